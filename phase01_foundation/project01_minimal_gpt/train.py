"""Train the character-level GPT on Tiny Shakespeare (or any UTF-8 text).

python train.py --preset tiny         # seconds on a CPU
python train.py                       # nanoGPT's shakespeare_char run: minutes on one GPU
python train.py --resume              # continue the run in --out exactly where it stopped
"""

import io
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from checkpoint import (
    DEFAULT_DIR,
    interrupted,
    load_train_state,
    load_weights,
    metrics_file,
    prepare_out,
    read_metrics,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from cli import (
    ArgumentParser,
    UserError,
    add_config_flags,
    add_device_args,
    autocast,
    check_memory,
    command,
    exits_cleanly,
    fraction_below,
    non_negative_int,
    override,
    pick_device,
    pick_dtype,
    positive_float,
    positive_int,
    refuse_changes_on_resume,
    seed_everything,
    sync,
    time_left,
    warn_if_slow,
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
        TrainConfig(batch_size=32, max_iters=2000, lr=2e-3, min_lr=2e-4, eval_interval=250, eval_iters=50),
    ),
    "tiny": (
        GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        TrainConfig(
            batch_size=8, max_iters=60, lr=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=20, eval_iters=4
        ),
    ),
}
DEFAULT_PRESET = "shakespeare"
# The flags that override a preset's value, with their types; --help reads each preset's value from PRESETS.
MODEL_FLAGS = {"dropout": (fraction_below(1), "dropout rate")}
TRAIN_FLAGS = {
    "max_iters": (positive_int, "total optimizer steps"),
    "batch_size": (positive_int, "sequences per step"),
    "lr": (positive_float, "peak learning rate"),
    "eval_interval": (positive_int, "evaluate and checkpoint every N steps"),
    "eval_iters": (positive_int, "batches per loss estimate"),
    "seed": (non_negative_int, "random seed"),
}
FIXED_ON_RESUME = ("preset", "dropout", "batch_size", "lr", "seed")  # --resume continues the run exactly


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up (large early updates from random weights are unstable), then cosine decay to min_lr."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    min_lr = min(tc.min_lr, tc.lr)  # a --lr under the preset's floor must not climb to the floor
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - min_lr)


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


