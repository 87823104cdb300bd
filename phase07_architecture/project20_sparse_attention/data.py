"""The short training loop's data: a UTF-8 text file as GPT-2 tokens (the first 90% to train on, the rest held
out), or the token shards that project 07's prepare.py writes (its train and val files); and random windows
of them, drawn by a generator that a checkpoint saves, so that --resume draws what an unbroken run would."""

import re
from pathlib import Path

import numpy as np
import torch

from cli import REPO_ROOT, UserError
from tokenizer import EOT, gpt2_encoding

DATA_DIR = REPO_ROOT / "data"
DEFAULT_SHARDS = DATA_DIR / "wikitext"  # where project 07's prepare.py writes WikiText-103's shards
SHARD_MAGIC, SHARD_HEADER_INTS = 20240520, 256  # prepare.py's (llm.c's) shard: 256 int32s, then uint16 tokens


def read_text(path: str | Path) -> str:
    """A local UTF-8 text file, with one-line errors for the usual mistakes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from e
    if not text:
        raise UserError(f"data file {path} is empty")
    return text


def encode_text_file(path: Path) -> np.ndarray:
    """A text file as prepare.py tokenizes it: documents between blank lines, each after an <|endoftext|>
    (encode_ordinary reads a literal "<|endoftext|>" in the text as plain text, so none is forged)."""
    docs = [d for d in re.split(r"\n(?:[^\S\n]*\n)+", read_text(path)) if d.strip()]
    if not docs:
        raise UserError(f"data file {path} holds only whitespace")
    enc = gpt2_encoding()
    return np.concatenate([np.array([EOT, *enc.encode_ordinary(doc)], dtype=np.uint16) for doc in docs])


def read_shards(folder: Path, split: str) -> np.ndarray:
    """Every `split` shard in folder, in index order, as one array in memory: the sets trained here (up to
    WikiText-103's 120M tokens) fit, and project 07's loader streams the larger ones."""
    files = sorted(folder.glob(f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if not files:
        raise UserError(f"no {split} shards (NAME_{split}_000000.bin, ...) in {folder}; "
                        "write them with project 07's prepare.py, or pass --data FILE")  # fmt: skip
    parts = []
    for f in files:
        header = np.fromfile(f, dtype="<i4", count=SHARD_HEADER_INTS)
        tokens = np.fromfile(f, dtype="<u2", offset=4 * SHARD_HEADER_INTS)
        if len(header) < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[2] != len(tokens):
            raise UserError(f"{f} is not a complete token shard of prepare.py's (truncated by a copy?)")
        parts.append(tokens)
    return np.concatenate(parts)


def load_tokens(data: str | None, block_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, held-out tokens, what they are): a folder of shards (data/wikitext), or a text file, 90/10."""
    path = Path(data) if data else DEFAULT_SHARDS
    if path.is_dir() or data is None:
        train, val = read_shards(path, "train"), read_shards(path, "val")
    else:
        tokens = encode_text_file(path)
        train, val = tokens[: int(len(tokens) * 0.9)], tokens[int(len(tokens) * 0.9) :]
    for split, tokens in (("training", train), ("held-out", val)):
        if len(tokens) <= block_size:
            raise UserError(f"{path}'s {split} split has {len(tokens):,} tokens, not more than one context "
                            f"({block_size}); use more text")  # fmt: skip
    return train, val, f"{len(train):,} + {len(val):,} held-out tokens from {path.name}"


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator, device):
    """batch_size windows of block_size tokens at random places, and the same shifted by one: (B, T) each."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    rows = torch.from_numpy(np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1].to(device), rows[:, 1:].to(device)
