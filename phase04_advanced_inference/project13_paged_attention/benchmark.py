"""Paged KV memory against project 12's contiguous reservation, at the same memory budget.

Both run on this engine, with the same model, the same workload (project 12's: random token ids, prompt
lengths uniform in a range, output lengths log-uniform, no stop token, so every length is controlled) and the
same KV budget of a few whole contexts. The baseline reserves a whole context per sequence when it is
admitted (EngineConfig.reserve_context: project 12's rows, counted in blocks), so the budget caps the batch
at budget / context. Paged memory gives a sequence a block when it enters one, so the batch grows until the
blocks actually used fill the budget (and preempts the newest sequence by recomputation when they run out).

1. KV memory: after every step, the positions the running sequences hold blocks for (reserved) against the
   tokens they hold (used); the waste is 1 - used / reserved over all steps. vLLM's figure for paged memory:
   under 4%; for reserving systems: 60-80% (Kwon et al. 2023, figure 2).
2. The largest batch that fits the budget: the most sequences running at once, and their mean.
3. Offline throughput at that batch (vLLM's benchmark_throughput: every request at once), output tokens/s.
4. The decode attention of one full batch: the gather reference (what the CPU runs) against the Triton
   kernel (GPU only).

Speed does not depend on the weights, so the model is random at the preset's shape, its context stretched to
fit the longest request. That the engine's tokens equal generation alone is tested in tests/.

python benchmark.py                             # on a GPU: GPT-2 124M's shape, 256 requests
python benchmark.py --preset cpu --device cpu   # on a CPU: the cpu preset's shape, 64 requests
python benchmark.py --preset tiny               # seconds, for tests
"""

import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from cli import (
    ArgumentParser,
    add_device_args,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
)
from config import DEFAULT_PRESET, PRESETS
from engine import Engine, EngineConfig
from model import GPT
from paged_attention import paged_attention, paged_attention_reference, paged_kernel_runs_on
from results import add_output_args, compare, print_table, row, time_it, write_report
from sequence import SamplingParams


@dataclass
class Workload:
    requests: int  # offline: all at once
    prompt_tokens: tuple[int, int]  # uniform in this range
    # log-uniform in this range: as many requests of 16-32 new tokens as of 32-64, ..., or of 256-512
    output_tokens: tuple[int, int]
    budget_contexts: int  # the KV budget, in whole contexts: the contiguous cache's batch
    kv_block_size: int = 16


WORKLOADS = {
    "cuda": Workload(256, (32, 512), (16, 512), 16),
    "cpu": Workload(64, (16, 128), (16, 512), 8),  # 2 cores: a few minutes at the cpu preset
    "tiny": Workload(12, (4, 12), (2, 16), 3, kv_block_size=4),
}


@dataclass
class Run:
    """What serving every request measured."""

    seconds: float
    tokens: list[list[int]]
    reserved: int = 0  # positions with a block, summed over steps
    used: int = 0  # positions holding a token, summed over steps
    running: list[int] | None = None  # sequences running after each step
    preemptions: int = 0


def per_workload(field: str) -> str:
    """--help's default for a workload's field: each device's, and the tiny preset's."""
    return "default: " + ", ".join(f"{name} {getattr(w, field)}" for name, w in WORKLOADS.items())


def parse_args(argv):
    p = ArgumentParser(
        description="Benchmark paged KV memory against a contiguous reservation, as vLLM does."
    )
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET, help="model shape to time")
    p.add_argument("--requests", type=positive_int, help=f"requests ({per_workload('requests')})")
    p.add_argument(
        "--budget-contexts",
        type=positive_int,
        help=f"the KV budget in contexts ({per_workload('budget_contexts')})",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="the workload's random lengths")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


def workload_for(args, device) -> Workload:
    """The device's workload (the tiny preset's for --preset tiny), then any flag given."""
    w = WORKLOADS["tiny" if args.preset == "tiny" else "cuda" if device.type == "cuda" else "cpu"]
    flags = {"requests": args.requests, "budget_contexts": args.budget_contexts}
    return replace(w, **{k: v for k, v in flags.items() if v is not None})


def make_requests(w: Workload, n: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt token ids, output length) pairs: project 12's workload."""
    rng = random.Random(seed)
    (p_lo, p_hi), (o_lo, o_hi) = w.prompt_tokens, w.output_tokens
    requests = []
    for _ in range(n):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(p_lo, p_hi))]
        requests.append((prompt, round(math.exp(rng.uniform(math.log(o_lo), math.log(o_hi))))))
    return requests


def engine_config(model: GPT, w: Workload, n_requests: int, paged: bool) -> EngineConfig:
    """The same KV budget for both; the contiguous cache fits budget_contexts sequences, paged as many as
    their blocks allow (max_num_seqs does not limit it)."""
    c = model.config
    context_bytes = c.n_layer * 2 * c.block_size * c.n_embd * model.wte.weight.element_size()
    return EngineConfig(
        max_num_seqs=n_requests if paged else w.budget_contexts,
        max_num_batched_tokens=max(c.block_size, n_requests * w.prompt_tokens[1]),
        kv_cache_mb=w.budget_contexts * context_bytes / 2**20,
        kv_block_size=w.kv_block_size,
        reserve_context=not paged,
    )