def step_memory(mc: GPTConfig, tc: TrainConfig) -> float:
    """A lower bound on the bytes a training step holds: weights, gradients and Adam's two moments (16 bytes
    a parameter), and the float32 activations backward needs (per layer the (T, T) attention weights and a
    few (T, C) tensors per sequence, and the logits)."""
    params = 12 * mc.n_layer * mc.n_embd**2 + mc.vocab_size * mc.n_embd
    per_token = mc.n_layer * (2 * mc.n_head * mc.block_size + 8 * mc.n_embd) + 2 * mc.vocab_size
    return 16 * params + 4 * per_token * tc.batch_size * mc.block_size


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
    p = ArgumentParser(description="Train the character-level GPT of this project.")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help=f"model and training sizes (default: {DEFAULT_PRESET}; tiny runs in seconds on a CPU)",
    )
    p.add_argument("--data", type=Path, default=None, help="a UTF-8 text file (default: Tiny Shakespeare)")
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    add_device_args(p)
    add_config_flags(p, {name: mc for name, (mc, _) in PRESETS.items()}, MODEL_FLAGS)
    add_config_flags(p, {name: tc for name, (_, tc) in PRESETS.items()}, TRAIN_FLAGS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # "." has no name to build the temporary sibling directories from
    return args


def configure(args) -> tuple[str, GPTConfig, TrainConfig, dict]:
    """The run's preset, configs and metadata: a preset's, or what a resumed run recorded; then the flags.
    Checked before anything is computed or written."""
    saved = prepare_out(args.out, args.resume, args.overwrite)
    if saved is None:
        preset = args.preset or DEFAULT_PRESET
        mc, tc = PRESETS[preset]
        data = args.data and str(args.data.resolve())
        meta = {"training": {"preset": preset, "data": data}}
        return preset, override(mc, args, MODEL_FLAGS), override(tc, args, TRAIN_FLAGS), meta
    recorded = {"preset": saved["training"]["preset"], **saved["model"], **saved["training"]["train_config"]}
    refuse_changes_on_resume(args, recorded, FIXED_ON_RESUME)
    recorded = saved["training"]["data"]
    if args.data is not None and str(args.data.resolve()) != recorded:
        raise UserError(
            f"the run in {args.out} trained on {recorded or 'Tiny Shakespeare'}; "
            "--resume continues on the same data"
        )
    tc = override(TrainConfig(**saved["training"]["train_config"]), args, TRAIN_FLAGS)
    if saved["training"]["step"] >= tc.max_iters:
        raise UserError(
            f"the run in {args.out} already finished its {tc.max_iters} steps; pass a larger "
            "--max-iters to train further (the cosine schedule is then stretched to it)"
        )
    return (
        saved["training"]["preset"],
        GPTConfig(**saved["model"]),
        tc,
        {k: saved[k] for k in ("tokenizer", "training")},
    )


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset, mc, tc, meta = configure(args)
    text = read_text(meta["training"]["data"])
    tokenizer = CharTokenizer(meta["tokenizer"]["chars"]) if args.resume else CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(torch.tensor(tokenizer.encode(text)), mc.block_size)
    mc = replace(mc, vocab_size=tokenizer.vocab_size)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    check_memory(step_memory(mc, tc), device, f"a training step of {tc.batch_size} x {mc.block_size} tokens")

    seed_everything(tc.seed)
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, tc, device)
    batch_gen = torch.Generator().manual_seed(tc.seed)  # the data order: its state is saved with the run
    step, metrics = restore_run(args.out, model, optimizer, batch_gen) if args.resume else (0, [])
    meta["tokenizer"] = {"type": "char", "chars": tokenizer.chars}
    meta["training"].update(train_config=asdict(tc), device=device.type)
    print(
        f"{preset} preset: {model.num_params() / 1e6:.2f}M parameters, vocabulary {mc.vocab_size}, "
        f"{len(train_ids):,} training tokens, {device.type} {str(dtype).removeprefix('torch.')}"
    )
    slow = warn_if_slow(device, preset == DEFAULT_PRESET)

    bar = tqdm(total=tc.max_iters, initial=step, desc="training", unit="step", dynamic_ncols=True)
    start = time.perf_counter() - meta["training"].get("elapsed_s", 0.0)
    try:
        while step < tc.max_iters:
            t0 = time.perf_counter()
            x, y = get_batch(train_ids, mc.block_size, tc.batch_size, batch_gen)
            lr = lr_at(step, tc)
            loss, grad_norm = train_step(model, optimizer, x.to(device), y.to(device), lr, tc, device, dtype)
            sync(device)
            step, dt = step + 1, time.perf_counter() - t0
            metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tc.batch_size * mc.block_size / dt:,.0f}")
            bar.update()
            if slow and step == 1:
                bar.write(time_left(dt, tc.max_iters - step))
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                losses = estimate_loss(model, {"train": train_ids, "val": val_ids}, tc, device, dtype)
                metrics.append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
                bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                elapsed = round(time.perf_counter() - start, 1)
                meta["training"].update(
                    step=step, train_loss=losses["train"], val_loss=losses["val"], elapsed_s=elapsed
                )
                save_run(args.out, model, optimizer, batch_gen, meta, metrics)
    except KeyboardInterrupt:
        bar.close()
        print(interrupted(step, meta["training"].get("step"), args.out))
        return 130
    bar.close()
    flags = [] if args.out == DEFAULT_DIR else ["--checkpoint", str(args.out)]
    print(f"done: val loss {meta['training']['val_loss']:.4f} after {step} steps; checkpoint in {args.out}")
    print(f"sample from it: {command('generate.py', *flags)}")
    return 0


def save_run(out: Path, model: GPT, optimizer, batch_gen: torch.Generator, meta: dict, metrics: list) -> None:
    """Checkpoint everything the next step depends on: weights, optimizer moments, data order, dropout RNG."""
    state = {
        "step": metrics[-1]["step"],
        "optimizer": optimizer.state_dict(),
        "batch_rng": batch_gen.get_state(),
        "rng": rng_states(),
    }
    files = {"metrics.jsonl": metrics_file(metrics), "loss_curve.png": plot_losses(metrics)}
    save_checkpoint(out, model, meta, state, files)


def restore_run(ckpt_dir: Path, model: GPT, optimizer, batch_gen: torch.Generator) -> tuple[int, list]:
    """The inverse of save_run: afterwards the next steps compute exactly what an uninterrupted run would."""
    load_weights(model, ckpt_dir)
    state = load_train_state(ckpt_dir)
    optimizer.load_state_dict(state["optimizer"])
    batch_gen.set_state(state["batch_rng"])
    restore_rng_states(state["rng"])
    return state["step"], read_metrics(ckpt_dir)


if __name__ == "__main__":
    raise SystemExit(main())
