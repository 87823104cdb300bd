"""The dense model against mixtures of experts at equal active parameters per token, in one run: top-1
(Switch), top-2 (Mixtral), top-2 without the balancing loss, and top-2 balanced by DeepSeek-V3's bias instead,
each with 8 experts, trained from the same seed on the same batches for the same steps. Then, for each:
held-out loss along the way and at the end, the steps a mixture needs to reach the dense model's final loss,
parameters (all, and active per token), training tokens/s, the per-expert load over training (max / mean,
and whether a router collapsed), and one PNG of the loss curves and each expert's share of the tokens.

python benchmark.py                                   # GPT-2 124M's shape on a GPU; a small shape elsewhere
python benchmark.py --preset tiny --steps 4           # seconds
"""

import functools
import io
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from cli import ArgumentParser, add_device_args, exits_cleanly, pick_device, positive_int
from data import make_loaders
from distributed import Dist
from model import GPT, GPTConfig
from precision import PRECISIONS, auto_precision, make_scaler, set_matmul_precision
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import DEFAULT_PRESET, PRESETS, estimate_loss, flops_per_token, lr_at, make_optimizer, train_step

N_EXPERT = 8
COLLAPSE = 2.0  # max / mean load at which a router counts as collapsed (balanced: 1; one expert: E / k)


def variants(mc: GPTConfig) -> dict[str, GPTConfig]:
    """The model configs compared, dense first (the ratios in the table are to it). Each expert is 4 C / k
    wide, so a token's k experts hold the dense MLP's weights: equal active parameters (plus the router)."""
    moe = replace(mc, n_expert=N_EXPERT)  # dropless: capacity drops are tested, not benchmarked
    return {
        "dense": mc,
        "top-1 (Switch)": replace(moe, top_k=1),
        "top-2 (Mixtral)": replace(moe, top_k=2),
        "top-2, no balancing": replace(moe, top_k=2, aux_loss_alpha=0.0),
        "top-2, bias balancing": replace(moe, top_k=2, aux_loss_alpha=0.0, bias_update=1e-3),
    }


def load_stats(counts: torch.Tensor) -> dict:
    """Per-expert load of (n_layer, E) token counts: the worst layer's max / mean, the experts that get
    under a tenth of the mean (dead), and whether some layer's router collapsed onto few experts."""
    counts = counts.float()
    ratio = (counts.max(-1).values / counts.mean(-1)).max().item()
    dead = int((counts < 0.1 * counts.mean(-1, keepdim=True)).sum())
    return {"max_over_mean": ratio, "dead": dead, "collapsed": ratio >= COLLAPSE}


