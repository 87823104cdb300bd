"""Continuous batching against static batching, measured the way vLLM's benchmarks measure a server.

Both run on the same engine (engine.py) with the same model, rows and limits; only admission differs. Static
batching admits requests only into an empty batch, which then runs until its longest request ends (a
finished request's row stays empty until then); continuous batching gives a free row to the next waiting
request at the very next step. Requests are random token ids with output lengths drawn from a wide
distribution and no stop token (vLLM's random dataset with --ignore-eos), so every length is controlled.

1. Offline throughput (vLLM's benchmark_throughput): every request at once; output tokens per second.
2. Online serving (vLLM's benchmark_serving): Poisson arrivals against the wall clock at several request
   rates (0.25 to 2 times the continuous engine's offline request throughput), a bounded number of requests
   each; time to first token (TTFT), time per output token after the first (TPOT), inter-token latency
   (ITL) and end-to-end latency, mean, median, std and p99, under vLLM's result keys; and a plot of them
   against the request rate.
3. Why it pays: the time of one decode step with one sequence and with max_num_seqs of them.

Speed does not depend on the weights, so the model is random at the preset's shape, its context stretched to
fit the longest request. That the engine's tokens equal generation alone is tested in tests/.

python benchmark.py                             # on a GPU: GPT-2 124M's shape, 256 requests, 64 at once
python benchmark.py --preset cpu --device cpu   # on a CPU: the cpu preset's shape, 128 requests, 32 at once
python benchmark.py --preset tiny               # seconds, for tests
"""

import argparse
import io
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from matplotlib.figure import Figure
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
from results import add_output_args, compare, print_table, row, time_it, write_report
from sequence import SamplingParams


@dataclass
class Workload:
    requests: int  # offline: all at once
    prompt_tokens: tuple[int, int]  # uniform in this range
    # log-uniform in this range: as many requests of 16-32 new tokens as of 32-64, ..., or of 256-512
    output_tokens: tuple[int, int]
    max_num_seqs: int
    online_requests: int  # at each request rate
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # of continuous batching's offline req/s


WORKLOADS = {
    "cuda": Workload(256, (32, 512), (16, 512), 64, 128),
    "cpu": Workload(128, (16, 128), (16, 512), 32, 48),  # 2 cores: a few minutes at the cpu preset
    "tiny": Workload(12, (4, 12), (2, 16), 4, 8),
}
# vLLM's names: time to first token, time per output token after the first, inter-token latency, end to end
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Trace:
    """What a run measured: per request its arrival and the wall-clock time of each of its tokens."""

    arrivals: list[float]
    token_times: list[list[float]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    steps: int = 0
    seqs_per_step: float = 0.0


def per_workload(field: str) -> str:
    """--help's default for a workload's field: each device's, and the tiny preset's."""
    return "default: " + ", ".join(f"{name} {getattr(w, field)}" for name, w in WORKLOADS.items())


def parse_args(argv):
    p = ArgumentParser(description="Benchmark continuous batching against static batching, as vLLM does.")
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET, help="model shape to time")
    p.add_argument("--requests", type=positive_int, help=f"offline requests ({per_workload('requests')})")
    p.add_argument(
        "--online-requests", type=positive_int, help=f"at each rate ({per_workload('online_requests')})"
    )
    p.add_argument(
        "--max-num-seqs", type=positive_int, help=f"running at once ({per_workload('max_num_seqs')})"
    )
    p.add_argument(
        "--rates",
        type=rates_list,
        default=None,
        help="request rates (req/s), comma-separated; "
        "default: 0.25, 0.5, 1 and 2 times continuous batching's offline req/s",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="the workload's random lengths and arrivals"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


def rates_list(text: str) -> list[float]:
    try:
        rates = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        rates = []
    if not rates or not all(0 < r < math.inf for r in rates):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of positive rates, got {text!r}")
    return rates


def workload_for(args, device) -> Workload:
    """The device's workload (the tiny preset's for --preset tiny), then any flag given."""
    w = WORKLOADS["tiny" if args.preset == "tiny" else "cuda" if device.type == "cuda" else "cpu"]
    flags = {
        "requests": args.requests,
        "online_requests": args.online_requests,
        "max_num_seqs": args.max_num_seqs,
    }
    return replace(w, **{k: v for k, v in flags.items() if v is not None})


def make_requests(w: Workload, n: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt token ids, output length) pairs."""
    rng = random.Random(seed)
    (p_lo, p_hi), (o_lo, o_hi) = w.prompt_tokens, w.output_tokens
    requests = []
    for _ in range(n):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(p_lo, p_hi))]
        requests.append((prompt, round(math.exp(rng.uniform(math.log(o_lo), math.log(o_hi))))))
    return requests


def token_budget(w: Workload, context: int) -> int:
    """max_num_batched_tokens: a whole batch of the longest prompts fits one step, so that the budget never
    splits static batching's batch (and at least the context, as the engine requires)."""
    return max(w.max_num_seqs * w.prompt_tokens[1], context)


def run(model: GPT, requests, arrivals: list[float], w: Workload, static: bool, label: str) -> Trace:
    """Serve the requests, each added at its arrival time (seconds from the start) as the wall clock passes
    it, and time every token as the step that made it returns."""
    budget = token_budget(w, model.config.block_size)
    engine = Engine(model, EngineConfig(w.max_num_seqs, budget, static=static))
    trace = Trace(arrivals, [[] for _ in requests], [[] for _ in requests])
    index, running, added = {}, 0, 0
    bar = tqdm(total=sum(n for _, n in requests), desc=label, unit="tok", leave=False)
    start = time.perf_counter()
    while added < len(requests) or engine.has_unfinished():
        now = time.perf_counter() - start
        while added < len(requests) and arrivals[added] <= now:
            prompt, n = requests[added]
            index[engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n))] = added
            added += 1
        if not engine.has_unfinished():  # idle until the next arrival (bounded: a request is due)
            time.sleep(max(0.0, arrivals[added] - now))
            continue
        outputs = engine.step()  # ends with the sampled token ids on the host: the GPU has finished
        now = time.perf_counter() - start
        for out in outputs:
            trace.token_times[index[out.request_id]].append(now)
            trace.tokens[index[out.request_id]] += out.token_ids
        trace.steps += 1
        running += len(outputs)
        bar.update(len(outputs))
    bar.close()
    trace.seqs_per_step = running / trace.steps
    return trace


