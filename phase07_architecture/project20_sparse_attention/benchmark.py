"""Our block-sparse kernels against dense FlashAttention (project 09's kernels) and PyTorch's FlexAttention
with a block mask, side by side on the same mask: forward and forward+backward time and peak memory from 1k
to 16k tokens at a fixed window, and the log-log slope of time against length; the tiles each pattern visits;
the decode cache's memory, full vs rolling; and a model trained with a window against one trained dense, the
same steps, held-out loss at the trained length and at twice it.

Off CUDA only Triton's interpreter runs the kernels: the benchmark then reports their error against the masked
reference, the tiles visited (the work, by count), the memory formula, masked SDPA against compiled
FlexAttention on the CPU, and the trained comparison; the kernels' speeds are "not measured".

python benchmark.py --data data/tinyshakespeare_shards                 # on a GPU: every length, then training
OMP_NUM_THREADS=1 python benchmark.py --preset cpu --lengths 1024,2048  # on a CPU
"""

import math
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton is imported: on a CPU its kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cli import (  # noqa: E402
    ArgumentParser,
    UserError,
    add_device_args,
    autocast,
    exits_cleanly,
    pick_device,
    pick_dtype,
    positive_int,
)
from config import TrainConfig  # noqa: E402
from data import get_batch, load_tokens  # noqa: E402
from flash_attention import flash_attention  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from results import add_output_args, compare, print_table, row, time_it, write_report  # noqa: E402
from sparse_attention import (  # noqa: E402
    MAX_BLOCKS,
    PATTERNS,
    Pattern,
    block_for,
    build_layout,
    layout_for,
    masked_reference,
    sparse_attention,
)
from train import lr_at, make_optimizer, train_step  # noqa: E402

B, H, HS = (
    8,
    16,
    64,
)  # the kernels' shape at every length (2,048 channels), so that time measures length alone
# The trained comparison per preset: the model trains at half its context (block_size) and is evaluated at
# both. (model, run, window): GPT-2's width at 6 layers on a GPU; a 2-layer 64-wide model for a CPU's minutes.
COMPARISON = {
    "gpt2": (
        GPTConfig(block_size=2048, n_layer=6, n_head=6, n_embd=384),
        TrainConfig(batch_size=16, max_iters=600, lr=1e-3, min_lr=1e-4, warmup_iters=60, eval_iters=20),
        256,
    ),
    "cpu": (
        GPTConfig(block_size=512, n_layer=2, n_head=2, n_embd=64),
        TrainConfig(batch_size=4, max_iters=150, lr=2e-3, min_lr=2e-4, warmup_iters=15, eval_iters=8),
        64,
    ),
    "tiny": (
        GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32),
        TrainConfig(batch_size=2, max_iters=3, lr=3e-3, min_lr=3e-4, warmup_iters=1, eval_iters=1),
        8,
    ),
}


