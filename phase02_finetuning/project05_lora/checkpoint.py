"""Checkpoints: a directory written atomically, read without unpickling anything; and the base models that
fine-tuning starts from.

model.safetensors     weights (safetensors: plain tensors, nothing executable), or, for a LoRA run:
adapter.safetensors   NEW: the LoRA tensors alone (a few MB), with adapter_config.json naming their base
config.json           model config, tokenizer name (tiktoken's "gpt2"), training metadata (+ lora, base)
train_state.pt        optimizer, step, RNG states: what --resume needs (read with weights_only=True)
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
from data import EOT
from hf import GPT2_MODELS, load_gpt2
from lora import LoRAConfig, load_adapter, load_lora_tensors, lora_layers, save_adapter
from model import GPT, GPTConfig

DEFAULT_DIR = REPO_ROOT / "data" / "models" / PROJECT
BASE_DIR = REPO_ROOT / "data" / "models" / "project03_pretrain"  # where fine-tuning starts by default
FORMAT = 1
# The model a run starts from when there is nothing to fine-tune (--init-from scratch, or no base found):
# random weights, so it can learn the template's shape but hardly any language. Its context fits every
# record of the local instruction file (at most 101 tokens).
SCRATCH_MODEL = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)


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
        if lora_layers(model):  # NEW: the frozen base is already on disk; save only what was trained
            save_adapter(tmp, model, LoRAConfig.from_dict(meta["lora"]), meta["base"])
        else:
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


def load_checkpoint(
    ckpt_dir: Path, device: torch.device | str = "cpu", base: str | None = None
) -> tuple[GPT, dict]:
    """Rebuild the model from config.json and fill in its weights. Returns (model in eval mode, config).
    NEW: an adapter checkpoint is loaded onto its base model (the one recorded, or `base`)."""
    config = read_config(ckpt_dir)
    if "lora" in config:
        try:
            model, _ = load_base(base or config["base"]["init_from"], torch.device(device))
        except UserError as e:  # load_base speaks of --init-from; here the base came from --base
            raise UserError(str(e).replace("--init-from", "--base", 1) if base else str(e)) from e
        load_adapter(find_checkpoint(Path(ckpt_dir)), model)  # refuses a different base model
        return model.eval(), config
    try:
        model = GPT(GPTConfig(**config["model"]))
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"checkpoint {ckpt_dir} has a model config this project cannot read ({e})") from e
    load_weights(model, ckpt_dir)
    return model.to(device).eval(), config


def load_weights(model: GPT, ckpt_dir: Path) -> None:
    """Fill in a model's weights from a checkpoint: all of them, or (adapter checkpoints) its LoRA tensors."""
    folder = find_checkpoint(Path(ckpt_dir))
    if (folder / "adapter.safetensors").exists():
        return load_lora_tensors(model, folder / "adapter.safetensors")
    path = folder / "model.safetensors"
    try:
        load_model(model, str(path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path.parent} is corrupt or does not match its config ({reason})") from e


def load_base(init_from: str, device: torch.device) -> tuple[GPT, str]:
    """The pre-trained model to fine-tune, and a description. `init_from`: "auto" (project 03's checkpoint,
    else a tiny random model), "scratch", gpt2/gpt2-medium/... (Hugging Face Hub), a folder in Hugging
    Face's GPT-2 format, or one of this repository's checkpoints (a merged one from merge.py, say)."""
    if init_from == "auto":
        if checkpoint_exists(BASE_DIR):
            init_from = str(BASE_DIR)
        else:
            print(
                f"note: no pre-trained checkpoint in {BASE_DIR}; fine-tuning a randomly initialised tiny "
                "model instead (it will learn the template, not language). Train project 03 first, or "
                "pass --init-from gpt2"
            )
            init_from = "scratch"
    if init_from == "scratch":
        torch.manual_seed(0)  # the same random base every time: an adapter can be loaded back onto it
        return GPT(SCRATCH_MODEL).to(device), "scratch"
    path = Path(init_from)
    if init_from in GPT2_MODELS or (path / "config.json").exists() and "model_type" in _json(path):
        try:
            model = load_gpt2(init_from, cache_dir=REPO_ROOT / "data" / "hf").to(device)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"--init-from {init_from}: {str(e).splitlines()[0]}") from e
        check_vocab(model, f"--init-from {init_from}")
        # A folder is recorded as an absolute path, like a checkpoint: benchmark.py reloads it from anywhere.
        return model, str(path.resolve()) if path.is_dir() else init_from
    if not checkpoint_exists(path):
        raise UserError(
            f"--init-from {init_from}: not a checkpoint, a Hugging Face GPT-2 folder, "
            f"nor one of {', '.join(GPT2_MODELS)}"
        )
    config = read_config(path)  # checked before any weights are read
    if config["tokenizer"].get("type") != "tiktoken":
        raise UserError(f"--init-from {path} was not trained on tiktoken's GPT-2 tokens")
    if "lora" in config:
        merge = command("merge.py", "--checkpoint", str(path))
        raise UserError(f"--init-from {path} is an adapter, not a whole model; merge it first: {merge}")
    model, _ = load_checkpoint(path, device)
    return model, str(path.resolve())


def check_vocab(model: GPT, what: str) -> None:
    """The records are GPT-2 tokens: a model with fewer rows cannot even embed them."""
    if model.config.vocab_size < EOT + 1:
        raise UserError(
            f"{what} has a vocabulary of {model.config.vocab_size} tokens; GPT-2's tokens need {EOT + 1}"
        )


def _json(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/config.json is unreadable ({e})") from e


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


def refuse_non_checkpoint_out(out: Path) -> None:
    """A non-empty folder (or a file) that holds no checkpoint is the user's, not ours to replace."""
    taken = out.exists() and (out.is_file() or any(out.iterdir()))
    if taken and not checkpoint_exists(out):
        raise UserError(f"--out {out} exists and is not a checkpoint directory; choose a new or empty one")


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
