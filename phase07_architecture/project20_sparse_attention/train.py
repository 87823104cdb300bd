"""A short loop on one device, so that every inference project trains a model of its own: a small preset from
scratch, or GPT-2's weights further; AdamW, warm-up and cosine decay, bf16 autocast where the device has it,
evaluation, and checkpoints that --resume continues exactly (Ctrl-C saves). Pre-training at scale is 07's.

python train.py --preset tiny --data input.txt     # seconds on a CPU (--preset cpu: minutes)
python train.py --init-from gpt2 --data input.txt --lr 3e-5 --max-iters 200   # GPT-2 124M, further
"""

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_DIR, interrupted, prepare_out, restore_run, save_run
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    autocast,
    command,
    ctrl_c_ends_the_step,
    exits_cleanly,
    pick_device,
    pick_dtype,
    refuse_changes_on_resume,
    seed_everything,
    warn_if_slow,
)
from config import DEFAULT_PRESET, FIXED_ON_RESUME, PRESETS, TrainConfig, add_preset_flags, with_flags
from data import DATA_DIR, get_batch, load_tokens
from hf import load_gpt2
from model import GPT, GPTConfig


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up (large early updates from random weights are unstable), then cosine decay to min_lr."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    min_lr = min(tc.min_lr, tc.lr)  # a --lr under the preset's floor must not climb to the floor
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - min_lr)


def make_optimizer(model: GPT, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW, decaying only matrices: decaying biases and LayerNorm gains pulls them off useful values."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head weight appears once
    matrices, others = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": tc.weight_decay}, {"params": others, "weight_decay": 0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95))


def train_step(model: GPT, optimizer, batch, lr: float, tc: TrainConfig, dtype) -> tuple[float, float]:
    """One optimizer step on one batch (x, y). Returns (loss, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(batch[0].device, dtype):  # bf16 matmuls; the weights and Adam's moments stay fp32
        _, loss = model(*batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    return loss.item(), grad_norm.item()


@torch.no_grad()
def estimate_loss(model: GPT, tokens, tc: TrainConfig, dtype, device) -> float:
    """Mean loss over eval_iters held-out batches, the same ones every time (a generator started afresh)."""
    model.eval()
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(tc.eval_iters):
        with autocast(device, dtype):
            losses.append(model(*get_batch(tokens, tc.batch_size, model.config.block_size, g, device))[1])
    model.train()
    return torch.stack(losses).float().mean().item()


def parse_args(argv):
    p = ArgumentParser(description="Train this project's GPT on one device, or GPT-2's weights further.")
    add_preset_flags(p)  # --preset, --attention and the flags that override a preset's values (config.py)
    p.add_argument("--data", type=Path, help="a text file, or project 07's shards (default: data/wikitext)")
    p.add_argument("--init-from", help="continue gpt2 (or gpt2-medium, ...) or a local Hugging Face folder")
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    add_device_args(p)
    args = p.parse_args(argv)
    args.data = args.data and str(args.data.resolve())  # recorded, so that --resume reads the same file
    args.out = args.out.resolve()  # "." has no name to build the temporary sibling directories from
    return args


def configure(args, device) -> tuple[GPTConfig, TrainConfig, dict]:
    """The run's configs and metadata: the preset's and the flags', or what a resumed run recorded."""
    saved = prepare_out(args.out, args.resume, args.overwrite)
    if saved is None:
        preset, dtype = args.preset or DEFAULT_PRESET, str(pick_dtype(args.dtype, device))[len("torch.") :]
        mc, tc = PRESETS[preset]
        training = dict(preset=preset, init_from=args.init_from, dtype=dtype, data=args.data)
    else:
        training, args.dtype = saved["training"], None if args.dtype == "auto" else args.dtype
        recorded = {**training, **saved["model"], **training["train_config"]}
        refuse_changes_on_resume(args, recorded, FIXED_ON_RESUME)
        mc, tc = GPTConfig(**saved["model"]), TrainConfig(**training["train_config"])
        if training["step"] >= (args.max_iters or tc.max_iters):
            raise UserError(f"the run in {args.out} is done at step {training['step']}: raise --max-iters")
    meta = {"tokenizer": {"type": "tiktoken", "name": "gpt2"}, "training": {"step": 0, **training}}
    return *with_flags(mc, tc, args), meta


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    mc, tc, meta = configure(args, device)
    training, dtype = meta["training"], getattr(torch, meta["training"]["dtype"])
    seed_everything(tc.seed)
    init_from = None if args.resume else training["init_from"]  # a resumed run's weights are its own
    model = (load_gpt2(init_from, DATA_DIR / "hf", like=mc) if init_from else GPT(mc)).to(device)
    train_tokens, val_tokens, about = load_tokens(training["data"], T := model.config.block_size)
    optimizer, batches = make_optimizer(model, tc), torch.Generator().manual_seed(tc.seed)  # the batch order
    step, metrics = restore_run(args.out, model, optimizer, batches) if args.resume else (0, [])
    training["train_config"] = asdict(tc)
    print(f"{training['init_from'] or training['preset']}: {model.num_params() / 1e6:.2f}M parameters; "
          f"{about}; batches of {tc.batch_size} x {T}; {device.type}, {training['dtype']}")  # fmt: skip
    warn_if_slow(device, model.num_params() > 50e6)  # GPT-2 124M (or larger) on a CPU: hours; tqdm: the ETA
    with (
        tqdm(total=tc.max_iters, initial=step, desc="training", unit="step") as bar,
        ctrl_c_ends_the_step() as stop,
    ):
        try:
            while step < tc.max_iters and not stop:
                t0, lr = time.perf_counter(), lr_at(step, tc)
                batch = get_batch(train_tokens, tc.batch_size, T, batches, device)
                loss, grad_norm = train_step(model, optimizer, batch, lr, tc, dtype)
                step, dt = step + 1, time.perf_counter() - t0
                metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{batch[0].numel() / dt:,.0f}")
                bar.update()
                if step % tc.eval_interval == 0 or step == tc.max_iters or stop:  # Ctrl-C: save this step
                    val = estimate_loss(model, val_tokens, tc, dtype, device)
                    metrics.append({"step": step, "val_loss": val, "val_ppl": math.exp(val)})
                    bar.write(
                        f"step {step}: train loss {loss:.4f}, val loss {val:.4f}, ppl {math.exp(val):.2f}"
                    )
                    training.update(step=step, train_loss=loss, val_loss=val)
                    save_run(args.out, model, meta, optimizer, batches, metrics)
        except KeyboardInterrupt:
            bar.write(interrupted(step, training["step"], args.out))
            return 130
    if stop:
        print(f"stopped at step {step}; saved in {args.out}: --resume continues from there")
        return 130
    print(f"done: val loss {training['val_loss']:.4f} after {step} steps; checkpoint in {args.out}")
    flags = [] if args.out == DEFAULT_DIR else ["--checkpoint", str(args.out)]
    print(f"sample from it: {command('generate.py', *flags)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