def serve(model: GPT, requests, w: Workload, paged: bool, label: str) -> Run:
    """Every request at once, to the end (bounded: each step makes a token of some request, and each has a
    max_tokens); after each step, the KV memory the running sequences hold and use."""
    engine = Engine(model, engine_config(model, w, len(requests), paged))
    index = {}
    for i, (prompt, n) in enumerate(requests):
        index[engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n))] = i
    run = Run(0.0, [[] for _ in requests], running=[])
    bar = tqdm(total=sum(n for _, n in requests), desc=label, unit="tok", leave=False)
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()  # ends with the sampled token ids on the host: the GPU has finished
        for out in outputs:
            run.tokens[index[out.request_id]] += out.token_ids
        running = engine.scheduler.running
        run.reserved += sum(len(s.block_table) for s in running) * w.kv_block_size
        run.used += sum(s.num_cached for s in running)
        run.running.append(len(running))
        bar.update(len(outputs))
    run.seconds = time.perf_counter() - start
    bar.close()
    run.preemptions = engine.scheduler.num_preemptions
    return run


def decode_attention_ms(model: GPT, w: Workload, batch: int, device) -> dict[str, float | None]:
    """One layer's decode attention for `batch` sequences of the workload's mean length in random blocks of a
    pool: the gather reference against the Triton kernel (on a GPU)."""
    c = model.config
    nh, hs, L = c.n_head, c.n_embd // c.n_head, w.kv_block_size
    length = sum(w.prompt_tokens) // 2 + sum(w.output_tokens) // 4
    per_seq = -(-length // L)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, batch * per_seq, nh, L, hs, generator=g).to(device, model.wte.weight.dtype)
    tables = torch.randperm(batch * per_seq, generator=g).view(batch, per_seq).to(device, torch.int32)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    q = torch.randn(batch, nh, hs, generator=g).to(device, pool.dtype)
    times = {}
    for name, fn in (("gather + SDPA", paged_attention_reference), ("Triton paged kernel", paged_attention)):
        runs = fn is paged_attention_reference or paged_kernel_runs_on(q, pool[0])
        times[name] = (
            time_it(lambda fn=fn: fn(q, *pool, tables, lens), device, 3, 20)[0] * 1e3 if runs else None
        )
    return times


def comparison_rows(runs: dict, requests: list, config, dtype) -> list[dict]:
    """The contiguous reservation against the paged pool, for the runs finished: KV waste and memory per
    sequence, batch sizes, throughput, steps, preemptions, and whether both give the same tokens."""
    out_tokens = sum(n for _, n in requests)
    position_mib = config.n_layer * 2 * config.n_embd * dtype.itemsize / 2**20
    rows = []
    for metric, unit, value in [
        ("kv_waste", "% of reserved", lambda r: 100 * (1 - r.used / r.reserved)),
        ("kv_reserved_mean", "MiB", lambda r: r.reserved / len(r.running) * position_mib),
        ("kv_used_mean", "MiB", lambda r: r.used / len(r.running) * position_mib),
        ("max_running", "sequences", lambda r: max(r.running)),
        ("mean_running", "sequences", lambda r: statistics.mean(r.running)),
        ("output_throughput", "tok/s", lambda r: out_tokens / r.seconds),
        ("duration", "s", lambda r: r.seconds),
        ("steps", "steps", lambda r: len(r.running)),
        ("preemptions", "sequences", lambda r: r.preemptions),
    ]:
        rows += compare(metric, unit, {name: value(r) for name, r in runs.items()}) if runs else []
    if len(runs) == 2:
        same = sum(a == b for a, b in zip(*(r.tokens for r in runs.values()))) / len(requests)
        rows.append(row("same_tokens", "contiguous vs paged", 100 * same, "% of requests"))
    return rows


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    w = workload_for(args, device)
    shape = PRESETS[args.preset][0]
    context = max(shape.block_size, w.prompt_tokens[1] + w.output_tokens[1])
    config = replace(shape, block_size=-(-context // w.kv_block_size) * w.kv_block_size)  # whole blocks
    torch.manual_seed(0)
    model = GPT(config).to(device, dtype).eval()
    requests = make_requests(w, w.requests, config.vocab_size, args.seed)
    budget_mib = engine_config(model, w, len(requests), True).kv_cache_mb
    print(f"{len(requests)} requests: {w}; {model.num_params() / 1e6:.1f}M parameters, {dtype}, {device}; "
          f"KV budget {budget_mib:.2f} MiB: {w.budget_contexts} contexts of {config.block_size}")  # fmt: skip
    serve(model, make_requests(w, 4, config.vocab_size, args.seed + 1), w, True, "warm-up")

    runs, decode, cut_short = {}, None, False
    try:
        for name in ("contiguous (project 12)", "paged"):
            runs[name] = serve(model, requests, w, name == "paged", name)
        decode = decode_attention_ms(model, w, max(runs["paged"].running), device)
    except KeyboardInterrupt:  # Ctrl-C, or run_benchmarks.py's budget: keep the runs finished so far
        print("interrupted: writing the runs finished so far", file=sys.stderr)
        cut_short = True
    rows = comparison_rows(runs, requests, config, dtype)
    if decode:
        rows += compare("decode_attention_ms", "ms", decode)
    print_table(rows)
    meta = {
        **vars(w),
        "kv_budget_mib": budget_mib,
        "output_lengths": "log-uniform",
        "arrivals": "all at once",
    }
    meta.update(context=config.block_size)
    meta.update(dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(), weights="random")
    out_tokens = sum(n for _, n in requests)
    meta.update(
        sampling="greedy, no stop token", seed=args.seed, mean_output_tokens=out_tokens / len(requests)
    )
    meta.update(cut_short=cut_short)
    write_report(args, "Paged attention", device, args.preset, DEFAULT_PRESET, meta, rows)
    return 130 if cut_short else 0


if __name__ == "__main__":
    raise SystemExit(main())
