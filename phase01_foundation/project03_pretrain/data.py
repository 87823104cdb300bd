"""Pre-training data: tiktoken's GPT-2 encoding, and batch loaders over token shards (prepare.py) or over a
small local text file."""

import re
from pathlib import Path

import numpy as np
import tiktoken

from cli import REPO_ROOT, UserError
from shards import ShardLoader, list_shards

DATA_DIR = REPO_ROOT / "data"
DEFAULT_SHARDS = DATA_DIR / "wikitext"
EOT = 50256  # GPT-2's <|endoftext|>: written before every document, so the model learns where one starts


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


_encoding: tiktoken.Encoding | None = None  # per process: forked workers inherit the parent's


def gpt2_encoding() -> tiktoken.Encoding:
    """NEW: GPT-2's tokenizer, as tiktoken ships it (project 02 showed ours gives the same ids)."""
    global _encoding
    if _encoding is None:
        try:
            _encoding = tiktoken.get_encoding("gpt2")
        except (OSError, ValueError) as e:  # requests' errors are OSErrors; a bad download is a ValueError
            raise UserError(
                f"cannot load tiktoken's GPT-2 encoding ({e}); it is downloaded once into tiktoken's cache "
                "(TIKTOKEN_CACHE_DIR) and needs the internet that first time"
            ) from e
    return _encoding


def tokenize(doc: str) -> np.ndarray:
    """One document -> [<|endoftext|>, its tokens...] as uint16. encode_ordinary treats a literal
    "<|endoftext|>" in the text as plain text, so no document can forge a separator."""
    return np.array([EOT, *gpt2_encoding().encode_ordinary(doc)], dtype=np.uint16)


def split_documents(text: str, one_document: bool = False) -> list[str]:
    """Blocks of text between blank lines (the blank lines themselves dropped), or the whole text as one."""
    # A separator is a line break followed by one or more whitespace-only lines; the indentation of the
    # next document's first line stays with it.
    docs = [text] if one_document else re.split(r"\n(?:[^\S\n]*\n)+", text)
    return [d for d in docs if d.strip()]


class GPT2Tokenizer:
    """tiktoken's GPT-2 encoding behind the two methods generate.py uses."""

    def __init__(self):
        self.enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")  # "<|endoftext|>" in a prompt is the special id

    def id_to_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)


def encode_text_file(path: Path) -> np.ndarray:
    """A small text file, tokenized in this process as prepare.py would: documents between blank lines, each
    after an <|endoftext|>."""
    return np.concatenate([tokenize(doc) for doc in split_documents(read_text(path))])


def make_loaders(data: str | Path | None, batch_size: int, block_size: int, d):
    """NEW: the training loader for this rank, a factory of fresh validation loaders (so every evaluation
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
    train = ShardLoader.from_tokens(tokens[:n], batch_size, block_size, d.rank, d.world_size)

    def make_val():
        return ShardLoader.from_tokens(tokens[n:], batch_size, block_size, d.rank, d.world_size)

    make_val()
    return train, make_val, f"{len(tokens):,} tokens from {path.name} (90% train)"
