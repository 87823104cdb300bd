"""Pruning side by side. Quality on a trained checkpoint (project 01's character model by default: 96% of its
weights are in the blocks that pruning touches): held-out perplexity, KL divergence from the dense model,
sparsity, parameters and checkpoint size of the dense model, magnitude, Wanda and SparseGPT at 50%
unstructured, 4:8 and 2:4, SparseGPT 50% with int4, and whole heads and MLP channels removed (25% and 50%)
with and without a short recovery fine-tune; perplexity against sparsity for the three methods (a plot).
Speed: forward and decode tokens/s of the dense, unstructured and structured models, at the checkpoint's
shape and at GPT-2 124M's (random weights: the time depends on the shapes, not the values); on a GPU, 2:4
weights through PyTorch's semi-structured sparse matmul against the dense fp16 one.

python benchmark.py --threads 1                       # project 01's checkpoint; speed at 124M's shape too
python benchmark.py --checkpoint data/models/mine --data input.txt --preset cpu
"""

import copy
import dataclasses
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from safetensors.torch import save_model
from tqdm import tqdm

from checkpoint import checkpoint_exists
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    pick_device,
    positive_float,
    positive_int,
)
from config import PRESETS
from loader import PROJECT01, calibration_batch, load_float_model, token_split, training_data
from model import GPT
from pruning import Sparsity, block_hessians, prune_model, recover, sparsity_of, structured_prune
from results import add_output_args, compare, print_table, row, time_it, write_report

PATTERNS = {"50%": Sparsity(0.5), "4:8": Sparsity(0.5, 4, 8), "2:4": Sparsity(0.5, 2, 4)}
STRUCTURED = (0.25, 0.5)  # the fraction of heads and of MLP channels removed


