"""Prune a trained checkpoint's weights, and save the result for generate.py.

python prune.py                                       # project 01's model, Wanda at 50% unstructured
python prune.py --method magnitude --out data/models/p17-magnitude
python prune.py --method sparsegpt --pattern 2:4 --out data/models/p17-2of4     # semi-structured 2:4
python prune.py --method sparsegpt --bits 4 --out data/models/p17-sparse-int4  # 50% sparse and 4-bit at once
python prune.py --method structured --heads 0.25 --channels 0.25 --recover-iters 200   # a smaller model
python prune.py --init-from gpt2 --data input.txt      # GPT-2's weights, calibrated on a text file
python generate.py --checkpoint data/models/p17-2of4   # a pruned checkpoint is an ordinary one

Wanda, SparseGPT and the structured scores read calibration windows of the training split. With
--recover-iters the pruned model is fine-tuned briefly, its pruned weights held at exactly zero.
"""

import argparse
from pathlib import Path

from checkpoint import prepare_out, save_checkpoint
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    fraction_below,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
)
from loader import PROJECT01, PRUNED_DIR, calibration_batch, load_float_model, token_split, training_data
from pruning import METHODS, Sparsity, prune_model, recover, sparsity_of, structured_prune


def pattern(text: str) -> tuple[int, int]:
    """argparse type: "N:M", keep N of every M consecutive weights, 0 < N < M."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"must be N:M with 0 < N < M (2:4, 4:8), got {text}")
    return n, m


def parse_args(argv):
    p = ArgumentParser(description="Prune a checkpoint: magnitude, Wanda, SparseGPT, N:M, or whole heads.")
    source = p.add_mutually_exclusive_group()  # a checkpoint of this GPT, or GPT-2's weights
    source.add_argument("--checkpoint", type=Path, default=PROJECT01, help="the trained checkpoint to prune")
    source.add_argument("--init-from", default=None, help="instead: GPT-2's weights (gpt2, ... or a folder)")
    p.add_argument("--method", choices=[*METHODS, "structured"], default="wanda", help="how to choose")
    p.add_argument("--sparsity", type=fraction_below(1), default=0.5, help="unstructured: fraction removed")
    p.add_argument("--pattern", type=pattern, default=None, help="N:M instead, e.g. 2:4 (keep 2 of 4)")
    p.add_argument("--bits", type=int, choices=[4], default=None, help="sparsegpt: round what stays to int4")
    p.add_argument("--group-size", type=positive_int, default=128, help="--bits 4: inputs per scale")
    p.add_argument("--heads", type=fraction_below(1), default=0.25, help="structured: heads removed")
    p.add_argument(
        "--channels", type=fraction_below(1), default=0.25, help="structured: MLP channels removed"
    )
    p.add_argument("--calibration-samples", type=positive_int, default=128, help="calibration windows")
    p.add_argument(
        "--data", type=Path, default=None, help="calibration text or shards (default: the model's)"
    )
    p.add_argument("--recover-iters", type=non_negative_int, default=0, help="fine-tune steps afterwards")
    p.add_argument("--recover-lr", type=positive_float, default=1e-4, help="recovery learning rate")
    p.add_argument("--out", type=Path, default=PRUNED_DIR, help="where to write the pruned checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint this project wrote in --out"
    )
    p.add_argument("--seed", type=non_negative_int, default=1337, help="calibration windows and recovery")
    add_device_args(p, dtype=False)
    return p.parse_args(argv)


def resolve(args) -> dict:
    """What the flags ask for, or one line saying which of them contradict each other."""
    if args.bits and args.method != "sparsegpt":
        raise UserError("--bits 4 rounds the weights SparseGPT keeps; use it with --method sparsegpt")
    if args.bits and args.recover_iters:
        raise UserError("--recover-iters would move the weights SparseGPT rounded off the int4 grid")
    if args.pattern and args.method == "structured":
        raise UserError("--pattern is for magnitude, wanda and sparsegpt; structured removes whole heads")
    if args.method == "structured":
        return {"method": "structured", "heads": args.heads, "channels": args.channels}
    n, m = args.pattern or (0, 0)
    fraction = 1 - n / m if m else args.sparsity
    spec = {"method": args.method, "sparsity": fraction, "pattern": f"{n}:{m}" if m else None}
    return spec | ({"bits": 4, "group_size": args.group_size} if args.bits else {})


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = resolve(args)
    device = pick_device(args.device)
    if not args.init_from and args.out.resolve() == args.checkpoint.resolve():
        raise UserError("--out is the checkpoint being pruned; write the pruned one elsewhere")
    prepare_out(args.out, resume=False, overwrite=args.overwrite, resumable=False)
    model, meta = load_float_model(args.checkpoint, args.init_from, device)
    data = training_data(args.data, meta)
    train = token_split(data, "train", meta["tokenizer"].get("chars"))
    T = model.config.block_size
    calibration = calibration_batch(train, args.calibration_samples, T, args.seed).to(device)
    params = sum(p.numel() for p in model.parameters())
    try:
        if spec["method"] == "structured":
            model, _ = structured_prune(model, args.heads, args.channels, calibration)
        else:
            sp = Sparsity(spec["sparsity"], *(args.pattern or (0, 0)))
            prune_model(model, args.method, sp, calibration, args.bits, args.group_size)
    except ValueError as e:  # a pattern or group size that does not fit these layers
        raise UserError(str(e)) from e
    if args.recover_iters:
        losses = recover(model, train, args.recover_iters, args.recover_lr, 16, args.seed)
        spec["recovery"] = {"iters": args.recover_iters, "lr": args.recover_lr, "last_loss": losses[-1]}
    spec["calibration"] = {"data": str(data), "samples": args.calibration_samples, "seed": args.seed}
    save_checkpoint(args.out, model.eval(), {**meta, "pruning": spec})
    left = sum(p.numel() for p in model.parameters())
    print(f"{spec['method']}: {sparsity_of(model):.1%} of the blocks' Linear weights are zero; parameters "
          f"{params:,} -> {left:,}; wrote {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
