"""Supervised fine-tuning with LoRA: the pre-trained weights stay frozen; small low-rank adapters learn.

python train.py --preset tiny --data instructions.json   # seconds on a CPU (a random tiny model)
python train.py --init-from gpt2                         # GPT-2 124M on Stanford Alpaca, one GPU
python train.py --lora-r 16 --lora-targets attn.qkv      # rank and which layers get adapters
python train.py --resume                                 # continue the run in --out exactly where it stopped
"""

import io
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from checkpoint import (
    DEFAULT_DIR,
    checkpoint_exists,
    find_checkpoint,
    load_base,
    load_train_state,
    load_weights,
    read_config,
    refuse_non_checkpoint_out,
    save_checkpoint,
)
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    autocast,
    command,
    exits_cleanly,
    fraction_below,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_float,
    positive_int,
    seed_everything,
    sync,
)
from data import (
    EOT,
    GPT2Tokenizer,
    SFTLoader,
    encode_examples,
    eval_batches,
    format_prompt,
    load_records,
    split_records,
)
from lora import LoRAConfig, apply_lora, base_fingerprint, trainable_parameters
from model import GPT


@dataclass
class TrainConfig:
    batch_size: int = 8  # examples (or packed rows) per step
    max_iters: int = 1000
    lr: float = 5e-4  # NEW: 10x project 04's: B starts at zero and only the small adapters move
    min_lr: float = 5e-5
    warmup_iters: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.1  # ~1K-50K examples overfit quickly; pre-training on millions of tokens used none
    pack: bool = False
    eval_interval: int = 100
    eval_samples: int = 10  # held-out instructions answered (greedily) after training, saved to eval.json
    seed: int = 1337


PRESETS = {
    # GPT-2 124M (project 03's checkpoint or --init-from gpt2) on Alpaca; a few minutes on one GPU.
    "gpt2": TrainConfig(),
    # A CPU run on project 03's cpu-preset checkpoint (7M parameters, 128-token context).
    "cpu": TrainConfig(batch_size=8, max_iters=300, lr=1e-2, min_lr=1e-3, warmup_iters=20, eval_interval=100),
    # Seconds anywhere, from a random tiny model: for tests.
    "tiny": TrainConfig(
        batch_size=4, max_iters=40, lr=3e-2, min_lr=3e-3, warmup_iters=5, eval_interval=20, eval_samples=2
    ),
}
DEFAULT_PRESET = "gpt2"


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr (as in project 03)."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def make_optimizer(model: GPT, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (as in project 03)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type == "cuda")


@torch.no_grad()
def response_loss(model: GPT, batches: list[dict], device, dtype) -> float:
    """NEW: the held-out loss on response tokens only, a token-weighted mean over the whole set: the number
    the fine-tuning lowers, before and after."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        x, y = b["x"].to(device), b["y"].to(device)
        with autocast(device, dtype):
            logits, _ = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += (y != -100).sum().item()
    model.train()
    return total / count


@torch.no_grad()
def answer(model: GPT, tokenizer: GPT2Tokenizer, record: dict, device, max_new_tokens: int = 128) -> str:
    """A greedy response to one record's instruction, up to the end-of-text token."""
    ids = tokenizer.encode(format_prompt(record["instruction"], record["input"]))
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = []
    for next_id in model.generate_stream(idx, max_new_tokens, temperature=0.0):
        if next_id.item() == EOT:
            break
        out.append(tokenizer.id_to_bytes(next_id.item()))
    return b"".join(out).decode("utf-8", errors="replace")


