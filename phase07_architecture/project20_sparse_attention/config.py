"""The presets: a model shape and the short training run that suits it, in one place beside the model, and
the flags that override them. train.py trains them; generate.py and benchmark.py read their shapes."""

import argparse
from dataclasses import dataclass, replace

from cli import (
    UserError,
    add_config_flags,
    fraction_below,
    non_negative_int,
    override,
    positive_float,
    positive_int,
)
from model import GPTConfig, pattern_of
from sparse_attention import PATTERNS


def pattern_name(text: str) -> str:
    """NEW: an argparse type for --pattern (a choice that add_config_flags can take as a type)."""
    if text not in PATTERNS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(PATTERNS)}, got {text}")
    return text


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences of block_size tokens per optimizer step
    max_iters: int = 1000
    lr: float = 6e-4  # GPT-3 paper's value for the 125M model
    min_lr: float = 6e-5
    warmup_iters: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 20
    seed: int = 1337


PRESETS = {
    # GPT-2 small, 16 x 1,024 tokens a step on one GPU: from scratch a short run (16M tokens; pre-training at
    # scale is project 07's). With --init-from gpt2 it continues OpenAI's weights: pass a small --lr (3e-5).
    "gpt2": (GPTConfig(), TrainConfig()),
    # Sized for a CPU: 7.2M parameters (6.4M of them the 50,304-row embedding), 4,096 tokens a step.
    "cpu": (
        GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
        TrainConfig(batch_size=32, max_iters=300, lr=2e-3, min_lr=2e-4, warmup_iters=30),
    ),
    # Seconds anywhere: what the tests train.
    "tiny": (
        GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
        TrainConfig(
            batch_size=8, max_iters=40, lr=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=20, eval_iters=4
        ),
    ),
}
DEFAULT_PRESET = "gpt2"
# How --attention computes attention (the first is the default): GPTConfig's switches.
ATTENTION = {
    "triton": dict(flash=True, triton=True),  # our FlashAttention-2 kernels on CUDA (SDPA elsewhere)
    "sdpa": dict(flash=True, triton=False),  # PyTorch's fused scaled_dot_product_attention
    "explicit": dict(flash=False, triton=False),  # written out, as in project 01
}
# The flags of train.py that override a preset's value, with their types; --help lists every preset's value.
MODEL_FLAGS = {
    "dropout": (fraction_below(1), "dropout rate"),
    "pattern": (pattern_name, f"attention pattern: {', '.join(PATTERNS)}"),  # NEW
    "window": (positive_int, "the pattern's local window (the stride of strided, fixed)"),  # NEW
}
TRAIN_FLAGS = {
    "max_iters": (positive_int, "total optimizer steps"),
    "batch_size": (positive_int, "sequences per step"),
    "lr": (positive_float, "peak learning rate"),
    "eval_interval": (positive_int, "evaluate and checkpoint every N steps"),
    "eval_iters": (positive_int, "batches per loss estimate"),
    "seed": (non_negative_int, "random seed"),
}
FIXED_ON_RESUME = (
    "preset",
    "init_from",
    "data",
    "dtype",
    "dropout",
    "pattern",
    "window",
    "batch_size",
    "lr",
    "seed",
)


def add_preset_flags(parser: argparse.ArgumentParser) -> None:
    """--preset, --attention, and a flag for each preset value the command line may override."""
    parser.add_argument("--preset", choices=PRESETS, default=None, help=f"sizes (default: {DEFAULT_PRESET})")
    parser.add_argument("--attention", choices=ATTENTION, default=next(iter(ATTENTION)), help="see ATTENTION")
    add_config_flags(parser, {name: mc for name, (mc, _) in PRESETS.items()}, MODEL_FLAGS)
    add_config_flags(parser, {name: tc for name, (_, tc) in PRESETS.items()}, TRAIN_FLAGS)


def with_flags(mc: GPTConfig, tc: TrainConfig, args: argparse.Namespace) -> tuple[GPTConfig, TrainConfig]:
    """The configs with the values given on the command line."""
    mc = replace(override(mc, args, MODEL_FLAGS), **ATTENTION[args.attention])
    try:  # NEW: flags valid one by one may make an invalid pattern (fixed: the window must exceed 16)
        pattern = pattern_of(mc)
    except ValueError as e:
        raise UserError(f"--pattern {mc.pattern} --window {mc.window}: {e}") from e
    # NEW: a sparse name on what is dense attention at this context (--init-from brings its own context)
    T, resized = mc.block_size, getattr(args, "init_from", None) and not getattr(args, "resume", False)
    if pattern is not None and not resized and int(pattern.token_mask(T).sum()) == T * (T + 1) // 2:
        raise UserError(
            f"--pattern {mc.pattern} --window {mc.window}: in a context of {T} tokens every query sees every "
            "earlier key (bigbird: also through its 64-token random blocks), so attention would be dense; "
            "pass a smaller --window or a longer context"
        )
    return mc, override(tc, args, TRAIN_FLAGS)
