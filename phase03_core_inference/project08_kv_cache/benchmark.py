"""Measure the KV cache: greedy decoding tokens/s without and with it at 128, 512 and 1,000 new tokens (and
2,000 on a GPU), the prefill's time to first token, the cache's memory, and Hugging Face transformers'
`generate` (with its own cache) on the same weights. On CUDA also torch.compile of the decode step (CUDA
graphs) and the memory bandwidth it reaches.

Speed does not depend on the weights, so the timings use random weights of the preset's shape (GPT-2 124M by
default). Whether the cache changes any token is checked on a trained model: --checkpoint, else this
project's or project 03's default checkpoint, else the random weights.

python benchmark.py                  # GPT-2 124M; on a CPU the no-cache baseline stops at 128 new tokens
python benchmark.py --preset tiny    # seconds, for tests
"""

import argparse
import functools
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_DIR, MODELS_DIR, checkpoint_exists, load_checkpoint
from cli import (
    REPO_ROOT,
    ArgumentParser,
    add_device_args,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
)
from config import DEFAULT_PRESET, PRESETS
from hf import CONV1D_WEIGHTS, name_from_hf
from model import GPT, KVCache
from results import add_output_args, compare, print_table, row, time_it, write_report

PROMPT_TOKENS = 16  # the decoding runs continue a prompt of this many (random) tokens
LENGTHS = {"tiny": (16, 64)}  # new tokens per run; the other presets: 128, 512, 1000 (and 2000 on a GPU)
TINY = "the tiny preset is too small to show the cache's gain: --preset cpu or the default does"
IDENTITY_TOKENS = 200  # greedy tokens compared between the cached and the uncached path
# Peak HBM bandwidth in bytes/s, from the data sheets, for the fraction decoding reaches.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "A100": 2.0e12}


def lengths_list(text: str) -> tuple[int, ...]:
    """argparse type for --lengths: "128,512" -> (128, 512)."""
    try:
        lengths = tuple(sorted({int(n) for n in text.split(",") if n.strip()}))
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) <= 0:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers, got {text!r}")
    return lengths


def parse_args(argv):
    p = ArgumentParser(
        description="Benchmark decoding with and without the KV cache, and against transformers."
    )
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET, help="model shape to time")
    p.add_argument(
        "--lengths",
        type=lengths_list,
        default=None,
        help="new tokens per run (default: 128,512,1000; 2000 too on CUDA)",
    )
    p.add_argument(
        "--no-cache-up-to",
        type=positive_int,
        default=None,
        help="the longest run timed without the cache (default: 128 on a CPU, where 512 tokens take about "
        "4 minutes at 124M on 2 cores and 1,000 about 12 more; every length on a GPU)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a checkpoint of this GPT (project 03's, 07's or this project's) for the same-tokens checks "
        "(default: this project's, else project03_pretrain's, else the random weights)",
    )
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="timed runs, median (default: 3 GPU, 1 CPU)"
    )
    p.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the random weights timed")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


def random_ids(n: int, vocab_size: int, device, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab_size, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)