def train_step(model: GPT, optimizer, loader: SFTLoader, lr: float, tc: TrainConfig, device, dtype) -> tuple:
    """One optimizer step on one batch. Returns (loss on its response tokens, gradient norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = {k: v.to(device) for k, v in loader.next_batch().items()}
    with autocast(device, dtype):
        _, loss = model(batch["x"], batch["y"], batch.get("segments"))  # NEW: prompt targets are -100
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    return loss.item(), grad_norm.item()


def plot_losses(metrics: list[dict]) -> bytes:
    """The loss curve as PNG bytes: every training step, and the held-out response loss."""
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=0.6, alpha=0.5, label="train (step)")
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="response loss (nats/token)", title="Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Fine-tune a pre-trained GPT on instruction/response pairs (SFT).")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=f"training sizes (default: {DEFAULT_PRESET}; tiny runs in seconds on a CPU)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="the model to fine-tune: auto (project 03's checkpoint, else a tiny random model; the default), "
        "scratch, gpt2 / gpt2-medium / ... (Hugging Face Hub), a Hugging Face GPT-2 folder, or a "
        "checkpoint folder (default for --preset tiny: scratch)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="JSON or JSONL records with instruction, input, output (default: Stanford Alpaca)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_DIR, help=f"checkpoint directory (default: {DEFAULT_DIR})"
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--pack", action="store_true", default=None, help="pack several examples into each row")
    add_device_args(p)
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed (default: 1337)")
    p.add_argument("--max-iters", type=positive_int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples (or packed rows) per step")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate")
    p.add_argument("--eval-interval", type=positive_int, default=None, help="evaluate and save every N steps")
    p.add_argument(
        "--eval-samples", type=non_negative_int, default=None, help="held-out answers in eval.json"
    )
    lora = p.add_argument_group("LoRA (fixed for a run: --resume keeps the recorded ones)")
    lora.add_argument("--lora-r", type=positive_int, default=None, help="adapter rank (default: 8)")
    lora.add_argument("--lora-alpha", type=positive_float, default=None, help="scale alpha/r (default: 16)")
    lora.add_argument(
        "--lora-dropout", type=fraction_below(1), default=None, help="on the adapter input (0.05)"
    )
    lora.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated layer names to adapt (default: attn.qkv,attn.proj,mlp.fc,mlp.proj)",
    )
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # "." has no name to build the temporary sibling directories from
    return args


def resolve_config(args, saved: dict | None) -> tuple[str, TrainConfig]:
    """Preset, then what a resumed checkpoint recorded, then explicit flags: later wins."""
    preset = saved["training"]["preset"] if saved else args.preset or DEFAULT_PRESET
    if saved and args.preset not in (None, preset):
        raise UserError(f"the run in {args.out} uses the {preset} preset; --resume cannot change it")
    tc = TrainConfig(**saved["training"]["train_config"]) if saved else PRESETS[preset]
    flags = {
        "seed": args.seed,
        "max_iters": args.max_iters,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pack": args.pack,
        "eval_interval": args.eval_interval,
        "eval_samples": args.eval_samples,
    }
    return preset, replace(tc, **{k: v for k, v in flags.items() if v is not None})


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_non_checkpoint_out(args.out)
    saved = read_config(args.out) if args.resume else None
    if not args.resume and not args.overwrite and checkpoint_exists(args.out):
        raise UserError(
            f"{args.out} already holds a checkpoint; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    if saved:
        check_resume(args, saved)
    preset, tc = resolve_config(args, saved)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    # Everything the user gave us is checked before anything is written.
    data_arg = args.data if args.data is not None else (saved["training"]["data"] if saved else None)
    records, data_name = load_records(data_arg)
    train_records, val_records = split_records(records)

    if saved:  # the same base again; the adapters' weights come from restore_run below
        model, base = load_base(saved["base"]["init_from"], device)
        lora_config = LoRAConfig.from_dict(saved["lora"])
    else:
        init_from = args.init_from or ("scratch" if preset == "tiny" else "auto")
        model, base = load_base(init_from, device)
        if (
            Path(base).is_absolute() and Path(base) == args.out
        ):  # saving would replace the model it starts from
            raise UserError(f"--out {args.out} is the model this run starts from; choose another --out")
        lora_config = lora_config_from(args)
    fingerprint = base_fingerprint(model)  # NEW: the adapter is only meaningful on exactly this base
    if saved and fingerprint != saved["base"]["fingerprint"]:
        raise UserError(
            f"the base model {base} has changed since the run in {args.out} started; "
            "its adapter cannot continue on different weights"
        )
    model.config.dropout = tc.dropout
    for m in model.modules():  # NEW: dropout on for fine-tuning (the base may have been trained without)
        if isinstance(m, torch.nn.Dropout):
            m.p = tc.dropout  # before apply_lora: the adapters' own dropout stays --lora-dropout
    seed_everything(tc.seed)  # before apply_lora: --seed fixes the adapters' random A
    apply_lora(model, lora_config)  # NEW: freeze everything, add trainable A and B to the target layers
    block_size = model.config.block_size
    train_examples = encode_examples(train_records, block_size, "training")
    val_examples = encode_examples(val_records, block_size, "held-out")
    loader = SFTLoader(train_examples, tc.batch_size, block_size, tc.pack, tc.seed)
    val_batches = eval_batches(val_examples, tc.batch_size)

    optimizer = make_optimizer(model, tc, device)
    step, metrics, elapsed = 0, [], 0.0
    meta = {
        "tokenizer": {"type": "tiktoken", "name": "gpt2"},
        "template": "alpaca",
        "lora": lora_config.to_dict(),
        "base": {"init_from": base, "fingerprint": fingerprint},
        "training": {
            "preset": preset,
            "init_from": base,
            "data": data_arg and str(Path(data_arg).resolve()),
            "train_config": asdict(tc),
            "device": device.type,
        },
    }
    if saved:
        step, metrics, elapsed = restore_run(args.out, model, optimizer, loader)
        meta["training"]["val_loss_before"] = saved["training"]["val_loss_before"]
        if step >= tc.max_iters:
            raise UserError(
                f"the run in {args.out} already finished its {tc.max_iters} steps; pass a larger "
                "--max-iters to train further (the cosine schedule is then stretched to it)"
            )
    else:
        before = response_loss(model, val_batches, device, dtype)
        meta["training"]["val_loss_before"] = before
        metrics.append({"step": 0, "val_loss": before})

    print(
        f"{preset} preset: LoRA r={lora_config.r} on {base} ({trainable_parameters(model):,} of "
        f"{model.num_params(non_embedding=False):,} parameters trainable, "
        f"{100 * trainable_parameters(model) / model.num_params(non_embedding=False):.2f}%) on "
        f"{len(train_examples)} records of {data_name} ({len(val_examples)} held out); "
        f"{tc.batch_size} {'packed rows' if tc.pack else 'examples'}/step; "
        f"{device.type} {str(dtype).removeprefix('torch.')}; "
        f"held-out response loss before: {meta['training']['val_loss_before']:.4f}"
    )
    tokenizer = GPT2Tokenizer()
    warn_cpu = device.type == "cpu" and preset == DEFAULT_PRESET and not saved and model.num_params() > 50e6
    bar = tqdm(total=tc.max_iters, initial=step, desc="fine-tuning", unit="step", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    try:
        while step < tc.max_iters:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            loss, grad_norm = train_step(model, optimizer, loader, lr, tc, device, dtype)
            sync(device)
            step += 1
            metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
            bar.set_postfix(
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                norm=f"{grad_norm:.2f}",
                step_s=f"{time.perf_counter() - t0:.2f}",
            )
            bar.update()
            if warn_cpu and step == 3:
                warn_slow_cpu(bar, time.perf_counter() - t0, tc.max_iters - step)
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                val = response_loss(model, val_batches, device, dtype)
                metrics.append({"step": step, "val_loss": val})
                bar.write(f"step {step}: train loss {loss:.4f}, held-out response loss {val:.4f}")
                meta["training"].update(step=step, train_loss=loss, val_loss=val)
                files = {}
                if step == tc.max_iters:  # what the fine-tuning did, in words: held-out answers
                    files["eval.json"] = evaluation(model, tokenizer, val_records, meta, tc, device)
                save_run(
                    args.out, model, optimizer, loader, meta, metrics, time.perf_counter() - start, files
                )
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
        f"done: held-out response loss {meta['training']['val_loss_before']:.4f} -> "
        f"{meta['training']['val_loss']:.4f} after {step} steps; checkpoint and eval.json in {args.out}\n"
        f"try it: {command('generate.py', *flags, '--instruction', repr('Name three primary colors.'))}"
    )
    return 0


def evaluation(model: GPT, tokenizer, val_records: list[dict], meta: dict, tc: TrainConfig, device) -> bytes:
    """eval.json: the held-out loss before and after, and greedy answers to the first held-out records
    next to their reference outputs."""
    model.eval()  # no dropout: the answers are the saved model's, the ones generate.py gives at temperature 0
    answers = [
        {
            **{k: r[k] for k in ("instruction", "input")},
            "reference": r["output"],
            "response": answer(model, tokenizer, r, device),
        }
        for r in val_records[: tc.eval_samples]
    ]
    model.train()
    report = {
        "val_loss_before": meta["training"]["val_loss_before"],
        "val_loss_after": meta["training"]["val_loss"],
        "responses": answers,
    }
    return (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()


def check_resume(args, saved: dict) -> None:
    """A resumed run continues exactly only on the same data."""
    recorded = saved["training"].get("data")
    if args.data is not None and str(Path(args.data).resolve()) != recorded:
        raise UserError(
            f"the run in {args.out} trained on {recorded or 'Alpaca'}; --resume continues "
            "on the same data (its saved position points into it)"
        )
    if args.data is None and recorded and not Path(recorded).exists():
        raise UserError(f"the run's data {recorded} (recorded in its config.json) is gone")
    if args.init_from is not None:
        raise UserError("--init-from starts a new run; --resume continues from the checkpoint in --out")
    flags = {
        "--batch-size": args.batch_size,
        "--pack": getattr(args, "pack", None),
        "--seed": args.seed,
        "--lr": args.lr,
    }
    changed = [name for name, value in flags.items() if value is not None]
    if changed:  # each would make the resumed run differ from the uninterrupted one
        raise UserError(
            f"{', '.join(changed)} cannot change when resuming (--resume continues the run exactly; "
            "--max-iters, --eval-interval and --eval-samples may change)"
        )
    lora_flags = (args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    if any(f is not None for f in lora_flags):
        raise UserError("--lora-* settings are fixed for a run; --resume continues with the recorded ones")


def lora_config_from(args) -> LoRAConfig:
    """LoRAConfig's defaults, overridden by the --lora-* flags given."""
    flags = {
        "r": args.lora_r,
        "alpha": args.lora_alpha,
        "dropout": args.lora_dropout,
        "targets": args.lora_targets and tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
    }
    return LoRAConfig(**{k: v for k, v in flags.items() if v is not None})


def save_run(out: Path, model: GPT, optimizer, loader, meta, metrics, elapsed, files: dict) -> None:
    """Checkpoint everything the next step depends on: weights, optimizer moments, data position, RNG."""
    meta["training"]["elapsed_s"] = round(elapsed, 1)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {
        "step": metrics[-1]["step"],
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),
        "rng": rng,
        "elapsed_s": elapsed,
    }
    files = {
        "metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics).encode(),
        "loss_curve.png": plot_losses(metrics),
        **files,
    }
    save_checkpoint(out, model, meta, state, files)


def restore_run(ckpt_dir: Path, model: GPT, optimizer, loader) -> tuple:
    """The inverse of save_run: afterwards the next steps compute exactly what an uninterrupted run would."""
    load_weights(model, ckpt_dir)
    state = load_train_state(ckpt_dir)
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
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
        f"{duration} ({seconds_per_step:.2f} s/step measured). --preset cpu or tiny are smaller."
    )


if __name__ == "__main__":
    raise SystemExit(main())
