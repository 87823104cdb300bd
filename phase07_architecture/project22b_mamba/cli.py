"""What every script shares: one-line errors (exit code 2), argparse types, flags that override a preset,
device and dtype, seeding, and a memory check before a run allocates. The same file in every project."""

import argparse
import contextlib
import dataclasses
import functools
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PROJECT = HERE.name  # taken from the folder, so that this file is byte-identical in every project
REPO_ROOT = HERE.parents[1]


def project_folder(project: str) -> Path:
    """The folder of any project in this repository, by name (e.g. "project03_pretrain")."""
    return next(REPO_ROOT.glob(f"phase*/{project}"), REPO_ROOT / project)


def command(script: str, *flags: str, project: str = PROJECT) -> str:
    """The shell command that runs a project's script from the current directory."""
    return " ".join(["python", os.path.relpath(project_folder(project) / script), *flags])


class UserError(ValueError):
    """Bad input, with a message written for the user. Library modules raise it like any ValueError; the
    scripts (exits_cleanly) report it as one line on stderr with exit code 2 and no traceback."""


class _Help(argparse.HelpFormatter):
    """--help shows each flag's default where it has one, from the one place that defines it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        given = action.default is not None and action.default is not False  # 0 is shown, False is not
        shown = given and action.default != argparse.SUPPRESS and "default" not in (action.help or "")
        return f"{action.help} (default: %(default)s)" if shown else action.help or ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of a usage block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_Help, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exits_cleanly(main: Callable[..., int]) -> Callable[..., int]:
    """Turn UserError into one stderr line and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (UserError, MemoryError, torch.cuda.OutOfMemoryError) as e:  # the last: torch >= 1.13
            if not isinstance(e, UserError):
                e = f"out of memory ({str(e).strip().partition(chr(10))[0]}); use a smaller --batch-size"
            if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once, not once per process
                print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever e holds
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


# --- argparse types: a bad value is refused where it is parsed, with the flag's name ------------------------


def unwritable(path: Path) -> str | None:
    """Why `path` could not be created or written as a folder (a file in the way, no permission), or None.
    Checked before any work, so that hours of training never end in a failed save."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file"
    existing = next(p for p in [path, *path.parents] if p.exists())  # the nearest folder that is there
    if not existing.is_dir():
        return f"{existing} is a file"
    return None if os.access(existing, os.W_OK) else f"{existing} is not writable"


def _checked(
    parse: Callable[[str], float], ok: Callable[[float], bool], wanted: str
) -> Callable[[str], float]:
    """An argparse type: parse(text), refused unless ok(value), with a message saying what is wanted (a bare
    ValueError would make argparse name the function instead: "invalid positive_int value")."""

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # comparisons with nan are False: nan is refused too
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return check


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
# tiny temperatures overflow the softmax
temperature = _checked(float, lambda v: v == 0 or 1e-3 <= v < float("inf"), "0 (greedy) or at least 0.001")
probability = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


def fraction_below(upper: float) -> Callable[[str], float]:
    """A number in [0, upper): a dropout rate (upper 1), a label-smoothing rate (upper 0.5)."""
    return _checked(float, lambda v: 0 <= v < upper, f"in [0, {upper:g})")


# --- presets: a dataclass holds each default; a flag given on the command line overrides it -----------------


def add_config_flags(parser: argparse.ArgumentParser, presets: dict, flags: dict, prefix: str = "") -> None:
    """One --flag per dataclass field in `flags` ({field: (type, help)}), named --<prefix><field>. Its default
    is None ("the preset's value"), and --help lists each preset's value, read from the presets themselves."""
    for field, (type_, text) in flags.items():
        values = ", ".join(f"{name} {getattr(config, field)}" for name, config in presets.items())
        flag = "--" + (prefix + field).replace("_", "-")
        parser.add_argument(flag, type=type_, default=None, help=f"{text} ({values})")


def override(config, args: argparse.Namespace, flags: dict, prefix: str = ""):
    """`config` with the fields whose flags were given on the command line replaced by them."""
    given = {field: getattr(args, prefix + field) for field in flags}
    return dataclasses.replace(
        config, **{field: value for field, value in given.items() if value is not None}
    )


def refuse_changes_on_resume(args: argparse.Namespace, recorded: dict, names: tuple[str, ...]) -> None:
    """--resume continues a run exactly: a flag in `names` given with another value than the run recorded
    is refused, by name (giving the same value again is harmless)."""
    changed = []
    for name in names:
        given, was = getattr(args, name), recorded.get(name)
        if given is not None and given != (tuple(was) if isinstance(was, list) else was):
            changed.append("--" + name.replace("_", "-"))
    if changed:
        flags = ", ".join(changed)
        raise UserError(
            f"{flags} cannot change when resuming: --resume continues the run exactly (--max-iters "
            "and how often it evaluates may change)"
        )


# --- device, precision, randomness ------------------------------------------------------------------------


def add_device_args(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """--device, and --dtype unless the script has its own precision flags (dtype=False)."""
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to run; auto picks cuda, then mps, then cpu",
    )
    if not dtype:
        return
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype; auto is bfloat16 on GPUs that support it, else float32",
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this machine has no Apple GPU available to PyTorch")
    return torch.device(name)


def has_bf16(device: torch.device) -> bool:
    """Native bf16 matmuls: NVIDIA GPUs from Ampere (compute capability 8) on. torch.cuda.is_bf16_supported()
    also says yes where bf16 is only emulated (a T4, a V100), slower than fp32."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if has_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Run matmuls in bfloat16 while the weights (and the optimizer) stay in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read afterwards measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def warn_if_slow(device: torch.device, sized_for_a_gpu: bool) -> bool:
    """Say, before the first step, that a run sized for a GPU will take hours on this CPU, and which preset
    suits one. Returns whether to report the measured time after the first step (time_left)."""
    slow = device.type == "cpu" and sized_for_a_gpu
    if slow:
        print(
            "warning: this run is sized for a GPU and takes hours on a CPU; --preset cpu is sized for a CPU "
            "(minutes), --preset tiny runs in seconds"
        )
    return slow


def time_left(seconds_per_step: float, steps: int) -> str:
    return f"measured {seconds_per_step:.1f} s/step: about {seconds_per_step * steps / 3600:.1f} hours to go"


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still hand out, or None where we cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what the kernel could give without swapping
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:")), 0)
    return kib * 1024 or None


def check_memory(need_bytes: float, device: torch.device, what: str) -> None:
    """Refuse, in one line, work that cannot fit, instead of being killed by the kernel part way in.
    `need_bytes` is a lower bound: a run refused here could never have finished."""
    free = free_memory(device)
    if device.type in ("cpu", "cuda") and free is not None and need_bytes > free:
        raise UserError(
            f"{what} needs at least {need_bytes / 2**30:.1f} GiB, but the {device.type} has "
            f"{free / 2**30:.1f} GiB free; use a smaller --batch-size"
        )