def decode(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> None:
    for _ in model.generate_stream(prompt, n, temperature=0, use_cache=use_cache):
        pass


def tok_per_s(run, n: int, device, repeats: int) -> float:
    """n new tokens per second of run(n), after one untimed run: on a GPU a whole one, since the first time
    each shape is seen costs extra (cuBLAS picks its kernels, the allocator grows; without the cache every
    step has a new shape); on a CPU, where a run takes minutes, a short one."""
    run(n if device.type == "cuda" else min(n, 8))
    return n / time_it(lambda: run(n), device, 0, repeats)[0]


@torch.no_grad()
def time_to_first_token(model: GPT, prompt: torch.Tensor, device, repeats: int) -> dict[str, float]:
    """Milliseconds to the first token's logits: the prefill, with and without writing the cache."""
    model.setup_cache(1, prompt.size(1), device=device)
    try:
        cached = time_it(lambda: model.prefill(prompt), device, 1, max(3, repeats))[0]
    finally:
        model.clear_cache()
    plain = time_it(lambda: model.next_token_logits(prompt), device, 1, max(3, repeats))[0]
    return {"no cache": plain * 1e3, "kv cache": cached * 1e3}


def cache_memory(model: GPT, context: int, dtype, device) -> tuple[int, int]:
    """(bytes by the formula 2 * n_layer * B * T * C * bytes, bytes the KVCache buffers hold) at B = 1 and T =
    the context: keys and values, for every layer, of every position."""
    c = model.config
    formula = 2 * c.n_layer * 1 * context * c.n_embd * torch.tensor([], dtype=dtype).element_size()
    print(
        f"KV cache at the full context: 2 * n_layer * B * T * C * bytes = 2 * {c.n_layer} * 1 * {context} * "
        f"{c.n_embd} * {torch.tensor([], dtype=dtype).element_size()} = {formula:,} bytes",
        file=sys.stderr,
    )
    model.setup_cache(1, context, dtype, device)
    caches = [m for m in model.modules() if isinstance(m, KVCache)]
    measured = sum(b.numel() * b.element_size() for cache in caches for b in cache.buffers())
    model.clear_cache()
    return formula, measured


@torch.no_grad()
def compiled_decoding(model: GPT, prompt: torch.Tensor, lengths, device, repeats: int):
    """CUDA only: yields (length, tokens/s) with the decode step compiled, mode="reduce-overhead": CUDA graphs
    replay a step's few hundred kernels as one launch, which at batch 1 is where eager time goes. One static
    cache for every length (gpt-fast's way), so the step compiles once; the prefill runs eagerly."""
    T = prompt.size(1)
    model.setup_cache(1, T + max(lengths), device=device)
    step = torch.compile(model.next_token_logits, mode="reduce-overhead", fullgraph=True)

    def run(n: int) -> None:
        next_id = model.prefill(prompt).argmax(dim=-1, keepdim=True)  # (1, 1)
        pos = torch.tensor([T], device=device)  # stays on the GPU: no host sync per step
        for _ in range(n - 1):
            next_id = step(next_id, pos).argmax(dim=-1, keepdim=True)
            pos += 1

    try:
        run(3)  # compiles, then records the graph
        for n in lengths:
            yield n, tok_per_s(run, n, device, repeats)
    except Exception as e:  # a compiler failure should not cost the rows measured so far
        print(
            f"warning: torch.compile failed ({type(e).__name__}: {e}); lengths not yet timed: not measured",
            file=sys.stderr,
        )
    finally:
        model.clear_cache()


def bandwidth_rows(model: GPT, speeds: dict[str, float | None], n: int, device) -> list[dict]:
    """Decoding at batch 1 is bound by memory traffic: each step reads every weight once and, here, the
    whole static cache (attention reads every slot; the mask hides the unwritten ones). Those bytes times
    steps per second, against the device's peak bandwidth."""
    c, size = model.config, next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied lm_head counted once
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)
    rows = []
    for variant, tps in speeds.items():
        if tps is None:
            rows.append(row("bandwidth_percent", f"{variant}, {n} new", None, "%", note="CUDA only"))
            continue
        cache = 2 * c.n_layer * (PROMPT_TOKENS + n) * c.n_embd * size  # both runs' caches hold T + n slots
        achieved = (weights + cache) * tps
        note = f"{achieved / 1e9:,.0f} GB/s" + (f" of {peak / 1e9:,.0f}" if peak else "; the peak is unknown")
        rows.append(
            row("bandwidth_percent", f"{variant}, {n} new", peak and 100 * achieved / peak, "%", note=note)
        )
    return rows


@torch.no_grad()
def same_tokens_and_logits(model: GPT, prompt: torch.Tensor) -> tuple[bool, float]:
    """Whether greedy decoding picks the same IDENTITY_TOKENS tokens with and without the cache, and the
    largest difference between a cached step's logits and a full forward pass over the same tokens, at every
    step that fits the context (past it both paths run the whole window)."""
    cached = torch.cat(list(model.generate_stream(prompt, IDENTITY_TOKENS, temperature=0)), dim=1)
    plain = torch.cat(list(model.generate_stream(prompt, IDENTITY_TOKENS, temperature=0, use_cache=False)), 1)
    ids = torch.cat([prompt, cached], dim=1)[:, : model.config.block_size]
    T = prompt.size(1)
    model.setup_cache(1, ids.size(1))
    try:
        diffs = [(model.prefill(ids[:, :T]) - model.next_token_logits(ids[:, :T])).abs().max()]
        for slot in range(T, ids.size(1)):
            step = model.decode(ids[:, slot : slot + 1], slot)
            diffs.append((step - model.next_token_logits(ids[:, : slot + 1])).abs().max())
    finally:
        model.clear_cache()
    return torch.equal(cached, plain), torch.stack(diffs).max().item()


