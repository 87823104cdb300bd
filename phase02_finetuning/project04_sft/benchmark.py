"""What fine-tuning bought, and what packing saves, side by side:

1. held-out response loss of the base model vs the fine-tuned checkpoint (same records, same tokens);
2. training steps with padded batches vs packed rows on the same data: step time, real (non-padding)
   tokens/s, the share of compute spent on padding, peak memory.

python benchmark.py                               # the checkpoint in data/models/project04_sft
python benchmark.py --checkpoint /tmp/sft --repeats 3   # any checkpoint: its data and base are recorded
"""

import copy
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from checkpoint import DEFAULT_DIR, load_base, load_checkpoint, read_run_config
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
)
from data import SFTLoader, encode_examples, eval_batches, load_records, split_records
from model import GPT
from results import add_output_args, compare, print_table, time_it, write_report
from train import DEFAULT_PRESET, TrainConfig, make_optimizer, response_loss, train_step


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
    batches = [probe.next_batch() for _ in range(args.warmup + args.repeats)][args.warmup :]  # the timed ones
    real, total = sum(real_tokens(b) for b in batches), sum(b["x"].numel() for b in batches)
    bar = tqdm(
        total=args.warmup + args.repeats, desc="packed" if pack else "padded", unit="step", leave=False
    )

    def step():
        train_step(model, optimizer, loader, tc.lr, tc, device, dtype)
        bar.update()

    seconds, peak = time_it(step, device, args.warmup, args.repeats)
    bar.close()
    return {"step_ms": seconds * 1e3, "train_tok_per_s": real / args.repeats / seconds,
            "padding_percent": 100 * (total - real) / total, "peak_memory_mib": peak}  # fmt: skip


def parse_args(argv):
    p = ArgumentParser(description="Benchmark SFT: base vs fine-tuned loss, padded vs packed batches.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help="a checkpoint written by train.py")
    p.add_argument("--data", default=None, help="instruction records (default: the run's own)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="rows per step (default: the run's)")
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
            "the run trained on Alpaca from the Hugging Face Hub; pass a local file with --data FILE"
        )
    train_records, val_records = split_records(load_records(data)[0])
    block = tuned.config.block_size
    train_examples = encode_examples(train_records, block, "training")
    val = eval_batches(encode_examples(val_records, block, "held-out"), tc.batch_size)

    print(
        f"held-out response loss: base ({training['init_from']}) vs fine-tuned ({args.checkpoint})",
        file=sys.stderr,
    )
    base, _ = load_base(training["init_from"], device, DEFAULT_DIR)
    losses = {
        "base": response_loss(base, val, device, dtype),
        "fine-tuned": response_loss(tuned, val, device, dtype),
    }
    del base
    print(
        f"timing {args.repeats} steps each: padded vs packed batches of {tc.batch_size} rows", file=sys.stderr
    )
    batching = {name: bench_batching(tuned, train_examples, tc, name == "packed", args, device, dtype)
                for name in ("padded", "packed")}  # fmt: skip

    rows = compare("val_loss", "nats/token", losses)
    units = {"step_ms": "ms", "train_tok_per_s": "tok/s", "padding_percent": "%", "peak_memory_mib": "MiB"}
    for metric, unit in units.items():
        rows += compare(metric, unit, {name: values[metric] for name, values in batching.items()})
    print_table(rows)
    preset = training["preset"]
    config = {**config["model"], **vars(tc), "init_from": training["init_from"], "data": Path(str(data)).name,
              "train_steps": training.get("step"), "repeats": args.repeats}  # fmt: skip
    write_report(args, "Supervised fine-tuning: base vs fine-tuned, padding vs packing", device, preset,
                 DEFAULT_PRESET, config, rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
