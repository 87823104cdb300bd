"""What every script shares: one-line errors with exit code 2, device and dtype choice, seeding."""

import argparse
import contextlib
import functools
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

PROJECT = "project05_lora"
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def command(script: str, *flags: str) -> str:
    """The shell command that runs one of this project's scripts from the current directory."""
    return " ".join(["python", os.path.relpath(HERE / script), *flags])


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of a usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exits_cleanly(main: Callable[..., int]) -> Callable[..., int]:
    """Turn UserError into one stderr line and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once, not once per process
                print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever e holds
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0 or value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def temperature(text: str) -> float:
    value = float(text)
    if not (value == 0 or 1e-3 <= value < float("inf")):  # tiny values overflow the softmax
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or at least 0.001, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def fraction_below(upper: float):
    """An argparse type for a number in [0, upper): a dropout rate (upper 1), a label-smoothing rate (0.5)."""

    def parse(text: str) -> float:
        value = float(text)
        if not 0 <= value < upper:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be in [0, {upper:g}), got {text}")
        return value

    return parse


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to run; auto picks cuda, then mps, then cpu (default: auto)",
    )
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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
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