def windows(tokens: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every full T-token window of the held-out tokens, (n, T), and the next tokens, (n, T): no overlap,
    every position scored (so early positions see a short context; the README says why this is pinned)."""
    n = (len(tokens) - 1) // T
    if n == 0:
        raise UserError(f"the held-out split has {len(tokens)} tokens, fewer than one {T}-token window")
    ids = torch.from_numpy(tokens[: n * T + 1].astype(np.int64))
    return ids[:-1].view(n, T), ids[1:].view(n, T)


@torch.no_grad()
def evaluate(model: GPT, reference: GPT | None, x, y, device, batch: int = 16) -> tuple[float, float]:
    """Held-out perplexity, exp(mean next-token loss), and the mean KL divergence from the dense model's
    next-token distribution to this one's (0 without a reference)."""
    loss = kl = 0.0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        logp = F.log_softmax(model(xb.to(device))[0].float(), dim=-1).flatten(0, 1)  # (B*T, V)
        loss += F.nll_loss(logp, yb.flatten().to(device), reduction="sum").item()
        if reference is not None:
            ref = F.log_softmax(reference(xb.to(device))[0].float(), dim=-1).flatten(0, 1)
            kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
    return math.exp(loss / y.numel()), kl / y.numel()


def file_bytes(model: GPT) -> int:
    """Size of model.safetensors as prune.py writes it (zeros take as many bytes as any other weight)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


@torch.no_grad()
def input_norm_spread(model: GPT, calibration: torch.Tensor) -> list[float]:
    """Per Linear of the blocks, max ||X_j|| / median ||X_j|| over its input features: how unevenly sized
    the inputs are. Wanda's scores differ from magnitude's only as far as this is above 1 (LLMs' outlier
    features put it far above)."""
    spread = []
    for _, hessians in block_hessians(model, calibration):
        for h in hessians.values():
            norms = torch.diag(h).sqrt()  # ||X_j|| up to a constant
            spread.append((norms.max() / norms.median()).item())
    return spread


def variants(group_size: int) -> dict[str, tuple]:
    """name -> (kind, arguments): the pruned models the quality table compares."""
    out = {"dense": ("dense",)}
    for label, sp in PATTERNS.items():
        out |= {
            f"{method} {label}": ("unstructured", method, sp)
            for method in ("magnitude", "wanda", "sparsegpt")
        }
    out[f"sparsegpt 50% + int4 g{group_size}"] = ("unstructured", "sparsegpt", PATTERNS["50%"], 4)
    for f in STRUCTURED:
        out[f"structured {f:.0%}"] = ("structured", f, False)
        out[f"structured {f:.0%} + recovery"] = ("structured", f, True)
    out["dense + recovery"] = ("dense", True)  # the control: what the same fine-tune does without pruning
    return out


def pruned(model: GPT, spec: tuple, calibration, train, args) -> GPT:
    model = copy.deepcopy(model)
    kind, *rest = spec
    if kind == "unstructured":
        method, sp, *bits = rest
        group_size = min(128, model.config.n_embd)
        return prune_model(model, method, sp, calibration, bits[0] if bits else None, group_size)
    if kind == "structured":
        model, _ = structured_prune(model, rest[0], rest[0], calibration)
    if rest and rest[-1] is True:  # the short recovery fine-tune, pruned weights held at zero
        recover(model, train, args.recover_iters, args.recover_lr, 16)
        model.eval()
    return model


def quality_rows(args, device) -> tuple[list[dict], dict, dict]:
    """Every variant of the trained checkpoint: perplexity, KL, sparsity, parameters, checkpoint size; and the
    perplexity-against-sparsity sweep. Returns rows, config, and the models the speed table times."""
    ckpt = args.checkpoint or PROJECT01
    if args.checkpoint is None and not checkpoint_exists(ckpt):
        print(f"note: no checkpoint in {ckpt} (project 01's): quality is not measured", file=sys.stderr)
        return [row("perplexity", "dense", None, "", note=f"no trained checkpoint in {ckpt}")], {}, {}
    model, meta = load_float_model(ckpt, None, device)
    data = training_data(args.data, meta)
    T, chars = model.config.block_size, meta["tokenizer"].get("chars")
    x, y = windows(token_split(data, "val", chars)[: args.eval_tokens], T)
    train = token_split(data, "train", chars)
    calibration = calibration_batch(train, args.calibration_samples, T, 0).to(device)
    spread = input_norm_spread(model, calibration)
    rows, ppl, timed = (
        [
            row(
                "input_norm_spread", "max/median ||X_j||, median over layers", statistics.median(spread), "x"
            ),
            row("input_norm_spread", "max/median ||X_j||, largest layer", max(spread), "x"),
        ],
        {},
        {},
    )
    for name, spec in tqdm(variants(min(128, model.config.n_embd)).items(), desc="quality", disable=None):
        q = pruned(model, spec, calibration, train, args)
        ppl[name], kl = evaluate(q, None if name == "dense" else model, x, y, device)
        params = sum(p.numel() for p in q.parameters())
        rows += [
            row("perplexity", name, ppl[name], "", None if name == "dense" else ("dense", ppl["dense"])),
            row("kl_vs_dense", name, kl, "nats/token"),
            row("sparsity_percent", name, 100 * sparsity_of(q), "%"),
            row("params", name, params, ""),
            row("nonzero_params", name, sum(int((p != 0).sum()) for p in q.parameters()), ""),
            row("checkpoint_mib", name, file_bytes(q) / 2**20, "MiB"),
        ]
        if name in (
            "dense",
            "sparsegpt 50%",
            "sparsegpt 2:4",
            *(f"structured {f:.0%} + recovery" for f in STRUCTURED),
        ):
            timed[name] = q
    sweep = sweep_perplexity(model, calibration, x, y, device, args.sweep)
    rows += [
        row("perplexity", f"{m} {f:.0%} (sweep)", p, "") for m, pts in sweep.items() for f, p in pts if f
    ]
    config = dict(
        checkpoint=str(ckpt),
        data=str(data),
        held_out=f"the last 10% of the text, {y.numel()} tokens in non-overlapping {T}-token windows",
        calibration=f"{args.calibration_samples} x {T} tokens of the train split, seed 0",
        recovery=f"{args.recover_iters} AdamW steps, lr {args.recover_lr}, 16 x {T} tokens each",
    )
    return rows + target_rows(ppl), config, {"timed": timed, "sweep": sweep}


def sweep_perplexity(model: GPT, calibration, x, y, device, fractions: list[float]) -> dict:
    """method -> [(sparsity, perplexity)]: the curve the plot draws, unstructured."""
    curves = {m: [(0.0, evaluate(model, None, x, y, device)[0])] for m in ("magnitude", "wanda", "sparsegpt")}
    for method, points in tqdm(curves.items(), desc="sweep", disable=None):
        for f in fractions:
            q = prune_model(copy.deepcopy(model), method, Sparsity(f), calibration)
            points.append((f, evaluate(q, None, x, y, device)[0]))
    return curves


def target_rows(ppl: dict) -> list[dict]:
    """The issue's targets, computed: the share of magnitude's perplexity gap that Wanda and SparseGPT close,
    and the structured model's cost after recovery."""
    rows, dense = [], ppl["dense"]
    for label in PATTERNS:
        base = ppl[f"magnitude {label}"]
        for method in ("wanda", "sparsegpt"):
            if base - dense > 0.01 * dense:
                closed, note = 100 * (base - ppl[f"{method} {label}"]) / (base - dense), None
            else:  # a gap within 1% of dense (an untrained model, say) would make any share meaningless
                closed, note = None, "magnitude's gap to dense is under 1%"
            rows.append(row("gap_closed_pct", f"{method} {label} vs magnitude", closed, "%", note=note))
    s = ppl[f"structured {STRUCTURED[0]:.0%} + recovery"]
    return rows + [
        row(
            "ppl_increase_pct",
            f"structured {STRUCTURED[0]:.0%} + recovery vs dense",
            100 * (s / dense - 1),
            "%",
        )
    ]


def plot_sweep(sweep: dict, title: str) -> bytes:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method, points in sweep.items():
        ax.plot([100 * f for f, _ in points], [p for _, p in points], marker="o", lw=1, label=method)
    ax.set(xlabel="sparsity of the blocks' Linear weights (%)", ylabel="held-out perplexity", yscale="log")
    ax.set_title(title)
    ax.legend()
    with tempfile.TemporaryFile() as buf:
        fig.savefig(buf, format="png", bbox_inches="tight")
        buf.seek(0)
        return buf.read()


# --- speed ------------------------------------------------------------------------------------------------


@torch.no_grad()
def timers(model: GPT, args, device) -> dict:
    """Two timed functions: a forward over a batch of full windows (prefill-like), and decode steps at
    batch 1 through the KV cache after a 16-token prefill."""
    model = model.to(device).eval()
    T, V = model.config.block_size, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(V, (args.forward_batch, min(T, args.forward_tokens)), generator=g).to(device)
    steps = min(args.decode_tokens, T - 16)
    model.setup_cache(1, 16 + steps, device=device)
    next_id = model.prefill(batch[:1, :16]).argmax(-1, keepdim=True)  # (1, 1)

    def forward():
        model(batch)

    def decode():
        for i in range(steps):
            model.decode(next_id, 16 + i)

    return {"forward_tok_per_s": (forward, batch.numel()), "decode_tok_per_s": (decode, steps)}


def speed_rows(models: dict[str, GPT], shape: str, args, device) -> list[dict]:
    """Tokens/s of each model; the models take turns, one timed run each per round, so that each meets the
    same machine (a shared CPU's load, a GPU's clocks)."""
    runs = {name: timers(m, args, device) for name, m in models.items()}
    times = {(name, metric): [] for name, t in runs.items() for metric in t}
    for fn, _ in (f for t in runs.values() for f in t.values()):
        fn()  # warm-up
    for _ in tqdm(range(args.repeats), desc=f"speed, {shape}", disable=None):
        for name, t in runs.items():
            for metric, (fn, _) in t.items():
                times[name, metric].append(time_it(fn, device, warmup=0, repeats=1)[0])
    rows = []
    for metric in ("forward_tok_per_s", "decode_tok_per_s"):
        speed = {
            f"{name}, {shape}": runs[name][metric][1] / statistics.median(times[name, metric])
            for name in runs
        }
        rows += compare(metric, "tok/s", speed)
    return rows


def shape_models(args) -> dict[str, GPT]:
    """The preset's shape (random weights), dense and with 25% and 50% of heads and channels removed."""
    mc, _ = PRESETS[args.preset]
    out = {}
    for f in (0.0, *STRUCTURED):
        heads, mlp = round(mc.n_head * (1 - f)), round(4 * mc.n_embd * (1 - f))
        config = dataclasses.replace(mc, layer_heads=[heads] * mc.n_layer, layer_mlp=[mlp] * mc.n_layer)
        torch.manual_seed(0)
        out["dense" if f == 0 else f"structured {f:.0%}"] = GPT(config)
    return out


SEMI_SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096), (4096, 11008))


