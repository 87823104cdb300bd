"""Every precision side by side, in one run. Training: the same model, initial weights and batches for
`--steps` steps in fp32 (TF32 off), tf32, fp16 with our loss scaler, fp16 with torch.amp.GradScaler, bf16
autocast and pure bf16: step time, tokens/s, peak memory, MFU, validation loss after those steps, skipped
steps, and the loss curves in one PNG. Inference: a trained checkpoint's weights in fp32, fp16 and bf16:
weight memory, checkpoint size, logits against fp32's, held-out perplexity, decode tokens/s.

python benchmark.py                                   # GPT-2 124M on a GPU; the cpu preset elsewhere
python benchmark.py --preset tiny --steps 3           # seconds
"""

import io
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

from checkpoint import MODELS_DIR, checkpoint_exists, load_checkpoint
from cli import (
    ArgumentParser,
    add_device_args,
    exits_cleanly,
    pick_device,
    positive_float,
    positive_int,
    sync,
)
from data import make_loaders
from distributed import Dist
from model import GPT
from precision import DTYPES, PRECISIONS, check_dtype, check_precision, make_scaler, set_matmul_precision
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import (
    DEFAULT_PRESET,
    PRESETS,
    estimate_loss,
    flops_per_token,
    lr_at,
    make_optimizer,
    peak_flops,
    train_step,
)

# name -> (precision, run PyTorch's GradScaler instead of ours); the first is the baseline
TRAIN_VARIANTS = {
    "fp32": ("fp32", False),
    "tf32": ("tf32", False),
    "fp16": ("fp16", False),
    "fp16-gradscaler": ("fp16", True),
    "bf16": ("bf16", False),
    "bf16-pure": ("bf16-pure", False),
}


def train_variant(name: str, mc, tc, args, device) -> dict:
    """`tc.max_iters` steps from the same initial weights on the same batches, timed one by one."""
    p = PRECISIONS[TRAIN_VARIANTS[name][0]]
    set_matmul_precision(p)
    torch.manual_seed(0)
    model = GPT(mc).to(device, p.weights)
    optimizer = make_optimizer(model, tc, device)
    scaler = make_scaler(p, device, reference=TRAIN_VARIANTS[name][1])
    loader, make_val_loader, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds, skipped = [], [], 0
    for step in range(tc.max_iters):
        sync(device)
        t0 = time.perf_counter()
        loss, _, skip = train_step(
            model, optimizer, scaler, loader, 1, lr_at(step, tc), tc, device, p, Dist()
        )
        sync(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
        skipped += skip
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    val = estimate_loss(model, make_val_loader, tc, device, p, Dist())
    timed = seconds[min(args.warmup, len(seconds) - 1) :]  # the first steps set up kernels and caches
    return {
        "losses": losses,
        "step_s": statistics.median(timed),
        "peak": peak,
        "skipped": skipped,
        "val": val,
    }


DEFAULT_CHECKPOINT = MODELS_DIR / "project03_pretrain"


def trained_model(args, mc) -> tuple[GPT, str]:
    """Quality needs trained weights: --checkpoint's (a path that holds none is an error), else project 03's
    default checkpoint, else random ones, with a note and the report saying so. On the CPU until they are
    measured, so that they take no GPU memory while training is."""
    path = args.checkpoint or (DEFAULT_CHECKPOINT if checkpoint_exists(DEFAULT_CHECKPOINT) else None)
    if path is not None:  # load_checkpoint names a missing or corrupt one in one line
        model, _ = load_checkpoint(path, "cpu", tokenizer="tiktoken")
        return model, str(path)
    print(
        f"note: no checkpoint in {DEFAULT_CHECKPOINT}; the inference figures use random weights, so only "
        "their speed and memory mean anything (train project03_pretrain first)",
        file=sys.stderr,
    )
    torch.manual_seed(0)
    return GPT(mc).eval(), "random weights"


@torch.no_grad()
def infer_dtype(model32: GPT, dtype: torch.dtype, batch, args, device) -> dict:
    """The model's weights cast to `dtype`: memory, file size, logits, perplexity and decode speed."""
    model = GPT(model32.config).to(device, dtype).eval()
    model.load_state_dict(model32.state_dict())  # copied, cast to dtype
    x, y = batch
    logits, loss = model(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, f"{tmp}/model.safetensors")
        file_mib = Path(f"{tmp}/model.safetensors").stat().st_size / 2**20
    prompt = x[:1, :16]  # (1, 16)
    decode = lambda: list(model.generate_stream(prompt, args.gen_tokens, temperature=0))  # noqa: E731
    seconds, _ = time_it(decode, device, warmup=1, repeats=args.repeats)
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "file": file_mib,
        "logits": logits.float(),
        "ppl": torch.exp(loss.float()).item(),
        "decode": args.gen_tokens / seconds,
    }


