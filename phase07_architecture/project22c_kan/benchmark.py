"""The GPT against KAN-GPTs (every block's MLP a two-layer KAN, kan.py) at equal parameters, in one run:
the same seed, batches and steps for each; then held-out loss, training tokens/s (forward + backward), decode
tokens/s, the block MLP alone (forward + backward), and memory: parameters, and the bytes autograd saves for
backward over one training forward (counted by torch.autograd.graph.saved_tensors_hooks; on a GPU also the
peak allocated during a training step).

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
from results import add_output_args, compare, print_table, time_it, write_report
from train import DEFAULT_PRESET, PRESETS, estimate_loss, lr_at, make_optimizer, train_step


def variants(mc: GPTConfig, grid_updates: int) -> dict[str, tuple[GPTConfig, int]]:
    """(model config, grid updates) per variant, the GPT first (the ratios in the table are to it). The
    KAN-MLP's hidden width is GPTConfig.kan_width: the MLP's parameters (model.py gives the formula)."""
    kan = replace(mc, mlp="kan")
    return {"GPT (MLP)": (mc, 0), "KAN-GPT": (kan, 0), "KAN-GPT, grid updates": (kan, grid_updates)}


def train_variant(mc: GPTConfig, grid_updates: int, tc, args, device, precision) -> dict:
    """`tc.max_iters` steps of one micro-batch each from seed `tc.seed` (0), on the batches every variant
    sees; the grids moved to the activations before each of the first `grid_updates` steps; the held-out
    loss every `args.eval_every` steps."""
    torch.manual_seed(tc.seed)
    model = GPT(mc).to(device, precision.weights)
    optimizer = make_optimizer(model, tc, device)
    scaler = make_scaler(precision, device)
    loader, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())
    evaluate = functools.partial(estimate_loss, model, make_val_loader, tc, device, precision, Dist())
    curve = []
    for step in range(1, tc.max_iters + 1):
        lr, grid = lr_at(step - 1, tc), step - 1 < grid_updates
        train_step(model, optimizer, scaler, loader, 1, lr, tc, device, precision, Dist(), grid)
        if step % args.eval_every == 0 or step == tc.max_iters:
            curve.append((step, evaluate()))
    return {"model": model, "curve": curve, "params": model.num_params(non_embedding=False)}


def saved_mib(fn) -> float:
    """MiB of the tensors autograd keeps for backward while fn() runs forward: each storage counted once
    (a tensor saved by two ops, or views of one buffer, take its memory once)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def train_measures(models: dict[str, GPT], batch, repeats: int, device, precision) -> dict[str, dict]:
    """Per model: median seconds of a forward and backward over one batch (the models taking turns, so that
    load coming and going on a shared machine falls on all alike), the GPU's peak allocated MiB during one,
    the MiB saved for backward, and the same seconds and MiB for the first block's MLP alone."""

    def step(model: GPT) -> None:
        with precision.autocast(device):
            _, loss = model.train()(*batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def mlp_step(mlp: torch.nn.Module, x: torch.Tensor) -> None:
        with precision.autocast(device):
            y = mlp(x)
        y.float().square().mean().backward()
        mlp.zero_grad(set_to_none=True)

    x = torch.randn(*batch[0].shape, models[next(iter(models))].config.n_embd, device=device)  # (B, T, C)
    out = {name: {"step": [], "mlp": []} for name in models}
    for turn in range(repeats):
        for name, model in models.items():
            s, peak = time_it(functools.partial(step, model), device, warmup=int(turn == 0), repeats=1)
            out[name]["step"].append(s)
            out[name]["peak"] = max(out[name].get("peak") or 0, peak or 0) or None
            mlp = functools.partial(mlp_step, model.blocks[0].mlp, x)
            out[name]["mlp"].append(time_it(mlp, device, warmup=int(turn == 0), repeats=1)[0])
    for name, model in models.items():
        with precision.autocast(device):
            out[name]["saved"] = saved_mib(lambda m=model: m.train()(*batch))
            out[name]["mlp_saved"] = saved_mib(lambda m=model: m.blocks[0].mlp(x))
        model.zero_grad(set_to_none=True)
        out[name].update(step=statistics.median(out[name]["step"]), mlp=statistics.median(out[name]["mlp"]))
    return out


@torch.no_grad()
def decode_tok_s(model: GPT, prompt: torch.Tensor, n: int, device, precision, repeats: int) -> float:
    """Greedy tokens per second after `prompt` (1, P), without a KV cache (each step reruns the window)."""

    def decode():
        with precision.autocast(device):
            list(model.eval().generate_stream(prompt, n, temperature=0))

    return n / time_it(decode, device, warmup=1, repeats=repeats)[0]


def plot_curves(runs: dict[str, dict], title: str) -> bytes:
    """Held-out loss against steps, one line per variant, as PNG bytes."""
    fig = Figure(figsize=(6, 3.8), dpi=110)
    ax = fig.add_subplot()
    for name, r in runs.items():
        ax.plot(*zip(*r["curve"], strict=True), "o-", ms=2, lw=1, label=name)
    ax.set(xlabel="step", ylabel="held-out loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Benchmark KAN-MLP GPTs against the GPT at equal parameters, same tokens.")
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="model size (default: gpt2 on a GPU, cpu elsewhere)"
    )
    p.add_argument("--data", type=Path, default=None, help="text file or shards (default: data/wikitext)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps per variant (default: 300; 100 on a CPU)",
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
    p.add_argument("--grid-updates", type=positive_int, default=10, help="grid updates of the third variant")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between held-out losses")
    p.add_argument("--eval-iters", type=positive_int, default=4, help="held-out batches per loss")
    p.add_argument("--gen-tokens", type=positive_int, default=32, help="tokens decoded per timing")
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
    steps = args.steps or (100 if cpu else 300)
    args.eval_every = args.eval_every or max(1, steps // 10)
    small = cpu and preset == "cpu"
    batch = args.batch_size or (8 if small else tc.batch_size)
    mc = replace(mc, block_size=args.block_size or (64 if small else mc.block_size))
    tokens = batch * mc.block_size  # one micro-batch a step: no accumulation
    tc = replace(tc, batch_size=batch, max_iters=steps, warmup_iters=max(1, steps // 10), seed=0,
                 total_batch_tokens=tokens, eval_iters=args.eval_iters,
                 eval_interval=args.eval_every)  # fmt: skip
    configs = variants(mc, args.grid_updates)
    precision = PRECISIONS[auto_precision(device)]  # bf16 autocast on GPUs that have it, fp32 elsewhere
    set_matmul_precision(precision)
    _, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())  # bad --data: now
    print(
        f"training {len(configs)} variants of the {preset} preset for {steps} steps x {tokens:,} tokens "
        f"each ({precision.name}); KAN-MLP width {configs['KAN-GPT'][0].kan_width}",
        file=sys.stderr,
    )
    runs = {n: train_variant(c, g, tc, args, device, precision) for n, (c, g) in tqdm(configs.items())}
    models = {n: r["model"] for n, r in runs.items()}
    batch = tuple(t.to(device) for t in make_val_loader().next_batch())  # (B, T) x 2: held-out tokens
    m = train_measures(models, batch, args.repeats, device, precision)
    decode = {n: decode_tok_s(r, batch[0][:1, :16], args.gen_tokens, device, precision, args.repeats)
              for n, r in models.items()}  # fmt: skip
    rows = [
        *compare("params", "count", {n: r["params"] for n, r in runs.items()}),
        *compare("val_loss", "nats/token", {n: r["curve"][-1][1] for n, r in runs.items()}),
        *compare("train_tok_per_s", "tok/s", {n: tokens / v["step"] for n, v in m.items()}),
        *compare("decode_tok_per_s", "tok/s", decode),
        *compare("mlp_fwd_bwd_ms", "ms", {n: 1e3 * v["mlp"] for n, v in m.items()}),
        *compare("param_mib", "MiB", {n: r["params"] * 4 / 2**20 for n, r in runs.items()}),
        *compare("saved_for_backward_mib", "MiB", {n: v["saved"] for n, v in m.items()}),
        *compare("mlp_saved_for_backward_mib", "MiB", {n: v["mlp_saved"] for n, v in m.items()}),
        *compare("train_peak_mib", "MiB", {n: v["peak"] for n, v in m.items()}),
    ]
    print_table(rows)
    config = {**vars(mc), **vars(tc), "kan_width": configs["KAN-GPT"][0].kan_width,
              "grid_updates": args.grid_updates, "tokens_per_step": tokens, "data": args.data}  # fmt: skip
    curves = {n: r["curve"] for n, r in runs.items()}
    path = write_report(args, "KAN", device, preset, DEFAULT_PRESET, {**config, "curves": curves}, rows)
    png = path.with_name(f"kan_training-{path.stem}.png")
    png.write_bytes(plot_curves(runs, f"{preset} preset, {device.type}"))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
