"""What fine-tuning bought, and what packing saves, side by side:

1. held-out response loss of the base model vs the fine-tuned checkpoint (same records, same tokens);
2. training steps with padded batches vs packed rows on the same data: step time, real (non-padding)
   tokens/s, the share of compute spent on padding, peak memory.

python benchmark.py                               # the checkpoint in data/models/project04_sft
python benchmark.py --checkpoint /tmp/sft --repeats 3   # any checkpoint: its data and base are recorded
"""

import copy
import json
import platform
import re
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from checkpoint import DEFAULT_DIR, load_checkpoint
from cli import (
    PROJECT,
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
    sync,
)
from data import SFTLoader, encode_examples, eval_batches, load_records, split_records
from model import GPT
from train import DEFAULT_PRESET, TrainConfig, load_base, make_optimizer, response_loss, train_step

TITLE = "Supervised fine-tuning: base vs fine-tuned, padding vs packing"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def real_tokens(batch: dict) -> int:
    """Tokens that belong to an example. A padded row's example ends at its last trained target (the
    end-of-text); a packed row's padding has segment -1."""
    if "segments" in batch:
        return (batch["segments"] >= 0).sum().item()
    trained = batch["y"] != -100  # (B, T)
    return (trained.flip(-1).cumsum(-1).flip(-1) > 0).sum().item()  # positions up to the last trained one


def bench_batching(model: GPT, examples, tc: TrainConfig, pack: bool, args, device, dtype) -> dict:
    """Median step time over --repeats steps of a fresh copy of the model, real tokens/s, padding share."""
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(model, tc, device)
    loader = SFTLoader(examples, tc.batch_size, model.config.block_size, pack, tc.seed)
    probe = SFTLoader(
        examples, tc.batch_size, model.config.block_size, pack, tc.seed
    )  # reads the same batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train_step(model, optimizer, loader, tc.lr, tc, device, dtype)
        probe.next_batch()
    times, real, total = [], 0, 0
    for _ in range(args.repeats):
        batch = probe.next_batch()  # the batch the timed step is about to read
        real, total = real + real_tokens(batch), total + batch["x"].numel()
        sync(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, loader, tc.lr, tc, device, dtype)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "step_ms": statistics.median(times) * 1e3,
        "real_tok_per_s": real / sum(times),
        "padding_percent": 100 * (total - real) / total,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
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
        value = "not measured" if r["value"] is None else f"{r['value']:,.4g}"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        print(f"{r['metric']:<22} {r['variant']:<12} {value:>14} {r['unit']:<7} {ratio}")


def parse_args(argv):
    p = ArgumentParser(description="Benchmark SFT: base vs fine-tuned loss, padded vs packed batches.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help=f"(default: {DEFAULT_DIR})")
    p.add_argument("--data", type=Path, default=None, help="instruction records (default: the run's own)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="rows per step (default: the run's)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed steps; the median is reported")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON results")
    add_device_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():  # found now, not after minutes of measuring
        raise UserError(f"--out {args.out} is a file; it must be a directory for the results")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tuned, config = load_checkpoint(args.checkpoint, device)
    training = config["training"]
    tc = replace(
        TrainConfig(**training["train_config"]),
        batch_size=args.batch_size or training["train_config"]["batch_size"],
    )
    data = args.data or training["data"]
    if data is None or not Path(data).exists():
        raise UserError(f"the run's data {data or '(Alpaca)'} is not a local file here; pass --data FILE")
    train_records, val_records = split_records(load_records(data)[0])
    block = tuned.config.block_size
    train_examples = encode_examples(train_records, block, "training")
    val = eval_batches(encode_examples(val_records, block, "held-out"), tc.batch_size)

    print(f"held-out response loss: base ({training['init_from']}) vs fine-tuned ({args.checkpoint})")
    base, _ = load_base(training["init_from"], device)
    losses = {
        "base": response_loss(base, val, device, dtype),
        "fine-tuned": response_loss(tuned, val, device, dtype),
    }
    del base
    print(f"timing {args.repeats} steps each: padded vs packed batches of {tc.batch_size} rows")
    batching = {
        name: bench_batching(tuned, train_examples, tc, name == "packed", args, device, dtype)
        for name in ("padded", "packed")
    }

    rows = [
        row("val_response_loss", "base", losses["base"], "nats"),
        row("val_response_loss", "fine-tuned", losses["fine-tuned"], "nats", ("base", losses["base"])),
    ]
    units = {"step_ms": "ms", "real_tok_per_s": "tok/s", "padding_percent": "%", "peak_memory_mb": "MiB"}
    for metric, unit in units.items():
        for name, values in batching.items():
            ref = ("padded", batching["padded"][metric]) if name == "packed" else None
            rows.append(row(metric, name, values[metric], unit, ref))
    print_table(rows)

    info = device_info(device)
    preset = training["preset"]
    report = {
        "schema": 1,
        "project": PROJECT,
        "title": TITLE,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": info,
        "preset": "default" if preset == DEFAULT_PRESET else preset,
        "config": {
            **config["model"],
            **vars(tc),
            "init_from": training["init_from"],
            "data": Path(data).name,
            "train_steps": training.get("step"),
            "repeats": args.repeats,
        },
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
