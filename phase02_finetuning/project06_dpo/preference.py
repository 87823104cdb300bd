"""Preference data for DPO: records (prompt, chosen, rejected), where a person (or a stronger model) judged
`chosen` the better response to the prompt. Both responses share one prompt, in project 04's Alpaca template:

    chosen row:   [prompt tokens] [chosen response] [<|endoftext|>]
    rejected row: [prompt tokens] [rejected response] [<|endoftext|>]
                   masked (-100)   scored: log p(response | prompt) is what DPO compares

A batch of B pairs is one padded tensor of 2B rows, chosen rows first, so one forward pass scores both.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError
from data import (
    DATA_DIR,
    NAMED_FILES,
    Example,
    ShuffledLoader,
    check_records,
    download_named,
    download_records,
    encode_example,
    pad_batch,
    read_records,
)

ORCA_DATASET = "Intel/orca_dpo_pairs"  # 12,859 pairs: GPT-4 answers (chosen) vs Llama-2-13B-chat (rejected)
ORCA_FILE = DATA_DIR / "orca_dpo_pairs" / "orca_dpo_pairs.json"
FIELDS = ("instruction", "chosen", "rejected")  # `input` is optional, as in Alpaca

# --- reading records ------------------------------------------------------------------------------------


def check_preference_records(records: list, source: str) -> list[dict]:
    """Alpaca-style checks on instruction/chosen/rejected (a missing or empty field is an error), then pairs
    whose two responses are identical are dropped with a warning. Identical responses have identical
    log-probabilities under any model, so such a pair's DPO margin is always 0: it adds a constant to the
    loss, no gradient, and counts as a miss in the accuracy. (The local preference file has 6 of them.)"""
    records = check_records(records, source, fields=FIELDS)
    kept = [r for r in records if r["chosen"] != r["rejected"]]
    if not kept:
        raise UserError(f"{source}: every record has the same 'chosen' and 'rejected' response")
    if len(kept) < len(records):
        print(
            f"warning: {source}: dropped {len(records) - len(kept)} records whose 'chosen' and 'rejected' "
            "responses are identical"
        )
    return kept


def orca_record(row: dict) -> dict:
    """One Intel/orca_dpo_pairs row (system, question, chosen, rejected) as an instruction record. The system
    prompt ("You are an AI assistant. Think step by step...") was in front of the question when the chosen
    answer was written, and it decides what "better" means (short or detailed, for a child or an expert).
    Our template has no slot for it, so it goes in front of the instruction."""
    system = (row.get("system") or "").strip()
    instruction = f"{system}\n\n{row['question']}" if system else row["question"]
    return {"instruction": instruction, "input": "", "chosen": row["chosen"], "rejected": row["rejected"]}


def _usable(record: dict) -> bool:
    return all(isinstance(record[f], str) and record[f].strip() for f in FIELDS) and (
        record["chosen"] != record["rejected"]
    )


def download_orca() -> Path:
    """Intel/orca_dpo_pairs, saved once as data/orca_dpo_pairs/orca_dpo_pairs.json. A hub data set is not ours
    to fix: a row with an empty or identical chosen/rejected response is dropped here (None)."""

    def to_record(row: dict) -> dict | None:
        record = orca_record(row)
        return record if _usable(record) else None

    return download_records(ORCA_DATASET, ORCA_FILE, to_record, "instruction/input/chosen/rejected")


def load_preference_records(data: str | Path | None) -> tuple[list[dict], str]:
    """(records, where they came from): --data FILE, instruction-data-with-preference (1,100 records,
    downloaded once), or Intel/orca_dpo_pairs (downloaded on first use)."""
    if data is None:
        path = download_orca()
    else:
        path = download_named(str(data)) if str(data) in NAMED_FILES else Path(data)
    return check_preference_records(read_records(path), str(path)), path.name


# --- tokens ---------------------------------------------------------------------------------------------


@dataclass
class PairExample:
    chosen: Example  # prompt + chosen response + <|endoftext|>
    rejected: Example  # the same prompt tokens + rejected response + <|endoftext|>


def encode_pair(record: dict) -> PairExample:
    """NEW: each response becomes an SFT example of the same prompt. The prompt is encoded on its own
    (data.encode_example), so both rows condition on exactly the same prompt tokens."""
    return PairExample(
        chosen=encode_example({**record, "output": record["chosen"]}),
        rejected=encode_example({**record, "output": record["rejected"]}),
    )


def encode_pairs(records: list[dict], block_size: int, what: str) -> list[PairExample]:
    """Tokenize records; drop (with a warning) pairs where either side is longer than the context: cutting
    one response short would compare a truncated answer with a whole one."""
    pairs = [encode_pair(r) for r in records]
    fits = [p for p in pairs if max(len(p.chosen.ids), len(p.rejected.ids)) - 1 <= block_size]
    if not fits:
        raise UserError(
            f"every {what} pair is longer than the model's context ({block_size} tokens); start from a model "
            "with a longer one: project 04 fine-tuned from project 03's --preset cpu (128 tokens) or gpt2"
        )
    if len(fits) < len(pairs):
        print(
            f"warning: dropped {len(pairs) - len(fits)} of {len(pairs)} {what} pairs longer than the "
            f"context ({block_size} tokens)"
        )
    return fits


# --- batches --------------------------------------------------------------------------------------------


def pair_batch(pairs: list[PairExample], index: list[int] | None = None) -> dict[str, torch.Tensor]:
    """NEW: B pairs as one right-padded batch of 2B rows: rows [0, B) the chosen responses, rows [B, 2B) the
    rejected ones in the same order. One forward pass then scores both sides: x (2B, T), y (2B, T) with
    IGNORE on prompt and padding targets. index (B,): which pairs these are (for precomputed references)."""
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])
    batch["index"] = torch.tensor(index if index is not None else range(len(pairs)), dtype=torch.long)
    return batch


class PairLoader(ShuffledLoader):
    """Batches of pairs in a shuffled order that changes every epoch (data.ShuffledLoader: resumable)."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        index = [self._take_index() for _ in range(self.batch_size)]
        return pair_batch([self.items[i] for i in index], index)


def eval_pair_batches(pairs: list[PairExample], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The held-out pairs in a fixed order: every evaluation scores exactly the same pairs."""
    starts = range(0, len(pairs), batch_size)
    return [
        pair_batch(pairs[i : i + batch_size], list(range(i, min(i + batch_size, len(pairs))))) for i in starts
    ]
