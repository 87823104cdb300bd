"""Pre-train GPT-2 small (124M) on GPT-2 tokens in a chosen precision: fp32, tf32, fp16 with dynamic loss
scaling (precision.py), bf16 autocast, or pure bf16; with its weights shared (model.py): across layers
(--share), in a factorised embedding (--embd-dim), or by running each block twice (--repeat 2).

python train.py --preset tiny --data input.txt   # seconds on a CPU
python train.py --preset cpu --share all         # ALBERT: every layer runs block 0's weights
python train.py --preset cpu --repeat 2          # MobileLLM: each block twice in a row, twice as deep
python train.py --precision fp16                 # fp16 autocast, our loss scaler (precision.py)
python prepare.py && python train.py             # WikiText-103 shards, GPT-2 124M, one GPU
torchrun --standalone --nproc_per_node=8 train.py --compile   # 8 GPUs (see distributed.py)
python train.py --resume                         # continue the run in --out exactly where it stopped
"""

import argparse
import contextlib
import io
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distributed
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
    check_memory,
    command,
    exits_cleanly,
    fraction_below,
    non_negative_int,
    override,
    positive_float,
    positive_int,
    refuse_changes_on_resume,
    seed_everything,
    sync,
    time_left,
    warn_if_slow,
)
from data import make_loaders
from model import GPT, SHARE_MODES, GPTConfig
from precision import (
    PRECISIONS,
    Precision,
    auto_precision,
    check_precision,
    make_scaler,
    set_matmul_precision,
)


@dataclass
class TrainConfig:
    batch_size: int = 16  # micro-batch: sequences per forward/backward on one device
    total_batch_tokens: int = 524_288  # tokens per optimizer step (2**19, GPT-3 small's ~0.5M)
    max_iters: int = 1000
    lr: float = 6e-4  # GPT-3 paper's value for the 125M model
    min_lr: float = 6e-5
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 20
    seed: int = 1337


PRESETS = {
    # GPT-2 small: 1000 steps x 524,288 tokens = 524M tokens, about 4.5 epochs of WikiText-103.
    "gpt2": (GPTConfig(), TrainConfig()),
    # Sized for a CPU: 7.2M parameters, 6.4M of them the 50,304-row embedding.
    "cpu": (
        GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
        TrainConfig(
            batch_size=16, total_batch_tokens=4096, max_iters=300, lr=2e-3, min_lr=2e-4, warmup_iters=30
        ),
    ),
    # Seconds anywhere; two micro-batches per step, so gradient accumulation is exercised too.
    "tiny": (
        GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
        TrainConfig(
            batch_size=4,
            total_batch_tokens=256,
            max_iters=40,
            lr=3e-3,
            min_lr=3e-4,
            warmup_iters=5,
            eval_interval=20,
            eval_iters=4,
        ),
    ),
}
DEFAULT_PRESET = "gpt2"


def share_mode(text: str) -> str:
    """argparse type for --share: refused by name, with the choices."""
    if text not in SHARE_MODES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(SHARE_MODES)}, got {text}")
    return text


# The flags that override a preset's value, with their types; --help reads each preset's value from PRESETS.
MODEL_FLAGS = {
    "dropout": (fraction_below(1), "dropout rate"),
    # NEW: weight sharing, off in every preset (model.py)
    "share": (share_mode, "cross-layer sharing (ALBERT): all, attn or mlp of block 0 in every layer; none"),
    "embd_dim": (non_negative_int, "factorised embedding (ALBERT): E below n_embd; 0 = off"),
    "repeat": (positive_int, "runs of each block in a row (MobileLLM: 2)"),
}
TRAIN_FLAGS = {
    "max_iters": (positive_int, "total optimizer steps"),
    "batch_size": (positive_int, "micro-batch size per device"),
    "total_batch_tokens": (positive_int, "tokens per optimizer step"),
    "lr": (positive_float, "peak learning rate"),
    "eval_interval": (positive_int, "evaluate and checkpoint every N steps"),
    "eval_iters": (positive_int, "batches per loss estimate"),
    "seed": (non_negative_int, "random seed"),
}
FIXED_ON_RESUME = (
    "preset",
    "precision",
    "dropout",
    "share",
    "embd_dim",
    "repeat",
    "batch_size",
    "total_batch_tokens",
    "lr",
    "seed",
)  # --resume continues exactly
# Dense bf16 peak FLOP/s of common GPUs, from their data sheets, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up (large early updates from random weights are unstable), then cosine decay to min_lr."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    min_lr = min(tc.min_lr, tc.lr)  # a --lr under the preset's floor must not climb to the floor
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - min_lr)


