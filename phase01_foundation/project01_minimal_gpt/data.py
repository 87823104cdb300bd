"""Tiny Shakespeare: download once, read as UTF-8, map characters to ids, and cut random training windows."""

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from cli import REPO_ROOT, UserError

DATA_DIR = REPO_ROOT / "data"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch url to dest once, with a progress bar; verify the checksum before the file appears."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = hashlib.md5(tmp.read_bytes()).hexdigest()
        if got != md5:
            raise UserError(
                f"download of {url} is corrupt (md5 {got}, expected {md5}); run again, "
                "or pass a local text file with --data FILE"
            )
        os.replace(tmp, dest)  # atomic: dest is either absent or complete
    except (urllib.error.URLError, OSError) as e:
        raise UserError(
            f"could not download {url} ({e}); when offline, pass a local text file with --data FILE"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def tiny_shakespeare() -> Path:
    return download(TINY_SHAKESPEARE_URL, DATA_DIR / "tinyshakespeare" / "input.txt", TINY_SHAKESPEARE_MD5)


def read_text(path: str | Path | None) -> str:
    """The training text: a local UTF-8 file, or Tiny Shakespeare (downloaded on first use)."""
    path = Path(path) if path is not None else tiny_shakespeare()
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


class CharTokenizer:
    """One token per character: the vocabulary is the sorted set of characters in the training text."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = "".join(unknown[:10])
            raise UserError(f"text has {len(unknown)} character(s) not in the model's vocabulary: {shown!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def train_val_split(ids: torch.Tensor, block_size: int, val_fraction: float = 0.1):
    """First 90% for training, last 10% for validation; both must hold at least one full window."""
    n = int(len(ids) * (1 - val_fraction))
    train, val = ids[:n], ids[n:]
    shortest = min(len(train), len(val))
    if shortest <= block_size:
        need = int((block_size + 1) / val_fraction) + 1
        raise UserError(
            f"data has {len(ids)} tokens; with a context of {block_size} it needs at least {need} "
            "(10% of it is held out for validation)"
        )
    return train, val


def get_batch(
    ids: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows: x = ids[i : i+T], y = ids[i+1 : i+T+1], the same text shifted by one.
    The generator alone decides the positions, so saving its state is enough to replay the data order."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    x = torch.stack([ids[i : i + block_size] for i in starts.tolist()])  # (B, T)
    y = torch.stack([ids[i + 1 : i + 1 + block_size] for i in starts.tolist()])  # (B, T)
    return x, y
