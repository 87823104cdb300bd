"""Mamba against the GPT at about equal parameters, in one run. Training: both from seed 0 on the same batches
for the same steps (Mamba gets as many blocks as match the GPT's block parameters: about two per transformer
block, as in the paper): held-out loss along the way and at the end, training tokens/s. The three selective
scans on one input: their time and their distance from the sequential reference. Decoding at contexts 128 to
8k (random weights and a random cache or state: speed and memory do not depend on what the numbers are): the
GPT with a KV cache against Mamba's recurrent state, decode tokens/s and the bytes each keeps per sequence.

python benchmark.py                                   # GPT-2 124M's width on a GPU; a small shape elsewhere
python benchmark.py --preset tiny --steps 4 --contexts 16 64   # seconds
"""

import functools
import io
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from cli import ArgumentParser, add_device_args, exits_cleanly, pick_device, positive_int
from data import make_loaders
from distributed import Dist
from mamba import SCANS, selective_scan, selective_scan_ref, triton_selective_scan
from model import GPT, GPTConfig
from precision import PRECISIONS, auto_precision, make_scaler, set_matmul_precision
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import DEFAULT_PRESET, PRESETS, block_weights, estimate_loss, lr_at, make_optimizer, train_step

CONTEXTS = (128, 256, 512, 1024, 2048, 4096, 8192)


def variants(mc: GPTConfig) -> dict[str, GPTConfig]:
    """The GPT, and Mamba with the number of blocks whose weights come nearest the GPT's blocks'."""
    mamba = replace(mc, arch="mamba")
    n_layer = max(1, round(mc.n_layer * block_weights(mc) / block_weights(mamba)))
    return {"gpt": mc, "mamba": replace(mamba, n_layer=n_layer)}


def train_variant(mc: GPTConfig, tc, args, device, precision) -> dict:
    """`tc.max_iters` steps of one micro-batch each from seed `tc.seed` (0), on the batches every variant
    sees; the held-out loss every `args.eval_every` steps."""
    torch.manual_seed(tc.seed)
    model = GPT(mc).to(device, precision.weights)
    optimizer = make_optimizer(model, tc, device)
    scaler = make_scaler(precision, device)
    loader, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())
    evaluate = functools.partial(estimate_loss, model, make_val_loader, tc, device, precision, Dist())
    curve = []
    for step in range(1, tc.max_iters + 1):
        train_step(model, optimizer, scaler, loader, 1, lr_at(step - 1, tc), tc, device, precision, Dist())
        if step % args.eval_every == 0 or step == tc.max_iters:
            curve.append((step, evaluate()))
    return {"model": model, "curve": curve, "params": model.num_params()}


def train_seconds(models: dict[str, GPT], batch, repeats: int, device, precision) -> dict[str, float]:
    """The median time of a forward and backward pass over one batch for each model, the models taking
    turns (one warm-up call each in the first turn): load that comes and goes falls on both alike."""

    def step(model: GPT) -> None:
        with precision.autocast(device):
            _, loss = model.train()(*batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = {name: [] for name in models}
    for turn in range(repeats):
        for name, model in models.items():
            seconds, _ = time_it(functools.partial(step, model), device, warmup=int(turn == 0), repeats=1)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def scans(mc: GPTConfig, batch: int, device, repeats: int) -> dict[str, tuple[float | None, float | None]]:
    """Each selective scan on one random input of a Mamba layer's shape (batch, block_size, d_inner,
    d_state): (milliseconds, max |y - y_ref|). The Triton kernel only on a GPU (the interpreter is a test
    tool, not a speed)."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, mc.block_size, mc.d_inner)
    u = torch.randn(shape, generator=g)
    delta = F.softplus(torch.randn(shape, generator=g) - 3)  # around the init's dt range
    A = -torch.arange(1, mc.d_state + 1.0).repeat(mc.d_inner, 1)  # (Di, N): the init's A
    B, C = torch.randn(2, batch, mc.block_size, mc.d_state, generator=g)
    inputs = [t.to(device) for t in (u, delta, A, B, C, torch.ones(mc.d_inner))]
    ref = selective_scan_ref(*inputs)[0]
    out = {}
    for impl in SCANS:
        if impl == "triton" and (device.type != "cuda" or triton_selective_scan is None):
            out[impl] = (None, None)
            continue
        ms = 1e3 * time_it(lambda i=impl: selective_scan(*inputs, impl=i), device, 1, repeats)[0]
        out[impl] = (ms, (selective_scan(*inputs, impl=impl)[0] - ref).abs().max().item())
    return out


def kv_cache(model: GPT, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The GPT's KV cache: per layer keys and values (B, nh, length, hs) for the tokens read and those still
    to come; random (a decode step costs the same whatever they hold)."""
    c, p = model.config, model.wte.weight
    shape = (batch, c.n_head, length, c.n_embd // c.n_head)
    new = functools.partial(torch.randn, shape, device=p.device, dtype=p.dtype)
    return [(new(), new()) for _ in model.blocks]


def gpt_step(model: GPT, idx: torch.Tensor, cache, pos: int) -> torch.Tensor:
    """One token (B,) at position `pos` through the GPT with a KV cache (what project 08 builds): its key and
    value go into the cache, its query attends over positions 0..pos. Returns logits (B, V)."""
    x = model.wte(idx) + model.wpe.weight[pos]  # (B, C)
    for block, (K, V) in zip(model.blocks, cache, strict=True):
        attn = block.attn
        q, k, v = attn.qkv(block.ln_1(x)).split(x.size(-1), dim=-1)  # 3 x (B, C)
        q, k, v = (t.view(x.size(0), attn.n_head, 1, -1) for t in (q, k, v))  # (B, nh, 1, hs)
        K[:, :, pos : pos + 1], V[:, :, pos : pos + 1] = k, v
        y = F.scaled_dot_product_attention(q, K[:, :, : pos + 1], V[:, :, : pos + 1])  # (B, nh, 1, hs)
        x = x + attn.proj(y.reshape(x.shape))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x))[:, : model.config.vocab_size]


