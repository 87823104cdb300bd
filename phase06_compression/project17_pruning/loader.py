"""What pruning loads: the trained models it prunes (this lineage's checkpoints, project 01's character
model, GPT-2's weights), their tokenizers and text, and the calibration windows Wanda, SparseGPT and the
Taylor scores read. A module the scripts share (prune.py, generate.py, benchmark.py), so that no script
imports another. A pruned checkpoint is an ordinary one: load_checkpoint reads it."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from checkpoint import DEFAULT_DIR, MODELS_DIR, find_checkpoint, load_checkpoint, read_config
from cli import UserError
from data import DATA_DIR, DEFAULT_SHARDS, encode_text_file, read_shards, read_text
from hf import load_gpt2
from model import GPT, GPTConfig
from tokenizer import GPT2Tokenizer

PRUNED_DIR = MODELS_DIR / f"{DEFAULT_DIR.name}-pruned"  # prune.py's, never train.py's folder
PROJECT01 = MODELS_DIR / "project01_minimal_gpt"  # the benchmark's model: its weights are in its blocks
TINY_SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"  # what project 01 trains on by default


def load_float_model(checkpoint: Path, init_from: str | None, device) -> tuple[GPT, dict]:
    """The model to prune and the metadata its pruned checkpoint keeps (tokenizer, training)."""
    if init_from:
        model = load_gpt2(init_from, cache_dir=DATA_DIR / "hf").to(device).eval()
        return model, {
            "tokenizer": {"type": "tiktoken", "name": "gpt2"},
            "training": {"init_from": init_from},
        }
    config = read_config(checkpoint, tokenizer=tokenizer_kind(checkpoint))
    if config["project"] == PROJECT01.name:  # its layout (a QAT run of it keeps characters, not its layout)
        try:
            model = GPT(model_config(config))
        except (TypeError, ValueError, AssertionError) as e:
            raise UserError(
                f"checkpoint {checkpoint} has a model config this project cannot read ({e})"
            ) from e
        load_project01_weights(model, checkpoint)
        model = model.to(device).eval()
    else:
        model, config = load_checkpoint(checkpoint, device)
    return model, {"tokenizer": config["tokenizer"], "training": config["training"]}


def model_config(config: dict) -> GPTConfig:
    """A checkpoint's model config for this GPT. Project 01's config does not record its GELU: its model
    computes the exact one (since 2026-12-07; older runs used the tanh form, within 5e-4 of it). A checkpoint
    that this GPT wrote records its own `gelu` (a QAT run of project 01's model keeps "none")."""
    mc = GPTConfig(**config["model"])
    return replace(mc, gelu="none") if config["project"] == PROJECT01.name else mc


def token_split(data: Path, split: str, chars: str | None = None) -> np.ndarray:
    """The "train" or "val" tokens of a folder of project 07's shards, or of a text file split 90/10 as
    train.py splits it; with `chars`, as project 01's character ids (project 01 splits the same way)."""
    if data.is_dir() and chars:
        raise UserError(
            f"{data} holds GPT-2 token shards; a character model reads a text file: pass --data FILE"
        )
    if data.is_dir():
        return read_shards(data, split)
    tokens = encode_text(data, chars)
    n = int(len(tokens) * 0.9)
    return tokens[:n] if split == "train" else tokens[n:]


# --- project 01's character model: nearly all of its weights are in the blocks that pruning touches ---


class CharTokenizer:
    """Project 01's tokenizer: one id per character of the model's training text."""

    def __init__(self, chars: str):
        self.chars, self.ids = chars, {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise UserError(f"characters outside the model's {len(self.chars)}-character vocabulary: {shown}")
        return [self.ids[c] for c in text]

    def id_to_bytes(self, token_id: int) -> bytes:
        return self.chars[token_id].encode()


def encode_text(path: Path, chars: str | None) -> np.ndarray:
    """A text file's token ids: GPT-2's, as train.py reads the file, or project 01's characters."""
    if chars is None:
        return encode_text_file(path)
    try:
        return np.array(CharTokenizer(chars).encode(read_text(path)), dtype=np.uint16)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e


def tokenizer_kind(ckpt_dir: Path) -> str:
    """The tokenizer to require of a checkpoint (read_config refuses any other, naming the project that wrote
    it): project 01's characters if it has them, else GPT-2's."""
    return "char" if read_config(ckpt_dir)["tokenizer"].get("type") == "char" else "tiktoken"


Tokenizer = GPT2Tokenizer | CharTokenizer  # what generate.py encodes prompts and decodes tokens with


def tokenizer_for(spec: dict) -> Tokenizer:
    """The tokenizer a checkpoint's config.json names."""
    return CharTokenizer(spec["chars"]) if spec["type"] == "char" else GPT2Tokenizer()


def load_project01_weights(model: GPT, ckpt_dir: Path) -> None:
    """Project 01 keeps its tied embedding once, as lm_head, with one row per character; this GPT pads the
    vocabulary to a multiple of 64 rows. The padding rows stay zero: their logits are sliced off before any
    softmax. The rest of the model is the same (tested: the same logits)."""
    path = find_checkpoint(ckpt_dir) / "model.safetensors"
    try:
        state = load_file(path)
        head = state.pop("lm_head.weight")  # (vocab_size, C)
        padded = head.new_zeros(model.lm_head.weight.shape)  # (padded vocab, C)
        padded[: len(head)] = head
        model.load_state_dict({**state, "wte.weight": padded, "lm_head.weight": padded}, strict=True)
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path.parent} is corrupt or does not match its config ({reason})") from e


def training_data(data: Path | None, meta: dict) -> Path:
    """--data, else what the checkpoint was trained on (train.py records it; None means its default: this
    lineage's shards, or Tiny Shakespeare for project 01's character model)."""
    if data is not None:
        return data
    recorded = meta["training"].get("data")
    if recorded is None and "preset" not in meta["training"]:  # GPT-2's weights: no train.py run recorded
        raise UserError("GPT-2's weights come without their training data: pass --data FILE for calibration")
    data = Path(recorded or (TINY_SHAKESPEARE if meta["tokenizer"].get("type") == "char" else DEFAULT_SHARDS))
    if not data.exists():
        raise UserError(f"the checkpoint was trained on {data}, which is not here: pass --data FILE")
    return data


def calibration_batch(tokens: np.ndarray, samples: int, length: int, seed: int) -> torch.Tensor:
    """(samples, length) token ids from random windows of the training split, as GPTQ draws its 128
    calibration sequences from random places in C4."""
    if len(tokens) < length:
        raise UserError(
            f"the calibration data has {len(tokens)} tokens, fewer than one {length}-token window"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length + 1, (samples,), generator=g).tolist()
    return torch.stack([torch.from_numpy(tokens[s : s + length].astype(np.int64)) for s in starts])
