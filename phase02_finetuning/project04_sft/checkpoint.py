"""Checkpoints: a directory written atomically, read without unpickling anything.

model.safetensors   weights (safetensors: plain tensors, nothing executable)
config.json         model config, tokenizer name (tiktoken's "gpt2"), training metadata
train_state.pt      optimizer, step, RNG states: what --resume needs (read with weights_only=True)
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from cli import PROJECT, REPO_ROOT, UserError, command
from model import GPT, GPTConfig

DEFAULT_DIR = REPO_ROOT / "data" / "models" / PROJECT
FORMAT = 1


def save_checkpoint(
    out_dir: Path, model: GPT, meta: dict, train_state: dict | None = None, extra_files: dict | None = None
) -> None:
    """Write everything to a temporary directory, then swap it in. A crash at any moment leaves either the
    old checkpoint or the new one on disk, never a mix of the two. extra_files: {name: bytes} written
    alongside (the metrics log and loss curve, so they always describe exactly this checkpoint)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _sibling(out_dir, "tmp"), _sibling(out_dir, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied wte/lm_head weight
        config = {"format": FORMAT, "project": PROJECT, "model": asdict(model.config), **meta}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames: between them only `old` exists, and find_checkpoint() below falls back to it.
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from config.json and fill in its weights. Returns (model in eval mode, config)."""
    config = read_config(ckpt_dir)
    try:
        model = GPT(GPTConfig(**config["model"]))
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"checkpoint {ckpt_dir} has a model config this project cannot read ({e})") from e
    load_weights(model, ckpt_dir)
    return model.to(device).eval(), config


def load_weights(model: GPT, ckpt_dir: Path) -> None:
    path = find_checkpoint(Path(ckpt_dir)) / "model.safetensors"
    try:
        load_model(model, str(path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path.parent} is corrupt or does not match its config ({reason})") from e


def read_config(ckpt_dir: Path) -> dict:
    ckpt_dir = find_checkpoint(Path(ckpt_dir))
    try:
        config = json.loads((ckpt_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt_dir} is corrupt: its config.json is unreadable ({e})") from e
    required = ("model", "tokenizer", "training")
    if (
        not isinstance(config, dict)
        or config.get("format") != FORMAT
        or any(k not in config for k in required)
    ):
        raise UserError(f"checkpoint {ckpt_dir} has a config.json this project cannot read")
    return config


def load_train_state(ckpt_dir: Path) -> dict:
    path = find_checkpoint(Path(ckpt_dir)) / "train_state.pt"
    if not path.exists():
        raise UserError(f"{path.parent} has no train_state.pt to resume from (it holds weights only)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}); cannot resume from it") from e


def checkpoint_exists(ckpt_dir: Path) -> bool:
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / "config.json").exists() or (_sibling(ckpt_dir, "old") / "config.json").exists()


def find_checkpoint(ckpt_dir: Path) -> Path:
    """The checkpoint directory, or its previous version if a save was cut off between its two renames."""
    if (ckpt_dir / "config.json").exists():
        return ckpt_dir
    old = _sibling(ckpt_dir, "old")
    if (old / "config.json").exists():
        return old
    out = [] if ckpt_dir.resolve() == DEFAULT_DIR.resolve() else ["--out", str(ckpt_dir)]
    raise UserError(
        f"no checkpoint at {ckpt_dir}; train one first: "
        f"{command('train.py', '--preset', 'tiny', '--data', 'FILE', *out)}"
    )


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{suffix}")


def _fsync_dir(path: Path) -> None:
    """Flush the files to disk before the rename makes them the checkpoint."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