@torch.no_grad()
def decode(configs: dict[str, GPTConfig], contexts, args, device, dtype) -> dict[int, dict[str, tuple]]:
    """For each context L: decode args.gen_tokens tokens after L tokens already read, greedy, batch
    args.decode_batch, each model with its memory of the past (the GPT's KV cache, Mamba's state). Returns
    {L: {variant: (tokens/s, bytes of cache or state, peak GPU MiB or None)}}."""
    gen, batch = args.gen_tokens, args.decode_batch
    torch.manual_seed(0)
    gpt = GPT(replace(configs["gpt"], block_size=max(contexts) + gen)).to(device, dtype).eval()
    mamba = GPT(configs["mamba"]).to(device, dtype).eval()
    out = {}
    for L in tqdm(contexts, desc="decode contexts", leave=False):
        cache = kv_cache(gpt, batch, L + gen)
        states = mamba.new_states(batch)
        for s in states:  # a state some prompt might have left
            s.conv.normal_(), s.ssm.normal_()
        memory = {  # the bytes of the tensors themselves: the KV cache grows with L, the state does not
            "gpt": sum(t.numel() * t.element_size() for kv in cache for t in kv),
            "mamba": sum(s.nbytes() for s in states),
        }
        idx = torch.zeros(batch, dtype=torch.long, device=device)

        def run_gpt(cache=cache, idx=idx, L=L):
            x = idx
            for i in range(gen):
                x = gpt_step(gpt, x, cache, L + i).argmax(-1)

        def run_mamba(states=states, idx=idx):
            x = idx
            for _ in range(gen):
                x = mamba.step(x, states).argmax(-1)

        out[L] = {}
        for name, fn in (("gpt", run_gpt), ("mamba", run_mamba)):
            seconds, peak = time_it(fn, device, warmup=1, repeats=args.repeats)
            out[L][name] = (batch * gen / seconds, memory[name], peak)
        del cache
    return out


