"""Measure prefix caching on a shared-prefix workload shaped like SGLang's generated-shared-prefix benchmark:
groups of prompts, each group sharing a long system prompt, each prompt adding its own question, each
request generating greedily. Requests are served one at a time in a shuffled order, first without the prefix
cache, then with it; both must give the same tokens. Reported: time to first token (all requests, and the
requests that hit), the workload's total time, the hit rate and the cache's memory.

Speed does not depend on the weights, so the model is random at the preset's shape (GPT-2 124M by default)
with its context stretched to fit the workload (1,024 + 64 + 64 tokens > GPT-2's 1,024). That outputs equal
those without the cache is tested on trained models in tests/; here it is checked again on every request.

python benchmark.py                   # on a GPU: 8 groups x 8 prompts, 1,024-token prefix, 64 + 64 tokens
python benchmark.py --device cpu      # on a CPU: 2 groups x 8 prompts, the same prefix, 8 new tokens
python benchmark.py --preset tiny     # seconds, for tests
"""

import random
import statistics
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from cli import ArgumentParser, add_device_args, exits_cleanly, pick_device, pick_dtype, positive_int, sync
from config import DEFAULT_PRESET, PRESETS
from model import GPT
from prefix_cache import PrefixCache
from results import add_output_args, compare, print_table, row, time_it, write_report


@dataclass
class Workload:
    groups: int  # distinct system prompts
    prompts_per_group: int  # questions sharing each one
    system_tokens: int
    question_tokens: int
    new_tokens: int


# SGLang's generated-shared-prefix benchmark, scaled to GPT-2 124M on one GPU, and smaller where it is slow.
WORKLOADS = {
    "cuda": Workload(8, 8, 1024, 64, 64),
    "cpu": Workload(2, 8, 1024, 64, 8),  # 2 cores: about 1.4 s per uncached 1,088-token prefill at 124M
    "tiny": Workload(2, 3, 48, 8, 4),
}


def parse_args(argv):
    p = ArgumentParser(description="Benchmark time to first token without and with the prefix cache.")
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET, help="model shape to time")
    for name in ("groups", "prompts-per-group", "system-tokens", "question-tokens", "new-tokens"):
        p.add_argument(f"--{name}", type=positive_int, default=None, help="default: the device's workload")
    p.add_argument("--cache-mb", type=positive_int, default=4096, help="the prefix cache's memory budget")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


def workload_for(args, device) -> Workload:
    """The device's workload (WORKLOADS; the tiny preset's for --preset tiny), then any flag given."""
    base = WORKLOADS["tiny" if args.preset == "tiny" else "cuda" if device.type == "cuda" else "cpu"]
    flags = {f: getattr(args, f) for f in vars(base) if getattr(args, f) is not None}
    return replace(base, **flags)


