"""What DPO bought, and what its reference model costs, side by side:

1. on the held-out pairs, how often the model gives the chosen answer a higher log-probability than the
   rejected one, the SFT model it started from vs the DPO checkpoint (and DPO's implicit-reward accuracy
   and margin against that reference);
2. training steps with the three kinds of reference: a frozen copy ("model"), log-probs precomputed once
   ("precomputed"), and LoRA with adapters switched off ("lora"): step time, peak memory, setup time.

python benchmark.py                                   # the checkpoint in data/models/project06_dpo
python benchmark.py --checkpoint /tmp/dpo --repeats 3 # any checkpoint: its data and base are recorded
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

from checkpoint import DEFAULT_DIR, load_base, load_checkpoint
from cli import (
    PROJECT,
    ArgumentParser,
    UserError,
    add_device_args,
    autocast,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
    sync,
)
from data import split_records
from lora import LoRAConfig, apply_lora
from preference import PairLoader, encode_pairs, eval_pair_batches, load_preference_records
from train import DEFAULT_PRESET, Reference, TrainConfig, evaluate, make_optimizer, train_step

TITLE = "DPO: preference accuracy, and the cost of the reference model"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench_reference(mode: str, init_from: str, pairs: list, tc: TrainConfig, args, device, dtype) -> dict:
    """--repeats timed DPO steps from the starting model with one kind of reference."""
    policy, _ = load_base(init_from, device)
    for m in policy.modules():  # as train.py does: no dropout in the model (see TrainConfig.dropout)
        if isinstance(m, torch.nn.Dropout):
            m.p = tc.dropout
    if mode == "lora":
        apply_lora(policy, LoRAConfig())
    policy.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    reference = Reference(mode, policy, pairs, tc.batch_size, device, autocast(device, dtype))
    sync(device)
    setup = time.perf_counter() - t0
    optimizer = make_optimizer(policy, tc, device)
    loader = PairLoader(pairs, tc.batch_size, tc.seed)
    times = []
    for step in range(args.warmup + args.repeats):
        sync(device)
        t0 = time.perf_counter()
        train_step(policy, reference, optimizer, loader, tc.lr, tc, device, dtype)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "step_ms": statistics.median(times) * 1e3,
        "setup_s": setup,
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
    print(f"\n{'metric':<22} {'variant':<16} {'value':>14} {'unit':<8} vs baseline")
    for r in rows:
        value = "not measured" if r["value"] is None else f"{r['value']:,.4g}"
        ratio = f"{r['ratio']:.3g}x" if "ratio" in r else ""
        print(f"{r['metric']:<22} {r['variant']:<16} {value:>14} {r['unit']:<8} {ratio}")


def parse_args(argv):
    p = ArgumentParser(description="Benchmark DPO: preference accuracy before/after, reference-model costs.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help=f"(default: {DEFAULT_DIR})")
    p.add_argument("--data", type=Path, default=None, help="preference records (default: the run's own)")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="pairs per step (default: the run's)"
    )
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
    tc = TrainConfig(**training["train_config"])
    tc = replace(tc, batch_size=args.batch_size or tc.batch_size)
    data = args.data or training["data"]
    if data is None or not Path(data).exists():
        raise UserError(
            f"the run's data {data or '(Intel/orca_dpo_pairs)'} is not a local file here; pass --data FILE"
        )
    train_records, val_records = split_records(load_preference_records(data)[0])
    block = tuned.config.block_size
    train_pairs = encode_pairs(train_records, block, "training")
    val = eval_pair_batches(encode_pairs(val_records, block, "held-out"), tc.batch_size)

    init_from = config["base"]["init_from"]
    print(f"held-out preferences: the starting model ({init_from}) vs DPO ({args.checkpoint})")
    base, _ = load_base(init_from, device)
    base.eval()
    amp = autocast(device, dtype)
    ref = Reference("model", base, [], tc.batch_size, device, amp)  # the reference DPO was trained against
    val_ref = [ref.compute(base, b) for b in val]
    before = evaluate(base, val, val_ref, tc, device, dtype)
    after = evaluate(tuned, val, val_ref, tc, device, dtype)
    del base, ref

    modes = ("model", "precomputed", "lora")
    print(f"timing {args.repeats} steps for each reference: {', '.join(modes)}")
    costs = {m: bench_reference(m, init_from, train_pairs, tc, args, device, dtype) for m in modes}

    rows = [
        row("logp_accuracy", "sft", before["val_logp_accuracy"], "fraction"),
        row(
            "logp_accuracy",
            "dpo",
            after["val_logp_accuracy"],
            "fraction",
            ("sft", before["val_logp_accuracy"]),
        ),
        row("reward_accuracy", "dpo", after["val_reward_accuracy"], "fraction"),
        row("reward_margin", "dpo", after["val_reward_margin"], "nats"),
        row("dpo_loss", "sft", before["val_loss"], "nats"),
        row("dpo_loss", "dpo", after["val_loss"], "nats", ("sft", before["val_loss"])),
    ]
    units = {"step_ms": "ms", "setup_s": "s", "peak_memory_mb": "MiB"}
    for metric, unit in units.items():
        for mode, values in costs.items():
            compared = mode != "model" and metric != "setup_s"  # no setup at all is not a ratio
            ref_value = ("ref-model", costs["model"][metric]) if compared else None
            rows.append(row(metric, f"ref-{mode}", values[metric], unit, ref_value))
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
            "init_from": init_from,
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
