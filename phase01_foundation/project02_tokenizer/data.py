"""Tiny Shakespeare and GPT-2's tokenizer files: download once, read as UTF-8, choose a tokenizer, and cut
random training windows."""

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from cli import REPO_ROOT, UserError
from tokenizer import Tokenizer, train_bpe_from_text

DATA_DIR = REPO_ROOT / "data"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
# OpenAI's GPT-2 tokenizer files, with the sha256 digests tiktoken also checks.
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
SPECIAL_TOKENS = ["<|endoftext|>"]  # NEW: documents are separated by this token, never merged into others


def download(url: str, dest: Path, digest: str, algorithm: str = "md5", offline_hint: str = "") -> Path:
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
        got = hashlib.new(algorithm, tmp.read_bytes()).hexdigest()
        if got != digest:
            raise UserError(
                f"download of {url} is corrupt ({algorithm} {got}, expected {digest}); run again, "
                f"or pass {offline_hint or 'a local text file with --data FILE'}"
            )
        os.replace(tmp, dest)  # atomic: dest is either absent or complete
    except (urllib.error.URLError, OSError) as e:
        raise UserError(
            f"could not download {url} ({e}); when offline, pass "
            f"{offline_hint or 'a local text file with --data FILE'}"
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


def gpt2_tokenizer(folder: Path | None = None) -> Tokenizer:
    """GPT-2's own BPE (50,257 tokens) from its published encoder.json and vocab.bpe: those in `folder`, or
    downloaded once into data/gpt2/."""
    if folder is None:
        folder = DATA_DIR / "gpt2"
        for name, sha256 in GPT2_FILES.items():
            hint = "--tokenizer DIR (train) or --gpt2-files DIR (benchmark) with encoder.json and vocab.bpe"
            download(GPT2_URL + name, folder / name, sha256, "sha256", offline_hint=hint)
    try:
        return Tokenizer.from_gpt2_files(folder / "encoder.json", folder / "vocab.bpe")
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read GPT-2's encoder.json and vocab.bpe in {folder} ({e})") from e


def make_tokenizer(spec: str, text: str, vocab_size: int) -> tuple[Tokenizer, str]:
    """NEW: the tokenizer named by --tokenizer. "bpe" trains one on the text; "gpt2" is GPT-2's; a path is
    a file written by Tokenizer.save or a folder with GPT-2's two files. Returns (tokenizer, description)."""
    if spec == "bpe":
        if vocab_size <= 256 + len(SPECIAL_TOKENS):
            raise UserError(
                f"--vocab-size must be above {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)"
            )
        vocab, merges = train_bpe_from_text(text, vocab_size, SPECIAL_TOKENS)
        return Tokenizer(
            vocab, merges, SPECIAL_TOKENS
        ), f"byte-level BPE trained on the data, {len(vocab)} tokens"
    if spec == "gpt2":
        return gpt2_tokenizer(), "GPT-2"
    path = Path(spec)
    if path.is_dir():
        return gpt2_tokenizer(path), f"GPT-2 files in {path}"
    try:
        return Tokenizer.load(path), f"loaded from {path}"
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"--tokenizer {spec}: not bpe, gpt2, a saved tokenizer file or a GPT-2 folder ({e})"
        ) from e


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
