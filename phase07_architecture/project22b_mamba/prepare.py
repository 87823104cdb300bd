"""Tokenize a corpus once into GPT-2 token shards (shards.py) that train.py streams from.

python prepare.py                          # WikiText-103 (~120M tokens) -> data/wikitext/
python prepare.py --dataset fineweb-edu    # FineWeb-Edu sample-10BT (~10B tokens) -> data/fineweb-edu/
python prepare.py --data input.txt         # any local UTF-8 text -> data/input/
python prepare.py --dataset fineweb-edu --max-docs 20000 --shard-tokens 1000000   # a quick look

Every document becomes <|endoftext|> followed by its GPT-2 tokens, so the model sees where one text ends and
an unrelated one begins (GPT-2 was trained the same way). Documents are encoded in parallel worker processes,
in order, and packed back to back into shards of exactly --shard-tokens tokens (the last one shorter),
validation shards first.

Where the validation split comes from:
  wikitext      the dataset's own validation split
  fineweb-edu   the first --shard-tokens tokens of the stream (one shard, as in llm.c), or with --max-docs N
                the first N/10 documents
  --data FILE   the last 10% of the file's tokens. A document is a block of text between blank lines (lines
                of only whitespace, which are dropped); a file without blank lines, or any file with
                --one-document, is one document.
"""

import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import ArgumentParser, UserError, exits_cleanly, positive_int, unwritable
from data import DATA_DIR, read_text, split_documents, tokenize
from shards import SPLITS, shard_name, write_shard
from tokenizer import gpt2_encoding

DATASETS = ("wikitext", "fineweb-edu")
VAL_FRACTION = 0.1


def tokenize_all(docs: Iterable[str], workers: int, desc: str) -> Iterator[np.ndarray]:
    """tokenize() over docs in worker processes, in order, with a progress bar counting tokens."""
    gpt2_encoding()  # load (or fail) once here, before the fork, so workers inherit it
    with tqdm(desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        if workers == 1:  # no pool: simplest to debug, and nothing to gain on one core
            for tokens in map(tokenize, docs):
                bar.update(len(tokens))
                yield tokens
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            # imap keeps the order and streams: at most a few chunks of documents are in flight, whatever
            # the corpus size. 16 documents a chunk amortizes the pickling round trips.
            for tokens in pool.imap(tokenize, docs, chunksize=16):
                bar.update(len(tokens))
                yield tokens


class ShardWriter:
    """Packs token arrays back to back into shards of exactly shard_tokens tokens; close() writes the rest."""

    def __init__(self, folder: Path, name: str, split: str, shard_tokens: int):
        self.folder, self.name, self.split = folder, name, split
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill, self.count, self.files = 0, 0, []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + take] = tokens[:take]
            self.fill, self.count, tokens = self.fill + take, self.count + take, tokens[take:]
            if self.fill == len(self.buf):
                self._flush()

    def _flush(self) -> None:
        path = self.folder / shard_name(self.name, self.split, len(self.files))
        self.files.append(write_shard(path, self.buf[: self.fill]))
        self.fill = 0

    def close(self) -> list[Path]:
        if self.fill:
            self._flush()
        return self.files


