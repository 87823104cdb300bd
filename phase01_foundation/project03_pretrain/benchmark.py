"""Measure what makes pre-training fast, side by side on the same model and data: precision (fp32 vs bf16
autocast), attention (project 01's written-out softmax vs PyTorch's fused scaled_dot_product_attention), and
eager mode vs torch.compile. Reports step time, tokens/s, peak memory and MFU.

python benchmark.py                                   # GPT-2 124M on a GPU; the cpu preset elsewhere
python benchmark.py --variants fp32-explicit,fp32-sdpa --preset tiny   # seconds, for tests
"""

import sys
from dataclasses import replace

import torch
from tqdm import tqdm

from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
)
from distributed import Dist
from model import GPT
from results import add_output_args, compare, print_table, time_it, write_report
from train import DEFAULT_PRESET, PRESETS, flops_per_token, make_optimizer, peak_flops, train_step

# name -> (autocast dtype, fused attention, torch.compile); the first one run is the baseline
VARIANTS = {
    "fp32-explicit": (torch.float32, False, False),
    "fp32-sdpa": (torch.float32, True, False),
    "bf16-sdpa": (torch.bfloat16, True, False),
    "bf16-sdpa-compile": (torch.bfloat16, True, True),
}


class RandomTokens:
    """A loader of random ids: step time does not depend on what the tokens say."""

    def __init__(self, batch_size: int, block_size: int, vocab_size: int, device):
        gen = torch.Generator().manual_seed(0)
        self.batch = torch.randint(vocab_size, (batch_size, block_size + 1), generator=gen).to(device)

    def next_batch(self):
        return self.batch[:, :-1], self.batch[:, 1:]


def bench_variant(name: str, mc, tc, args, device) -> tuple[float, float | None]:
    """Median seconds of an optimizer step (one micro-batch per step) of one variant, and its peak memory."""
    dtype, flash, compiled = VARIANTS[name]
    torch.manual_seed(0)
    raw = GPT(replace(mc, flash=flash)).to(device)
    model = torch.compile(raw) if compiled else raw
    optimizer = make_optimizer(raw, tc, device)
    loader = RandomTokens(tc.batch_size, mc.block_size, mc.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step = lambda: train_step(model, optimizer, loader, 1, tc.lr, tc, device, dtype, Dist())  # noqa: E731
    warmup = args.warmup + (3 if compiled else 0)  # compilation happens in the first calls
    return time_it(step, device, warmup, args.repeats)


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
        )
    return names


def parse_args(argv):
    p = ArgumentParser(
        description="Benchmark pre-training steps: fp32 vs bf16, explicit vs SDPA, eager vs compile."
    )
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="model size (default: gpt2 on a GPU, cpu elsewhere)"
    )
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, the first is the baseline"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="sequences per step (default: the preset's)"
    )
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed steps; the median is reported")
    p.add_argument("--peak-flops", type=positive_float, default=None, help="device peak FLOP/s for MFU")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = parse_variants(args.variants)
    device = pick_device(args.device)
    preset = args.preset or (DEFAULT_PRESET if device.type == "cuda" else "cpu")
    mc, tc = PRESETS[preset]
    tc = replace(tc, batch_size=args.batch_size or tc.batch_size)
    if device.type == "cpu" and any(VARIANTS[n][0] == torch.bfloat16 for n in names):
        print("note: bf16 autocast on a CPU is emulated and usually slower than fp32", file=sys.stderr)

    print(f"benchmarking the {preset} preset on {device.type}: {', '.join(names)}", file=sys.stderr)
    results = {name: bench_variant(name, mc, tc, args, device) for name in tqdm(names, desc="variants")}
    tokens = tc.batch_size * mc.block_size
    peak = peak_flops(device, args.peak_flops)
    mfu = {
        n: 100 * flops_per_token(mc) * tokens / s / peak if peak else None for n, (s, _) in results.items()
    }
    rows = [
        *compare("step_ms", "ms", {name: seconds * 1e3 for name, (seconds, _) in results.items()}),
        *compare(
            "train_tok_per_s", "tok/s", {name: tokens / seconds for name, (seconds, _) in results.items()}
        ),
        *compare("peak_memory_mib", "MiB", {name: memory for name, (_, memory) in results.items()}),
        *compare("mfu_percent", "%", mfu),
    ]
    for r in rows:
        if r["metric"] == "mfu_percent" and r["value"] is None:
            r["note"] = "the device's peak FLOP/s is unknown (pass --peak-flops)"
    print_table(rows)
    config = {**vars(mc), **vars(tc), "tokens_per_step": tokens}
    write_report(args, "GPT-2 pre-training throughput", device, preset, DEFAULT_PRESET, config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