def decode_step_ms(model: GPT, w: Workload, n: int, device) -> float:
    """The median time of one decode step with n sequences running, each with a prompt of the workload's mean
    length: what continuous batching keeps full and static batching lets empty out."""
    engine = Engine(model, EngineConfig(n, token_budget(w, model.config.block_size)))
    length = sum(w.prompt_tokens) // 2
    for prompt, _ in make_requests(replace(w, prompt_tokens=(length, length)), n, model.config.vocab_size, 3):
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=16))
    engine.step()  # the prefills
    seconds, _ = time_it(engine.step, device, warmup=2, repeats=10)
    return seconds * 1e3


def serving_metrics(trace: Trace, requests) -> dict[str, float]:
    """vLLM's benchmark_serving results, under its keys."""
    duration = max(times[-1] for times in trace.token_times)
    out_tokens = sum(len(t) for t in trace.tokens)
    in_tokens = sum(len(prompt) for prompt, _ in requests)
    per = {m: [] for m in METRICS}
    for arrival, times in zip(trace.arrivals, trace.token_times):
        ttft, e2el = times[0] - arrival, times[-1] - arrival
        per["ttft"].append(ttft)
        per["e2el"].append(e2el)
        per["itl"] += [b - a for a, b in zip(times, times[1:])]
        if len(times) > 1:
            per["tpot"].append((e2el - ttft) / (len(times) - 1))
    metrics = {
        "duration": duration,
        "completed": len(trace.token_times),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(trace.token_times) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for m in METRICS:
        values = np.array(per[m] or [0.0]) * 1e3
        metrics.update(
            {
                f"mean_{m}_ms": float(values.mean()),
                f"median_{m}_ms": float(np.median(values)),
                f"std_{m}_ms": float(values.std()),
                f"p99_{m}_ms": float(np.percentile(values, 99)),
            }
        )
    return metrics


UNITS = {
    "duration": "s",
    "completed": "requests",
    "total_input_tokens": "tokens",
    "total_output_tokens": "tokens",
    "request_throughput": "req/s",
    "output_throughput": "tok/s",
    "total_token_throughput": "tok/s",
}


def metric_rows(static: dict, continuous: dict, rate: str) -> list[dict]:
    """Rows for one request rate: continuous batching's against static batching's, metric by metric."""
    base = f"static batching, {rate}"
    rows = []
    for key in static:
        unit = UNITS.get(key, "ms")
        rows += [
            row(key, base, static[key], unit),
            row(key, f"continuous batching, {rate}", continuous[key], unit, (base, static[key])),
        ]
    return rows


def plot(rates: list[float], online: dict[str, list[dict]]) -> bytes:
    """Latency against request rate, static and continuous batching side by side."""
    fig = Figure(figsize=(11, 7), dpi=110)
    panels = [
        ("mean_ttft_ms", "mean TTFT (ms)"),
        ("p99_ttft_ms", "p99 TTFT (ms)"),
        ("mean_tpot_ms", "mean TPOT (ms)"),
        ("p99_itl_ms", "p99 ITL (ms)"),
    ]
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        for name, metrics in online.items():
            ax.plot(rates, [m[key] for m in metrics], "o-", label=name)
        ax.set(xlabel="request rate (req/s)", ylabel=label, yscale="log" if "ttft" in key else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def offline_rows(model: GPT, requests: list, w: Workload, device) -> tuple[list[dict], float]:
    """Every request at once, static against continuous batching: vLLM's throughput keys, the steps, the
    sequences per step, a decode step's cost, and whether both give the same tokens. Also returns the
    continuous engine's request throughput, which sets the online rates."""
    zero = [0.0] * len(requests)
    static = run(model, requests, zero, w, True, "static batching, offline")
    continuous = run(model, requests, zero, w, False, "continuous batching, offline")
    offline = {
        name: serving_metrics(t, requests) for name, t in [("static", static), ("continuous", continuous)]
    }
    names = ("static batching, offline", "continuous batching, offline")
    rows = []
    for key in ("output_throughput", "request_throughput", "total_token_throughput", "duration"):
        rows += compare(
            key, UNITS[key], {names[0]: offline["static"][key], names[1]: offline["continuous"][key]}
        )
    rows += compare("steps", "steps", {names[0]: static.steps, names[1]: continuous.steps})
    rows += compare(
        "seqs_per_step", "sequences", {names[0]: static.seqs_per_step, names[1]: continuous.seqs_per_step}
    )
    steps = {"1 sequence": decode_step_ms(model, w, 1, device)}
    steps[f"{w.max_num_seqs} sequences"] = decode_step_ms(model, w, w.max_num_seqs, device)
    rows += compare("decode_step_ms", "ms", steps)
    same = sum(a == b for a, b in zip(static.tokens, continuous.tokens)) / len(requests)
    rows.append(row("same_tokens", "static vs continuous", 100 * same, "% of requests"))
    return rows, offline["continuous"]["request_throughput"]


def online_rows(model: GPT, requests: list, w: Workload, rates: list[float], seed: int):
    """Poisson arrivals at each rate, the same arrivals for both schedulers. Returns (rows, the rates measured
    in full, each scheduler's metrics per rate, whether a Ctrl-C cut the run short)."""
    online, rows = {"static batching": [], "continuous batching": []}, []
    try:
        for rate in rates:
            gaps = np.random.default_rng(seed).exponential(1 / rate, len(requests))
            arrivals = [0.0, *np.cumsum(gaps[:-1]).tolist()]
            for name in online:
                trace = run(model, requests, arrivals, w, name == "static batching", f"{name}, {rate} req/s")
                online[name].append(serving_metrics(trace, requests))
            rows += metric_rows(
                online["static batching"][-1], online["continuous batching"][-1], f"{rate:g} req/s"
            )
    except KeyboardInterrupt:  # Ctrl-C, or run_benchmarks.py's budget: keep the rates measured in full
        print("interrupted: writing the request rates measured so far", file=sys.stderr)
        rates = rates[: len(online["continuous batching"])]
        online["static batching"] = online["static batching"][: len(rates)]
        return rows, rates, online, True
    return rows, rates, online, False


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:  # the published CPU figures ran on one (a shared machine's second core stalls the other)
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    w = workload_for(args, device)
    shape = PRESETS[args.preset][0]
    config = replace(shape, block_size=max(shape.block_size, w.prompt_tokens[1] + w.output_tokens[1]))
    torch.manual_seed(0)
    model = GPT(config).to(device, dtype).eval()
    requests = make_requests(w, w.requests, config.vocab_size, args.seed)
    print(f"{len(requests)} requests: {w}; {model.num_params() / 1e6:.1f}M parameters, {dtype}, {device}")
    run(model, make_requests(w, 4, config.vocab_size, args.seed + 1), [0.0] * 4, w, False, "warm-up")
    rows, capacity = offline_rows(model, requests, w, device)  # 1. offline: every request at once
    rates = args.rates or [float(f"{f * capacity:.3g}") for f in w.rate_fractions]  # 2. online
    online_requests = make_requests(w, w.online_requests, config.vocab_size, args.seed + 2)
    more, rates, online, cut_short = online_rows(model, online_requests, w, rates, args.seed)
    rows += more
    print_table([r for r in rows if r["metric"] in TABLE])
    meta = {**vars(w), "request_rates": rates, "output_lengths": "log-uniform", "arrivals": "Poisson"}
    meta.update(
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, block_size=config.block_size
    )
    meta.update(dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(), weights="random")
    meta.update(max_num_batched_tokens=token_budget(w, config.block_size), sampling="greedy, no stop token")
    meta.update(seed=args.seed, mean_output_tokens=statistics.mean(n for _, n in requests))
    meta.update(cut_short=cut_short)
    path = write_report(args, "Continuous batching", device, args.preset, DEFAULT_PRESET, meta, rows)
    if rates and path:
        png = path.with_name(f"latency-{path.stem}.png")
        png.write_bytes(plot(rates, online))
        print(f"wrote {png}")
    return 130 if cut_short else 0


TABLE = {"output_throughput", "request_throughput", "steps", "seqs_per_step", "same_tokens", "mean_ttft_ms",
         "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms"}  # fmt: skip  # the rows printed; the JSON has them all


if __name__ == "__main__":
    raise SystemExit(main())
