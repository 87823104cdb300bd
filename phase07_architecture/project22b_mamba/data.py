"""Pre-training data: documents as GPT-2 tokens, and batch loaders over token shards (prepare.py) or over a
small local text file."""

import re
from pathlib import Path

import numpy as np

from cli import REPO_ROOT, UserError
from shards import ShardLoader, TokenLoader, list_shards
from tokenizer import EOT, gpt2_encoding

DATA_DIR = REPO_ROOT / "data"
DEFAULT_SHARDS = DATA_DIR / "wikitext"


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


def tokenize(doc: str) -> np.ndarray:
    """One document -> [<|endoftext|>, its tokens...] as uint16: the separator before every document teaches
    the model where one starts. encode_ordinary treats a literal "<|endoftext|>" in the text as plain text,
    so no document can forge a separator."""
    return np.array([EOT, *gpt2_encoding().encode_ordinary(doc)], dtype=np.uint16)


def split_documents(text: str, one_document: bool = False) -> list[str]:
    """Blocks of text between blank lines (the blank lines themselves dropped), or the whole text as one."""
    # A separator is a line break followed by one or more whitespace-only lines; the indentation of the
    # next document's first line stays with it.
    docs = [text] if one_document else re.split(r"\n(?:[^\S\n]*\n)+", text)
    return [d for d in docs if d.strip()]


def encode_text_file(path: Path) -> np.ndarray:
    """A small text file, tokenized in this process as prepare.py would: documents between blank lines, each
    after an <|endoftext|>."""
    return np.concatenate([tokenize(doc) for doc in split_documents(read_text(path))])


def make_loaders(data: str | Path | None, batch_size: int, block_size: int, d):
    """The training loader for this rank, a factory of fresh validation loaders (so every evaluation
    reads the same batches), and a description. `data`: a folder of shards from prepare.py (default:
    data/wikitext), or a text file, tokenized here and split 90/10."""
    path = Path(data) if data is not None else DEFAULT_SHARDS
    if path.is_dir() or data is None:
        if not path.is_dir():
            raise UserError(f"no token shards in {path}; make them first: python prepare.py "
                            "(WikiText-103), or pass --data FILE")  # fmt: skip
        train_files, val_files = list_shards(path, "train"), list_shards(path, "val")
        train = ShardLoader(train_files, batch_size, block_size, d.rank, d.world_size)

        def make_val():
            return ShardLoader(val_files, batch_size, block_size, d.rank, d.world_size)

        make_val()  # checks now that the validation shards are large enough, before any training
        return train, make_val, f"{len(train_files)} train + {len(val_files)} val shards in {path}"
    tokens = encode_text_file(path)
    n = int(len(tokens) * 0.9)
    train = TokenLoader(tokens[:n], batch_size, block_size, d.rank, d.world_size)

    def make_val():
        return TokenLoader(tokens[n:], batch_size, block_size, d.rank, d.world_size)

    make_val()
    return train, make_val, f"{len(tokens):,} tokens from {path.name} (90% train)"
