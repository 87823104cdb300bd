"""Supervised fine-tuning: teach a pre-trained GPT to answer instructions.

python train.py --preset tiny --data instructions.json   # seconds on a CPU (a random tiny model)
python train.py --init-from gpt2                         # GPT-2 124M on Stanford Alpaca, one GPU
python train.py --data instruction-data --pack           # 1,100 records (downloaded); several per row
python train.py --resume                                 # continue the run in --out exactly where it stopped
"""

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from checkpoint import (
    DEFAULT_DIR,
    MODELS_DIR,
    interrupted,
    load_base,
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
from data import IGNORE, SFTLoader, encode_examples, eval_batches, format_prompt, load_records, split_records
from model import GPT, GPTConfig
from tokenizer import EOT, GPT2Tokenizer

BASE = MODELS_DIR / "project03_pretrain"  # NEW: where fine-tuning starts by default (--init-from auto)


@dataclass
class TrainConfig:
    batch_size: int = 8  # examples (or packed rows) per step
    max_iters: int = 1000
    lr: float = 5e-5  # ~10x below pre-training's: nudge the pre-trained weights, don't overwrite them
    min_lr: float = 5e-6
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
    "cpu": TrainConfig(batch_size=8, max_iters=300, lr=1e-3, min_lr=1e-4, warmup_iters=20, eval_interval=100),
    # Seconds anywhere, from a random tiny model: for tests.
    "tiny": TrainConfig(
        batch_size=4, max_iters=40, lr=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=20, eval_samples=2
    ),
}
DEFAULT_PRESET = "gpt2"
# The flags that override a preset's value, with their types; --help reads each preset's value from PRESETS.
TRAIN_FLAGS = {
    "max_iters": (positive_int, "total optimizer steps"),
    "batch_size": (positive_int, "examples (or packed rows) per step"),
    "lr": (positive_float, "peak learning rate"),
    "dropout": (fraction_below(1), "dropout rate while fine-tuning"),
    "eval_interval": (positive_int, "evaluate and save every N steps"),
    "eval_samples": (non_negative_int, "held-out instructions answered in eval.json"),
    "seed": (non_negative_int, "random seed"),
}
FIXED_ON_RESUME = ("preset", "init_from", "batch_size", "lr", "dropout", "pack", "seed")


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr (as in project 03)."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    min_lr = min(tc.min_lr, tc.lr)  # a --lr under the preset's floor must not climb to the floor
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - min_lr)


def make_optimizer(model: GPT, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (as in project 03)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type == "cuda")


