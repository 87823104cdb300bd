"""Direct Preference Optimization: make the fine-tuned model prefer the answers people chose.

python train.py --preset tiny --data preferences.json   # seconds on a CPU (a random tiny model)
python train.py                                         # project 04's SFT model on Intel/orca_dpo_pairs
python train.py --precompute-ref                        # reference log-probs once; no second model
python train.py --lora                                  # train adapters; reference = adapters off
python train.py --loss ipo --beta 0.5                   # IPO; or conservative DPO: --label-smoothing 0.1
python train.py --resume                                # continue the run in --out exactly
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
from data import format_prompt, split_records
from dpo import LOSS_TYPES, Reference, dpo_loss, policy_logprobs
from lora import LoRAConfig, apply_lora, base_fingerprint, trainable_parameters
from model import GPT, GPTConfig
from preference import PairLoader, encode_pairs, eval_pair_batches, load_preference_records
from tokenizer import EOT, GPT2Tokenizer

BASE = MODELS_DIR / "project04_sft"  # NEW: DPO starts from the SFT model (--init-from auto)


@dataclass
class TrainConfig:
    batch_size: int = 8  # preference pairs per step (16 sequences)
    max_iters: int = 1000
    lr: float = 5e-6  # NEW: DPO moves the policy a little; large steps collapse both log-probs together
    min_lr: float = 5e-7
    warmup_iters: int = 50
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.0  # NEW: off, so the policy's log-probs are computed exactly as the reference's are
    beta: float = 0.1  # NEW: the KL weight: how far the policy may drift from the reference
    label_smoothing: float = 0.0  # NEW: > 0 is conservative DPO: labels assumed flipped with this chance
    loss: str = "sigmoid"  # NEW: "sigmoid" (DPO) or "ipo"
    ref: str = "model"  # NEW: "model" (frozen copy), "precomputed" (log-probs once), "lora" (adapters off)
    lora: bool = False  # train LoRA adapters instead of every weight
    eval_interval: int = 100
    eval_samples: int = 5  # held-out prompts answered (greedily) after training, saved to eval.json
    seed: int = 1337


PRESETS = {
    # GPT-2 124M fine-tuned by project 04 (or --init-from gpt2) on Intel/orca_dpo_pairs; one GPU.
    "gpt2": TrainConfig(),
    # A CPU run on project 04's cpu-preset checkpoint (7M parameters, 128-token context).
    "cpu": TrainConfig(batch_size=8, max_iters=200, lr=1e-4, min_lr=1e-5, warmup_iters=20, eval_interval=50),
    # Seconds anywhere, from a random tiny model: for tests.
    "tiny": TrainConfig(
        batch_size=2, max_iters=40, lr=1e-3, min_lr=1e-4, warmup_iters=5, eval_interval=20, eval_samples=2
    ),
}
DEFAULT_PRESET = "gpt2"
# The flags that override a preset's value, with their types; --help reads each preset's value from PRESETS.
TRAIN_FLAGS = {
    "max_iters": (positive_int, "total optimizer steps"),
    "batch_size": (positive_int, "preference pairs per step"),
    "lr": (positive_float, "peak learning rate"),
    "beta": (positive_float, "DPO's beta: the KL weight"),
    "label_smoothing": (fraction_below(0.5), "conservative DPO: the assumed chance a label is flipped"),
    "eval_interval": (positive_int, "evaluate and save every N steps"),
    "eval_samples": (non_negative_int, "held-out prompts answered in eval.json"),
    "seed": (non_negative_int, "random seed"),
}
LORA_FLAGS = {  # the adapters' shape, with --lora; --help reads the defaults from LoRAConfig
    "r": (positive_int, "adapter rank"),
    "alpha": (positive_float, "the update is scaled by alpha / r"),
    "dropout": (fraction_below(1), "dropout on the adapter's input"),
    "targets": (lambda text: tuple(t.strip() for t in text.split(",") if t.strip()), "layers to adapt"),
}
FIXED_ON_RESUME = (
    "preset",
    "init_from",
    "batch_size",
    "lr",
    "beta",
    "label_smoothing",
    "loss",
    "seed",
    "precompute_ref",
    "lora",
    *(f"lora_{f}" for f in LORA_FLAGS),
)


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
    """Dropout as configured (off by default: see TrainConfig.dropout)."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def train_step(policy: GPT, reference: Reference, optimizer, loader, lr: float, tc, device, dtype):
    """One optimizer step on one batch of pairs. Returns (metrics of dpo_loss, gradient norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = {k: v.to(device) for k, v in loader.next_batch().items()}
    chosen, rejected = policy_logprobs(policy, batch, autocast(device, dtype), tc.loss == "ipo")  # NEW: (B,)
    ref_chosen, ref_rejected = reference.logprobs(policy, batch)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, tc.beta, tc.label_smoothing, tc.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.grad_clip)
    optimizer.step()
    return metrics, grad_norm.item()


@torch.no_grad()
def evaluate(policy: GPT, batches: list[dict], ref_logps: list, tc: TrainConfig, device, dtype) -> dict:
    """NEW: the DPO loss and reward metrics on the held-out pairs (each batch weighted by its pairs), and
    how often the policy itself gives the chosen answer the higher log-probability."""
    policy.eval()
    totals, n = {}, 0
    for b, (rc, rr) in zip(batches, ref_logps, strict=True):
        b = {k: v.to(device) for k, v in b.items()}
        chosen, rejected = policy_logprobs(policy, b, autocast(device, dtype), tc.loss == "ipo")
        _, metrics = dpo_loss(chosen, rejected, rc, rr, tc.beta, tc.label_smoothing, tc.loss)
        metrics["logp_accuracy"] = (chosen > rejected).float().mean().item()
        k = chosen.numel()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * k
        n += k
    policy.train()
    return {f"val_{key.replace('rewards/', 'reward_')}": value / n for key, value in totals.items()}


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


@torch.no_grad()
def held_out_reference(reference: Reference, policy: GPT, batches: list[dict]) -> list:
    """The reference log-probs of the held-out pairs, computed once (in eval mode: no dropout)."""
    policy.eval()
    logps = [reference.compute(policy, b) for b in batches]
    policy.train()
    return logps


def evaluation(policy: GPT, val_records: list[dict], meta: dict, tc: TrainConfig, device) -> bytes:
    """eval.json: held-out metrics before and after, and greedy answers to the first held-out prompts next
    to the chosen and rejected answers."""
    policy.eval()  # no dropout: the answers are the saved model's, as generate.py gives them at temperature 0
    tokenizer = GPT2Tokenizer()
    answers = [
        {
            **{k: r[k] for k in ("instruction", "input", "chosen", "rejected")},
            "response": answer(policy, tokenizer, r, device),
        }
        for r in val_records[: tc.eval_samples]
    ]
    policy.train()
    report = {"before": meta["training"]["before"], "after": meta["training"]["after"], "responses": answers}
    return (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()


def step_memory(mc: GPTConfig, tc: TrainConfig) -> float:
    """A lower bound on the bytes a training step holds: weights, gradients and Adam's two moments (16 bytes
    a parameter), and the activations backward needs for 2 x batch rows of up to a full context."""
    params = 12 * mc.n_layer * mc.n_embd**2 + mc.padded_vocab_size * mc.n_embd
    per_token = 8 * mc.n_layer * mc.n_embd + 2 * mc.padded_vocab_size
    return 16 * params + 2 * per_token * 2 * tc.batch_size * mc.block_size


def plot_losses(metrics: list[dict]) -> bytes:
    """The DPO loss (train steps, held-out) and the held-out reward accuracy, as PNG bytes."""
    fig = Figure(figsize=(10, 4), dpi=120)
    ax, acc = fig.subplots(1, 2)
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=0.6, alpha=0.5, label="train (step)")
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="held-out")
    ax.axhline(math.log(2), color="gray", ls=":", label="ln 2 (policy = reference)")
    ax.set(xlabel="step", ylabel="DPO loss", title="DPO loss")
    acc.plot([m["step"] for m in evals], [m["val_reward_accuracy"] for m in evals], "o-", label="reward")
    acc.plot([m["step"] for m in evals], [m["val_logp_accuracy"] for m in evals], "s-", label="log-prob")
    acc.set(xlabel="step", ylabel="held-out accuracy", title="Chosen preferred over rejected", ylim=(0, 1))
    for a in (ax, acc):
        a.grid(alpha=0.3)
        a.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Align a fine-tuned GPT to preference pairs with DPO.")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help=f"training sizes (default: {DEFAULT_PRESET}; tiny runs in seconds on a CPU)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="the model to align: auto (project 04's checkpoint, else a tiny random model; the "
        "default), scratch (the default for --preset tiny), gpt2 / gpt2-medium / ... (Hugging Face "
        "Hub), a Hugging Face GPT-2 folder, or a checkpoint folder",
    )
    p.add_argument(
        "--data",
        default=None,
        help="JSON or JSONL records with instruction, input, chosen, rejected; or "
        "instruction-data-with-preference (1,100 records, downloaded once) (default: "
        "Intel/orca_dpo_pairs)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument(
        "--loss", choices=LOSS_TYPES, default=None, help=f"sigmoid (DPO) or ipo (default: {TrainConfig.loss})"
    )
    p.add_argument(
        "--precompute-ref",
        action="store_true",
        default=None,
        help="compute the reference log-probs once before training instead of every step",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        default=None,
        help="train LoRA adapters; the reference is the model with adapters off",
    )
    add_device_args(p)
    add_config_flags(p, PRESETS, TRAIN_FLAGS)
    add_config_flags(p, {"default": LoRAConfig()}, LORA_FLAGS, prefix="lora_")
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # "." has no name to build the temporary sibling directories from
    return args


def data_source(data: str | None) -> str | None:
    """--data as recorded: a file as an absolute path (a resumed run finds it from anywhere), a name as is."""
    return data if data is None or not Path(data).exists() else str(Path(data).resolve())


def configure(args) -> tuple[str, TrainConfig, dict, LoRAConfig | None]:
    """The run's preset, configs and metadata: a preset's, or what a resumed run recorded; then the flags.
    Checked before anything is computed or written."""
    saved = prepare_out(args.out, args.resume, args.overwrite)
    if saved is None:
        preset = args.preset or DEFAULT_PRESET
        tc = override(PRESETS[preset], args, {**TRAIN_FLAGS, "loss": None})
        ref = "precomputed" if args.precompute_ref else "lora" if args.lora else "model"
        tc = replace(tc, lora=bool(args.lora), ref=ref)
        if tc.loss == "ipo" and tc.label_smoothing:
            raise UserError("--label-smoothing applies to the sigmoid (DPO) loss only; IPO has no such term")
        init_from = args.init_from or ("scratch" if preset == "tiny" else "auto")
        meta = {
            "template": "alpaca",
            "training": {"preset": preset, "init_from": init_from, "data": data_source(args.data)},
        }
        lora = override(LoRAConfig(), args, LORA_FLAGS, prefix="lora_") if tc.lora else None
        return preset, tc, meta, lora
    tc = TrainConfig(**saved["training"]["train_config"])
    recorded = {
        **saved["training"],
        **asdict(tc),
        "precompute_ref": tc.ref == "precomputed",
        **{f"lora_{k}": v for k, v in saved.get("lora", {}).items()},
    }
    refuse_changes_on_resume(args, recorded, FIXED_ON_RESUME)
    training = saved["training"]
    if args.data is not None and data_source(args.data) != training["data"]:
        raise UserError(
            f"the run in {args.out} trained on {training['data'] or 'Intel/orca_dpo_pairs'}; "
            "--resume continues on the same data (its saved position points into it)"
        )
    tc = override(tc, args, TRAIN_FLAGS)
    if training["step"] >= tc.max_iters:
        raise UserError(
            f"the run in {args.out} already finished its {tc.max_iters} steps; pass a larger "
            "--max-iters to train further (the cosine schedule is then stretched to it)"
        )
    meta = {k: saved[k] for k in ("template", "training", "base")}
    return training["preset"], tc, meta, LoRAConfig.from_dict(saved["lora"]) if tc.lora else None


def start_policy(args, meta: dict, lora: LoRAConfig | None, tc: TrainConfig, device) -> GPT:
    """The model DPO starts from (recorded in meta), which is also the reference. A resumed run rebuilds it
    the same way, then restore_run loads the policy's trained weights over it."""
    training = meta["training"]
    policy, training["init_from"] = load_base(training["init_from"], device, BASE)
    if Path(training["init_from"]) == args.out:  # saving would replace the model it starts from
        raise UserError(f"--out {args.out} is the model this run starts from; choose another --out")
    fingerprint = base_fingerprint(policy)
    if args.resume and fingerprint != meta["base"]["fingerprint"]:
        raise UserError(
            f"the starting model {training['init_from']} has changed since the run in {args.out} "
            "started; its policy cannot continue against a different reference"
        )
    set_dropout(policy, tc.dropout)
    if lora:
        seed_everything(tc.seed)  # before apply_lora: --seed fixes the adapters' random A
        apply_lora(policy, lora)  # B = 0: the policy starts equal to the reference
        meta["lora"] = lora.to_dict()
    meta["base"] = {"init_from": training["init_from"], "fingerprint": fingerprint}
    return policy


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset, tc, meta, lora = configure(args)
    training = meta["training"]
    records, data_name = load_preference_records(training["data"])
    train_records, val_records = split_records(records)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    policy = start_policy(args, meta, lora, tc, device)
    check_memory(step_memory(policy.config, tc), device, f"a step of {tc.batch_size} pairs")
    block_size = policy.config.block_size
    train_pairs = encode_pairs(train_records, block_size, "training")
    loader = PairLoader(train_pairs, tc.batch_size, tc.seed)
    val_batches = eval_pair_batches(encode_pairs(val_records, block_size, "held-out"), tc.batch_size)
    amp, average = autocast(device, dtype), tc.loss == "ipo"
    reference = Reference(tc.ref, policy, train_pairs, tc.batch_size, device, amp, average)  # NEW
    val_ref = held_out_reference(reference, policy, val_batches)

    seed_everything(tc.seed)
    optimizer = make_optimizer(policy, tc, device)
    step, metrics = restore_run(args.out, policy, optimizer, loader) if args.resume else (0, [])
    if not args.resume:
        training["before"] = evaluate(policy, val_batches, val_ref, tc, device, dtype)
        metrics.append({"step": 0, **training["before"]})
    meta["tokenizer"] = {"type": "tiktoken", "name": "gpt2"}
    training.update(train_config=asdict(tc), device=device.type)
    print(
        f"{preset} preset: DPO ({tc.loss}, beta {tc.beta}) on {training['init_from']}, "
        f"{trainable_parameters(policy):,} trainable parameters{' (LoRA)' if tc.lora else ''}; reference: "
        f"{tc.ref}; {len(train_pairs)} pairs of {data_name}; {tc.batch_size} pairs/step; "
        f"{device.type} {str(dtype).removeprefix('torch.')}"
    )
    print(f"held-out log-prob accuracy before: {training['before']['val_logp_accuracy']:.3f}")
    slow = warn_if_slow(device, policy.num_params() > 50e6)

    bar = tqdm(total=tc.max_iters, initial=step, desc="DPO", unit="step", dynamic_ncols=True)
    start = time.perf_counter() - training.get("elapsed_s", 0.0)
    try:
        while step < tc.max_iters:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            m, grad_norm = train_step(policy, reference, optimizer, loader, lr, tc, device, dtype)
            sync(device)
            step, dt = step + 1, time.perf_counter() - t0
            metrics.append({"step": step, **m, "lr": lr, "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracy']:.2f}", lr=f"{lr:.2e}")
            bar.update()
            if slow and step == 1:
                bar.write(time_left(dt, tc.max_iters - step))
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                val = evaluate(policy, val_batches, val_ref, tc, device, dtype)
                metrics.append({"step": step, **val})
                bar.write(
                    f"step {step}: train loss {m['loss']:.4f}; held-out loss {val['val_loss']:.4f}, reward "
                    f"accuracy {val['val_reward_accuracy']:.3f}, margin {val['val_reward_margin']:.4f}, "
                    f"log-prob accuracy {val['val_logp_accuracy']:.3f}"
                )
                elapsed = round(time.perf_counter() - start, 1)
                training.update(step=step, train_loss=m["loss"], after=val, elapsed_s=elapsed)
                last = step == tc.max_iters  # what DPO did, in words: answers to held-out prompts
                files = {"eval.json": evaluation(policy, val_records, meta, tc, device)} if last else {}
                save_run(args.out, policy, optimizer, loader, meta, metrics, files)
    except KeyboardInterrupt:
        bar.close()
        print(interrupted(step, training.get("step"), args.out))
        return 130
    bar.close()
    before, after = training["before"], training["after"]
    print(
        f"done after {step} steps: held-out DPO loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}, "
        f"reward accuracy {after['val_reward_accuracy']:.3f}, log-prob accuracy "
        f"{before['val_logp_accuracy']:.3f} -> {after['val_logp_accuracy']:.3f}; checkpoint in {args.out}"
    )
    flags = [] if args.out == DEFAULT_DIR else ["--checkpoint", str(args.out)]
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
