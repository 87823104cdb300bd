"""Our FlashAttention-2 kernels against explicit attention and PyTorch's scaled_dot_product_attention, side by
side: forward and forward+backward TFLOP/s and peak memory across sequence lengths, causal and not, head dims
64 and 128; a decode step's attention (one query against the cache) in GB/s; then GPT-2 124M's training
tokens/s with each attention at two context lengths. Plots of TFLOP/s and memory against the length.

Off CUDA only Triton's interpreter runs the kernels: the benchmark then reports their error against the
reference and the memory formula, and every speed is "not measured".

python benchmark.py                                # on a GPU: every length up to 16k, then end to end
python benchmark.py --lengths 512,1024 --no-train  # a quick look
"""

import io
import os
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if not torch.cuda.is_available():  # before Triton is imported: on a CPU its kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from matplotlib.figure import Figure  # noqa: E402
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
from config import ATTENTION, PRESETS  # noqa: E402
from flash_attention import attention_reference, flash_attention  # noqa: E402
from model import GPT  # noqa: E402
from results import add_output_args, compare, print_table, row, time_it, write_report  # noqa: E402
from train import make_optimizer, train_step  # noqa: E402


def sdpa(q, k, v, causal: bool) -> torch.Tensor:
    """PyTorch's fused attention, held to its FlashAttention-2 backend on a GPU in 16 bits: the issue's
    yardstick. Left to choose, PyTorch may take cuDNN's or its memory-efficient kernel instead."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


IMPLEMENTATIONS = {  # the first is the baseline each row's ratio divides by: the targets are against SDPA
    "sdpa": sdpa,
    "explicit": attention_reference,  # softmax(q k^T / sqrt(hs)) v, the (T, T) scores in memory
    "triton": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),  # ours
}
TOKENS = 4 * 32 * 16384  # batch x heads x length per run at head dim 64: the Triton tutorial's largest shape


def flops(B: int, H: int, T: int, hs: int, causal: bool, backward: bool) -> float:
    """4 B H T^2 hs for the forward (two matmuls of 2 B H T^2 hs), half of it when causal; the backward
    does 2.5x the forward's (five matmuls, one of them recomputing the scores)."""
    forward = 4 * B * H * T * T * hs * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def shape(T: int, hs: int) -> tuple[int, int]:
    """(B, H) for a length: the tutorial's batch 4 and 2,048 channels (32 heads of 64, 16 of 128), with
    the batch grown at short lengths so that every run has the same tokens."""
    H = 2048 // hs
    return max(1, TOKENS * 64 // (H * hs) // T), H


def time_attention(name: str, T: int, hs: int, causal: bool, backward: bool, dtype, device, repeats: int):
    """(seconds, peak MiB) of one implementation, or (None, note) when it runs out of memory."""
    B, H = shape(T, hs)
    q, k, v = (torch.randn(B, H, T, hs, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    fn = IMPLEMENTATIONS[name]
    if backward:
        do = torch.randn_like(q)
        run = lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)  # noqa: E731
    else:
        run = lambda: fn(q, k, v, causal)  # noqa: E731
    torch.cuda.empty_cache()
    try:
        with torch.no_grad() if not backward else torch.enable_grad():
            return time_it(run, device, warmup=2, repeats=repeats)
    except torch.OutOfMemoryError:
        return None, "out of memory"


def kernel_rows(args, dtype, device, rows: list[dict], curves: dict) -> None:
    """TFLOP/s and peak memory of every implementation at every length, head dim, mask and pass, appended
    to rows (and curves) as each is measured, so that a run cut short keeps them."""
    cases = [(hs, causal, bwd) for hs in (64, 128) for causal in (True, False) for bwd in (False, True)]
    for hs, causal, bwd in tqdm(cases, desc="attention"):
        what = f"hs {hs}, {'causal' if causal else 'full'}, {'fwd+bwd' if bwd else 'fwd'}"
        for T in args.lengths:
            B, H = shape(T, hs)
            speed, memory = {}, {}
            for name in IMPLEMENTATIONS:
                seconds, peak = time_attention(name, T, hs, causal, bwd, dtype, device, args.repeats)
                speed[name] = seconds and flops(B, H, T, hs, causal, bwd) / seconds / 1e12
                memory[name] = peak if seconds else None
            label = f"{what}, T={T}"
            rows += compare("attention_tflops", "TFLOP/s", {f"{n}, {label}": s for n, s in speed.items()})
            rows += compare("peak_memory_mib", "MiB", {f"{n}, {label}": m for n, m in memory.items()})
            for name in IMPLEMENTATIONS:  # after the rows: a plot never shows a point the JSON lacks
                curves.setdefault((what, name), []).append((T, speed[name], memory[name]))


def step_seconds(fn, q, k, v, device, calls: int, repeats: int) -> float:
    """One decode step's attention time: `calls` of them are timed together, as one lasts about a launch."""
    seconds, _ = time_it(lambda: [fn(q, k, v, False) for _ in range(calls)], device, 2, repeats)
    return seconds / calls


@torch.no_grad()
def decode_rows(args, dtype, device, rows: list[dict]) -> None:
    """One decode step's attention: one query per sequence against a cache of T keys, at GPT-2 124M's 12
    heads of 64, through our forward kernel (a single query, end-aligned, sees every key) and through SDPA. A
    step reads the whole cache once and does little arithmetic, so its speed is the cache's bytes over its
    time, in GB/s."""
    for B in (1, 16):
        for T in args.lengths:
            q = torch.randn(B, 12, 1, 64, device=device, dtype=dtype)
            k, v = (torch.randn(B, 12, T, 64, device=device, dtype=dtype) for _ in range(2))
            cache_gb = 2 * k.numel() * k.element_size() / 1e9
            speed = {
                f"{name}, decode, B={B}, T={T}": cache_gb
                / step_seconds(IMPLEMENTATIONS[name], q, k, v, device, 20, args.repeats)
                for name in ("sdpa", "triton")
            }
            rows += compare("decode_attention_gb_per_s", "GB/s", speed)


def train_and_prefill(mc, tc, dtype, args, device) -> tuple[float | None, float | None]:
    """Tokens/s of one training step of GPT(mc) (a batch of tc.batch_size), and milliseconds of one prefill,
    a forward pass over one full-context prompt under the KV cache; None out of memory. The step is
    train.py's; the tokens are random (step time does not depend on what they say)."""
    torch.manual_seed(0)
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, tc)
    data = torch.randint(mc.vocab_size, (tc.batch_size, mc.block_size + 1), device=device)
    step = lambda: train_step(model, optimizer, (data[:, :-1], data[:, 1:]), tc.lr, tc, dtype)  # noqa: E731
    prompt = data[:1, :-1]  # (1, T)

    @torch.no_grad()
    def prefill():
        with autocast(device, dtype):
            model.prefill(prompt)  # writes slots 0..T-1 again each time: the same work as the first

    torch.cuda.empty_cache()
    try:
        train_s, _ = time_it(step, device, warmup=2, repeats=args.repeats)
    except torch.OutOfMemoryError:
        train_s = None
    # as project 08 times it: the prefill alone, cache in place, holding the keys autocast makes
    model.eval().setup_cache(1, mc.block_size, dtype=dtype)
    try:
        prefill_s, _ = time_it(prefill, device, warmup=2, repeats=args.repeats)
    except torch.OutOfMemoryError:
        prefill_s = None
    tokens_per_s = train_s and tc.batch_size * mc.block_size / train_s
    return tokens_per_s, prefill_s and prefill_s * 1e3


def end_to_end_rows(args, device, rows: list[dict]) -> None:
    """GPT-2 124M's training tokens/s and prefill time with each attention, at its context and at 4x it
    (attention's share of a step grows with the length), the same 16,384 tokens a training step at both."""
    mc, tc = PRESETS["gpt2"]
    dtype = pick_dtype("auto", device)  # bf16 autocast where the GPU has it, as train.py trains
    for block in (1024, 4096):
        tc_block = replace(tc, batch_size=16 * 1024 // block)
        runs = {
            f"{name}, 124M, T={block}": train_and_prefill(
                replace(mc, block_size=block, **switches), tc_block, dtype, args, device
            )
            for name, switches in reversed(ATTENTION.items())  # explicit first: the ratios' baseline
        }
        rows += compare("train_tok_per_s", "tok/s", {n: r[0] for n, r in runs.items()})
        rows += compare("ttft_ms", "ms", {n: r[1] for n, r in runs.items()})


@torch.no_grad()
def correctness_rows(device) -> list[dict]:
    """The kernels' largest error against the float64 reference on small random inputs (the interpreter runs
    them on a CPU), and the memory each attention needs at GPT-2's shape, from the formula."""
    rows, g = [], torch.Generator().manual_seed(0)
    for causal in (True, False):
        q, k, v = (torch.randn(2, 3, 100, 64, generator=g).to(device) for _ in range(3))
        ref = attention_reference(q.double(), k.double(), v.double(), causal)
        err = (flash_attention(q, k, v, causal=causal).double() - ref).abs().max().item()
        rows.append(
            row("max_abs_diff", f"triton vs float64, {'causal' if causal else 'full'}, T=100", err, "")
        )
    B, H, T = 16, 12, 1024  # GPT-2 124M's training micro-batch, per layer
    rows += [
        row("attention_memory_mib", "explicit: B H T^2 scores, bf16", B * H * T * T * 2 / 2**20, "MiB"),
        row("attention_memory_mib", "triton: B H T log-sum-exps, fp32", B * H * T * 4 / 2**20, "MiB"),
    ]
    return rows


def plot(curves: dict, index: int, ylabel: str) -> bytes:
    fig = Figure(figsize=(11, 7), dpi=110)
    whats = sorted({what for what, _ in curves})
    for i, what in enumerate(whats):
        ax = fig.add_subplot(2, (len(whats) + 1) // 2, i + 1)
        for (w, name), points in curves.items():
            if w == what:
                ax.plot([p[0] for p in points], [p[index] for p in points], "o-", label=name)
        ax.set(xscale="log", title=what, xlabel="sequence length", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def lengths_list(text: str) -> list[int]:
    try:
        lengths = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths: a comma-separated list of positive integers, got {text!r}")
    return lengths


def parse_args(argv):
    p = ArgumentParser(description="Benchmark our Triton FlashAttention-2 against explicit attention, SDPA.")
    p.add_argument(
        "--lengths", default="512,1024,2048,4096,8192,16384", help="sequence lengths, comma-separated"
    )
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs; the median is reported")
    p.add_argument("--no-train", action="store_true", help="skip the end-to-end GPT-2 training comparison")
    add_device_args(p)
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.lengths = lengths_list(args.lengths)
    device = pick_device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("off the GPU the kernels need Triton's interpreter: run with TRITON_INTERPRET=1")
    rows = correctness_rows(device if device.type == "cuda" else torch.device("cpu"))
    config, curves = {"lengths": args.lengths, "tokens_per_run": TOKENS, "repeats": args.repeats}, {}
    if device.type == "cuda":
        dtype = pick_dtype(args.dtype, device)
        config["dtype"] = str(dtype).removeprefix("torch.")
        try:
            kernel_rows(args, dtype, device, rows, curves)
            decode_rows(args, dtype, device, rows)
            if not args.no_train:
                end_to_end_rows(args, device, rows)
        except KeyboardInterrupt:  # Ctrl-C, or run_benchmarks.py's budget: keep what was measured
            print("interrupted: writing the rows measured so far", file=sys.stderr)
            config["cut_short"] = True
    else:
        print(
            "note: only Triton's interpreter runs the kernels here: speeds are not measured", file=sys.stderr
        )
        rows.append(row("attention_tflops", "triton", None, "TFLOP/s", note="needs a CUDA GPU"))
        rows.append(row("decode_attention_gb_per_s", "triton", None, "GB/s", note="needs a CUDA GPU"))
    print_table(rows)
    path = write_report(args, "FlashAttention-2 in Triton", device, "gpt2", "gpt2", config, rows)
    if curves and path:  # path: None when nothing was measured
        for name, index, label in (("tflops", 1, "TFLOP/s"), ("memory", 2, "peak memory (MiB)")):
            png = path.with_name(f"{name}-{path.stem}.png")
            png.write_bytes(plot(curves, index, label))
            print(f"wrote {png}")
    return 130 if config.get("cut_short") else 0


if __name__ == "__main__":
    raise SystemExit(main())