def set_dropout(model: GPT, p: float) -> None:
    """NEW: dropout on for fine-tuning (the base may have been pre-trained without any)."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


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
        count += (y != IGNORE).sum().item()
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


def evaluation(model: GPT, val_records: list[dict], meta: dict, tc: TrainConfig, device) -> bytes:
    """eval.json: the held-out loss before and after, and greedy answers to the first held-out records
    next to their reference outputs."""
    model.eval()  # no dropout: the answers are the saved model's, the ones generate.py gives at temperature 0
    tokenizer = GPT2Tokenizer()
    answers = [
        {
            "instruction": r["instruction"],
            "input": r["input"],
            "reference": r["output"],
            "response": answer(model, tokenizer, r, device),
        }
        for r in val_records[: tc.eval_samples]
    ]
    model.train()
    training = meta["training"]
    report = {
        "val_loss_before": training["val_loss_before"],
        "val_loss_after": training["val_loss"],
        "responses": answers,
    }
    return (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()


def step_memory(mc: GPTConfig, tc: TrainConfig) -> float:
    """A lower bound on the bytes a training step holds: weights, gradients and Adam's two moments (16 bytes
    a parameter), and the activations backward needs for rows of up to a full context."""
    params = 12 * mc.n_layer * mc.n_embd**2 + mc.padded_vocab_size * mc.n_embd
    per_token = 8 * mc.n_layer * mc.n_embd + 2 * mc.padded_vocab_size
    return 16 * params + 2 * per_token * tc.batch_size * mc.block_size


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
        choices=PRESETS,
        default=None,
        help=f"training sizes (default: {DEFAULT_PRESET}; tiny runs in seconds on a CPU)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="the model to fine-tune: auto (project 03's checkpoint, else a tiny random model; the "
        "default), scratch (the default for --preset tiny), gpt2 / gpt2-medium / ... (Hugging Face "
        "Hub), a Hugging Face GPT-2 folder, or a checkpoint folder",
    )
    p.add_argument(
        "--data",
        default=None,
        help="JSON or JSONL records with instruction, input, output; or instruction-data (1,100 "
        "records, downloaded once) (default: Stanford Alpaca)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--pack", action="store_true", default=None, help="pack several examples into each row")
    add_device_args(p)
    add_config_flags(p, PRESETS, TRAIN_FLAGS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # "." has no name to build the temporary sibling directories from
    return args


def data_source(data: str | None) -> str | None:
    """--data as recorded: a file as an absolute path (a resumed run finds it from anywhere), a name as is."""
    return data if data is None or not Path(data).exists() else str(Path(data).resolve())


def configure(args) -> tuple[str, TrainConfig, dict, GPTConfig | None]:
    """The run's preset, config and metadata (and the model config when resuming): a preset's, or what a
    resumed run recorded; then the flags. Checked before anything is computed or written."""
    saved = prepare_out(args.out, args.resume, args.overwrite)
    if saved is None:
        preset = args.preset or DEFAULT_PRESET
        tc = override(PRESETS[preset], args, {**TRAIN_FLAGS, "pack": None})
        init_from = args.init_from or ("scratch" if preset == "tiny" else "auto")
        meta = {
            "template": "alpaca",
            "training": {"preset": preset, "init_from": init_from, "data": data_source(args.data)},
        }
        return preset, tc, meta, None
    recorded = {**saved["training"], **saved["training"]["train_config"]}
    refuse_changes_on_resume(args, recorded, FIXED_ON_RESUME)
    training = saved["training"]
    if args.data is not None and data_source(args.data) != training["data"]:
        raise UserError(
            f"the run in {args.out} trained on {training['data'] or 'Alpaca'}; --resume continues "
            "on the same data (its saved position points into it)"
        )
    tc = override(TrainConfig(**training["train_config"]), args, TRAIN_FLAGS)
    if training["step"] >= tc.max_iters:
        raise UserError(
            f"the run in {args.out} already finished its {tc.max_iters} steps; pass a larger "
            "--max-iters to train further (the cosine schedule is then stretched to it)"
        )
    meta = {k: saved[k] for k in ("template", "training")}
    return training["preset"], tc, meta, GPTConfig(**saved["model"])


def start_model(args, meta: dict, mc: GPTConfig | None, tc: TrainConfig, device) -> GPT:
    """The model to fine-tune: the base it starts from (recorded in meta), or when resuming the checkpoint's
    architecture (its weights come from restore_run)."""
    training = meta["training"]
    if mc is not None:
        model = GPT(mc).to(device)
    else:
        model, training["init_from"] = load_base(training["init_from"], device, BASE)
        if Path(training["init_from"]) == args.out:  # saving would replace the model it starts from
            raise UserError(f"--out {args.out} is the model this run starts from; choose another --out")
    set_dropout(model, tc.dropout)
    return model


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset, tc, meta, mc = configure(args)
    training = meta["training"]
    records, data_name = load_records(training["data"])
    train_records, val_records = split_records(records)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = start_model(args, meta, mc, tc, device)
    check_memory(step_memory(model.config, tc), device, f"a step of {tc.batch_size} rows")
    block_size = model.config.block_size
    train_examples = encode_examples(train_records, block_size, "training")
    loader = SFTLoader(train_examples, tc.batch_size, block_size, tc.pack, tc.seed)
    val_batches = eval_batches(encode_examples(val_records, block_size, "held-out"), tc.batch_size)

    seed_everything(tc.seed)
    optimizer = make_optimizer(model, tc, device)
    step, metrics = restore_run(args.out, model, optimizer, loader) if args.resume else (0, [])
    if not args.resume:
        training["val_loss_before"] = response_loss(model, val_batches, device, dtype)
        metrics.append({"step": 0, "val_loss": training["val_loss_before"]})
    meta["tokenizer"] = {"type": "tiktoken", "name": "gpt2"}
    training.update(train_config=asdict(tc), device=device.type)
    print(
        f"{preset} preset: fine-tuning {training['init_from']} ({model.num_params() / 1e6:.2f}M parameters) "
        f"on {len(train_examples)} records of {data_name}; {tc.batch_size} "
        f"{'packed rows' if tc.pack else 'examples'}/step; {device.type} {str(dtype).removeprefix('torch.')}"
    )
    print(f"held-out response loss before: {training['val_loss_before']:.4f}")
    slow = warn_if_slow(device, model.num_params() > 50e6)

    bar = tqdm(total=tc.max_iters, initial=step, desc="fine-tuning", unit="step", dynamic_ncols=True)
    start = time.perf_counter() - training.get("elapsed_s", 0.0)
    try:
        while step < tc.max_iters:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            loss, grad_norm = train_step(model, optimizer, loader, lr, tc, device, dtype)
            sync(device)
            step, dt = step + 1, time.perf_counter() - t0
            metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", step_s=f"{dt:.2f}")
            bar.update()
            if slow and step == 1:
                bar.write(time_left(dt, tc.max_iters - step))
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                val = response_loss(model, val_batches, device, dtype)
                metrics.append({"step": step, "val_loss": val})
                bar.write(f"step {step}: train loss {loss:.4f}, held-out response loss {val:.4f}")
                elapsed = round(time.perf_counter() - start, 1)
                training.update(step=step, train_loss=loss, val_loss=val, elapsed_s=elapsed)
                last = step == tc.max_iters  # what the fine-tuning did, in words: held-out answers
                files = {"eval.json": evaluation(model, val_records, meta, tc, device)} if last else {}
                save_run(args.out, model, optimizer, loader, meta, metrics, files)
    except KeyboardInterrupt:
        bar.close()
        print(interrupted(step, training.get("step"), args.out))
        return 130
    bar.close()
    flags = [] if args.out == DEFAULT_DIR else ["--checkpoint", str(args.out)]
    print(
        f"done: held-out response loss {training['val_loss_before']:.4f} -> {training['val_loss']:.4f} after "
        f"{step} steps; checkpoint and eval.json in {args.out}"
    )
    print(f"try it: {command('generate.py', *flags, '--instruction', repr('Name three primary colors.'))}")
    return 0


def save_run(out: Path, model: GPT, optimizer, loader, meta: dict, metrics: list, files: dict) -> None:
    """Checkpoint everything the next step depends on: weights, optimizer moments, data position, RNG."""
    state = {
        "step": metrics[-1]["step"],
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),
        "rng": rng_states(),
    }
    files = {"metrics.jsonl": metrics_file(metrics), "loss_curve.png": plot_losses(metrics), **files}
    save_checkpoint(out, model, meta, state, files)


def restore_run(ckpt_dir: Path, model: GPT, optimizer, loader) -> tuple[int, list]:
    """The inverse of save_run: afterwards the next steps compute exactly what an uninterrupted run would."""
    load_weights(model, ckpt_dir)
    state = load_train_state(ckpt_dir)
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    restore_rng_states(state["rng"])
    return state["step"], read_metrics(ckpt_dir)


if __name__ == "__main__":
    raise SystemExit(main())
