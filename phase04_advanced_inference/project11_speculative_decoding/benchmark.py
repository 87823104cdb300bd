"""Speculative decoding against the target model alone: tokens/s of greedy and sampled generation with a draft
model at k = 2, 4, 5, 8 and with prompt lookup; the acceptance rate and tokens per target pass of each; and,
beside the measured speed-up, the one Leviathan et al.'s formula expects from the measured acceptance and the
measured cost ratio c of a draft step to a target step. Then the same costs at GPT-2 124M's shape (random
weights: a cost does not depend on them), to show what a larger target does to c.

python benchmark.py                                # project 03's model, this project's draft (--preset draft)
python benchmark.py --checkpoint DIR --draft DIR   # any target and draft that share a tokenizer
"""

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_DIR, MODELS_DIR, checkpoint_exists, load_checkpoint
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    command,
    exits_cleanly,
    pick_device,
    pick_dtype,
    positive_int,
    sync,
    temperature,
)
from model import GPT, GPTConfig
from results import add_output_args, compare, print_table, row, time_it, write_report
from speculative import LookupDrafter, ModelDrafter, SpeculativeDecoder
from tokenizer import GPT2Tokenizer

# Openings of Tiny Shakespeare's kind; each is cut to half the target's context.
PROMPTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n",
    "ROMEO:\n",
    "KING RICHARD III:\nNow is the winter of our discontent\n",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n",
]


def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """Leviathan et al. (2023), eq. 1: with each draft accepted independently with probability alpha, a pass
    yields 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha) tokens (the last from the target)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, c: float, verify: float = 1.0) -> float:
    """Their theorem 3.8: a pass costs k draft steps (c each, in target steps) and one target pass, which the
    paper takes to cost one target step; `verify` is what it measures to cost instead."""
    return expected_tokens_per_pass(alpha, k) / (k * c + verify)


def generate_all(decoder, prompts: list[torch.Tensor], new: list[int], temp: float, seed: int) -> list:
    """Every prompt's continuation with the same seed each time, as lists of ids."""
    gen = torch.Generator(device=prompts[0].device).manual_seed(seed)
    return [
        [t.item() for t in decoder.generate_stream(p, n, temp, generator=gen)] for p, n in zip(prompts, new)
    ]


@torch.no_grad()
def step_ms(model: GPT, tokens: int, prompt: torch.Tensor, repeats: int) -> float:
    """Milliseconds of one cached pass of `tokens` new tokens after the prompt: a decode step (1) or a
    verification (k + 1), median of `repeats`."""
    model.setup_cache(1, prompt.size(1) + tokens)
    model.prefill(prompt)
    new = prompt.new_zeros((1, tokens))  # what the tokens are does not change the time
    times = []
    for _ in range(repeats + 2):  # two untimed
        sync(prompt.device)
        t0 = time.perf_counter()
        model.verify(new, prompt.size(1), tokens).sum().item()  # .item() waits for the device
        times.append(time.perf_counter() - t0)
    model.clear_cache()
    return statistics.median(times[2:]) * 1e3


def cost_rows(target: GPT, draft: GPT | None, name: str, ks: list[int], prompt: torch.Tensor, repeats: int):
    """A decode step of the target and of the draft, and a verification pass of k + 1 tokens, in ms; the
    ratios to a target step are c and the verification's cost. Returns (rows, c, {k: verify cost})."""
    target_ms = step_ms(target, 1, prompt, repeats)
    steps = {f"{name}: target step": target_ms}
    if draft is not None:
        steps[f"{name}: draft step"] = step_ms(draft, 1, prompt, repeats)
    rows = compare("decode_step_ms", "ms", steps)
    verify = {k: step_ms(target, k + 1, prompt, repeats) for k in ks}
    baseline = (f"{name}: target step", target_ms)
    rows += [
        row("verify_ms", f"{name}: verify k={k} ({k + 1} tokens)", ms, "ms", baseline)
        for k, ms in verify.items()
    ]
    c = steps.get(f"{name}: draft step", 0.0) / target_ms
    return rows, c, {k: ms / target_ms for k, ms in verify.items()}