def plot(runs: dict[str, dict], dec: dict[int, dict[str, tuple]], title: str) -> bytes:
    """Held-out loss against steps; decode tokens/s and cache or state bytes against the context."""
    fig = Figure(figsize=(13, 3.8), dpi=110)
    fig.subplots_adjust(wspace=0.3)
    ax = fig.add_subplot(1, 3, 1)
    for name, r in runs.items():
        ax.plot(*zip(*r["curve"], strict=True), "o-", ms=2, lw=1, label=name)
    ax.set(xlabel="step", ylabel="held-out loss (nats/token)", title=title)
    for i, (what, unit) in enumerate((("decode tokens/s", 1), ("decode memory per batch (MiB)", 2**20))):
        ax2 = fig.add_subplot(1, 3, 2 + i)
        for name in runs:
            ax2.plot(list(dec), [d[name][i] / unit for d in dec.values()], "o-", ms=3, label=name)
        ax2.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=what)
    for a in fig.axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Benchmark Mamba against the GPT: quality, training and decoding speed.")
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="model size (default: gpt2 on a GPU, cpu elsewhere)"
    )
    p.add_argument("--data", type=Path, default=None, help="text file or shards (default: data/wikitext)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps per model (default: 300; 150 on a CPU)",
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default: 8)")
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="tokens per training sequence (default: 512 on a GPU, 64 elsewhere)",
    )
    p.add_argument(
        "--eval-every", type=positive_int, default=None, help="steps between held-out losses (steps / 10)"
    )
    p.add_argument("--eval-iters", type=positive_int, default=4, help="held-out batches per loss")
    p.add_argument(
        "--contexts",
        type=positive_int,
        nargs="+",
        default=CONTEXTS,
        help=f"decode contexts (default: {' '.join(map(str, CONTEXTS))})",
    )
    p.add_argument("--gen-tokens", type=positive_int, default=32, help="tokens decoded per timing")
    p.add_argument(
        "--decode-batch",
        type=positive_int,
        default=None,
        help="sequences decoded at once (default: 64 on a GPU, where the KV cache dominates; 1 elsewhere)",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per measurement; the median")
    add_device_args(p, dtype=False)
    add_output_args(p)
    args = p.parse_args(argv)
    args.data = args.data and str(args.data.resolve())
    return args


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    cpu = device.type != "cuda"
    preset = args.preset or ("cpu" if cpu else DEFAULT_PRESET)
    mc, tc = PRESETS[preset]
    steps = args.steps or (150 if cpu else 300)
    args.eval_every = args.eval_every or max(1, steps // 10)
    args.decode_batch = args.decode_batch or (1 if cpu else 64)
    batch = args.batch_size or 8
    mc = replace(mc, block_size=args.block_size or (64 if cpu else 512))
    tokens = batch * mc.block_size  # one micro-batch a step: no accumulation
    # seed 0 and eval_interval = --eval-every: what train_variant uses, so the report's config says so
    tc = replace(tc, batch_size=batch, max_iters=steps, warmup_iters=max(1, steps // 10), seed=0,
                 total_batch_tokens=tokens, eval_iters=args.eval_iters,
                 eval_interval=args.eval_every)  # fmt: skip
    configs = variants(mc)
    precision = PRECISIONS[auto_precision(device)]  # bf16 autocast on GPUs that have it, fp32 elsewhere
    set_matmul_precision(precision)
    _, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())  # bad --data: now
    print(
        f"training the GPT ({mc.n_layer} blocks) and Mamba ({configs['mamba'].n_layer} blocks) at the "
        f"{preset} preset's width for {steps} steps x {tokens:,} tokens each ({precision.name})",
        file=sys.stderr,
    )
    runs = {name: train_variant(c, tc, args, device, precision) for name, c in tqdm(configs.items())}
    held_out = tuple(t.to(device) for t in make_val_loader().next_batch())  # (B, T) x 2
    seconds = train_seconds(
        {n: r["model"] for n, r in runs.items()}, held_out, args.repeats, device, precision
    )
    scan = scans(configs["mamba"], batch, device, args.repeats)
    dtype = torch.bfloat16 if precision.name.startswith("bf16") else torch.float32
    dec = decode(configs, sorted(args.contexts), args, device, dtype)
    val = {n: r["curve"][-1][1] for n, r in runs.items()}
    rows = [
        *compare("params", "count", {n: r["params"] for n, r in runs.items()}),
        *compare("n_layer", "blocks", {n: c.n_layer for n, c in configs.items()}),
        *compare("val_loss", "nats/token", val),
        row("val_loss_within_5pct_of_gpt", "mamba", abs(val["mamba"] / val["gpt"] - 1) <= 0.05, ""),
        *compare("train_tok_per_s", "tok/s", {n: tokens / s for n, s in seconds.items()}),
        *compare("scan_ms", "ms", {f"{n} scan": ms for n, (ms, _) in scan.items()}),
        *[row("scan_max_abs_diff_vs_ref", f"{n} scan", d, "") for n, (_, d) in scan.items()],
    ]
    for L, d in dec.items():
        rows += compare(f"decode_tok_per_s_ctx{L}", "tok/s", {n: v[0] for n, v in d.items()})
        rows += compare(f"decode_cache_mib_ctx{L}", "MiB", {n: v[1] / 2**20 for n, v in d.items()})
        if device.type == "cuda":  # what the allocator held at its peak while decoding
            rows += compare(f"decode_peak_mib_ctx{L}", "MiB", {n: v[2] for n, v in d.items()})
    print_table(rows)
    config = {
        **vars(mc),
        **vars(tc),
        "mamba_n_layer": configs["mamba"].n_layer,
        "tokens_per_step": tokens,
        "data": args.data,
        "decode_batch": args.decode_batch,
        "gen_tokens": args.gen_tokens,
        "decode_weights": "random (speed and memory only)",
        "curves": {n: r["curve"] for n, r in runs.items()},
    }
    path = write_report(args, "Mamba", device, preset, DEFAULT_PRESET, config, rows)
    png = path.with_name(f"mamba-{path.stem}.png")
    png.write_bytes(plot(runs, dec, f"{preset} preset, {device.type}"))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
