"""Measure what makes pre-training fast, side by side on the same model and data: precision (fp32 vs bf16
autocast), attention (project 01's written-out softmax vs PyTorch's fused scaled_dot_product_attention), and
eager mode vs torch.compile. Reports step time, tokens/s, peak memory and MFU.

python benchmark.py                                   # GPT-2 124M on a GPU; the cpu preset elsewhere
python benchmark.py --variants fp32-explicit,fp32-sdpa --preset tiny   # seconds, for tests
"""

import json
import platform
import re
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from cli import (
    PROJECT,
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    non_negative_int,
    pick_device,
    positive_int,
    sync,
)
from distributed import Dist
from model import GPT
from train import PRESETS, flops_per_token, make_optimizer, peak_flops, train_step

TITLE = "GPT-2 pre-training throughput"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
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


def bench_variant(name: str, mc, tc, args, device) -> dict:
    """Median optimizer-step time (one micro-batch per step) of one variant, its tokens/s, memory and MFU."""
    dtype, flash, compiled = VARIANTS[name]
    torch.manual_seed(0)
    raw = GPT(replace(mc, flash=flash)).to(device)
    model = torch.compile(raw) if compiled else raw
    optimizer = make_optimizer(raw, tc, device)
    loader = RandomTokens(tc.batch_size, mc.block_size, mc.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        train_step(model, optimizer, loader, 1, tc.lr, tc, device, dtype, Dist())

    for _ in range(args.warmup + (3 if compiled else 0)):  # compilation happens in the first calls
        step()
    times = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens = tc.batch_size * mc.block_size
    peak = peak_flops(device, args.peak_flops)
    return {
        "step_ms": seconds * 1e3,
        "tok_per_s": tokens / seconds,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "mfu_percent": 100 * flops_per_token(mc) * tokens / seconds / peak if peak else None,
    }


UNITS = {"step_ms": "ms", "tok_per_s": "tok/s", "peak_memory_mb": "MiB", "mfu_percent": "%"}


def build_rows(results: dict[str, dict]) -> list[dict]:
    base_name, base = next(iter(results.items()))
    rows = []
    for metric, unit in UNITS.items():
        for variant, values in results.items():
            row = {"metric": metric, "variant": variant, "value": values[metric], "unit": unit}
            if values[metric] is None:
                row["note"] = (
                    "not measured on this device" if metric == "peak_memory_mb" else "peak FLOP/s unknown"
                )
            elif variant != base_name and base[metric]:
                row.update(baseline=base_name, ratio=round(values[metric] / base[metric], 3))
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'metric':<16} {'variant':<20} {'value':>14} {'unit':<6} vs baseline")
    for r in rows:
        value = "not measured" if r["value"] is None else f"{r['value']:,.4g}"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        print(f"{r['metric']:<16} {r['variant']:<20} {value:>14} {r['unit']:<6} {ratio}")


def device_info(device: torch.device) -> dict:
    try:
        import triton  # noqa: PLC0415 - optional: not installed on macOS or Windows

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cpu" and Path("/proc/cpuinfo").exists():
        models = [
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ]
        name = models[0] if models else name
    return {
        "type": device.type,
        "name": name,
        "torch": torch.__version__.split("+")[0],
        "triton": triton_version,
        "python": platform.python_version(),
    }


def parse_args(argv):
    p = ArgumentParser(
        description="Benchmark pre-training steps: fp32 vs bf16, explicit vs SDPA, eager vs compile."
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model size (default: gpt2 on a GPU, cpu elsewhere)",
    )
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="sequences per step (default: preset's)"
    )
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed steps; the median is reported")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON results")
    add_device_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():  # found now, not after minutes of measuring
        raise UserError(f"--out {args.out} is a file; it must be a directory for the results")
    device = pick_device(args.device)
    preset = args.preset or ("gpt2" if device.type == "cuda" else "cpu")
    mc, tc = PRESETS[preset]
    tc = replace(tc, batch_size=args.batch_size or tc.batch_size)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
        )
    if device.type == "cpu" and any(VARIANTS[n][0] == torch.bfloat16 for n in names):
        print("note: bf16 autocast on a CPU is emulated and usually slower than fp32", file=sys.stderr)

    print(f"benchmarking the {preset} preset on {device.type}: {', '.join(names)}", file=sys.stderr)
    results = {name: bench_variant(name, mc, tc, args, device) for name in names}
    rows = build_rows(results)
    print_table(rows)

    info = device_info(device)
    config = {
        **{k: v for k, v in vars(mc).items()},
        **vars(tc),
        "tokens_per_step": tc.batch_size * mc.block_size,
    }
    report = {
        "schema": 1,
        "project": PROJECT,
        "title": TITLE,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": info,
        "preset": "default" if preset == ("gpt2" if device.type == "cuda" else "cpu") else preset,
        "config": config,
        "rows": rows,
    }
    name = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    name += "" if report["preset"] == "default" else f"-{preset}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
