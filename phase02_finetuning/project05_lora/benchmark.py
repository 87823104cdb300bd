"""Full fine-tuning vs LoRA at ranks 4, 8 and 16, side by side on the same base, data and steps:
trainable parameters, optimizer-state bytes, peak memory, step time, and the held-out response loss reached.

python benchmark.py --data instruction-data                  # on project 03's checkpoint (or GPT-2)
python benchmark.py --preset tiny --data FILE --steps 2       # seconds, for tests
"""

import sys
from dataclasses import replace

import torch
from tqdm import tqdm

from checkpoint import load_base
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    pick_device,
    pick_dtype,
    positive_int,
)
from data import SFTLoader, encode_examples, eval_batches, load_records, split_records
from lora import LoRAConfig, apply_lora, merge_lora, trainable_parameters, unmerge_lora
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import BASE, DEFAULT_PRESET, PRESETS, lr_at, make_optimizer, response_loss, set_dropout, train_step

# Full fine-tuning's learning rates are project 04's (LoRA's, in PRESETS, are 10x higher).
FULL_LR = {"gpt2": 5e-5, "cpu": 1e-3, "tiny": 3e-3}
UNITS = {
    "trainable_params": "count",
    "trainable_percent": "%",
    "optimizer_state_mib": "MiB",
    "peak_memory_mib": "MiB",
    "step_ms": "ms",
    "val_loss": "nats/token",
    "decode_tok_per_s": "tok/s",
}


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
    model, _ = load_base(init_from, device, BASE)
    set_dropout(model, tc.dropout)  # as train.py sets it, before the adapters get their own
    torch.manual_seed(tc.seed)  # before apply_lora: the adapters' random A is the same in every run
    if rank is not None:
        apply_lora(model, LoRAConfig(r=rank, alpha=2.0 * rank))  # NEW: alpha/r = 2 at every rank
    model.train()
    lr = tc.lr if rank is not None else FULL_LR[args.preset]
    tc = replace(tc, lr=lr, min_lr=lr / 10, max_iters=args.steps)
    optimizer = make_optimizer(model, tc, device)
    loader = SFTLoader(train_examples, tc.batch_size, model.config.block_size, tc.pack, tc.seed)
    steps = iter(range(args.steps))
    bar = tqdm(total=args.steps, desc=f"lora r={rank}" if rank else "full", unit="step", leave=False)

    def step():
        train_step(model, optimizer, loader, lr_at(next(steps), tc), tc, device, dtype)
        bar.update()

    seconds, peak = time_it(step, device, 1, args.steps - 1)  # the first step allocates Adam's moments
    bar.close()
    decode = {"decode_tok_per_s": decode_speed(model, args, device)}
    if rank is not None:  # NEW: merged, the adapter costs nothing at inference (W + B A is one matrix)
        merge_lora(model)
        decode["decode_merged_tok_per_s"] = decode_speed(model, args, device)
        unmerge_lora(model)
    return {
        **decode,
        "trainable_params": trainable_parameters(model),
        "trainable_percent": 100 * trainable_parameters(model) / model.num_params(non_embedding=False),
        "optimizer_state_mib": optimizer_state_bytes(optimizer) / 2**20,
        "peak_memory_mib": peak,
        "step_ms": seconds * 1e3,
        "val_loss": response_loss(model, val, device, dtype),
    }


@torch.no_grad()
def decode_speed(model, args, device) -> float:
    """Greedy decoding tokens/s at batch 1 from a one-token prompt (no KV cache), in eval mode."""
    model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    seconds, _ = time_it(
        lambda: list(model.generate_stream(prompt, args.gen_tokens, temperature=0)), device, 1, 3
    )
    model.train()
    return args.gen_tokens / seconds


def parse_args(argv):
    p = ArgumentParser(description="Benchmark full fine-tuning against LoRA r=4, 8, 16.")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="batch size and learning rate (default: gpt2 on a GPU, cpu elsewhere)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="base model, as train.py takes it (default: auto; scratch for --preset tiny)",
    )
    p.add_argument(
        "--data", default=None, help="instruction records, as train.py takes them (default: Stanford Alpaca)"
    )
    p.add_argument("--ranks", default="4,8,16", help="LoRA ranks to compare with full fine-tuning")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps per variant, at least 2 (default: 300 on a GPU, 100 elsewhere)",
    )
    p.add_argument("--gen-tokens", type=positive_int, default=64, help="tokens decoded per timing")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    args.preset = args.preset or (DEFAULT_PRESET if device.type == "cuda" else "cpu")
    args.steps = max(2, args.steps or (300 if device.type == "cuda" else 100))
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
    probe, base = load_base(init_from, torch.device("cpu"), BASE)
    block = probe.config.block_size
    del probe
    train_examples = encode_examples(train_records, block, "training")
    val = eval_batches(encode_examples(val_records, block, "held-out"), tc.batch_size)

    variants = {"full": None, **{f"lora-r{r}": r for r in ranks}}
    print(f"{args.steps} steps of each of {', '.join(variants)} on {data_name}", file=sys.stderr)
    results = {
        name: run_variant(rank, init_from, train_examples, val, tc, args, device, dtype)
        for name, rank in tqdm(variants.items(), desc="variants")
    }
    rows = [
        r
        for metric, unit in UNITS.items()
        for r in compare(metric, unit, {name: values[metric] for name, values in results.items()})
    ]
    for name, values in results.items():  # NEW: each adapter merged, next to the same adapter unmerged
        if "decode_merged_tok_per_s" in values:
            unmerged = (name, values["decode_tok_per_s"])
            rows.append(
                row(
                    "decode_tok_per_s", f"{name} merged", values["decode_merged_tok_per_s"], "tok/s", unmerged
                )
            )
    print_table(rows)
    config = {
        **{k: v for k, v in vars(tc).items() if k not in ("max_iters", "eval_interval", "eval_samples")},
        "full_lr": FULL_LR[args.preset],
        "steps": args.steps,
        "init_from": base,
        "data": data_name,
        "lora_alpha_over_r": 2.0,
        "lora_targets": list(LoRAConfig().targets),
    }
    write_report(args, "LoRA vs full fine-tuning", device, args.preset, DEFAULT_PRESET, config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