def decoding_rows(target, draft, args, prompts, new, c, verify) -> tuple[list[dict], list[tuple]]:
    """Tokens/s of every variant at every temperature, with its acceptance, and the formula's figures."""
    rows, summary = [], []  # summary: (label, stats, expected tokens/pass, expected speed-ups, speed-up)
    variants = [("target alone", None, 0)]
    variants += [(f"draft k={k}", "model", k) for k in args.ks]
    variants += [(f"lookup k={args.lookup_k}", "lookup", args.lookup_k)]
    bar = tqdm(total=len(variants) * len(args.temperatures), desc="decoding")
    for temp in args.temperatures:
        speed, reference, found, measured_rows = {}, None, [], []
        for name, kind, k in variants:
            label = f"{name}, T={temp:g}"
            bar.update()
            if kind == "model" and draft is None:
                speed[label] = None
                continue
            if kind is None:
                decoder = target
            else:
                drafter = ModelDrafter(draft, target) if kind == "model" else LookupDrafter()
                decoder = SpeculativeDecoder(target, drafter, k)
            run = functools.partial(generate_all, decoder, prompts, new, temp, args.seed)
            out = run()  # the warm-up: the tokens, and for greedy the check against the target's
            seconds, _ = time_it(run, prompts[0].device, warmup=0, repeats=args.repeats)
            speed[label] = sum(new) / seconds
            if kind is None:
                reference = out
                continue
            stats = decoder.stats  # every run's passes (greedy runs repeat the first exactly)
            cost = c if kind == "model" else 0.0  # the lookup costs no model step
            tokens = expected_tokens_per_pass(stats.alpha, k)
            paper = expected_speedup(stats.alpha, k, cost)
            with_verify = expected_speedup(stats.alpha, k, cost, verify[k])
            measured_rows += [
                row("acceptance_rate", label, stats.acceptance_rate, "fraction"),
                row("alpha", label, stats.alpha, "fraction", note="accepted / (accepted + rejections)"),
                row("tokens_per_pass", label, stats.tokens_per_step, "tokens"),
                row("expected_tokens_per_pass", label, tokens, "tokens", note="(1 - a^(k+1)) / (1 - a)"),
                row("expected_speedup", label, paper, "x", note="E[tokens] / (k c + 1)"),
                row("expected_speedup_with_verify_cost", label, with_verify, "x", note="E / (k c + v_k)"),
            ]
            if temp == 0:
                same = sum(a == b for o, r in zip(out, reference) for a, b in zip(o, r))
                measured_rows.append(row("greedy_tokens_as_target", label, same / sum(new), "fraction"))
            found.append((label, stats, tokens, paper, with_verify))
        rows += compare("decode_tok_per_s", "tok/s", speed) + measured_rows
        base = speed[f"target alone, T={temp:g}"]
        summary += [(*f, speed[f[0]] / base) for f in found]
    bar.close()
    return rows, summary


def print_summary(summary: list[tuple], c: float) -> None:
    """The README's table: measured beside expected."""
    print(f"\ncost ratio c (draft step / target step) = {c:.3f}")
    print("| variant | acceptance | tokens/pass (formula) | speed-up | formula: paper / with verify cost |")
    print("| --- | --- | --- | --- | --- |")
    for label, stats, tokens, paper, with_verify, speedup in summary:
        print(
            f"| {label} | {stats.acceptance_rate:.0%} (a = {stats.alpha:.2f}) | {stats.tokens_per_step:.2f} "
            f"({tokens:.2f}) | {speedup:.2f}x | {paper:.2f}x / {with_verify:.2f}x |"
        )


def list_of(kind):
    """argparse type: comma-separated values, each checked by `kind` (its message names the bad one)."""

    def parse(text: str) -> list:
        return [kind(v) for v in text.split(",")]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse's "invalid ... value" names it
    return parse