def write_shards(
    out_dir: Path, name: str, shard_tokens: int, fill: Callable[[ShardWriter, ShardWriter], None]
) -> tuple[list[Path], list[Path]]:
    """Call fill(val_writer, train_writer), then swap the new shards in for any old {name}_* ones.

    The shards are written to a temporary folder first: an interrupted run leaves the previous set intact
    rather than a mix of old and new files that list_shards() would happily load."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        val, train = (ShardWriter(tmp, name, split, shard_tokens) for split in ("val", "train"))
        fill(val, train)
        new = {split: w.close() for split, w in (("val", val), ("train", train))}
        for split in SPLITS:
            if not new[split]:
                raise UserError(f"the {split} split of {name} came out empty; give it more text")
        for split in SPLITS:
            for old in out_dir.glob(f"{name}_{split}_*.bin"):
                old.unlink()
        for files in new.values():
            for i, path in enumerate(files):
                os.replace(path, out_dir / path.name)
                files[i] = out_dir / path.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return new["train"], new["val"]


# ----------------------------------------------------------------------------------------------------------
# Where documents come from


def prepare_text(
    text: str,
    out_dir: str | Path,
    name: str,
    shard_tokens: int,
    workers: int,
    one_document: bool = False,
    max_docs: int | None = None,
) -> tuple[list[Path], list[Path]]:
    """Tokenize a local text into out_dir: the first 90% of its tokens as train shards, the last 10% as val.
    Returns (train files, val files)."""
    docs = split_documents(text, one_document)[:max_docs]
    if not docs:
        raise UserError(f"the text for {name} holds no documents (it is empty or only whitespace)")
    tokens = np.concatenate(list(tokenize_all(docs, workers, f"tokenizing {name}")))
    if len(tokens) < 2:
        raise UserError(f"{name} has {len(tokens)} token(s); a train/val split needs at least 2")
    n = int(len(tokens) * (1 - VAL_FRACTION))  # last 10% held out, as train.py --data FILE does

    def fill(val: ShardWriter, train: ShardWriter) -> None:
        val.add(tokens[n:])
        train.add(tokens[:n])

    return write_shards(Path(out_dir), name, shard_tokens, fill)


def wikitext_articles(rows: Iterable[str]) -> Iterator[str]:
    """WikiText stores one paragraph per row; an article starts at a row " = Title = " (one "=" a side:
    "= = Section = =" rows are headings inside it). Joining the rows between titles gives whole articles."""
    title = re.compile(r" = [^=].* = \n")
    article: list[str] = []
    for row in rows:
        if title.fullmatch(row) and any(r.strip() for r in article):
            yield "".join(article)
            article = []
        article.append(row)
    if any(r.strip() for r in article):
        yield "".join(article)


def load_hf(dataset: str, *args, **kwargs):
    """datasets.load_dataset, with a network failure turned into a one-line hint."""
    try:
        import datasets  # imported here: only the Hub datasets need it, and it is slow to import
    except ImportError as e:
        raise UserError(f"--dataset {dataset} needs the datasets package (pip install datasets)") from e
    return _guard(dataset, lambda: datasets.load_dataset(*args, **kwargs))


def _guard(dataset: str, call):
    try:
        return call()
    except Exception as e:  # the Hub client raises many types (HTTP, connection, file-not-found, ...)
        raise UserError(
            f"could not load {dataset} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "when offline, pass a local text file with --data FILE"
        ) from e


def guarded_texts(dataset: str, rows: Iterable) -> Iterator[str]:
    """The "text" field of each row; a stream that breaks mid-way (network) ends in the same hint."""
    it = iter(rows)
    while (row := _guard(dataset, lambda: next(it, None))) is not None:
        yield row["text"] if isinstance(row, dict) else row


def prepare_wikitext(out_dir: Path, shard_tokens: int, workers: int, max_docs: int | None):
    ds = load_hf("WikiText-103", "Salesforce/wikitext", "wikitext-103-raw-v1")

    def fill(val: ShardWriter, train: ShardWriter) -> None:
        for split, writer in (("validation", val), ("train", train)):
            docs = islice(wikitext_articles(guarded_texts("WikiText-103", ds[split]["text"])), max_docs)
            for tokens in tokenize_all(docs, workers, f"tokenizing wikitext {split}"):
                writer.add(tokens)

    return write_shards(out_dir, "wikitext", shard_tokens, fill)


def prepare_fineweb(out_dir: Path, shard_tokens: int, workers: int, max_docs: int | None):
    stream = load_hf(
        "FineWeb-Edu", "HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True
    )
    docs = islice(guarded_texts("FineWeb-Edu", stream), max_docs)
    val_docs = max(1, max_docs // 10) if max_docs else None

    def fill(val: ShardWriter, train: ShardWriter) -> None:
        for i, tokens in enumerate(tokenize_all(docs, workers, "tokenizing fineweb-edu")):
            if val_docs is not None:
                (val if i < val_docs else train).add(tokens)
            else:  # the first shard_tokens tokens are val, even if that cuts a document in two (llm.c)
                room = max(0, shard_tokens - val.count)
                val.add(tokens[:room])
                train.add(tokens[room:])

    return write_shards(out_dir, "fineweb-edu", shard_tokens, fill)


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = ArgumentParser(description="Tokenize a corpus into GPT-2 token shards for train.py.")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset", choices=DATASETS, default=None, help="a Hugging Face corpus (default: wikitext)"
    )
    source.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a local UTF-8 text instead: documents separated by blank lines, the last 10%% of tokens as val",
    )
    p.add_argument("--one-document", action="store_true", help="with --data: the whole file is one document")
    p.add_argument(
        "--overwrite", action="store_true", help="replace shards of the same name already in --out"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: data/<dataset or file name>/)"
    )
    p.add_argument(
        "--shard-tokens",
        type=positive_int,
        default=100_000_000,
        help="tokens per shard (2 bytes each)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="tokenizer processes (default: all cores)",
    )
    p.add_argument(
        "--max-docs",
        type=positive_int,
        default=None,
        metavar="N",
        help="read only the first N documents (wikitext: of each split), for a quick run",
    )
    return p.parse_args(argv)


def check_out(out_dir: Path, name: str, overwrite: bool) -> None:
    """Shards go into a folder of their own: never among other files (train.py would read whatever shards
    are there), and replacing shards of the same name needs --overwrite, since a run trained on them can then
    no longer --resume exactly (its saved position points into them)."""
    if unwritable(out_dir):
        raise UserError(f"cannot write --out {out_dir}: {unwritable(out_dir)}")
    ours = re.compile(rf"{re.escape(name)}_({'|'.join(SPLITS)})_\d{{6}}\.bin")
    present = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")] if out_dir.exists() else []
    others = [f for f in present if not ours.fullmatch(f)]
    if others:
        raise UserError(
            f"--out {out_dir} holds other files ({others[0]}, ...); shards go into a folder of their own"
        )
    if present and not overwrite:
        raise UserError(
            f"{out_dir} already holds {name} shards; pass --overwrite to replace them (a run trained "
            "on them then cannot --resume exactly)"
        )


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_document and args.data is None:
        raise UserError("--one-document applies to --data FILE only")
    name = args.data.stem if args.data is not None else args.dataset or "wikitext"
    out_dir = args.out or DATA_DIR / name
    check_out(out_dir, name, args.overwrite)
    if args.data is not None:
        text = read_text(args.data)
        train, val = prepare_text(
            text, out_dir, name, args.shard_tokens, args.workers, args.one_document, args.max_docs
        )
    else:
        prepare = prepare_wikitext if name == "wikitext" else prepare_fineweb
        train, val = prepare(out_dir, args.shard_tokens, args.workers, args.max_docs)
    print(f"wrote {len(train)} train and {len(val)} val shard(s) to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
