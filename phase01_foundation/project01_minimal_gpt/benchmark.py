"""Measure project 01's GPT: training step time and tokens/s, decoding tokens/s, peak memory, parameter
count, and the validation loss of a trained checkpoint.

The baselines, side by side in the same run: the same model and weights with attention computed by PyTorch's
fused F.scaled_dot_product_attention instead of the written-out softmax(QK^T/sqrt(d))V of model.py; and
decoding that computes the logits of every position (as the model's forward does) instead of the last only.

    python benchmark.py                   # the shakespeare preset -> data/benchmarks/<project>/<device>.json
    python benchmark.py --preset tiny     # seconds on a CPU
"""

import functools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import DEFAULT_DIR, checkpoint_exists, load_checkpoint, read_run_config
from cli import (
    ArgumentParser,
    add_device_args,
    autocast,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
)
from data import CharTokenizer, read_text, train_val_split
from model import GPT, CausalSelfAttention, sample_next_token
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import DEFAULT_PRESET, PRESETS, TrainConfig, estimate_loss, make_optimizer, train_step


class SDPAAttention(CausalSelfAttention):
    """The reference: identical parameters, but PyTorch's fused attention kernel does the math."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        dropout = self.attn_dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


def use_sdpa(model: GPT) -> GPT:
    """Switch every block to the reference attention in place (same weights, same state dict)."""
    for block in model.blocks:
        block.attn.__class__ = SDPAAttention
    return model


@torch.no_grad()
def decode_all_logits(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> None:
    """Greedy decoding that runs lm_head on every position of the window, then keeps the last: the cost
    model.generate_stream avoids."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])  # (B, T, V)
        idx = torch.cat([idx, sample_next_token(logits[:, -1, :], temperature=0)], dim=1)


def decode(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> None:
    for _ in model.generate_stream(idx, max_new_tokens, temperature=0):
        pass


def bench_training(model: GPT, tc: TrainConfig, args, device, dtype) -> tuple[float, float | None]:
    """Median seconds of a training step, and the peak memory it took."""
    T, V = model.config.block_size, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(V, (tc.batch_size, T), generator=gen).to(device)  # timing does not depend on the text
    y = torch.randint(V, (tc.batch_size, T), generator=gen).to(device)
    optimizer = make_optimizer(model, tc, device)
    model.train()
    return time_it(
        lambda: train_step(model, optimizer, x, y, tc.lr, tc, device, dtype),
        device,
        args.warmup,
        args.repeats,
    )


def bench_decoding(variants: dict, args, device, dtype) -> dict[str, float]:
    """Tokens per second of greedy decoding from a one-token prompt, batch 1, no KV cache, for each
    {name: (decoder, model)}. The variants take turns, round after round, so that a slow spell of a shared
    machine falls on all of them alike; the median over rounds is reported."""
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    times = {name: [] for name in variants}
    with autocast(device, dtype):
        for _ in range(max(1, args.repeats // 2)):
            for name, (decoder, model) in variants.items():
                model.eval()
                run = functools.partial(decoder, model, prompt, args.gen_tokens)
                times[name].append(time_it(run, device, 1, 1)[0])
    return {name: args.gen_tokens / statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def max_logit_difference(a: GPT, b: GPT, device) -> float:
    """How far apart the two attention implementations' logits are on the same input (eval mode)."""
    a.eval(), b.eval()
    T, V = a.config.block_size, a.config.vocab_size
    idx = torch.randint(V, (2, T), generator=torch.Generator().manual_seed(1)).to(device)
    return (a(idx)[0].float() - b(idx)[0].float()).abs().max().item()


def checkpoint_val_loss(args, device, dtype) -> tuple[float | None, str]:
    """The validation loss of a trained checkpoint (--checkpoint, else this project's default one if there is
    one), estimated exactly as train.py does (same batches). Returns (loss, a note saying which it was)."""
    if args.checkpoint is None and not checkpoint_exists(DEFAULT_DIR):
        return None, f"not measured: no checkpoint at {DEFAULT_DIR}"
    checkpoint = args.checkpoint or DEFAULT_DIR
    read_run_config(checkpoint, "benchmark.py")  # another project's run is named, not misread
    model, config = load_checkpoint(checkpoint, device, tokenizer="char")
    tokenizer = CharTokenizer(config["tokenizer"]["chars"])
    text = read_text(args.data if args.data else config["training"]["data"])
    _, val_ids = train_val_split(torch.tensor(tokenizer.encode(text)), model.config.block_size)
    tc = TrainConfig(**config["training"]["train_config"])
    training = config["training"]
    note = f"checkpoint trained with the {training['preset']} preset for {training['step']} steps"
    return estimate_loss(model, {"val": val_ids}, tc, device, dtype)["val"], note


def parse_args(argv):
    p = ArgumentParser(description="Benchmark project 01: written-out attention vs PyTorch's fused SDPA.")
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET, help="model size to time")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"trained checkpoint for the val loss (default: {DEFAULT_DIR.name}'s, if there is one)",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="text for the val loss (default: the checkpoint's)"
    )
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed steps; the median is reported")
    p.add_argument("--gen-tokens", type=positive_int, default=200, help="tokens decoded per timing")
    p.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the random weights timed")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    mc, tc = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    explicit = GPT(mc).to(device)
    sdpa = use_sdpa(GPT(mc).to(device))
    sdpa.load_state_dict(explicit.state_dict())
    logit_diff = max_logit_difference(explicit, sdpa, device)  # before timing: training steps change weights

    val_loss, val_note = checkpoint_val_loss(args, device, dtype)  # first: a bad checkpoint fails at once
    print(f"benchmarking the {args.preset} preset on {device.type} ({dtype})", file=sys.stderr)
    decode_speed = bench_decoding(
        {
            "explicit, logits at every position": (decode_all_logits, explicit),
            "explicit attention": (decode, explicit),
            "torch sdpa": (decode, sdpa),
        },
        args,
        device,
        dtype,
    )
    step = {
        name: bench_training(model, tc, args, device, dtype)
        for name, model in (("explicit attention", explicit), ("torch sdpa", sdpa))
    }

    tokens = tc.batch_size * mc.block_size
    rows = [row("params", "model", explicit.num_params(), "params")]
    rows += compare("step_ms", "ms", {name: seconds * 1e3 for name, (seconds, _) in step.items()})
    rows += compare(
        "train_tok_per_s", "tok/s", {name: tokens / seconds for name, (seconds, _) in step.items()}
    )
    rows += compare("peak_memory_mib", "MiB", {name: peak for name, (_, peak) in step.items()})
    rows += compare("decode_tok_per_s", "tok/s", decode_speed)
    rows.append(row("max_abs_logit_diff", "torch sdpa vs explicit", logit_diff, ""))
    rows.append(row("val_loss", "checkpoint", val_loss, "nats/char", note=val_note))
    print_table(rows)
    config = {
        **vars(mc),
        **vars(tc),
        "dtype": str(dtype).removeprefix("torch."),
        "gen_tokens": args.gen_tokens,
    }
    write_report(args, "Minimal GPT", device, args.preset, DEFAULT_PRESET, config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
