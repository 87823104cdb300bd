"""Every way of sharing weights side by side, in one run: the unshared baseline, ALBERT's cross-layer sharing
(all of a block, its attention only, its MLP only), ALBERT's factorised embedding, and MobileLLM's block-wise
repeat, each trained from the same seed on the same batches for the same number of tokens. Then, for each:
parameters (all, and outside the embeddings), checkpoint size, FLOPs and time per token, and held-out
perplexity; and one PNG of parameters against perplexity.

python benchmark.py                                   # GPT-2 124M's shape on a GPU; the cpu preset elsewhere
python benchmark.py --preset tiny --steps 3           # seconds
"""

import functools
import io
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from safetensors.torch import save_model
from tqdm import tqdm

from cli import ArgumentParser, UserError, add_device_args, exits_cleanly, pick_device, positive_int, sync
from data import make_loaders
from distributed import Dist
from model import GPT, GPTConfig
from precision import PRECISIONS, auto_precision, make_scaler, set_matmul_precision
from results import add_output_args, compare, print_table, time_it, write_report
from train import DEFAULT_PRESET, PRESETS, estimate_loss, flops_per_token, lr_at, make_optimizer, train_step


def variants(mc: GPTConfig, embd_dim: int) -> dict[str, GPTConfig]:
    """The model configs compared, baseline first (the ratios in the table are to it)."""
    return {
        "baseline": mc,
        "all-shared": replace(mc, share="all"),  # ALBERT: one block's weights in every layer
        "attn-shared": replace(mc, share="attn"),
        "mlp-shared": replace(mc, share="mlp"),
        "factorised": replace(mc, embd_dim=embd_dim),  # ALBERT: V x E + E x C instead of V x C
        "repeat x2": replace(mc, repeat=2),  # MobileLLM: each block twice in a row, the baseline's weights
    }


def default_embd_dim(mc: GPTConfig) -> int:
    """ALBERT's E = 128 (at its C = 768: a sixth); below C = 512, a quarter of the width, so that the
    factorisation still has a width to save on (the cpu preset: C = 128, E = 32)."""
    return min(128, mc.n_embd // 4)


def train_variant(mc: GPTConfig, tc, args, device, precision) -> dict:
    """`tc.max_iters` steps of one micro-batch each from seed 0, on the batches every variant sees, timed one
    by one; then the held-out loss on the whole validation split, the parameters and the checkpoint's size."""
    torch.manual_seed(0)
    model = GPT(mc).to(device, precision.weights)
    optimizer = make_optimizer(model, tc, device)
    scaler = make_scaler(precision, device)
    loader, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())
    seconds = []
    for step in range(tc.max_iters):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, scaler, loader, 1, lr_at(step, tc), tc, device, precision, Dist())
        sync(device)
        seconds.append(time.perf_counter() - t0)
    # every batch of the validation split once (estimate_loss stops at its end): the pinned held-out set
    val = estimate_loss(model, make_val_loader, replace(tc, eval_iters=10**9), device, precision, Dist())
    with tempfile.TemporaryDirectory() as tmp:  # save_model stores each shared tensor once
        save_model(model, f"{tmp}/model.safetensors")
        file_mib = Path(f"{tmp}/model.safetensors").stat().st_size / 2**20
    return {
        "model": model.eval(),
        "step_s": statistics.median(seconds[min(args.warmup, len(seconds) - 1) :]),
        "val": val,
        "params": model.num_params(non_embedding=False),
        "non_embedding": model.num_params(),
        "file": file_mib,
    }


