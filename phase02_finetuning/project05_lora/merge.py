"""Fold a LoRA adapter into its base model and save the result as an ordinary checkpoint: W + (alpha/r) B A
in every adapted layer. The merged model runs at the base model's speed and loads anywhere a full checkpoint
does (a later project can start from it with --init-from).

python merge.py                                    # data/models/<this project> -> ..._merged
python merge.py --checkpoint /tmp/lora --out /tmp/lora-merged
"""

from pathlib import Path

from checkpoint import DEFAULT_DIR, load_checkpoint, prepare_out, save_checkpoint
from cli import ArgumentParser, UserError, command, exits_cleanly
from lora import merge_and_unload


def parse_args(argv):
    p = ArgumentParser(description="Merge a LoRA adapter into its base model; save a full checkpoint.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help="an adapter written by train.py")
    p.add_argument("--out", type=Path, default=None, help="where to save (default: <checkpoint>_merged)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint.resolve()  # "." has no name to build the default --out from
    args.out = (args.out or args.checkpoint.with_name(args.checkpoint.name + "_merged")).resolve()
    return args


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out == args.checkpoint:  # saving would replace the adapter before anything else could use it
        raise UserError(f"--out {args.out} is the adapter being merged; choose another --out")
    prepare_out(args.out, resume=False, overwrite=args.overwrite, resumable=False)  # train.py's --out rules
    model, config = load_checkpoint(args.checkpoint)
    if "lora" not in config:
        raise UserError(f"{args.checkpoint} holds a full model, not an adapter; nothing to merge")
    merge_and_unload(model)  # a plain GPT whose weights include the adapters' updates
    meta = {k: v for k, v in config.items() if k not in ("format", "project", "model", "lora", "base")}
    meta["training"] = {
        **config["training"],
        "merged_from": str(args.checkpoint.resolve()),
        "lora": config["lora"],
        "base": config["base"],
    }
    save_checkpoint(args.out, model, meta)
    print(
        f"saved the merged model to {args.out}\n"
        f"try it: {command('generate.py', '--checkpoint', str(args.out))}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
