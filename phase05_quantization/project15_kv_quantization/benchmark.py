"""The quantised KV cache (KIVI) against the plain one. Quality on a trained checkpoint (project 03's by
default): held-out perplexity with each cache, computed by decoding the held-out text token by token through
the cache (teacher forcing: the true next token goes in, its log-probability is added up), since a prefill
alone never reads the cache; the share of positions where the top token matches the plain cache's; and
greedy generation from held-out prompts, token by token against the plain cache's. Memory at GPT-2 124M's
shape: bytes per token of each format, checked against the tensors of a real cache, and the longest context
and the largest batch that fit a fixed budget. Speed at that shape (random weights: a decode step costs the
same whatever the values): decode tokens/s at batch 1 after a long prompt.

python benchmark.py                       # project 03's checkpoint; memory and speed at GPT-2 124M's shape
python benchmark.py --threads 1                       # on a shared CPU
python benchmark.py --kv-residual 16 --eval-tokens 4096
python benchmark.py --checkpoint data/models/mine --data input.txt --preset cpu
"""

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import checkpoint_exists
from cli import (
    DTYPES,
    ArgumentParser,
    UserError,
    add_device_args,
    check_dtype,
    exits_cleanly,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
)
from config import PRESETS
from kv_quant import BITS, KVFormat, QuantizedKVCache, bytes_per_token, cache_bytes
from loader import PROJECT03, load_float_model, tensor_bytes, token_split, training_data
from model import GPT, KVCache
from results import add_output_args, compare, print_table, row, time_it, write_report

PLAIN = "plain cache (full precision)"


def quality_formats(residual: int, group_size: int) -> dict[str, KVFormat | None]:
    """name -> format (None: the plain cache). With the residual window, and without it (R = 0: every token
    but the newest G - 1 keys quantised) to show what the window buys, and keys per token to show what
    per-channel keys buy (KIVI's two ablations)."""
    out = {PLAIN: None}
    for bits in BITS:
        out[f"int{bits}, R={residual}"] = KVFormat(bits, residual, group_size)
    for bits in (4, 2):
        out[f"int{bits}, R=0"] = KVFormat(bits, 0, group_size)
        out[f"int{bits}, R=0, keys per token"] = KVFormat(bits, 0, group_size, per_channel_keys=False)
    return out


def windows(tokens: np.ndarray, T: int) -> torch.Tensor:
    """Every full (T + 1)-token window of the held-out tokens, (n, T + 1): T inputs and their next tokens."""
    n = (len(tokens) - 1) // T
    if n == 0:
        raise UserError(f"the held-out split has {len(tokens)} tokens, fewer than one {T}-token window")
    ids = torch.from_numpy(tokens[: n * T + 1].astype(np.int64))
    return torch.stack([ids[i * T : (i + 1) * T + 1] for i in range(n)])