def make_requests(w: Workload, vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    """groups x prompts_per_group prompts (1, T) of random tokens, in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(w.groups):
        system = torch.randint(vocab_size, (1, w.system_tokens), generator=g)
        for _ in range(w.prompts_per_group):
            question = torch.randint(vocab_size, (1, w.question_tokens), generator=g)
            requests.append(torch.cat([system, question], dim=1))
    random.Random(seed).shuffle(requests)  # groups interleaved, as concurrent users would send them
    return requests


def serve(model: GPT, prompt: torch.Tensor, new_tokens: int, prefix_cache: PrefixCache | None):
    """One greedy request: (seconds to the first token, seconds in all, its tokens)."""
    sync(prompt.device)
    start, ttft, tokens = time.perf_counter(), 0.0, []
    for next_id in model.generate_stream(prompt, new_tokens, temperature=0, prefix_cache=prefix_cache):
        tokens.append(next_id.item())  # waits for the GPU
        if len(tokens) == 1:
            ttft = time.perf_counter() - start
    return ttft, time.perf_counter() - start, tokens


def run_workload(model: GPT, requests, w: Workload, prefix_cache: PrefixCache | None, label: str):
    """Serve every request in order: ttfts (s), the total (s), every request's tokens."""
    g = torch.Generator().manual_seed(9)
    warm = torch.randint(model.config.vocab_size, requests[0].shape, generator=g)
    serve(model, warm.to(requests[0].device), 2, None)  # warm-up, untimed, sharing nothing with the requests
    ttfts, outputs, start = [], [], time.perf_counter()
    for prompt in tqdm(requests, desc=label, leave=False):
        ttft, _, tokens = serve(model, prompt, w.new_tokens, prefix_cache)
        ttfts.append(ttft)
        outputs.append(tokens)
    return ttfts, time.perf_counter() - start, outputs


def copy_seconds(model: GPT, positions: int, device) -> float:
    """The part of a hit that only moves memory: copying a cached prefix's keys and values into the KV cache
    (paged attention, project 13, reads shared blocks in place instead)."""
    model.setup_cache(1, positions)
    kv = model.read_slots(0, positions).clone()  # (n_layer, 2, nh, positions, hs)
    seconds, _ = time_it(lambda: model.write_slots(0, kv), device, warmup=1, repeats=5)
    model.clear_cache()
    return seconds


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    w = workload_for(args, device)
    context = w.system_tokens + w.question_tokens + w.new_tokens
    config = replace(PRESETS[args.preset][0], block_size=max(PRESETS[args.preset][0].block_size, context))
    torch.manual_seed(0)
    model = GPT(config).to(device, dtype).eval()
    requests = [r.to(device) for r in make_requests(w, config.vocab_size)]
    print(f"{len(requests)} requests: {w}; {model.num_params() / 1e6:.0f}M parameters, {dtype}, {device}")

    plain_ttft, plain_total, plain_out = run_workload(model, requests, w, None, "no prefix cache")
    cache = PrefixCache(args.cache_mb * 2**20)
    ttft, total, out = run_workload(model, requests, w, cache, "prefix cache")
    hits = [t for t, n in zip(ttft, first_in_group(requests)) if not n]  # requests after their group's first

    mean = {"no prefix cache": statistics.mean(plain_ttft) * 1e3, "prefix cache": statistics.mean(ttft) * 1e3}
    median = {
        "no prefix cache": statistics.median(plain_ttft) * 1e3,
        "prefix cache": statistics.median(ttft) * 1e3,
    }
    median["prefix cache, hits only"] = statistics.median(hits) * 1e3  # the median resists a noisy machine
    rows = compare("mean_ttft_ms", "ms", mean) + compare("median_ttft_ms", "ms", median)  # vLLM's names
    rows += compare("total_s", "s", {"no prefix cache": plain_total, "prefix cache": total})
    rows += [
        row("hit_rate", "prefix cache", 100 * cache.hit_rate, "% of prompt tokens"),
        row("cache_mib", "prefix cache", cache.bytes_used / 2**20, "MiB"),
        row(
            "copy_ms",
            "the shared prefix into the KV cache",
            copy_seconds(model, w.system_tokens, device) * 1e3,
            "ms",
        ),
        row("same_tokens", "prefix cache", out == plain_out, "every request's greedy tokens"),
    ]
    print_table(rows)
    meta = {**vars(w), "n_layer": config.n_layer, "n_embd": config.n_embd, "block_size": config.block_size}
    meta.update(dtype=str(dtype).removeprefix("torch."), cache_mb=args.cache_mb, weights="random")
    write_report(args, "Prompt (prefix) caching", device, args.preset, DEFAULT_PRESET, meta, rows)
    return 0


def first_in_group(requests: list[torch.Tensor]) -> list[bool]:
    """Whether each request is the first of its group served: the one that misses and fills the cache."""
    seen, firsts = set(), []
    for prompt in requests:
        key = tuple(prompt[0, :16].tolist())  # the system prompt's first tokens name the group
        firsts.append(key not in seen)
        seen.add(key)
    return firsts


if __name__ == "__main__":
    raise SystemExit(main())
