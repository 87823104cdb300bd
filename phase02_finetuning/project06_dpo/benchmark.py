"""What DPO bought, and what its reference model costs, side by side:

1. on the held-out pairs, how often the model gives the chosen answer a higher log-probability than the
   rejected one, the SFT model it started from vs the DPO checkpoint (and DPO's implicit-reward accuracy
   and margin against that reference);
2. training steps with the three kinds of reference: a frozen copy ("model"), log-probs precomputed once
   ("precomputed"), and LoRA with adapters switched off ("lora"): step time, peak memory, setup time.

python benchmark.py                                   # the checkpoint in data/models/project06_dpo
python benchmark.py --checkpoint /tmp/dpo --repeats 3 # any checkpoint: its data and base are recorded
"""

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_DIR, load_base, load_checkpoint, read_run_config
from cli import (
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
from dpo import Reference
from lora import LoRAConfig, apply_lora
from preference import PairLoader, encode_pairs, eval_pair_batches, load_preference_records
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import DEFAULT_PRESET, TrainConfig, evaluate, make_optimizer, set_dropout, train_step


def bench_reference(mode: str, init_from: str, pairs: list, tc: TrainConfig, args, device, dtype) -> dict:
    """--repeats timed DPO steps from the starting model with one kind of reference."""
    policy, _ = load_base(init_from, device, DEFAULT_DIR)
    set_dropout(policy, tc.dropout)  # as train.py does
    if mode == "lora":
        apply_lora(policy, LoRAConfig())
    policy.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    t0 = time.perf_counter()
    reference = Reference(
        mode, policy, pairs, tc.batch_size, device, autocast(device, dtype), tc.loss == "ipo"
    )
    sync(device)
    setup = time.perf_counter() - t0
    optimizer = make_optimizer(policy, tc, device)
    loader = PairLoader(pairs, tc.batch_size, tc.seed)
    bar = tqdm(total=args.warmup + args.repeats, desc=f"reference {mode}", unit="step", leave=False)

    def step():
        train_step(policy, reference, optimizer, loader, tc.lr, tc, device, dtype)
        bar.update()

    seconds, peak = time_it(step, device, args.warmup, args.repeats)
    bar.close()
    return {"step_ms": seconds * 1e3, "setup_s": setup, "peak_memory_mib": peak}


def parse_args(argv):
    p = ArgumentParser(description="Benchmark DPO: preference accuracy before/after, reference-model costs.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help="a checkpoint written by train.py")
    p.add_argument("--data", default=None, help="preference records (default: the run's own)")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="pairs per step (default: the run's)"
    )
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed steps; the median is reported")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    read_run_config(args.checkpoint, "benchmark.py")  # another project's run is named, not misread
    tuned, config = load_checkpoint(args.checkpoint, device, tokenizer="tiktoken")
    training = config["training"]
    tc = TrainConfig(**training["train_config"])
    tc = replace(tc, batch_size=args.batch_size or tc.batch_size)
    data = args.data or training["data"]
    if data is None:
        raise UserError(
            "the run trained on Intel/orca_dpo_pairs from the Hub; pass a local file with --data FILE"
        )
    train_records, val_records = split_records(load_preference_records(data)[0])
    block = tuned.config.block_size
    train_pairs = encode_pairs(train_records, block, "training")
    val = eval_pair_batches(encode_pairs(val_records, block, "held-out"), tc.batch_size)

    init_from = config["base"]["init_from"]
    print(
        f"held-out preferences: the starting model ({init_from}) vs DPO ({args.checkpoint})", file=sys.stderr
    )
    base, _ = load_base(init_from, device, DEFAULT_DIR)
    base.eval()
    # The reference DPO was trained against, as train.py computes it.
    ref = Reference("model", base, [], tc.batch_size, device, autocast(device, dtype), tc.loss == "ipo")
    val_ref = [ref.compute(base, b) for b in val]
    before = evaluate(base, val, val_ref, tc, device, dtype)
    after = evaluate(tuned, val, val_ref, tc, device, dtype)
    del base, ref

    modes = ("model", "precomputed", "lora")
    print(f"timing {args.repeats} steps for each reference: {', '.join(modes)}", file=sys.stderr)
    costs = {f"ref-{m}": bench_reference(m, init_from, train_pairs, tc, args, device, dtype) for m in modes}

    rows = [
        *compare(
            "logp_accuracy",
            "fraction",
            {"sft": before["val_logp_accuracy"], "dpo": after["val_logp_accuracy"]},
        ),
        row("reward_accuracy", "dpo", after["val_reward_accuracy"], "fraction"),
        row("reward_margin", "dpo", after["val_reward_margin"], "nats"),
        *compare("dpo_loss", "nats", {"sft": before["val_loss"], "dpo": after["val_loss"]}),
        *compare("step_ms", "ms", {mode: values["step_ms"] for mode, values in costs.items()}),
        *compare(
            "peak_memory_mib", "MiB", {mode: values["peak_memory_mib"] for mode, values in costs.items()}
        ),
        *[row("setup_s", mode, values["setup_s"], "s") for mode, values in costs.items()],  # 0 s: no ratio
    ]
    print_table(rows)
    config = {
        **config["model"],
        **vars(tc),
        "init_from": init_from,
        "data": Path(str(data)).name,
        "train_steps": training.get("step"),
        "repeats": args.repeats,
    }
    title = "DPO: preference accuracy, and the cost of the reference model"
    write_report(args, title, device, training["preset"], DEFAULT_PRESET, config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
