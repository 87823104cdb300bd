"""Quantize a trained checkpoint's weights after training, and save the result for generate.py.

python quantize.py                                    # project 03's checkpoint, int4 GPTQ in groups of 128
python quantize.py --method int8 --out data/models/p14-int8          # int8 per channel, round to nearest
python quantize.py --method int4 --group-size 32 --out data/models/p14-int4
python quantize.py --method int8-outlier --out data/models/p14-llm-int8   # LLM.int8()
python quantize.py --init-from gpt2 --data input.txt  # GPT-2's weights, calibrated on a text file
python generate.py --checkpoint data/models/p14-int8  # generate.py reads the format from config.json

The checkpoint is a directory like train.py's: model.safetensors holds the integer tensors (int8, or int4
packed two per byte as uint8), their fp16 scales and uint8 zero points, and every layer left in floating
point; config.json records the format under "quantization" (loader.py reads it back).

It also reads project 01's character model (--checkpoint data/models/project01_minimal_gpt), whose weights
are nearly all in the blocks that quantization rounds: the model benchmark.py measures on.
"""

from pathlib import Path

from checkpoint import prepare_out, save_checkpoint
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
from loader import (
    PROJECT03,
    QUANTIZED_DIR,
    calibration_batch,
    layers_bytes,
    load_float_model,
    token_split,
    training_data,
)
from quantization import BITS, DEFAULT_GROUP_SIZE, METHODS, block_linears, check_format, quantize_model


def parse_args(argv):
    p = ArgumentParser(description="Quantize a checkpoint's weights to int8 or int4 (RTN, GPTQ, LLM.int8()).")
    source = p.add_mutually_exclusive_group()  # a checkpoint of this GPT, or GPT-2's weights
    source.add_argument(
        "--checkpoint", type=Path, default=PROJECT03, help="the trained checkpoint to quantize"
    )
    source.add_argument(
        "--init-from", default=None, help="instead: GPT-2's weights (gpt2, ... or a local folder)"
    )
    p.add_argument("--method", choices=METHODS, default="gptq", help="int8/int4: round to nearest")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None, help="gptq's width (default 4)")
    p.add_argument(
        "--group-size",
        type=positive_int,
        default=None,
        help=f"int4: input features per scale (default {DEFAULT_GROUP_SIZE}); int8: per channel",
    )
    p.add_argument("--threshold", type=positive_float, default=6.0, help="int8-outlier: outlier magnitude")
    p.add_argument("--calibration-samples", type=positive_int, default=128, help="gptq: sequences")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="gptq's calibration text or shards (default: the checkpoint's)",
    )
    p.add_argument("--out", type=Path, default=QUANTIZED_DIR, help="where to write the quantized checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint this project wrote in --out"
    )
    p.add_argument("--seed", type=non_negative_int, default=1337, help="which calibration windows")
    add_device_args(p, dtype=False)
    return p.parse_args(argv)


def resolve_format(args) -> dict:
    """The format the flags ask for, or one line saying which flags contradict each other."""
    bits = args.bits or BITS.get(args.method, 4)
    if args.method in BITS and bits != BITS[args.method]:
        raise UserError(f"--bits {bits} contradicts --method {args.method}; --bits chooses gptq's width")
    if bits == 8 and args.group_size:
        raise UserError("--group-size applies to 4 bits; 8-bit formats have one scale per output channel")
    group_size = (args.group_size or DEFAULT_GROUP_SIZE) if bits == 4 else None
    threshold = args.threshold if args.method == "int8-outlier" else None
    return {"method": args.method, "bits": bits, "group_size": group_size, "threshold": threshold}


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = resolve_format(args)
    device = pick_device(args.device)
    if not args.init_from and args.out.resolve() == args.checkpoint.resolve():
        raise UserError("--out is the checkpoint being quantized; write the quantized one elsewhere")
    prepare_out(args.out, resume=False, overwrite=args.overwrite, resumable=False)
    model, meta = load_float_model(args.checkpoint, args.init_from, device)
    try:
        check_format(model, spec["bits"], spec["group_size"])
    except ValueError as e:
        raise UserError(f"--group-size: {e}") from e
    calibration = None
    if spec["method"] == "gptq":  # random windows of the training split
        data, T = training_data(args.data, meta), model.config.block_size
        tokens = token_split(data, "train", meta["tokenizer"].get("chars"))
        calibration = calibration_batch(tokens, args.calibration_samples, T, args.seed)
        spec["calibration"] = {"data": str(data), "samples": args.calibration_samples, "seed": args.seed}
        calibration = calibration.to(device)
    names = [name for name, _ in block_linears(model)]
    before = layers_bytes(model, names)
    quantize_model(model, args.method, spec["group_size"], spec["bits"], calibration, args.threshold)
    after = layers_bytes(model, names)
    save_checkpoint(args.out, model, {**meta, "quantization": spec})
    group = spec["group_size"] or "per channel"
    print(
        f"{args.method}, {spec['bits']} bits, group {group}: the blocks' {len(names)} Linear layers "
        f"{before / 2**20:.3g} -> {after / 2**20:.3g} MiB ({before / after:.1f}x smaller); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