def grad_accum_steps(tc: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step, so that every step sees total_batch_tokens tokens whatever
    fits in one device's memory and however many devices there are."""
    per_micro = tc.batch_size * block_size * world_size
    if tc.total_batch_tokens % per_micro:
        raise UserError(
            f"--total-batch-tokens {tc.total_batch_tokens} is not a multiple of batch size x context "
            f"x processes = {per_micro}"
        )
    return tc.total_batch_tokens // per_micro


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


def train_step(model, optimizer, scaler, loader, accum, lr, tc: TrainConfig, device, p: Precision, d):
    """One optimizer step over `accum` micro-batches. Returns (mean loss, gradient norm before clipping,
    whether the step was skipped because a gradient overflowed)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        # Gradients add up over micro-batches; DDP need only all-reduce them after the last one.
        last = micro == accum - 1
        no_sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
        with no_sync:  # forward and backward both inside: DDP decides in forward whether backward syncs
            with p.autocast(device):
                _, loss = model(x, y)
            scaler.scale(loss / accum).backward()  # gradients x scale, lifted out of fp16's underflow
        total += loss.detach()
    scale = scaler.get_scale()
    scaler.unscale_(optimizer)  # true gradients again, before clipping compares their norm with 1.0
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    scaler.step(optimizer)  # skipped if any gradient is inf or nan
    scaler.update()  # halve the scale after an overflow, double it after a clean stretch
    skipped = scaler.get_scale() < scale  # the scale only ever drops after an overflow
    return distributed.mean_across_ranks(total / accum, d).item(), grad_norm.item(), skipped


@torch.no_grad()
def estimate_loss(model: GPT, make_val_loader, tc: TrainConfig, device, p: Precision, d) -> float:
    """Mean validation loss over the same batches every time (a fresh loader), over all ranks: eval_iters
    batches, or fewer if the validation data runs out first (a batch is never counted twice)."""
    model.eval()
    loader, total, n = make_val_loader(), torch.zeros((), device=device), 0
    while n < tc.eval_iters and loader.epoch == 0:  # ranks advance together, so they stop together
        x, y = loader.next_batch()
        with p.autocast(device):
            _, loss = model(x.to(device), y.to(device))
        total, n = total + loss.float(), n + 1
    model.train()
    return distributed.mean_across_ranks(total / n, d).item()


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token: 6 per matmul weight a token passes through (2 forward, 4 backward) plus
    attention's 12 * layers * width * context (PaLM, appendix B). Used for model FLOPs utilisation. A shared
    weight costs its FLOPs at every use: compute follows the blocks applied (depth), not the blocks stored.
    Factorised, the output matmul is V x E, and the E x C projection runs twice (tokens in, hidden out)."""
    head = config.n_embd // config.n_head
    blocks = 12 * config.depth * config.n_embd**2  # NEW: applied blocks, however few are stored
    E = config.embd_dim or config.n_embd
    output = config.padded_vocab_size * E + (2 * E * config.n_embd if config.embd_dim else 0)
    return 6 * (blocks + output) + 12 * config.depth * config.n_head * head * config.block_size


def sharing(mc: GPTConfig) -> str:
    """The weight sharing of a model config, in words: 'share attn, E = 32, each block x2'."""
    parts = [f"share {mc.share}" if mc.share != "none" else "", f"E = {mc.embd_dim}" if mc.embd_dim else "",
             f"each block x{mc.repeat}" if mc.repeat > 1 else ""]  # fmt: skip
    return ", ".join(filter(None, parts)) or "no sharing beyond tied embeddings"


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def step_memory(mc: GPTConfig, tc: TrainConfig) -> float:
    """A lower bound on the bytes a training step holds: weights, gradients and Adam's two moments (16 bytes
    a parameter), and the activations backward needs (a few (T, C) tensors per layer and the logits, in
    bf16 at the least; fused attention keeps no (T, T) matrix)."""
    stored = mc.n_layer if mc.share == "none" else 1  # NEW: shared layers store at least one block
    params = 12 * stored * mc.n_embd**2 + mc.padded_vocab_size * (mc.embd_dim or mc.n_embd)
    per_token = 8 * mc.depth * mc.n_embd + 2 * mc.padded_vocab_size  # every applied block keeps its own
    return 16 * params + 2 * per_token * tc.batch_size * mc.block_size


def plot_losses(metrics: list[dict]) -> bytes:
    """The loss curve as PNG bytes: every training step, and the periodic validation estimates."""
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=0.6, alpha=0.5, label="train (step)")
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats/token)", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(
        description="Pre-train this project's GPT-2 on GPT-2 tokens (one process or torchrun)."
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help=f"model and training sizes (default: {DEFAULT_PRESET}; tiny runs in seconds on a CPU)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a UTF-8 text file, or a folder of shards from prepare.py (default: data/wikitext)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    add_device_args(p, dtype=False)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="number formats of the run (precision.py); default: bf16 on GPUs that have it, else fp32",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; first steps slower)")
    p.add_argument(
        "--attention",
        choices=["sdpa", "explicit"],
        default="sdpa",
        help="fused scaled_dot_product_attention, or project 01's written-out version",
    )
    p.add_argument("--peak-flops", type=positive_float, default=None, help="device peak FLOP/s for MFU")
    add_config_flags(p, {name: mc for name, (mc, _) in PRESETS.items()}, MODEL_FLAGS)
    add_config_flags(p, {name: tc for name, (_, tc) in PRESETS.items()}, TRAIN_FLAGS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # "." has no name to build the temporary sibling directories from
    return args


def configure(args, d: distributed.Dist) -> tuple[str, GPTConfig, TrainConfig, dict]:
    """The run's preset, configs and metadata: a preset's, or what a resumed run recorded; then the flags.
    Checked before anything is computed or written."""
    saved = prepare_out(args.out, args.resume, args.overwrite)
    flash = args.attention == "sdpa"
    if saved is None:
        preset = args.preset or DEFAULT_PRESET
        mc, tc = PRESETS[preset]
        data = args.data and str(args.data.resolve())
        meta = {"training": {"preset": preset, "data": data, "world_size": d.world_size}}
        try:  # NEW: flags that fit no model, e.g. --embd-dim at or above the preset's n_embd
            mc = replace(override(mc, args, MODEL_FLAGS), flash=flash)
        except ValueError as e:
            raise UserError(f"{preset} preset: {e}") from e
        return preset, mc, override(tc, args, TRAIN_FLAGS), meta
    recorded = {**saved["training"], **saved["model"], **saved["training"]["train_config"]}
    refuse_changes_on_resume(args, recorded, FIXED_ON_RESUME)
    training = saved["training"]
    if training.get("world_size", 1) != d.world_size:  # each process's data position is saved
        raise UserError(
            f"the run in {args.out} used {training.get('world_size', 1)} process(es); "
            f"resume it with as many (now {d.world_size})"
        )
    if args.data is not None and str(args.data.resolve()) != training["data"]:
        raise UserError(
            f"the run in {args.out} trained on {training['data'] or 'data/wikitext'}; --resume "
            "continues on the same data (its saved position points into it)"
        )
    if training["data"] and not Path(training["data"]).exists():
        raise UserError(
            f"the run's data {training['data']} (recorded in its config.json) is gone; "
            "prepare it again at that path to resume"
        )
    tc = override(TrainConfig(**training["train_config"]), args, TRAIN_FLAGS)
    if training["step"] >= tc.max_iters:
        raise UserError(
            f"the run in {args.out} already finished its {tc.max_iters} steps; pass a larger "
            "--max-iters to train further (the cosine schedule is then stretched to it)"
        )
    try:  # a recorded config the model refuses (e.g. repeat 0, edited by hand) is one line too
        mc = replace(GPTConfig(**saved["model"]), flash=flash)
    except ValueError as e:
        raise UserError(f"checkpoint {args.out} has a model config this project cannot read ({e})") from e
    return training["preset"], mc, tc, {k: saved[k] for k in ("tokenizer", "training")}


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d, device = distributed.setup(args.device)
    try:
        return train(args, d, device)
    finally:
        distributed.cleanup(d)


def train(args, d: distributed.Dist, device: torch.device) -> int:
    preset, mc, tc, meta = configure(args, d)
    accum = grad_accum_steps(tc, mc.block_size, d.world_size)
    precision = PRECISIONS[meta["training"].setdefault("precision", args.precision or auto_precision(device))]
    note = check_precision(precision, device)
    set_matmul_precision(precision)
    data = meta["training"]["data"]
    train_loader, make_val_loader, data_desc = make_loaders(data, tc.batch_size, mc.block_size, d)
    check_memory(step_memory(mc, tc), device, f"a micro-batch of {tc.batch_size} x {mc.block_size} tokens")

    seed_everything(tc.seed + d.rank)
    raw_model = GPT(mc).to(device, precision.weights)  # fp32 master weights, except in bf16-pure
    optimizer = make_optimizer(raw_model, tc, device)
    scaler = make_scaler(precision, device)  # our LossScaler for fp16; a no-op for the others
    step, metrics = (0, [])
    if args.resume:
        step, metrics = restore_run(args.out, raw_model, optimizer, scaler, train_loader, d)
    model = torch.compile(raw_model) if args.compile else raw_model  # fused kernels, less Python
    if d.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    meta["tokenizer"] = {"type": "tiktoken", "name": "gpt2"}
    meta["training"].update(train_config=asdict(tc), device=device.type)
    fpt, peak = flops_per_token(mc), peak_flops(device, args.peak_flops)
    if d.is_main:
        print(
            f"{preset} preset: {sharing(mc)}, {raw_model.num_params(non_embedding=False) / 1e6:.2f}M "
            f"parameters ({raw_model.num_params() / 1e6:.2f}M outside the embeddings); {data_desc}; "
            f"{d.world_size} process(es) x {accum} micro-batch(es) of {tc.batch_size} x {mc.block_size} = "
            f"{tc.total_batch_tokens:,} tokens/step; {device.type}, precision {precision.name}"
        )
        if note:
            print(f"note: {note}", file=sys.stderr)
    slow = d.is_main and warn_if_slow(device, preset == DEFAULT_PRESET)

    bar = tqdm(total=tc.max_iters, initial=step, desc="training", unit="step", disable=not d.is_main)
    start = time.perf_counter() - meta["training"].get("elapsed_s", 0.0)
    try:
        while step < tc.max_iters:
            t0 = time.perf_counter()
            lr, scale = lr_at(step, tc), scaler.get_scale()
            loss, grad_norm, skipped = train_step(
                model, optimizer, scaler, train_loader, accum, lr, tc, device, precision, d
            )
            sync(device)
            step, dt = step + 1, time.perf_counter() - t0
            finite = math.isfinite(grad_norm)  # inf or nan on a skipped step: JSON has neither
            metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm if finite else None})
            if precision.loss_scaling:  # the scale this step used, and whether it was skipped
                metrics[-1].update(loss_scale=scale, skipped=skipped)
            postfix = {
                "loss": f"{loss:.4f}",
                "lr": f"{lr:.2e}",
                "tok_s": f"{tc.total_batch_tokens / dt:,.0f}",
            }
            if precision.loss_scaling:
                postfix["skipped"] = sum(m.get("skipped", 0) for m in metrics)
            if peak:  # model FLOPs utilisation: achieved FLOP/s over what the hardware could do
                postfix["mfu"] = f"{100 * fpt * tc.total_batch_tokens / dt / (peak * d.world_size):.1f}%"
            bar.set_postfix(postfix)
            bar.update()
            if slow and step == 1:
                bar.write(time_left(dt, tc.max_iters - step))
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                val = estimate_loss(model, make_val_loader, tc, device, precision, d)
                metrics.append({"step": step, "val_loss": val, "val_ppl": math.exp(val)})
                bar.write(
                    f"step {step}: train loss {loss:.4f}, val loss {val:.4f}, perplexity {math.exp(val):.2f}"
                )
                elapsed = round(time.perf_counter() - start, 1)
                meta["training"].update(step=step, train_loss=loss, val_loss=val, elapsed_s=elapsed)
                save_run(args.out, raw_model, optimizer, scaler, train_loader, meta, metrics, d)
    except KeyboardInterrupt:
        bar.close()
        if d.is_main:
            print(interrupted(step, meta["training"].get("step"), args.out))
        return 130
    bar.close()
    if d.is_main:
        flags = [] if args.out == DEFAULT_DIR else ["--checkpoint", str(args.out)]
        val = meta["training"]["val_loss"]
        print(f"done: val loss {val:.4f} after {step} steps; checkpoint in {args.out}")
        print(f"sample from it: {command('generate.py', *flags)}")
    return 0


def save_run(out: Path, model: GPT, optimizer, scaler, loader, meta: dict, metrics: list, d) -> None:
    """Checkpoint everything the next step depends on: weights, optimizer moments, and every rank's data
    position and RNG state. Only rank 0 writes; the gathers are collective, so every rank calls this."""
    loader_states = distributed.gather(loader.state_dict(), d)
    rng = distributed.gather(rng_states(), d)  # each rank has its own dropout stream (seed + rank)
    if d.is_main:
        state = {
            "step": metrics[-1]["step"],
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "loaders": loader_states,
            "rng": rng,
        }
        files = {"metrics.jsonl": metrics_file(metrics), "loss_curve.png": plot_losses(metrics)}
        save_checkpoint(out, model, meta, state, files)


def restore_run(ckpt_dir: Path, model: GPT, optimizer, scaler, loader, d) -> tuple[int, list]:
    """The inverse of save_run: afterwards the next steps compute exactly what an uninterrupted run would."""
    load_weights(model, ckpt_dir)
    state = load_train_state(ckpt_dir)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loaders"][d.rank])
    restore_rng_states(state["rng"][d.rank])
    return state["step"], read_metrics(ckpt_dir)


if __name__ == "__main__":
    raise SystemExit(main())