@torch.no_grad()
def batched_equals_alone(model: GPT, device) -> bool:
    """Three prompts of different lengths, left-padded into one batch, against each decoded alone."""
    V = model.config.vocab_size
    prompts = [random_ids(n, V, device, seed=n)[0].tolist() for n in (3, 9, PROMPT_TOKENS)]
    n = min(64, model.config.block_size)
    batch = model.generate_batch(prompts, n, temperature=0)
    alone = [torch.cat(list(model.generate_stream(torch.tensor([p], device=device), n, temperature=0)), 1)
             for p in prompts]  # fmt: skip
    return torch.equal(batch, torch.cat(alone))


def hf_model(model: GPT, device, dtype):
    """Our weights in transformers' GPT2LMHeadModel: hf.py's loading read backwards (each HF weight is ours
    under name_from_hf, Conv1D's transposed, the vocabulary's padding rows dropped); None without it."""
    try:
        import transformers  # noqa: PLC0415 - optional: the comparison is skipped without it
    except ImportError:
        return None
    c, ours = model.config, model.state_dict()
    shape = dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer)
    config = transformers.GPT2Config(**shape, n_head=c.n_head, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf, weights = transformers.GPT2LMHeadModel(config), {}
    for key, param in hf.named_parameters():  # the tied lm_head.weight is wte's: listed once
        w = ours[name_from_hf(key)]
        weights[key] = (w.t() if name_from_hf(key).endswith(CONV1D_WEIGHTS) else w)[: param.size(0)]
    hf.load_state_dict(weights, strict=False)  # every parameter; attention's mask buffers stay HF's own
    return hf.to(device, dtype).eval()


@torch.no_grad()
def hf_generate(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy generate with its default (dynamic) KV cache: (1, n) new tokens."""
    mask = torch.ones_like(prompt)
    # eos_token_id=None: never stop early at <|endoftext|>, so that every run makes exactly n tokens
    out = hf.generate(
        prompt, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[:, prompt.size(1) :]


def checked_model(args, device) -> tuple[GPT | None, str]:
    """The trained model the same-tokens checks run on, in float32 (so that a difference is the cache's, not
    rounding's), and where it came from: --checkpoint (any checkpoint of this GPT), else this project's
    default checkpoint or project 03's pre-trained one, else None: the random weights timed."""
    found = [d for d in (DEFAULT_DIR, MODELS_DIR / "project03_pretrain") if checkpoint_exists(d)]
    path = args.checkpoint or (found[0] if found else None)
    if path is None:
        where = f"{DEFAULT_DIR.relative_to(REPO_ROOT)} or project03_pretrain's"
        print(f"no checkpoint in {where}: the same-tokens checks use the random weights", file=sys.stderr)
        return None, "random weights, float32"
    model, _ = load_checkpoint(path, device, tokenizer="tiktoken")  # another kind of GPT is named
    where = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path
    return model.float(), f"{where}, float32"


def speed_rows(model: GPT, context: int, lengths, no_cache_up_to: int, device, dtype, repeats):
    """decode_tok_per_s of every variant at every length, time to first token, the cache's memory (at the
    preset's context) and, on CUDA, the bandwidth decoding reaches. Returns (rows, whether a Ctrl-C cut the
    compiled runs short)."""
    prompt = random_ids(PROMPT_TOKENS, model.config.vocab_size, device)
    plain = functools.partial(decode, model, prompt, use_cache=False)
    cached = functools.partial(decode, model, prompt, use_cache=True)
    hf = hf_model(model, device, dtype)
    speeds = {"no cache": {}, "kv cache": {}, "kv cache + compile": {}, "HF generate": {}}
    timed = {
        "no cache": plain,
        "kv cache": cached,
        "HF generate": hf and functools.partial(hf_generate, hf, prompt),
    }
    bar = tqdm(
        total=len(timed) * len(lengths), desc="timed runs", unit="run"
    )  # minutes each at 124M on a CPU
    for n in lengths:
        for variant, run in timed.items():
            skip = run is None or (variant == "no cache" and n > no_cache_up_to)
            speeds[variant][n] = None if skip else tok_per_s(run, n, device, repeats)
            bar.update()
    bar.close()
    compiled, cut_short = {}, False
    if device.type == "cuda":
        try:  # compilation is the longest part on a GPU: a Ctrl-C there keeps what was measured
            for n, tok_s in compiled_decoding(model, prompt, lengths, device, repeats):
                compiled[n] = tok_s
        except KeyboardInterrupt:
            print("interrupted: the compiled lengths not yet timed are not measured", file=sys.stderr)
            cut_short = True
    speeds["kv cache + compile"] = {n: compiled.get(n) for n in lengths}
    why_not = {
        "no cache": f"not timed past --no-cache-up-to {no_cache_up_to}",
        "kv cache + compile": "CUDA only (torch.compile with CUDA graphs)"
        if device.type != "cuda"
        else "torch.compile failed or was interrupted (see stderr)",
        "HF generate": "transformers is not installed",
    }
    rows = []
    for n in lengths:
        for r in compare("decode_tok_per_s", "tok/s", {f"{v}, {n} new": speeds[v][n] for v in speeds}):
            variant = r["variant"].partition(",")[0]
            rows.append({**r, "note": why_not[variant]} if r["value"] is None else r)

    long_prompt = random_ids(context // 2, model.config.vocab_size, device, seed=1)
    ttft = time_to_first_token(model, long_prompt, device, repeats)
    rows += compare("ttft_ms", "ms", {f"{v}, {long_prompt.size(1)}-token prompt": t for v, t in ttft.items()})
    formula, measured = cache_memory(model, context, dtype, device)
    rows += [
        row("cache_memory_mib", f"formula, T = {context}", formula / 2**20, "MiB"),
        row("cache_memory_mib", f"KVCache buffers, T = {context}", measured / 2**20, "MiB"),
    ]
    n = max(lengths)
    rows += bandwidth_rows(model, {v: speeds[v][n] for v in ("kv cache", "kv cache + compile")}, n, device)
    return rows, cut_short


def identity_rows(model: GPT, source: str, device) -> list[dict]:
    """Whether the cache changes anything: tokens and logits against the uncached path, a left-padded batch
    against each prompt alone, and transformers' greedy tokens against ours."""
    prompt = random_ids(PROMPT_TOKENS, model.config.vocab_size, device, seed=2)
    same, diff = same_tokens_and_logits(model, prompt)
    rows = [
        row("same_greedy_tokens", f"kv cache vs no cache, {IDENTITY_TOKENS} new", same, "bool", note=source),
        row("max_abs_logit_diff", "kv cache vs no cache, every step", diff, "", note=source),
        row(
            "same_greedy_tokens",
            "batched (left-padded) vs alone",
            batched_equals_alone(model, device),
            "bool",
        ),
    ]
    hf = hf_model(model, device, torch.float32)
    n = min(IDENTITY_TOKENS, model.config.block_size - PROMPT_TOKENS)  # HF's positions end at its context
    if hf is None:
        return rows + [
            row("same_greedy_tokens", "HF generate vs kv cache", None, "bool", note="no transformers")
        ]
    ours = torch.cat(list(model.generate_stream(prompt, n, temperature=0)), dim=1)
    same_hf = torch.equal(hf_generate(hf, prompt, n), ours)
    return rows + [
        row("same_greedy_tokens", f"HF generate vs kv cache, {n} new", same_hf, "bool", note=source)
    ]


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    lengths = args.lengths or LENGTHS.get(args.preset, (128, 512, 1000, 2000) if cuda else (128, 512, 1000))
    no_cache_up_to = args.no_cache_up_to or (max(lengths) if cuda else 128)
    repeats = args.repeats or (3 if cuda else 1)
    checked, source = checked_model(args, device)  # first: a wrong --checkpoint fails before any timing
    mc, _ = PRESETS[args.preset]
    # Random weights, so the context may grow past the preset's to fit the longest run in the cache.
    speed_config = replace(mc, block_size=max(mc.block_size, PROMPT_TOKENS + max(lengths)))
    torch.manual_seed(args.seed)
    model = GPT(speed_config).to(device, dtype).eval()
    print(f"decoding {lengths} new tokens, {args.preset} preset's shape, {device.type}", file=sys.stderr)
    rows, cut_short = speed_rows(model, mc.block_size, lengths, no_cache_up_to, device, dtype, repeats)
    if not cut_short:  # a Ctrl-C asked to stop: write what was timed, skip the checks
        rows += identity_rows(checked or model.float(), source, device)
    if (
        args.preset == "tiny"
    ):  # 1.6M parameters and 16-64 tokens: a step is all overhead, the cache saves nothing
        rows = [{**r, "note": TINY} if r["metric"] == "decode_tok_per_s" and r["value"] else r for r in rows]
    print_table(rows)
    config = {
        **vars(speed_config),
        "weights": "random for the timings: speed does not depend on the weights",
        "preset_block_size": mc.block_size,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": 1,
        "prompt_tokens": PROMPT_TOKENS,
        "lengths": list(lengths),
        "no_cache_up_to": no_cache_up_to,
        "repeats": repeats,
        "checked_on": source,
        "cut_short": cut_short,
    }
    write_report(args, "KV cache", device, args.preset, DEFAULT_PRESET, config, rows)
    return 130 if cut_short else 0


if __name__ == "__main__":
    raise SystemExit(main())