@torch.no_grad()
def teacher_forced(model: GPT, fmt, ids: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    """Summed next-token loss of ids (n, T + 1) and the top token at every position, (n, T), decoding one
    position at a time through the cache: every prediction after the first reads the cache."""
    model.kv_format = fmt
    loss, top = 0.0, []
    for chunk in ids.split(batch):
        x, y = chunk[:, :-1], chunk[:, 1:]  # (b, T) each
        model.setup_cache(x.size(0), x.size(1))
        steps = []
        for t in range(x.size(1)):
            logits = model.prefill(x[:, :1]) if t == 0 else model.decode(x[:, t : t + 1], t)  # (b, V)
            loss += F.cross_entropy(logits.float(), y[:, t], reduction="sum").item()
            steps.append(logits.argmax(-1))
        top.append(torch.stack(steps, dim=1))
        model.clear_cache()
    return loss, torch.cat(top)


@torch.no_grad()
def full_forward_loss(model: GPT, ids: torch.Tensor, batch: int) -> float:
    """The same loss from the whole window in one pass, no cache: the plain cache must reproduce it."""
    return sum(F.cross_entropy(model(c[:, :-1])[0].flatten(0, 1), c[:, 1:].flatten(), reduction="sum").item()
               for c in ids.split(batch))  # fmt: skip


@torch.no_grad()
def greedy(model: GPT, fmt, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(n, new_tokens) greedy continuations of prompts (n, P), generated through the cache."""
    model.kv_format = fmt
    return torch.cat(list(model.generate_stream(prompts, new_tokens, temperature=0)), dim=1)


def quality_rows(args) -> tuple[list[dict], dict]:
    ckpt = args.checkpoint or PROJECT03
    if args.checkpoint is None and not checkpoint_exists(ckpt):
        print(f"note: no checkpoint in {ckpt} (project 03's): quality is not measured", file=sys.stderr)
        return [row("perplexity", PLAIN, None, "", note=f"no trained checkpoint in {ckpt}")], {}
    model, meta = load_float_model(ckpt, None, torch.device("cpu"))  # perplexity in float32, on the CPU
    check_format(KVFormat(2, args.kv_residual, args.kv_group_size), model.config)
    data = training_data(args.data, meta)
    T = model.config.block_size
    ids = windows(token_split(data, "val", meta["tokenizer"].get("chars"))[: args.eval_tokens + 1], T)
    prompt_len = min(16, T // 8)
    prompts, new_tokens = ids[: args.prompts, :prompt_len], T - prompt_len  # generation fills the context
    base_loss = full_forward_loss(model, ids, args.batch_size)
    rows = [row("perplexity", "full forward pass, no cache", math.exp(base_loss / ids[:, 1:].numel()), "")]
    ppl, top, gen = {}, {}, {}
    for name, fmt in tqdm(quality_formats(args.kv_residual, args.kv_group_size).items(), desc="quality"):
        loss, top[name] = teacher_forced(model, fmt, ids, args.batch_size)
        ppl[name] = math.exp(loss / ids[:, 1:].numel())
        gen[name] = greedy(model, fmt, prompts, new_tokens)
        match = (gen[name] == gen[PLAIN]).float()  # (n, new_tokens)
        diverged = (match == 0).int().argmax(1).where(match.min(1).values == 0, new_tokens)  # first mismatch
        rows += [
            row("perplexity", name, ppl[name], "", None if fmt is None else (PLAIN, ppl[PLAIN])),
            row("ppl_increase_pct", name, 100 * (ppl[name] / ppl[PLAIN] - 1), "%"),
            row("top1_agreement_pct", name, 100 * (top[name] == top[PLAIN]).float().mean().item(), "%"),
            row("greedy_agreement_pct", name, 100 * match.mean().item(), "%"),
            row("greedy_tokens_before_divergence", name, diverged.float().mean().item(), "tokens"),
        ]
        if fmt is not None and fmt.residual >= T:  # e.g. the tiny preset's 32 tokens at the default R = 32
            rows[-5:] = [
                {**r, "note": f"R = {fmt.residual} >= the context, {T}: nothing is quantised"}
                for r in rows[-5:]
            ]
    config = dict(
        checkpoint=str(ckpt), data=str(data), held_out_tokens=ids[:, 1:].numel(), context=T,
        greedy=f"{prompts.size(0)} held-out prompts of {prompt_len} tokens, {new_tokens} new tokens each",
    )  # fmt: skip
    return rows, config


def check_format(fmt: KVFormat, config) -> None:
    try:
        fmt.check(config.n_embd // config.n_head)
    except ValueError as e:
        raise UserError(str(e)) from e


def cache_formats(args, plain: str) -> dict[str, KVFormat | None]:
    """The plain cache, named `plain`, then int8, int4 and int2 with the residual window."""
    return {plain: None, **{f"int{b}": KVFormat(b, args.kv_residual, args.kv_group_size) for b in BITS}}


def memory_rows(args) -> list[dict]:
    """Per format at the preset's shape, 16-bit activations: bytes per token (the formula, all layers), the
    cut against fp16, a real cache's tensors against the formula, and what fits in --budget-gib."""
    mc, _ = PRESETS[args.preset]
    L, nh, hs, S = mc.n_layer, mc.n_head, mc.n_embd // mc.n_head, mc.block_size
    budget, fp16 = args.budget_gib * 2**30, torch.float16
    per_token, at_context, actual, longest, batch = {}, {}, {}, {}, {}
    for name, fmt in cache_formats(args, "fp16 (plain cache)").items():
        if fmt is None:
            real = KVCache(1, S, nh, hs, fp16)
            per_token[name], window = 2 * nh * hs * 2 * L, 0
        else:
            real = QuantizedKVCache(1, S, nh, hs, fp16, fmt=fmt)
            per_token[name] = bytes_per_token(fmt, nh, hs) * L
            window = cache_bytes(fmt, 1, S, nh, hs, fp16) * L - S * per_token[name]
        at_context[name] = (S * per_token[name] + window) / 2**20  # one sequence of the whole context
        actual[name] = sum(b.numel() * b.element_size() for b in real.buffers()) * L / 2**20  # the tensors
        longest[name] = int((budget - window) // per_token[name])  # batch 1
        batch[name] = int(budget // (S * per_token[name] + window))
    rows = compare("cache_bytes_per_token", "B", per_token)
    rows += [row("cache_cut_vs_fp16_pct", n, 100 * (1 - v / per_token["fp16 (plain cache)"]), "%")
             for n, v in per_token.items()]  # fmt: skip
    rows += compare("cache_mib_at_context", "MiB", at_context) + compare("cache_mib_allocated", "MiB", actual)
    return (
        rows
        + compare("longest_context_in_budget", "tokens", longest)
        + compare("largest_batch", "seqs", batch)
    )


@torch.no_grad()
def speed_rows(args, device, dtype) -> list[dict]:
    """Decode tokens/s at batch 1 after a --prompt-tokens prompt, each cache format on one random model.
    Each format's caches are set up and prefilled once; then the formats take turns, one timed run of
    --decode-tokens steps each per round, so that all of them meet the same machine (a shared CPU's load)."""
    mc, _ = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPT(mc).to(device=device, dtype=dtype).eval()
    weights = tensor_bytes(model) / 2**20
    P, D = args.prompt_tokens, args.decode_tokens
    prompt = torch.randint(mc.vocab_size, (1, P), generator=torch.Generator().manual_seed(0)).to(device)
    caches = {}
    for name, fmt in cache_formats(args, f"plain cache ({str(dtype).removeprefix('torch.')})").items():
        model.kv_format = fmt
        model.setup_cache(1, P + D * (args.repeats + 1), dtype, device)
        model.prefill(prompt)
        caches[name] = [block.attn.kv_cache for block in model.blocks]
    next_id, position = prompt[:, -1:], dict.fromkeys(caches, P)

    def run(name):
        def steps():  # the next D slots of this format's caches
            for block, cache in zip(model.blocks, caches[name]):
                block.attn.kv_cache = cache
            for i in range(D):
                model.decode(next_id, position[name] + i)
            position[name] += D

        return steps

    runs = {name: run(name) for name in caches}
    times = {name: [] for name in caches}
    for r in tqdm(range(args.repeats + 1), desc="decode"):  # round 0 warms up
        for name, steps in runs.items():
            seconds = time_it(steps, device, warmup=0, repeats=1)[0]
            if r:
                times[name].append(seconds)
    speed = {f"{name}, batch 1": D / statistics.median(t) for name, t in times.items()}
    return compare("decode_tok_per_s", "tok/s", speed) + [
        row("weight_mib", f"{args.preset} shape", weights, "MiB")
    ]


def parse_args(argv):
    p = ArgumentParser(
        description="Benchmark the KIVI-quantised KV cache (int8/int4/int2) against the plain one."
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help=f"a trained checkpoint (default: {PROJECT03.name}'s)"
    )
    p.add_argument("--data", type=Path, default=None, help="held-out data (default: the checkpoint's)")
    p.add_argument(
        "--eval-tokens", type=positive_int, default=16384, help="held-out tokens decoded per format"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="held-out windows decoded at once")
    p.add_argument("--prompts", type=positive_int, default=8, help="held-out prompts for greedy generation")
    p.add_argument(
        "--kv-residual", type=non_negative_int, default=KVFormat.residual, help="full-precision tokens"
    )
    p.add_argument(
        "--kv-group-size", type=positive_int, default=KVFormat.group_size, help="key group (tokens)"
    )
    p.add_argument(
        "--preset", choices=list(PRESETS), default="gpt2", help="the model shape for memory and speed"
    )
    p.add_argument("--budget-gib", type=positive_float, default=1.0, help="the cache memory budget")
    p.add_argument("--prompt-tokens", type=positive_int, default=512, help="context before the timed steps")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the median is reported")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: PyTorch's); 1 on a shared CPU",
    )
    add_device_args(p, dtype=False)
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto",
        help="speed runs' weights and activations; auto: float16 on GPUs, float32 elsewhere",
    )  # fmt: skip
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:  # on a loaded CPU, every small op of two threads can wait at a barrier for a busy core
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    auto = torch.float16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else DTYPES[args.dtype]
    check_dtype(dtype, device)
    mc, _ = PRESETS[args.preset]
    check_format(KVFormat(2, args.kv_residual, args.kv_group_size), mc)
    context = args.prompt_tokens + args.decode_tokens * (args.repeats + 1)
    if context > mc.block_size:
        raise UserError(f"--prompt-tokens + --decode-tokens x (--repeats + 1) = {context} exceed the "
                        f"{args.preset} preset's context ({mc.block_size})")  # fmt: skip
    rows, config = quality_rows(args)
    rows += memory_rows(args) + speed_rows(args, device, dtype)
    print_table(rows)
    config.update(kv_residual=args.kv_residual, kv_group_size=args.kv_group_size, budget_gib=args.budget_gib,
                  prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats,
                  dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())  # fmt: skip
    write_report(args, "KV-cache quantization (KIVI)", device, args.preset, "gpt2", config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