def train_variant(mc: GPTConfig, tc, args, device, precision) -> dict:
    """`tc.max_iters` steps of one micro-batch each from seed `tc.seed` (0), on the batches every variant
    sees, timed one by one; the held-out loss every `args.eval_every` steps; each step's tokens per expert
    and layer."""
    torch.manual_seed(tc.seed)
    model = GPT(mc).to(device, precision.weights)
    optimizer = make_optimizer(model, tc, device)
    scaler = make_scaler(precision, device)
    loader, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())
    evaluate = functools.partial(estimate_loss, model, make_val_loader, tc, device, precision, Dist())
    curve, loads = [], []
    for step in range(1, tc.max_iters + 1):
        train_step(model, optimizer, scaler, loader, 1, lr_at(step - 1, tc), tc, device, precision, Dist())
        if mc.n_expert:
            loads.append(model.expert_counts().cpu())  # (n_layer, E)
        if step % args.eval_every == 0 or step == tc.max_iters:
            curve.append((step, evaluate()))
    last = torch.stack(loads[-max(1, len(loads) // 4) :]).sum(0) if loads else None  # last quarter's load
    return {
        "model": model.eval(),
        "curve": curve,
        "loads": torch.stack(loads) if loads else None,  # (steps, n_layer, E)
        "load": load_stats(last) if last is not None else None,
        "params": model.num_params(non_embedding=False),
        "active": model.num_active_params(),
    }


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose held-out loss is at or below target (None: never within the run)."""
    return next((step for step, loss in curve if loss <= target), None)


def train_seconds(models: dict[str, GPT], batch, repeats: int, device, precision) -> dict[str, float]:
    """The median time of a forward and backward pass (the losses and the routers' losses) over one batch
    for each trained model, the models taking turns (one warm-up call each in the first turn): on a shared
    machine, load that comes and goes falls on all of them alike."""

    def step(model: GPT) -> None:
        with precision.autocast(device):
            _, loss, aux = model.train()(*batch, aux=True)
        (loss + aux["balance"] + aux["z"]).backward()
        model.zero_grad(set_to_none=True)

    times = {name: [] for name in models}
    for turn in range(repeats):
        for name, model in models.items():
            seconds, _ = time_it(functools.partial(step, model), device, warmup=int(turn == 0), repeats=1)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def forward_ms(model: GPT, x: torch.Tensor, device, precision, repeats: int) -> dict[str, float]:
    """One MoE model's forward pass over x, its experts run by a loop over E and by torch's grouped GEMM
    (on sm90 GPUs in bf16 a CUTLASS kernel; elsewhere PyTorch's reference implementation)."""
    times = {}
    for name, grouped in (("loop over experts", False), ("grouped_mm", True)):
        for block in model.blocks:
            block.mlp.grouped = grouped

        def forward():
            with precision.autocast(device):
                model(x)

        times[name] = 1e3 * time_it(forward, device, warmup=1, repeats=repeats)[0]
    for block in model.blocks:
        block.mlp.grouped = None
    return times


def plot_training(runs: dict[str, dict], title: str) -> bytes:
    """Held-out loss against steps for every variant, then each MoE variant's per-expert share of the routed
    tokens over training (mean over layers), one line per expert; 1 / E is perfect balance."""
    moe = [name for name, r in runs.items() if r["loads"] is not None]
    fig = Figure(figsize=(4.2 * (1 + len(moe)), 3.8), dpi=110)
    fig.subplots_adjust(wspace=0.3)
    ax = fig.add_subplot(1, 1 + len(moe), 1)
    for name, r in runs.items():
        ax.plot(*zip(*r["curve"], strict=True), "o-", ms=2, lw=1, label=name)
    ax.set(xlabel="step", ylabel="held-out loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, name in enumerate(moe):
        loads = runs[name]["loads"].float()  # (steps, n_layer, E)
        share = (loads / loads.sum(-1, keepdim=True)).mean(1)  # (steps, E)
        window = max(1, len(share) // 20)  # a moving average: one micro-batch's counts are noisy
        smooth = share.T.unsqueeze(1)  # (E, 1, steps)
        smooth = torch.nn.functional.avg_pool1d(smooth, window, stride=1).squeeze(1)  # (E, steps')
        ax = fig.add_subplot(1, 1 + len(moe), 2 + i)
        for e, line in enumerate(smooth):
            ax.plot(range(window, window + len(line)), line, lw=1, label=f"expert {e}")
        ax.axhline(1 / share.size(1), color="k", ls="--", lw=0.8)
        ax.set(xlabel="step", ylabel="share of routed tokens", title=name, ylim=(0, None))
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Benchmark mixtures of experts against the dense model, same tokens.")
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="model size (default: gpt2 on a GPU, cpu elsewhere)"
    )
    p.add_argument("--data", type=Path, default=None, help="text file or shards (default: data/wikitext)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps per variant (default: 300 on a GPU; 150 elsewhere)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="sequences per step (default: the preset's; 8 on a CPU)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="tokens per sequence (default: the preset's; 64 on a CPU)",
    )
    p.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help="steps between held-out losses (default: steps / 10)",
    )
    p.add_argument("--eval-iters", type=positive_int, default=4, help="held-out batches per loss")
    p.add_argument(
        "--repeats", type=positive_int, default=5, help="timed passes per model; the median counts"
    )
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
    preset = args.preset or (DEFAULT_PRESET if not cpu else "cpu")
    mc, tc = PRESETS[preset]
    steps = args.steps or (150 if cpu else 300)
    args.eval_every = args.eval_every or max(1, steps // 10)
    batch = args.batch_size or (8 if cpu and preset == "cpu" else tc.batch_size)
    mc = replace(mc, block_size=args.block_size or (64 if cpu and preset == "cpu" else mc.block_size))
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
        f"training {len(configs)} variants of the {preset} preset for {steps} steps x {tokens:,} tokens "
        f"each ({precision.name})",
        file=sys.stderr,
    )
    runs = {name: train_variant(c, tc, args, device, precision) for name, c in tqdm(configs.items())}
    dense_final = runs["dense"]["curve"][-1][1]
    reach = {n: steps_to(r["curve"], dense_final) for n, r in runs.items()}
    reached = [  # (variant, steps, the dense baseline, why there is no value)
        (
            n,
            v,
            None if n == "dense" else ("dense", reach["dense"]),
            None if v else f"not reached in {steps} steps",
        )
        for n, v in reach.items()
    ]
    batch = tuple(t.to(device) for t in make_val_loader().next_batch())  # (B, T) x 2: held-out tokens
    seconds = train_seconds({n: r["model"] for n, r in runs.items()}, batch, args.repeats, device, precision)
    tok_s = {n: tokens / s for n, s in seconds.items()}
    forward = forward_ms(runs["top-2 (Mixtral)"]["model"].eval(), batch[0], device, precision, args.repeats)
    loads = {n: r["load"] for n, r in runs.items() if r["load"]}
    rows = [
        *compare("params", "count", {n: r["params"] for n, r in runs.items()}),
        *compare("active_params", "count", {n: r["active"] for n, r in runs.items()}),
        *compare("train_flops_per_token", "FLOPs", {n: flops_per_token(c) for n, c in configs.items()}),
        *compare("val_loss", "nats/token", {n: r["curve"][-1][1] for n, r in runs.items()}),
        *[row("steps_to_dense_final_loss", n, v, "steps", base, miss) for n, v, base, miss in reached],
        *compare("train_tok_per_s", "tok/s", tok_s),
        *compare("tok_per_s_x_active_params", "", {n: tok_s[n] * runs[n]["active"] for n in runs}),
        *[row("max_over_mean_load", n, s["max_over_mean"], "") for n, s in loads.items()],
        *[row("dead_experts", n, s["dead"], "experts") for n, s in loads.items()],
        *[row("router_collapsed", n, s["collapsed"], "") for n, s in loads.items()],
        *compare("forward_ms", "ms", forward),
    ]
    print_table(rows)
    config = {**vars(mc), **vars(tc), "n_expert": N_EXPERT, "tokens_per_step": tokens, "data": args.data}
    curves = {n: r["curve"] for n, r in runs.items()}
    path = write_report(
        args, "Mixture of experts", device, preset, DEFAULT_PRESET, {**config, "curves": curves}, rows
    )
    png = path.with_name(f"moe_training-{path.stem}.png")
    png.write_bytes(plot_training(runs, f"{preset} preset, {device.type}"))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