def parse_args(argv):
    p = ArgumentParser(description="Benchmark speculative decoding against the target model alone.")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=MODELS_DIR / "project03_pretrain",
        help="the target model (default: project 03's)",
    )
    p.add_argument(
        "--draft", type=Path, default=DEFAULT_DIR, help="the draft model (default: train.py --preset draft's)"
    )
    p.add_argument("--ks", type=list_of(positive_int), default=[2, 4, 5, 8], help="drafts per pass")
    p.add_argument("--lookup-k", type=positive_int, default=5, help="prompt lookup's drafts per pass")
    p.add_argument("--temperatures", type=list_of(temperature), default=[0.0, 0.8], help="0 = greedy")
    p.add_argument("--new-tokens", type=positive_int, default=100, help="per prompt, at most to the context")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the median is reported")
    p.add_argument("--seed", type=positive_int, default=1337, help="the sampled runs' seed")
    p.add_argument("--no-124m", action="store_true", help="skip the costs at GPT-2 124M's shape")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


def load_models(args, device, dtype) -> tuple[GPT, GPT | None, dict]:
    if not checkpoint_exists(args.checkpoint):
        train = command("train.py", "--preset", "cpu", project="project03_pretrain")
        raise UserError(f"no target model in {args.checkpoint}: train one with {train}, or pass --checkpoint")
    target, config = load_checkpoint(args.checkpoint, device, tokenizer="tiktoken")
    draft = None
    if checkpoint_exists(args.draft):
        draft, _ = load_checkpoint(args.draft, device, tokenizer="tiktoken")
        try:
            ModelDrafter(draft, target)
        except ValueError as e:
            raise UserError(f"{args.draft}: {e}") from e
        draft = draft.to(dtype)
    else:
        print(f"note: no draft model in {args.draft}: the draft rows are not measured", file=sys.stderr)
    return target.to(dtype), draft, config


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:  # one sequence of a small model gains little from more threads, and waits at every
        torch.set_num_threads(args.threads)  # OpenMP barrier when another process holds one of the cores
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    target, draft, config = load_models(args, device, dtype)
    block = target.config.block_size
    tokenizer = GPT2Tokenizer()
    prompts = [torch.tensor([tokenizer.encode(p)[: block // 2]], device=device) for p in PROMPTS]
    new = [min(args.new_tokens, block - p.size(1)) for p in prompts]  # speculation stops at the context
    if max(args.ks + [args.lookup_k]) >= block // 2:
        raise UserError(
            f"k must stay below half the target's context ({block // 2}): it drafts after the prompt"
        )
    shortest = min(block, draft.config.block_size if draft is not None else block)
    cost_prompt = prompts[0][:, : shortest // 2]  # the costs are timed after it, in both models' contexts
    rows, c, verify = cost_rows(target, draft, "target", args.ks + [args.lookup_k], cost_prompt, 50)
    decoding, summary = decoding_rows(target, draft, args, prompts, new, c, verify)
    rows += decoding
    if not args.no_124m:  # the cost side only: random weights of GPT-2 124M's shape, the same draft
        torch.manual_seed(0)
        big = GPT(GPTConfig(block_size=block)).to(device, dtype).eval()
        rows += cost_rows(big, draft, "124M shape", args.ks, cost_prompt, 10)[0]
    print_table(rows)
    print_summary(summary, c)
    preset = config["training"].get("preset", "unknown")
    settings = {
        "target": str(args.checkpoint),
        "draft": str(args.draft) if draft is not None else None,
        "target_params": target.num_params(),
        "draft_params": draft.num_params() if draft is not None else None,
        "dtype": str(dtype).removeprefix("torch."),
        "new_tokens": new,
        "prompt_tokens": [p.size(1) for p in prompts],
        "temperatures": args.temperatures,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    write_report(args, "Speculative decoding", device, preset, "cpu", settings, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