@torch.no_grad()
def semi_structured_rows(device, tokens: list[int]) -> list[dict]:
    """On a GPU: a 2:4 weight through torch.sparse.to_sparse_semi_structured (cuSPARSELt/CUTLASS sparse
    tensor cores) against the dense fp16 matmul, at GPT-2 124M's and Llama-2-7B's Linear shapes, at batch 1
    and at prefill-sized inputs. CUDA only."""
    if device.type != "cuda":
        return [row("semi_structured_us", "2:4 sparse matmul", None, "us", note="needs a CUDA GPU")]
    from torch.sparse import to_sparse_semi_structured
    from triton.testing import do_bench

    rows = []
    for N, K in SEMI_SHAPES:
        w = torch.randn(N, K, device=device, dtype=torch.float16)
        w = w * (torch.arange(K, device=device) % 4 < 2)  # 2:4: two of every four inputs kept
        try:
            sparse = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError) as e:  # a build without its kernels: say so, measure the rest
            return rows + [row("semi_structured_us", "2:4 sparse matmul", None, "us", note=str(e)[:120])]
        for M in tokens:
            x = torch.randn(M, K, device=device, dtype=torch.float16)
            dense = do_bench(lambda: F.linear(x, w), return_mode="median") * 1e3  # noqa: B023  (ms -> us)
            name = f"({N}, {K}), {M} tokens"
            rows.append(row("semi_structured_us", f"dense fp16, {name}", dense, "us"))
            try:
                ours = do_bench(lambda: F.linear(x, sparse), return_mode="median") * 1e3  # noqa: B023
            except RuntimeError as e:  # a shape its kernels refuse: say so, measure the rest
                rows.append(row("semi_structured_us", f"2:4 sparse, {name}", None, "us", note=str(e)[:120]))
                continue
            rows.append(
                row("semi_structured_us", f"2:4 sparse, {name}", ours, "us", (f"dense fp16, {name}", dense))
            )
    return rows