def plot_curves(curves: dict[str, list[float]], title: str) -> bytes:
    """Every variant's training loss per step, one line each, as PNG bytes."""
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, lw=1, label=name)
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Benchmark training and inference in every precision, side by side.")
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="model size (default: gpt2 on a GPU, cpu elsewhere)"
    )
    p.add_argument("--data", type=Path, default=None, help="text file or shards (default: data/wikitext)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="trained weights for the inference figures, any checkpoint of this GPT (default: project 03's "
        "in data/models/project03_pretrain, else random weights, which the report says)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps per precision (default: 20 on a GPU; 6 elsewhere, where fp16 is slow)",
    )
    p.add_argument("--warmup", type=positive_int, default=2, help="first steps left out of the step time")
    p.add_argument("--gen-tokens", type=positive_int, default=64, help="tokens decoded per dtype")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed decodes; the median is reported")
    p.add_argument("--peak-flops", type=positive_float, default=None, help="device peak FLOP/s for MFU")
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
    steps = args.steps or (20 if device.type == "cuda" else 6)
    tokens = tc.batch_size * mc.block_size  # one micro-batch a step: no accumulation
    tc = replace(tc, max_iters=steps, warmup_iters=max(1, steps // 10), total_batch_tokens=tokens)
    for p in {PRECISIONS[precision] for precision, _ in TRAIN_VARIANTS.values()}:
        check_precision(p, device)  # every precision and dtype, before minutes of work are spent
    for dtype in DTYPES.values():
        check_dtype(dtype, device)
    model32, source = trained_model(args, mc)  # first: a wrong --checkpoint fails before any work
    names = list(TRAIN_VARIANTS)
    print(f"training the {preset} preset for {steps} steps in each precision", file=sys.stderr)
    runs = {name: train_variant(name, mc, tc, args, device) for name in tqdm(names, desc="precisions")}
    peak = peak_flops(device, args.peak_flops)
    mfu = {
        n: 100 * flops_per_token(mc) * tokens / r["step_s"] / peak if peak else None for n, r in runs.items()
    }
    rows = [
        *compare("step_ms", "ms", {n: r["step_s"] * 1e3 for n, r in runs.items()}),
        *compare("train_tok_per_s", "tok/s", {n: tokens / r["step_s"] for n, r in runs.items()}),
        *compare("peak_memory_mib", "MiB", {n: r["peak"] for n, r in runs.items()}),
        *compare("mfu_percent", "%", mfu),
        *compare("val_loss", "nats/token", {n: r["val"] for n, r in runs.items()}),
        *[row("skipped_steps", n, r["skipped"], "steps") for n, r in runs.items()],
    ]

    set_matmul_precision(PRECISIONS["fp32"])
    _, make_val_loader, _ = make_loaders(args.data, 4, model32.config.block_size, Dist())
    batch = tuple(t.to(device) for t in make_val_loader().next_batch())
    dtypes = {}
    for name, dtype in DTYPES.items():
        dtypes[name] = infer_dtype(model32, dtype, batch, args, device)
    rows += [
        *compare("weight_memory_mib", "MiB", {n: r["weights"] for n, r in dtypes.items()}),
        *compare("checkpoint_mib", "MiB", {n: r["file"] for n, r in dtypes.items()}),
        *[
            row("max_abs_logit_diff", n, (r["logits"] - dtypes["float32"]["logits"]).abs().max().item(), "")
            for n, r in dtypes.items()
        ],
        *compare("val_ppl", "perplexity", {n: r["ppl"] for n, r in dtypes.items()}),
        *compare("decode_tok_per_s", "tok/s", {n: r["decode"] for n, r in dtypes.items()}),
    ]
    print_table(rows)
    config = {
        **vars(mc),
        **vars(tc),
        "tokens_per_step": tokens,
        "data": args.data,
        "inference_weights": source,
    }
    path = write_report(
        args, "Mixed precision: training and inference", device, preset, DEFAULT_PRESET, config, rows
    )
    curves = plot_curves({n: r["losses"] for n, r in runs.items()}, f"{preset} preset, {device.type}")
    png = path.with_name(f"loss_curves-{path.stem}.png")
    png.write_bytes(curves)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