@torch.no_grad()
def forward_seconds(models: dict[str, GPT], x: torch.Tensor, repeats: int, device, precision) -> dict:
    """The median time of a forward pass over x (B, T) for each model, the models taking turns (one warm-up
    call each in the first turn): on a shared machine, load that comes and goes falls on all of them alike."""

    def forward(model: GPT) -> None:
        with precision.autocast(device):
            model(x)

    times = {name: [] for name in models}
    for turn in range(repeats):
        for name, model in models.items():
            seconds, _ = time_it(functools.partial(forward, model), device, warmup=int(turn == 0), repeats=1)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def plot_params_vs_perplexity(runs: dict[str, dict], title: str) -> bytes:
    """Perplexity against parameters, all of them and those outside the embeddings, one point per variant."""
    fig = Figure(figsize=(11, 4), dpi=120)
    fig.subplots_adjust(wspace=0.4)  # room for the second panel's axis label
    panels = [("params", "parameters"), ("non_embedding", "non-embedding parameters")]
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, r in runs.items():
            ax.scatter(r[key] / 1e6, math.exp(r["val"]))
            ax.annotate(name, (r[key] / 1e6, math.exp(r["val"])), textcoords="offset points", xytext=(4, 4))
        ax.set(xlabel=f"{label} (millions)", ylabel="held-out perplexity", title=title)
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Benchmark every way of sharing weights against the unshared model.")
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="model size (default: gpt2 on a GPU, cpu elsewhere)"
    )
    p.add_argument("--data", type=Path, default=None, help="text file or shards (default: data/wikitext)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps (one micro-batch each) per variant (default: 200 on a GPU; 50 elsewhere)",
    )
    p.add_argument(
        "--embd-dim",
        type=positive_int,
        default=None,
        help="E of the factorised variant (default: 128, or a quarter of n_embd below 512)",
    )
    p.add_argument("--warmup", type=positive_int, default=2, help="first steps left out of the step time")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed forward passes; the median counts")
    add_device_args(p, dtype=False)
    add_output_args(p)
    args = p.parse_args(argv)
    args.data = args.data and str(args.data.resolve())
    return args


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    preset = args.preset or (DEFAULT_PRESET if device.type == "cuda" else "cpu")
    mc, tc = PRESETS[preset]
    steps = args.steps or (200 if device.type == "cuda" else 50)
    tokens = tc.batch_size * mc.block_size  # one micro-batch a step: no accumulation
    tc = replace(tc, max_iters=steps, warmup_iters=max(1, steps // 10), total_batch_tokens=tokens)
    embd_dim = args.embd_dim or default_embd_dim(mc)
    try:  # every config before minutes of training: an --embd-dim as wide as the model is refused now
        configs = variants(mc, embd_dim)
    except ValueError as e:
        raise UserError(f"--embd-dim {embd_dim}: {e}") from e
    precision = PRECISIONS[auto_precision(device)]  # bf16 autocast on GPUs that have it, fp32 elsewhere
    set_matmul_precision(precision)
    _, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())  # bad --data: now
    print(
        f"training {len(configs)} variants of the {preset} preset for {steps} steps x {tokens:,} tokens "
        f"each ({precision.name})",
        file=sys.stderr,
    )
    runs = {name: train_variant(c, tc, args, device, precision) for name, c in tqdm(configs.items())}
    x = make_val_loader().next_batch()[0].to(device)  # (B, T): one batch of held-out tokens
    forward = forward_seconds({n: r["model"] for n, r in runs.items()}, x, args.repeats, device, precision)
    rows = [
        *compare("params", "count", {n: r["params"] for n, r in runs.items()}),
        *compare("non_embedding_params", "count", {n: r["non_embedding"] for n, r in runs.items()}),
        *compare("checkpoint_mib", "MiB", {n: r["file"] for n, r in runs.items()}),
        *compare("forward_flops_per_token", "FLOP", {n: flops_per_token(c) / 3 for n, c in configs.items()}),
        *compare("forward_us_per_token", "us", {n: 1e6 * s / x.numel() for n, s in forward.items()}),
        *compare("train_tok_per_s", "tok/s", {n: tokens / r["step_s"] for n, r in runs.items()}),
        *compare("val_loss", "nats/token", {n: r["val"] for n, r in runs.items()}),
        *compare("val_ppl", "perplexity", {n: math.exp(r["val"]) for n, r in runs.items()}),
    ]
    print_table(rows)
    config = {**vars(mc), **vars(tc), "tokens_per_step": tokens, "data": args.data}
    config.update(factorised_embd_dim=embd_dim, precision=precision.name)
    path = write_report(args, "Weight sharing", device, preset, DEFAULT_PRESET, config, rows)
    png = path.with_name(f"params_vs_perplexity-{path.stem}.png")
    png.write_bytes(plot_params_vs_perplexity(runs, f"{preset} preset, {steps * tokens:,} tokens"))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
