"""Full fine-tuning vs LoRA at ranks 4, 8 and 16, side by side on the same base, data and steps:
trainable parameters, optimizer-state bytes, peak memory, step time, and the held-out response loss reached.

python benchmark.py --data instruction-data.json                 # on project 03's checkpoint (or GPT-2)
python benchmark.py --preset tiny --data FILE --steps 2           # seconds, for tests
"""

import json
import platform
import re
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from checkpoint import load_base
from cli import (
    PROJECT,
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    pick_device,
    pick_dtype,
    positive_int,
    sync,
)
from data import SFTLoader, encode_examples, eval_batches, load_records, split_records
from lora import LoRAConfig, apply_lora, trainable_parameters
from train import DEFAULT_PRESET, PRESETS, lr_at, make_optimizer, response_loss, train_step

TITLE = "LoRA vs full fine-tuning"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Full fine-tuning's learning rates are project 04's (LoRA's, in PRESETS, are 10x higher).
FULL_LR = {"gpt2": 5e-5, "cpu": 1e-3, "tiny": 3e-3}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """AdamW keeps two moments per trainable parameter (+ a step count): what LoRA shrinks the most."""
    return sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )


def run_variant(rank: int | None, init_from: str, train_examples, val, tc, args, device, dtype) -> dict:
    """Train one variant for --steps steps (rank None: full fine-tuning). Returns its measurements."""
    model, _ = load_base(init_from, device)
    for m in model.modules():  # dropout as train.py sets it, before the adapters get their own
        if isinstance(m, torch.nn.Dropout):
            m.p = tc.dropout
    torch.manual_seed(tc.seed)  # before apply_lora: the adapters' random A is the same in every run
    if rank is not None:
        apply_lora(model, LoRAConfig(r=rank, alpha=2.0 * rank))  # NEW: alpha/r = 2 at every rank
    model.train()
    tc = replace(
        tc,
        lr=tc.lr if rank is not None else FULL_LR[args.preset],
        max_iters=args.steps,
        min_lr=(tc.lr if rank is not None else FULL_LR[args.preset]) / 10,
    )
    optimizer = make_optimizer(model, tc, device)
    loader = SFTLoader(train_examples, tc.batch_size, model.config.block_size, tc.pack, tc.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, loader, lr_at(step, tc), tc, device, dtype)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "trainable_params": trainable_parameters(model),
        "trainable_percent": 100 * trainable_parameters(model) / model.num_params(non_embedding=False),
        "optimizer_state_mb": optimizer_state_bytes(optimizer) / 2**20,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "step_ms": statistics.median(times[1:] or times) * 1e3,  # the first step allocates the moments
        "val_response_loss": response_loss(model, val, device, dtype),
    }


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


def row(metric: str, variant: str, value, unit: str, baseline: tuple[str, float] | None = None) -> dict:
    r = {"metric": metric, "variant": variant, "value": value, "unit": unit}
    if value is None:
        r["note"] = "not measured on this device"
    elif baseline and baseline[1]:
        r.update(baseline=baseline[0], ratio=round(value / baseline[1], 3))
    return r


def print_table(rows: list[dict]) -> None:
    print(f"\n{'metric':<22} {'variant':<12} {'value':>14} {'unit':<7} vs baseline")
    for r in rows:
        value = r["value"]
        value = (
            "not measured" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"
        )
        ratio = f"{r['ratio']:.3g}x" if "ratio" in r else ""
        print(f"{r['metric']:<22} {r['variant']:<12} {value:>14} {r['unit']:<7} {ratio}")


def parse_args(argv):
    p = ArgumentParser(description="Benchmark full fine-tuning against LoRA r=4, 8, 16.")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="batch size and learning rate (default: gpt2 on a GPU, cpu elsewhere)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="base model, as train.py takes it (default: auto; scratch for --preset tiny)",
    )
    p.add_argument("--data", type=Path, default=None, help="instruction records (default: Stanford Alpaca)")
    p.add_argument("--ranks", default="4,8,16", help="LoRA ranks to compare with full fine-tuning")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps per variant (default: 300 on a GPU, 100 elsewhere)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON results")
    add_device_args(p)
    return p.parse_args(argv)


UNITS = {
    "trainable_params": "count",
    "trainable_percent": "%",
    "optimizer_state_mb": "MiB",
    "peak_memory_mb": "MiB",
    "step_ms": "ms",
    "val_response_loss": "nats",
}


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():  # found now, not after minutes of measuring
        raise UserError(f"--out {args.out} is a file; it must be a directory for the results")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    args.preset = args.preset or ("gpt2" if device.type == "cuda" else "cpu")
    args.steps = args.steps or (300 if device.type == "cuda" else 100)
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise UserError(f"--ranks: expected positive integers like 4,8,16, got {args.ranks!r}")
    tc = PRESETS[args.preset]
    init_from = args.init_from or ("scratch" if args.preset == "tiny" else "auto")
    records, data_name = load_records(args.data)
    train_records, val_records = split_records(records)
    probe, base = load_base(init_from, torch.device("cpu"))
    block = probe.config.block_size
    del probe
    train_examples = encode_examples(train_records, block, "training")
    val = eval_batches(encode_examples(val_records, block, "held-out"), tc.batch_size)

    variants = {"full": None, **{f"lora-r{r}": r for r in ranks}}
    results = {}
    for name, rank in variants.items():
        print(f"{name}: {args.steps} steps on {data_name}")
        results[name] = run_variant(rank, init_from, train_examples, val, tc, args, device, dtype)
    rows = [
        row(metric, name, values[metric], unit, ("full", results["full"][metric]) if name != "full" else None)
        for metric, unit in UNITS.items()
        for name, values in results.items()
    ]
    print_table(rows)

    info = device_info(device)
    report = {
        "schema": 1,
        "project": PROJECT,
        "title": TITLE,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": info,
        "preset": "default" if args.preset == DEFAULT_PRESET else args.preset,
        "config": {
            **{k: v for k, v in vars(tc).items() if k not in ("max_iters", "eval_interval", "eval_samples")},
            "full_lr": FULL_LR[args.preset],
            "steps": args.steps,
            "init_from": base,
            "data": data_name,
            "lora_alpha_over_r": 2.0,
            "lora_targets": list(LoRAConfig().targets),
        },
        "rows": rows,
    }
    name = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    name += "" if report["preset"] == "default" else f"-{args.preset}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
