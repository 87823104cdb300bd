"""Checkpoints: a directory written atomically, read without unpickling anything, and the rules that keep a
training run from ever destroying one by mistake.

model.safetensors   weights (safetensors: plain tensors, nothing executable)
config.json         the project that wrote it, the model config, the tokenizer, training metadata
train_state.pt      optimizer, step, RNG states, data position: what --resume needs (weights_only=True)
metrics.jsonl       every step's loss and every evaluation, and loss_curve.png drawn from them
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from cli import PROJECT, REPO_ROOT, UserError, command, project_folder, unwritable
from model import GPT, GPTConfig

MODELS_DIR = REPO_ROOT / "data" / "models"
DEFAULT_DIR = MODELS_DIR / PROJECT
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


def load_checkpoint(
    ckpt_dir: Path, device: torch.device | str = "cpu", tokenizer: str | None = None
) -> tuple[GPT, dict]:
    """Rebuild the model from config.json and fill in its weights. Returns (model in eval mode, config)."""
    config = read_config(ckpt_dir, tokenizer)
    try:
        model = GPT(GPTConfig(**config["model"]))
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(
            _written_by_another_project(ckpt_dir, config)
            or f"checkpoint {ckpt_dir} has a model config this project cannot read ({e})"
        ) from e
    load_weights(model, ckpt_dir)
    return model.to(device).eval(), config


def load_weights(model: GPT, ckpt_dir: Path) -> None:
    path = find_checkpoint(Path(ckpt_dir)) / "model.safetensors"
    try:
        load_model(model, str(path), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        other = _written_by_another_project(path.parent, read_config(path.parent))
        raise UserError(
            other or f"checkpoint {path.parent} is corrupt or does not match its config ({reason})"
        ) from e


def read_config(ckpt_dir: Path, tokenizer: str | None = None) -> dict:
    """config.json, checked; with `tokenizer`, also that the model was trained with that kind of tokenizer."""
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
    if tokenizer is not None and config["tokenizer"].get("type") != tokenizer:
        raise UserError(
            _written_by_another_project(ckpt_dir, config)
            or f"{ckpt_dir} was not trained with this project's tokenizer ({tokenizer})"
        )
    return config


def _written_by_another_project(ckpt_dir: Path, config: dict, script: str = "generate.py") -> str | None:
    """The message for a checkpoint that another project wrote, naming its own script that reads it."""
    project = config.get("project")
    if project in (None, PROJECT):
        return None
    flag = "--out" if script == "train.py" else "--checkpoint"
    use = command(
        script, *(["--resume"] if script == "train.py" else []), flag, str(ckpt_dir), project=project
    )
    return f"{ckpt_dir} holds a {project} checkpoint, which {PROJECT} cannot load; use: {use}"


def read_run_config(ckpt_dir: Path, script: str) -> dict:
    """config.json of a run of this project's train.py, which `script` (train.py --resume, benchmark.py)
    reads the training settings of; another project's run is named, with its own script."""
    config = read_config(ckpt_dir)
    other = _written_by_another_project(find_checkpoint(Path(ckpt_dir)), config, script)
    if other:
        raise UserError(other)
    return config


def load_train_state(ckpt_dir: Path) -> dict:
    path = find_checkpoint(Path(ckpt_dir)) / "train_state.pt"
    if not path.exists():
        raise UserError(f"{path.parent} has no train_state.pt to resume from (it holds weights only)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}); cannot resume from it") from e
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= state.keys():
        raise UserError(f"{path} was written by an older version of this project; it cannot resume")
    return state


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
    # data/models/<a project>/ is that project's default: its own train.py makes it (project 14 reads 01's)
    named = ckpt_dir.resolve().parent == MODELS_DIR.resolve() and project_folder(ckpt_dir.name).is_dir()
    project = ckpt_dir.name if named else PROJECT
    out = [] if named else ["--out", str(ckpt_dir)]
    raise UserError(
        f"no checkpoint at {ckpt_dir}; train one first, e.g. "
        f"{command('train.py', '--preset', 'tiny', *out, project=project)} ({project}'s README: its data)"
    )


# --- a training run's folder --------------------------------------------------------------------------------


def prepare_out(out: Path, resume: bool, overwrite: bool, resumable: bool = True) -> dict | None:
    """The rules for train.py's --out, checked before any work: a folder of the user's is never touched, a
    checkpoint is replaced only with --overwrite and only if this project wrote it, and --resume continues
    only this project's runs. Returns the saved config when resuming, else None."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if unwritable(out):
        raise UserError(f"cannot write --out {out}: {unwritable(out)}")
    if out.exists() and not checkpoint_exists(out) and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a checkpoint directory; choose a new or empty one")
    if resume:
        return read_run_config(out, "train.py")
    if checkpoint_exists(out):
        if not overwrite:
            continue_it = "pass --resume to continue it or " if resumable else ""
            raise UserError(f"{out} already holds a checkpoint; {continue_it}pass --overwrite to replace it")
        if not resumable and (find_checkpoint(out) / "train_state.pt").exists():  # quantize.py, merge.py
            raise UserError(f"{out} holds a training run, which --resume continues; write this one elsewhere")
        owner = _project_of(out)
        if owner not in (PROJECT, None):
            raise UserError(
                f"{out} holds a {owner} checkpoint; --overwrite replaces only {PROJECT}'s own. "
                "Delete it yourself if you mean to, or choose another --out"
            )
        for adapter in adapters_built_on(out):
            print(
                f"warning: the adapter in {adapter} was trained on the model in {out}; once this run "
                "replaces that model the adapter no longer loads (its base fingerprint changes)"
            )
    return None


def _project_of(ckpt_dir: Path) -> str | None:
    try:
        return json.loads((find_checkpoint(ckpt_dir) / "config.json").read_text()).get("project")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: a torn checkpoint of unknown origin may be replaced


def adapters_built_on(base_dir: Path) -> list[Path]:
    """Checkpoints under data/models/ holding only an adapter (LoRA, project 05) for the model in base_dir."""
    found = []
    for config_file in sorted(MODELS_DIR.glob("*/config.json")):
        try:
            init_from = json.loads(config_file.read_text())["base"]["init_from"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (config_file.parent / "adapter.safetensors").exists() and Path(init_from) == base_dir.resolve():
            found.append(config_file.parent)
    return found


def rng_states() -> dict:
    """The random streams a training step draws from (dropout): saved so that a resumed run repeats them."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def metrics_file(metrics: list[dict]) -> bytes:
    return "".join(json.dumps(m) + "\n" for m in metrics).encode()


def read_metrics(ckpt_dir: Path) -> list[dict]:
    path = find_checkpoint(Path(ckpt_dir)) / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    except ValueError as e:
        raise UserError(f"{path} is corrupt ({e}); cannot resume from it") from e


def interrupted(step: int, last_saved: int | None, out: Path) -> str:
    """What Ctrl-C cost: the steps since the last checkpoint, or, before the first one, everything."""
    if last_saved:
        return f"interrupted at step {step}; the last checkpoint (step {last_saved}) is in {out}: --resume it"
    return f"interrupted at step {step}, before this run's first checkpoint; nothing was saved"


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{suffix}")


def _fsync_dir(path: Path) -> None:
    """Flush the files to disk before the rename makes them the checkpoint."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
