"""Instruction data for supervised fine-tuning: Alpaca-format records (instruction, input, output), the prompt
template, tokenization with a loss mask over the response, and batches padded or packed.

A record becomes one token sequence:

    [template + instruction (+ input) ... "### Response:\\n"] [response tokens] [<|endoftext|>]
     prompt: masked out of the loss (target -100)            trained            trained: learns to stop
"""

import hashlib
import json
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import REPO_ROOT, UserError
from tokenizer import EOT, gpt2_encoding

DATA_DIR = REPO_ROOT / "data"
ALPACA_FILE = DATA_DIR / "alpaca" / "alpaca.json"
ALPACA_DATASET = "tatsu-lab/alpaca"  # Stanford Alpaca's 52,002 records, on the Hugging Face Hub
# Small files for a first run, by name (--data instruction-data): LLMs-from-scratch's chapter 7 data
# (Apache-2.0), 1,100 records each; the second adds a chosen and a rejected response to every record.
LLMS_FROM_SCRATCH = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
NAMED_FILES = {  # name -> (URL, sha256)
    "instruction-data": (
        LLMS_FROM_SCRATCH + "01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    ),
    "instruction-data-with-preference": (
        LLMS_FROM_SCRATCH + "04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    ),
}
IGNORE = -100  # target id that F.cross_entropy skips (its default ignore_index)
HELD_OUT = 0.1  # fraction of the records kept for evaluation, chosen by a fixed shuffle
SPLIT_SEED = 0  # the held-out split never changes with --seed: before/after losses stay comparable

# the Alpaca prompt template (Taori et al. 2023). The model only ever sees instructions in this shape,
# so generate.py must wrap a user's instruction in exactly the same text.
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def format_prompt(instruction: str, input: str = "") -> str:
    """Everything before the response: the text the model conditions on."""
    if input:
        return (
            f"{PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
            "### Response:\n"
        )
    return f"{PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


# --- reading records ------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict]:
    """A local JSON file (a list of records) or JSON Lines file (one record per line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from e
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, list):  # not one JSON array: try JSON Lines
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path} is neither a JSON list nor JSON Lines (line {n}: {e.msg})"
                    ) from e
    if not data:
        raise UserError(f"{path} holds no records")
    return data


def check_records(
    records: list, source: str, fields: tuple[str, ...] = ("instruction", "output")
) -> list[dict]:
    """Every record must be an object with non-empty string `fields`; `input` is optional. Returns the
    records with `input` filled in as "" where absent."""
    checked = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{source}: record {i} is not a JSON object")
        for field in fields:
            if field not in r:
                raise UserError(
                    f"{source}: record {i} has no {field!r} field (each record needs {', '.join(fields)}; "
                    "'input' is optional)"
                )
            if not isinstance(r[field], str) or not r[field].strip():
                raise UserError(f"{source}: record {i} has an empty or non-text {field!r}")
        if not isinstance(r.get("input", ""), str):
            raise UserError(f"{source}: record {i} has a non-text 'input'")
        checked.append({**r, "input": r.get("input") or ""})
    return checked


def download_records(dataset: str, path: Path, to_record, fields: str) -> Path:
    """A Hugging Face data set through `datasets`, each row made a record by to_record (None drops the row),
    saved once as a JSON list at path. fields names the record fields, for the --data hint."""
    if path.exists():
        return path
    try:
        import datasets  # imported here: only the download needs it

        rows = datasets.load_dataset(dataset, split="train", cache_dir=str(DATA_DIR / "hf"))
        converted = [to_record(r) for r in rows]
    except Exception as e:  # offline, proxy, missing package: each raises its own type
        raise UserError(
            f"could not download {dataset} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            f"pass a local JSON or JSONL file of {fields} records with --data FILE"
        ) from e
    records = [r for r in converted if r is not None]
    if len(records) < len(converted):
        print(f"note: dropped {len(converted) - len(records)} of {len(converted)} unusable {dataset} rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, path)  # a cut-off download never leaves half a file under the real name
    return path


def download_alpaca() -> Path:
    """Stanford Alpaca, saved once as data/alpaca/alpaca.json."""
    fields = ("instruction", "input", "output")
    return download_records(
        ALPACA_DATASET, ALPACA_FILE, lambda r: {k: r[k] for k in fields}, "/".join(fields)
    )


def download_named(name: str) -> Path:
    """One of NAMED_FILES, downloaded once into data/<name>/<name>.json with a progress bar, its sha256
    checked before the file appears under its real name."""
    url, sha256 = NAMED_FILES[name]
    dest = DATA_DIR / name / f"{name}.json"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := response.read(1 << 16):
                    bar.update(f.write(chunk))
        if hashlib.sha256(tmp.read_bytes()).hexdigest() != sha256:
            raise UserError(f"download of {url} is corrupt (its sha256 differs); run again, or pass a local "
                            "JSON file with --data FILE")  # fmt: skip
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"could not download {url} ({e}); pass a local JSON file with --data FILE") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def load_records(data: str | Path | None) -> tuple[list[dict], str]:
    """(records, where they came from): --data FILE, a name from NAMED_FILES, or Alpaca (downloaded on first
    use)."""
    if data is None:
        path = download_alpaca()
    else:
        path = download_named(str(data)) if str(data) in NAMED_FILES else Path(data)
    return check_records(read_records(path), str(path)), path.name


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a fixed shuffle, then the last 10% (at least one record) held out."""
    if len(records) < 2:
        raise UserError(f"need at least 2 records (one to train on, one to hold out), got {len(records)}")
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = max(1, round(len(records) * HELD_OUT))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


# --- tokens and loss masks ------------------------------------------------------------------------------


@dataclass
class Example:
    ids: np.ndarray  # prompt + response + <|endoftext|>, int64
    n_prompt: int  # how many of ids are prompt tokens (masked out of the loss)


def encode_example(record: dict) -> Example:
    """Prompt and response are encoded separately and concatenated, so the prompt's tokens are exactly
    those generate.py will feed (BPE across the seam could otherwise merge differently)."""
    enc = gpt2_encoding()
    prompt = enc.encode_ordinary(format_prompt(record["instruction"], record["input"]))
    response = enc.encode_ordinary(record["output"])
    return Example(np.array([*prompt, *response, EOT], dtype=np.int64), len(prompt))


def encode_examples(records: list[dict], block_size: int, what: str) -> list[Example]:
    """Tokenize records; drop (with a warning) those longer than the context, since cutting one would cut
    off its end-of-text and teach the model never to stop."""
    examples = [encode_example(r) for r in records]
    fits = [e for e in examples if len(e.ids) - 1 <= block_size]  # inputs are ids[:-1]
    if not fits:
        raise UserError(
            f"every {what} record is longer than the model's context ({block_size} tokens); start from a "
            "model with a longer one: project 03 trained with --preset cpu (128 tokens) or gpt2 (1024)"
        )
    if len(fits) < len(examples):
        print(
            f"warning: dropped {len(examples) - len(fits)} of {len(examples)} {what} records longer than "
            f"the context ({block_size} tokens)"
        )
    return fits


def inputs_and_targets(e: Example) -> tuple[np.ndarray, np.ndarray]:
    """Next-token pairs; targets that predict a prompt token are IGNORE. The first response token is
    predicted from the last prompt position, so the mask starts one position before the response."""
    x, y = e.ids[:-1], e.ids[1:].copy()
    y[: e.n_prompt - 1] = IGNORE
    return x, y


# --- batches --------------------------------------------------------------------------------------------


def pad_batch(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Rows padded on the right to the longest example. Causal attention never looks right, so the padding
    cannot change a real token's output; its targets are IGNORE, so it adds nothing to the loss."""
    T = max(len(e.ids) - 1 for e in examples)
    x = torch.full((len(examples), T), EOT, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        xi, yi = inputs_and_targets(e)
        x[row, : len(xi)], y[row, : len(yi)] = torch.from_numpy(xi), torch.from_numpy(yi)
    return {"x": x, "y": y}


def pack_batch(rows: list[list[Example]]) -> dict[str, torch.Tensor]:
    """With --pack, several examples share a row of block_size tokens, so little compute goes to padding.
    `segments` numbers the examples within a row; the model lets a token attend only inside its own
    example and restarts positions at each, so a packed example sees exactly what it would alone."""
    T = max(sum(len(e.ids) - 1 for e in row) for row in rows)  # at most block_size, by construction
    x = torch.full((len(rows), T), EOT, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: the padding at the end
    for r, row in enumerate(rows):
        t = 0
        for s, e in enumerate(row):
            xi, yi = inputs_and_targets(e)
            x[r, t : t + len(xi)], y[r, t : t + len(yi)] = torch.from_numpy(xi), torch.from_numpy(yi)
            segments[r, t : t + len(xi)] = s
            t += len(xi)
    return {"x": x, "y": y, "segments": segments}


class ShuffledLoader:
    """Items in a shuffled order that changes every epoch. The order is a function of (seed, epoch) only, so
    the position in the data is two integers: a resumed run reads exactly the batches it would have read."""

    def __init__(self, items: list, batch_size: int, seed: int):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _take_index(self) -> int:
        if self.pos == len(self._order):  # end of an epoch: a fresh order
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._order_for(self.epoch)
        self.pos += 1
        return self._order[self.pos - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._order_for(self.epoch)


class SFTLoader(ShuffledLoader):
    """Batches of examples: batch_size rows, each one example (padded) or, with pack=True, as many whole
    examples as fit in block_size tokens."""

    def __init__(self, examples: list[Example], batch_size: int, block_size: int, pack: bool, seed: int):
        super().__init__(examples, batch_size, seed)
        self.block_size, self.pack = block_size, pack

    def _take(self):
        return self.items[self._take_index()]

    def _peek(self):
        """The item _take() returns next, without taking it."""
        if self.pos < len(self._order):
            return self.items[self._order[self.pos]]
        return self.items[self._order_for(self.epoch + 1)[0]]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.pack:
            return pad_batch([self._take() for _ in range(self.batch_size)])
        rows = []
        for _ in range(self.batch_size):
            row = [self._take()]
            used = len(row[0].ids) - 1
            while used + len(self._peek().ids) - 1 <= self.block_size:  # whole examples only: never split one
                row.append(self._take())
                used += len(row[-1].ids) - 1
            rows.append(row)
        return pack_batch(rows)


def eval_batches(examples: list[Example], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The held-out set in a fixed order, padded: every evaluation scores exactly the same tokens."""
    return [pad_batch(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