def patterns(window: int) -> dict[str, Pattern]:
    """Every pattern at the benchmark's window; globals and random blocks at the GPU tile's size, and fixed's
    summary an eighth of its stride (64 of 512; shorter than the stride, or fixed would be dense)."""
    summary = min(64, window // 8)
    return {name: Pattern(name, window=window, n_global=64, n_random=2, summary=summary) for name in PATTERNS}


def output_and_grads(fn, q, k, v, do, dtype) -> list[torch.Tensor]:
    """fn's output and dQ, dK, dV for copies of q, k, v in dtype, as float64."""
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    o.backward(do.to(dtype))
    return [o.detach().double(), *(x.grad.double() for x in leaves)]


def correctness_rows(device) -> list[dict]:
    """Each pattern's largest error, forward and gradients, against the float64 masked reference (the
    interpreter runs the kernels on a CPU), T = 200: not a multiple of the block."""
    rows, g, T = [], torch.Generator().manual_seed(0), 200
    for name, p in patterns(48).items():
        mask = replace(p, n_global=8, summary=8, block=16).token_mask(T, device)
        layout = build_layout(mask, block_for(device))
        q, k, v, do = (torch.randn(1, 2, T, HS, generator=g).to(device) for _ in range(4))
        ref = output_and_grads(lambda *a, m=mask: masked_reference(*a, m), q, k, v, do, torch.float64)
        ours = output_and_grads(lambda *a, lay=layout: sparse_attention(*a, lay), q, k, v, do, q.dtype)
        worst = [(a - b).abs().max().item() for a, b in zip(ours, ref)]
        rows.append(row("max_abs_diff", f"{name}: forward vs float64 masked, T={T}", worst[0], ""))
        rows.append(row("max_abs_diff", f"{name}: gradients vs float64 masked, T={T}", max(worst[1:]), ""))
    return rows


def slope(points: dict[int, float], lo: int, hi: int) -> float | None:
    """d log(y) / d log(T) between two lengths: 1 is linear, 2 quadratic; None if either is missing, or if
    there is only one length (lo == hi)."""
    if lo == hi or points.get(lo) is None or points.get(hi) is None:
        return None
    return math.log(points[hi] / points[lo]) / math.log(hi / lo)


def span(lengths: list[int]) -> tuple[int, int]:
    """The lengths a slope is taken between: from 2k (or the shortest) to the longest."""
    return min([T for T in lengths if T >= 2048] or lengths), max(lengths)


def tile_rows(args, rows: list[dict]) -> None:
    """The BLOCK x BLOCK tiles one (batch, head) computes in the forward, per pattern and length (the work,
    by count: the same on every device), and the slope of the window's count against the length."""
    counts = {}
    for T in tqdm(args.lengths, desc="layouts"):
        values = {}
        for name, p in patterns(args.window).items():
            label = "dense" if name == "dense" else f"{name} {args.window}"
            values[f"{label}, T={T}"] = layout_for(p, T, 64, torch.device("cpu")).visited()
            counts.setdefault(name, {})[T] = values[f"{label}, T={T}"]
        layout_for.cache_clear()  # the masks at 16k are 256 MiB each
        rows += compare("tiles_visited", "tiles of 64x64", values)
    lo, hi = span(args.lengths)
    for name in ("dense", "window", "fixed"):
        rows.append(row("tiles_slope", f"{name}, T={lo}..{hi}", slope(counts[name], lo, hi), "log-log"))


def memory_rows(args, rows: list[dict]) -> None:
    """Decode memory by formula, GPT-2 124M's shape in bf16, batch 1: the full KV cache grows with the
    tokens, the rolling buffer stops at the window. (GPT-2's learned positions end at 1,024: past that the
    lengths are the formula's, for a model with relative positions.)"""
    per_position = 2 * 12 * 768 * 2  # keys and values, 12 layers of 768 channels, 2 bytes each
    for T in args.lengths:
        rows += compare(
            "decode_cache_mib",
            "MiB",
            {
                f"full cache, T={T}": T * per_position / 2**20,
                f"rolling, window {args.window}, T={T}": min(T, args.window) * per_position / 2**20,
            },
        )


def flex_block_mask(p: Pattern, T: int, device):
    """FlexAttention's BlockMask of the pattern (its own default block size, 128)."""
    rule = p.mask_mod(T, device)
    return create_block_mask(lambda _b, _h, q, kv: rule(q, kv), None, None, T, T, device=device)


def attention_fns(p: Pattern, T: int, device, flex_compiled) -> dict:
    """The three ways to run one pattern on the same mask, as functions of (q, k, v)."""
    block_mask = flex_block_mask(p, T, device)
    layout = layout_for(p, T, block_for(device), device)
    return {
        "dense flash (project 09)": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "flex": lambda q, k, v: flex_compiled(q, k, v, block_mask=block_mask),
        "ours": lambda q, k, v: sparse_attention(q, k, v, layout),
    }


def time_attention(fn, T: int, backward: bool, dtype, device, repeats: int):
    """(ms, peak MiB) of fn at (B, H, T, HS), or (None, None) out of memory."""
    q, k, v = (torch.randn(B, H, T, HS, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    if backward:
        do = torch.randn_like(q)
        run = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
    else:
        run = lambda: fn(q, k, v)  # noqa: E731
    torch.cuda.empty_cache()
    try:
        with torch.enable_grad() if backward else torch.no_grad():
            seconds, peak = time_it(run, device, warmup=3, repeats=repeats)
        return seconds * 1e3, peak
    except torch.OutOfMemoryError:
        return None, None


def kernel_rows(args, dtype, device, rows: list[dict]) -> None:
    """On a GPU: time and peak memory of dense flash, FlexAttention and ours on the window pattern at every
    length, forward and forward+backward; then the slopes and the targets' ratios at the longest length."""
    p, flex_compiled = Pattern("window", args.window), torch.compile(flex_attention)
    times = {}
    for backward in (False, True):
        what = "fwd+bwd" if backward else "fwd"
        for T in tqdm(args.lengths, desc=what):
            fns = attention_fns(p, T, device, flex_compiled)
            measured = {
                name: time_attention(fn, T, backward, dtype, device, args.repeats) for name, fn in fns.items()
            }
            rows += compare("attention_ms", "ms", {f"{n}, {what}, T={T}": m[0] for n, m in measured.items()})
            rows += compare(
                "peak_memory_mib", "MiB", {f"{n}, {what}, T={T}": m[1] for n, m in measured.items()}
            )
            for name, (ms, _) in measured.items():
                times.setdefault((name, what), {})[T] = ms
            layout_for.cache_clear()
    lo, hi = span(args.lengths)
    for (name, what), points in times.items():
        rows.append(row("time_slope", f"{name}, {what}, T={lo}..{hi}", slope(points, lo, hi), "log-log"))
    for what in ("fwd", "fwd+bwd"):
        ours = times[("ours", what)].get(hi)
        for other in ("flex", "dense flash (project 09)"):
            theirs = times[(other, what)].get(hi)
            speed = ours and theirs and theirs / ours
            rows.append(row("speedup", f"ours vs {other}, {what}, T={hi}, window {args.window}", speed, "x"))


def flex_cpu_rows(args, rows: list[dict]) -> None:
    """On a CPU: masked SDPA against compiled FlexAttention on the window pattern (fp32, forward), at the
    lengths up to 2,048 (SDPA's (T, T) mask and scores grow quadratically)."""
    flex_compiled, device = torch.compile(flex_attention), torch.device("cpu")
    p = Pattern("window", args.window)
    for T in [T for T in args.lengths if T <= 2048]:
        q, k, v = (torch.randn(1, 4, T, HS) for _ in range(3))
        mask, block_mask = p.token_mask(T), flex_block_mask(p, T, "cpu")
        fns = {
            f"masked SDPA, fwd, T={T}": partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask),
            f"flex (compiled), fwd, T={T}": partial(flex_compiled, q, k, v, block_mask=block_mask),
        }
        with torch.no_grad():
            ms = {
                name: time_it(fn, device, warmup=2, repeats=args.repeats)[0] * 1e3 for name, fn in fns.items()
            }
        rows += compare("cpu_attention_ms", "ms", ms)


def train_and_evaluate(mc: GPTConfig, tc: TrainConfig, tokens, dtype, device) -> dict[int, float]:
    """Train GPT(mc) at half its context for tc.max_iters steps; held-out loss at that length and at the
    whole context, on the same batches for every model (a generator started afresh)."""
    train_tokens, val_tokens = tokens
    T = mc.block_size // 2
    torch.manual_seed(tc.seed)
    model = GPT(mc).to(device)
    optimizer, batches = make_optimizer(model, tc), torch.Generator().manual_seed(tc.seed)
    for step in tqdm(range(tc.max_iters), desc=f"{mc.pattern} model", leave=False):
        batch = get_batch(train_tokens, tc.batch_size, T, batches, device)
        train_step(model, optimizer, batch, lr_at(step, tc), tc, dtype)
    model.eval()
    losses = {}
    with torch.no_grad():
        for length in (T, mc.block_size):
            g, total = torch.Generator().manual_seed(0), 0.0
            for _ in range(tc.eval_iters):
                with autocast(device, dtype):
                    total += model(*get_batch(val_tokens, tc.batch_size, length, g, device))[1].item()
            losses[length] = total / tc.eval_iters
    return losses


def training_rows(args, device, rows: list[dict]) -> dict:
    """Dense against the window pattern: the same model, data, seed and steps. Returns the run's config."""
    mc, tc, window = COMPARISON[args.preset]
    mc = replace(mc, dropout=0.0)
    train_tokens, val_tokens, about = load_tokens(args.data, mc.block_size)
    dtype = pick_dtype(args.dtype, device)
    runs = {
        name: train_and_evaluate(
            replace(mc, pattern=pattern, window=window), tc, (train_tokens, val_tokens), dtype, device
        )
        for name, pattern in (("dense", "dense"), (f"window {window}", "window"))
    }
    trained = mc.block_size // 2
    for length in (trained, mc.block_size):
        where = "trained length" if length == trained else "2x the trained length"
        rows += compare(
            "val_loss", "nats", {f"{name}, T={length} ({where})": r[length] for name, r in runs.items()}
        )
    return {"train_model": vars(mc), "train_run": vars(tc), "train_window": window, "train_data": about}


def lengths_list(text: str) -> list[int]:
    try:
        lengths = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths: a comma-separated list of positive integers, got {text!r}")
    if max(lengths) > MAX_BLOCKS * 64:  # bigbird's random blocks are drawn for this many 64-token blocks
        raise UserError(f"--lengths: at most {MAX_BLOCKS * 64} tokens, got {max(lengths)}")
    return lengths


def parse_args(argv):
    p = ArgumentParser(description="Benchmark block-sparse attention against dense flash and FlexAttention.")
    p.add_argument("--preset", choices=COMPARISON, default="gpt2", help="the trained comparison's size")
    p.add_argument("--data", type=Path, default=None, help="text file or shards (default: data/wikitext)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="sequence lengths, comma-separated")
    p.add_argument("--window", type=positive_int, default=512, help="the window of the kernels' comparison")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs; the median is reported")
    p.add_argument("--no-train", action="store_true", help="skip the trained dense vs window comparison")
    p.add_argument(
        "--no-flex", action="store_true", help="skip FlexAttention on the CPU (compiling: minutes)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p)
    add_output_args(p)
    args = p.parse_args(argv)
    args.data = args.data and str(args.data.resolve())
    return args


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.lengths = lengths_list(args.lengths)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("off the GPU the kernels need Triton's interpreter: run with TRITON_INTERPRET=1")
    config = {"lengths": args.lengths, "window": args.window, "shape": [B, H, HS], "repeats": args.repeats}
    rows = correctness_rows(device if device.type == "cuda" else torch.device("cpu"))
    try:
        tile_rows(args, rows)
        memory_rows(args, rows)
        if device.type == "cuda":
            dtype = pick_dtype(args.dtype, device)
            config["dtype"] = str(dtype).removeprefix("torch.")
            kernel_rows(args, dtype, device, rows)
        else:
            print(
                "note: only Triton's interpreter runs the kernels here: their speed is not measured",
                file=sys.stderr,
            )
            rows.append(row("attention_ms", "ours", None, "ms", note="needs a CUDA GPU"))
            if not args.no_flex:
                flex_cpu_rows(args, rows)
        if not args.no_train:
            config.update(training_rows(args, device, rows))
    except KeyboardInterrupt:  # Ctrl-C, or run_benchmarks.py's budget: keep what was measured
        print("interrupted: writing the rows measured so far", file=sys.stderr)
        config["cut_short"] = True
    print_table(rows)
    write_report(args, "Block-sparse attention in Triton", device, args.preset, "gpt2", config, rows)
    return 130 if config.get("cut_short") else 0


if __name__ == "__main__":
    raise SystemExit(main())