def fractions(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or not all(0 < v < 1 for v in values):
        raise UserError(f"--sweep: a comma-separated list of sparsities in (0, 1), got {text!r}")
    return values


def parse_args(argv):
    p = ArgumentParser(description="Benchmark magnitude, Wanda, SparseGPT and structured pruning.")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help=f"a trained checkpoint (default: {PROJECT01.name}'s)"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="held-out and calibration data (default: the checkpoint's)"
    )
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="held-out tokens (default: all)")
    p.add_argument("--calibration-samples", type=positive_int, default=128, help="calibration windows")
    p.add_argument("--recover-iters", type=positive_int, default=300, help="recovery fine-tune steps")
    p.add_argument("--recover-lr", type=positive_float, default=1e-4, help="recovery learning rate")
    p.add_argument("--sweep", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", help="sparsities the plot draws")
    p.add_argument("--preset", choices=list(PRESETS), default="gpt2", help="the second model shape for speed")
    p.add_argument("--forward-batch", type=positive_int, default=4, help="windows per timed forward pass")
    p.add_argument("--forward-tokens", type=positive_int, default=256, help="tokens per window (at most T)")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs; the median is reported")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p, dtype=False)
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.sweep = fractions(args.sweep)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows, config, made = quality_rows(args, device)
    if made.get("timed"):
        rows += speed_rows(made["timed"], "checkpoint's shape", args, device)
    rows += speed_rows(shape_models(args), f"{args.preset} shape", args, device)
    rows += semi_structured_rows(device, [1, 2048])
    print_table(rows)
    config.update(
        forward=f"{args.forward_batch} x min(T, {args.forward_tokens}) tokens",
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        threads=torch.get_num_threads(),
    )
    path = write_report(args, "Pruning", device, args.preset, "gpt2", config, rows)
    if path and made.get("sweep"):
        png = path.with_name(f"perplexity_vs_sparsity-{path.stem}.png")
        png.write_bytes(plot_sweep(made["sweep"], f"{Path(config['checkpoint']).name}, {device.type}"))
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
