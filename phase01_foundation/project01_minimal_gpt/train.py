"""Train the character-level GPT on Tiny Shakespeare (or any UTF-8 text).

python train.py --preset tiny         # seconds on a CPU
python train.py                       # nanoGPT's shakespeare_char run: minutes on one GPU
python train.py --resume              # continue the run in --out exactly where it stopped
"""

import io
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from checkpoint import (
    DEFAULT_DIR,
    checkpoint_exists,
    find_checkpoint,
    load_train_state,
    load_weights,
    read_config,
    save_checkpoint,
)
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    autocast,
    command,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_float,
    positive_int,
    seed_everything,
    sync,
)
from data import CharTokenizer, get_batch, read_text, train_val_split
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    batch_size: int = 64
    max_iters: int = 5000
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay ends here (lr / 10, as in Chinchilla)
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    # beta2 a little below the usual 0.999: few tokens per step, so average over a shorter window
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250  # evaluate and checkpoint every this many steps
    eval_iters: int = 200  # batches per loss estimate
    seed: int = 1337


# The default preset is nanoGPT's config/train_shakespeare_char.py: 10.7M parameters, ~3 minutes on an A100.
PRESETS = {
    "shakespeare": (
        GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        TrainConfig(),
    ),
    # Sized for a CPU: 0.8M parameters, 2000 steps (in the spirit of nanoGPT's README CPU example).
    "cpu": (
        GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        TrainConfig(
            batch_size=32,
            max_iters=2000,
            lr=2e-3,
            min_lr=2e-4,
            warmup_iters=100,
            eval_interval=250,
            eval_iters=50,
        ),
    ),
    "tiny": (
        GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        TrainConfig(
            batch_size=8, max_iters=60, lr=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=20, eval_iters=4
        ),
    ),
}
DEFAULT_PRESET = "shakespeare"


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up (large early updates from random weights are unstable), then cosine decay to min_lr."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def make_optimizer(model: GPT, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (matmul weights and embeddings) only: decaying biases and
    LayerNorm gains only pulls them from their useful values without regularising anything."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head weight appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"  # one kernel for the whole update instead of several per parameter
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused)


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict, tc: TrainConfig, device, dtype) -> dict[str, float]:
    """Mean loss over eval_iters batches per split. Its own fixed-seed generator means every estimate sees
    the same batches (comparable across steps) and training's data order is left untouched."""
    model.eval()
    out = {}
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(tc.eval_iters):
            x, y = get_batch(ids, model.config.block_size, tc.batch_size, gen)
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def train_step(model, optimizer, x, y, lr: float, tc: TrainConfig, device, dtype) -> tuple[float, float]:
    """One optimizer step. Returns (loss, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device, dtype):
        _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Clipping the global norm caps the size of a step when a rare batch produces a huge gradient.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    return loss.item(), grad_norm.item()


def plot_losses(metrics: list[dict]) -> bytes:
    """The loss curve as PNG bytes: every training step, and the periodic train/val estimates."""
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=0.6, alpha=0.4, label="train (batch)")
    ax.plot([m["step"] for m in evals], [m["train_loss"] for m in evals], "o-", label="train (estimate)")
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats/char)", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Train the character-level GPT of project 01.")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=f"model and training sizes (default: {DEFAULT_PRESET}; tiny runs in seconds on a CPU)",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="train on this UTF-8 text file (default: Tiny Shakespeare)"
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_DIR, help=f"checkpoint directory (default: {DEFAULT_DIR})"
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    add_device_args(p)
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed (default: 1337)")
    p.add_argument("--max-iters", type=positive_int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate")
    p.add_argument(
        "--eval-interval", type=positive_int, default=None, help="evaluate and checkpoint every N steps"
    )
    p.add_argument("--eval-iters", type=positive_int, default=None, help="batches per loss estimate")
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # "." has no name to build the temporary sibling directories from
    return args


def resolve_configs(args, saved: dict | None) -> tuple[str, GPTConfig, TrainConfig]:
    """Preset, then what a resumed checkpoint recorded, then explicit flags: later wins."""
    preset = saved["training"]["preset"] if saved else args.preset or DEFAULT_PRESET
    if saved and args.preset not in (None, preset):
        raise UserError(f"the run in {args.out} uses the {preset} preset; --resume cannot change it")
    mc, tc = PRESETS[preset]
    if saved:
        mc = GPTConfig(**saved["model"])
        tc = TrainConfig(**saved["training"]["train_config"])
    flags = {
        "seed": args.seed,
        "max_iters": args.max_iters,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "eval_interval": args.eval_interval,
        "eval_iters": args.eval_iters,
    }
    tc = replace(tc, **{k: v for k, v in flags.items() if v is not None})
    return preset, mc, tc


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    saved = read_config(args.out) if args.resume else None
    if (
        args.out.exists()
        and not checkpoint_exists(args.out)
        and (args.out.is_file() or any(args.out.iterdir()))
    ):
        raise UserError(
            f"--out {args.out} exists and is not a checkpoint directory; choose a new or empty one"
        )
    if not args.resume and not args.overwrite and checkpoint_exists(args.out):
        raise UserError(
            f"{args.out} already holds a checkpoint; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    preset, mc, tc = resolve_configs(args, saved)

    # Everything the user gave us is checked before anything is written.
    data_path = args.data if args.data is not None else (saved["training"]["data"] if saved else None)
    if saved and args.data is not None and str(Path(args.data).resolve()) != saved["training"]["data"]:
        recorded = saved["training"]["data"] or "Tiny Shakespeare"
        raise UserError(f"the run in {args.out} trained on {recorded}; --resume continues on the same data")
    text = read_text(data_path)
    tokenizer = CharTokenizer(saved["tokenizer"]["chars"]) if saved else CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = train_val_split(ids, mc.block_size)
    mc = replace(mc, vocab_size=tokenizer.vocab_size)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    seed_everything(tc.seed)
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, tc, device)
    batch_gen = torch.Generator().manual_seed(tc.seed)  # the data order: its state is saved with the run
    step, metrics, elapsed = 0, [], 0.0
    if saved:
        step, metrics, elapsed = restore_run(args.out, model, optimizer, batch_gen, device)
        if step >= tc.max_iters:
            raise UserError(
                f"the run in {args.out} already finished its {tc.max_iters} steps; "
                "pass a larger --max-iters to train further (the cosine schedule is then stretched to it)"
            )

    print(
        f"{preset} preset: {model.num_params() / 1e6:.2f}M parameters, vocabulary {mc.vocab_size}, "
        f"{len(train_ids):,} training tokens, {device.type} {str(dtype).removeprefix('torch.')}"
    )

    meta = {
        "tokenizer": {"type": "char", "chars": tokenizer.chars},
        "training": {
            "preset": preset,
            "data": str(Path(data_path).resolve()) if data_path else None,
            "train_config": asdict(tc),
            "device": device.type,
        },
    }
    splits = {"train": train_ids, "val": val_ids}
    warn_cpu = device.type == "cpu" and args.preset is None and not saved
    tokens_per_step = tc.batch_size * mc.block_size
    bar = tqdm(total=tc.max_iters, initial=step, desc="training", unit="step", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    try:
        while step < tc.max_iters:
            t0 = time.perf_counter()
            x, y = get_batch(train_ids, mc.block_size, tc.batch_size, batch_gen)
            lr = lr_at(step, tc)
            loss, grad_norm = train_step(model, optimizer, x.to(device), y.to(device), lr, tc, device, dtype)
            sync(device)
            step += 1
            tok_s = tokens_per_step / (time.perf_counter() - t0)
            metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
            bar.update()
            if warn_cpu and step == 3:
                warn_slow_cpu(bar, time.perf_counter() - t0, tc.max_iters - step)
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                losses = estimate_loss(model, splits, tc, device, dtype)
                metrics.append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
                bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                meta["training"].update(step=step, train_loss=losses["train"], val_loss=losses["val"])
                save_run(args.out, model, optimizer, batch_gen, meta, metrics, time.perf_counter() - start)
    except KeyboardInterrupt:
        bar.close()
        last = meta["training"].get("step") or (saved and saved["training"].get("step"))
        if last:
            print(
                f"interrupted at step {step}; the last checkpoint (step {last}) is in {args.out}; "
                "continue with --resume"
            )
        else:
            print(f"interrupted at step {step}, before this run's first checkpoint; nothing was saved")
        return 130
    bar.close()
    flags = [] if args.out == DEFAULT_DIR else ["--checkpoint", str(args.out)]
    print(
        f"done: val loss {meta['training']['val_loss']:.4f} after {step} steps; checkpoint in {args.out}\n"
        f"sample from it: {command('generate.py', *flags)}"
    )
    return 0


def save_run(out: Path, model: GPT, optimizer, batch_gen: torch.Generator, meta, metrics, elapsed) -> None:
    """Checkpoint everything the next step depends on: weights, optimizer moments, data order, dropout RNG."""
    step = metrics[-1]["step"]
    meta["training"]["elapsed_s"] = round(elapsed, 1)
    state = {"step": step, "optimizer": optimizer.state_dict(), "batch_rng": batch_gen.get_state(),
             "torch_rng": torch.get_rng_state(), "elapsed_s": elapsed}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    files = {"metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics).encode(),
             "loss_curve.png": plot_losses(metrics)}  # fmt: skip
    save_checkpoint(out, model, meta, state, files)


def restore_run(ckpt_dir: Path, model: GPT, optimizer, batch_gen: torch.Generator, device) -> tuple:
    """The inverse of save_run: afterwards the next steps compute exactly what an uninterrupted run would."""
    load_weights(model, ckpt_dir)
    state = load_train_state(ckpt_dir)
    optimizer.load_state_dict(state["optimizer"])
    batch_gen.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    metrics_file = find_checkpoint(ckpt_dir) / "metrics.jsonl"
    try:
        lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
        metrics = [json.loads(line) for line in lines]
    except ValueError as e:
        raise UserError(f"{metrics_file} is corrupt ({e}); cannot resume from it") from e
    return state["step"], metrics, state["elapsed_s"]


def warn_slow_cpu(bar: tqdm, seconds_per_step: float, steps_left: int) -> None:
    seconds = seconds_per_step * steps_left
    duration = f"{seconds / 3600:.1f} hours" if seconds >= 3600 else f"{seconds / 60:.0f} minutes"
    bar.write(
        f"warning: the {DEFAULT_PRESET} preset is sized for a GPU; on this CPU it will take about "
        f"{duration} ({seconds_per_step:.2f} s/step measured). Use --preset tiny for a quick run."
    )


if __name__ == "__main__":
    raise SystemExit(main())
