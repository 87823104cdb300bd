"""Direct Preference Optimization: make the fine-tuned model prefer the answers people chose.

python train.py --preset tiny --data preferences.json   # seconds on a CPU (a random tiny model)
python train.py                                         # project 04's SFT model on Intel/orca_dpo_pairs
python train.py --precompute-ref                        # reference log-probs once; no second model
python train.py --lora                                  # train adapters; reference = adapters off
python train.py --loss ipo --beta 0.5                   # IPO; or conservative DPO: --label-smoothing 0.1
python train.py --resume                                # continue the run in --out exactly
"""

import copy
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
from data import EOT, GPT2Tokenizer, format_prompt, split_records
from dpo import LOSS_TYPES, dpo_loss, policy_logprobs, reference_logprobs
from lora import LoRAConfig, adapters_disabled, apply_lora, base_fingerprint, trainable_parameters
from model import GPT
from preference import PairLoader, encode_pairs, eval_pair_batches, load_preference_records


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


class Reference:
    """NEW: where the reference log-probs come from. Three ways, the same numbers:
    "model"        a frozen copy of the starting policy: a second model in memory, a second forward pass;
    "precomputed"  the starting policy's log-probs for every training pair, computed once before training;
    "lora"         the policy itself with its adapters switched off: the base it started from, no copy."""

    def __init__(self, mode: str, policy: GPT, train_pairs: list, batch_size: int, device, amp):
        self.mode, self.device, self.amp = mode, device, amp
        self.model, self.table = None, None
        if mode == "model":
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        elif mode == "precomputed":  # the policy is still the reference now: score with it, keep no copy
            policy.eval()
            batches = tqdm(
                eval_pair_batches(train_pairs, batch_size), desc="reference log-probs", unit="batch"
            )
            self.table = torch.cat([torch.stack(self.compute(policy, b), dim=1) for b in batches])  # (N, 2)
            policy.train()

    def compute(self, policy: GPT, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the reference on a batch: (chosen (B,), rejected (B,)) log-probs."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.mode == "lora":
            with adapters_disabled(policy):
                return reference_logprobs(policy, batch, self.amp)
        return reference_logprobs(self.model or policy, batch, self.amp)

    def logprobs(self, policy: GPT, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference log-probs of a training batch: looked up, or computed."""
        if self.table is not None:
            rows = self.table[batch["index"].to(self.table.device)]  # (B, 2)
            return rows[:, 0], rows[:, 1]
        return self.compute(policy, batch)


def train_step(policy: GPT, reference: Reference, optimizer, loader, lr: float, tc, device, dtype):
    """One optimizer step on one batch of pairs. Returns (metrics of dpo_loss, gradient norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = {k: v.to(device) for k, v in loader.next_batch().items()}
    chosen, rejected = policy_logprobs(policy, batch, autocast(device, dtype))  # NEW: (B,), (B,)
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
        chosen, rejected = policy_logprobs(policy, b, autocast(device, dtype))
        _, metrics = dpo_loss(chosen, rejected, rc, rr, tc.beta, tc.label_smoothing, tc.loss)
        metrics["logp_accuracy"] = (chosen > rejected).float().mean().item()
        k = chosen.numel()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * k
        n += k
    policy.train()
    return {f"val_{key.replace('rewards/', 'reward_')}": value / n for key, value in totals.items()}


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
        choices=sorted(PRESETS),
        default=None,
        help=f"training sizes (default: {DEFAULT_PRESET}; tiny runs in seconds on a CPU)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="the model to align: auto (project 04's checkpoint, else a tiny random model; the default), "
        "scratch, gpt2 / gpt2-medium / ... (Hugging Face Hub), a Hugging Face GPT-2 folder, or a "
        "checkpoint folder (default for --preset tiny: scratch)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="JSON or JSONL records: instruction, input, chosen, rejected (default: Intel/orca_dpo_pairs)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_DIR, help=f"checkpoint directory (default: {DEFAULT_DIR})"
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--beta", type=positive_float, default=None, help="DPO's beta: the KL weight (0.1)")
    p.add_argument(
        "--label-smoothing",
        type=fraction_below(0.5),
        default=None,
        help="conservative DPO: the assumed chance a label is flipped, in [0, 0.5) (default: 0)",
    )
    p.add_argument("--loss", choices=LOSS_TYPES, default=None, help="sigmoid (DPO, default) or ipo")
    p.add_argument(
        "--precompute-ref",
        action="store_true",
        default=None,
        help="compute the reference log-probs once before training instead of every step",
    )
    add_device_args(p)
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed (default: 1337)")
    p.add_argument("--max-iters", type=positive_int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=None, help="preference pairs per step")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate")
    p.add_argument("--eval-interval", type=positive_int, default=None, help="evaluate and save every N steps")
    p.add_argument(
        "--eval-samples", type=non_negative_int, default=None, help="held-out prompts answered in eval.json"
    )
    lora = p.add_argument_group("LoRA (fixed for a run: --resume keeps the recorded ones)")
    lora.add_argument(
        "--lora",
        action="store_true",
        default=None,
        help="train LoRA adapters; the reference is the model with adapters off",
    )
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
        "beta": args.beta,
        "label_smoothing": args.label_smoothing,
        "loss": args.loss,
        "eval_interval": args.eval_interval,
        "eval_samples": args.eval_samples,
    }
    fixed = (args.beta, args.label_smoothing, args.loss, args.precompute_ref)
    if saved and any(v is not None for v in fixed):
        raise UserError(
            "--beta, --label-smoothing, --loss and --precompute-ref are fixed for a run; "
            "--resume continues with the recorded ones"
        )
    tc = replace(tc, **{k: v for k, v in flags.items() if v is not None})
    if tc.loss == "ipo" and tc.label_smoothing:
        raise UserError("--label-smoothing applies to the sigmoid (DPO) loss only; IPO has no such term")
    if not saved:
        lora = bool(args.lora)
        tc = replace(tc, lora=lora, ref="precomputed" if args.precompute_ref else "lora" if lora else "model")
    return preset, tc


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
    amp = autocast(device, dtype)

    # Everything the user gave us is checked before anything is written.
    data_arg = args.data if args.data is not None else (saved["training"]["data"] if saved else None)
    records, data_name = load_preference_records(data_arg)
    train_records, val_records = split_records(records)

    # The starting policy is also the reference; a resumed run rebuilds it the same way, then loads the
    # policy's trained weights over it (restore_run).
    default = "scratch" if preset == "tiny" else "auto"
    init_from = saved["base"]["init_from"] if saved else args.init_from or default
    policy, base = load_base(init_from, device)
    if Path(base).is_absolute() and Path(base) == args.out:  # saving would replace the model it starts from
        raise UserError(f"--out {args.out} is the model this run starts from; choose another --out")
    fingerprint = base_fingerprint(policy)
    if saved and fingerprint != saved["base"]["fingerprint"]:
        raise UserError(
            f"the starting model {base} has changed since the run in {args.out} started; "
            "its policy cannot continue against a different reference"
        )
    for m in policy.modules():  # dropout as configured (off by default: see TrainConfig.dropout)
        if isinstance(m, torch.nn.Dropout):
            m.p = tc.dropout
    policy.config.dropout = tc.dropout
    lora_config = None
    if tc.lora:
        lora_config = LoRAConfig.from_dict(saved["lora"]) if saved else lora_config_from(args)
        seed_everything(tc.seed)  # before apply_lora: --seed fixes the adapters' random A
        apply_lora(policy, lora_config)  # B = 0: the policy starts equal to the reference
    policy.train()
    block_size = policy.config.block_size
    train_pairs = encode_pairs(train_records, block_size, "training")
    val_pairs = encode_pairs(val_records, block_size, "held-out")
    loader = PairLoader(train_pairs, tc.batch_size, tc.seed)
    val_batches = eval_pair_batches(val_pairs, tc.batch_size)

    reference = Reference(tc.ref, policy, train_pairs, tc.batch_size, device, amp)
    policy.eval()
    val_ref = [reference.compute(policy, b) for b in val_batches]  # held-out reference log-probs, once
    policy.train()
    seed_everything(tc.seed)
    optimizer = make_optimizer(policy, tc, device)
    step, metrics, elapsed = 0, [], 0.0
    meta = {
        "tokenizer": {"type": "tiktoken", "name": "gpt2"},
        "template": "alpaca",
        "base": {"init_from": base, "fingerprint": fingerprint},
        "training": {
            "preset": preset,
            "data": data_arg and str(Path(data_arg).resolve()),
            "train_config": asdict(tc),
            "device": device.type,
        },
    }
    if lora_config:
        meta["lora"] = lora_config.to_dict()
    if saved:
        step, metrics, elapsed = restore_run(args.out, policy, optimizer, loader)
        meta["training"]["before"] = saved["training"]["before"]
        if step >= tc.max_iters:
            raise UserError(
                f"the run in {args.out} already finished its {tc.max_iters} steps; pass a larger "
                "--max-iters to train further (the cosine schedule is then stretched to it)"
            )
    else:
        meta["training"]["before"] = evaluate(policy, val_batches, val_ref, tc, device, dtype)
        metrics.append({"step": 0, **meta["training"]["before"]})

    before = meta["training"]["before"]
    trainable = trainable_parameters(policy)
    print(
        f"{preset} preset: DPO ({tc.loss}, beta {tc.beta}) on {base}, {trainable:,} trainable parameters"
        f"{' (LoRA)' if tc.lora else ''}; reference: {tc.ref}; {len(train_pairs)} pairs of {data_name} "
        f"({len(val_pairs)} held out); {tc.batch_size} pairs/step; {device.type} "
        f"{str(dtype).removeprefix('torch.')}; held-out log-prob accuracy before: "
        f"{before['val_logp_accuracy']:.3f}"
    )
    tokenizer = GPT2Tokenizer()
    warn_cpu = device.type == "cpu" and preset == DEFAULT_PRESET and not saved and policy.num_params() > 50e6
    bar = tqdm(total=tc.max_iters, initial=step, desc="DPO", unit="step", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    try:
        while step < tc.max_iters:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            m, grad_norm = train_step(policy, reference, optimizer, loader, lr, tc, device, dtype)
            sync(device)
            step += 1
            metrics.append({"step": step, **m, "lr": lr, "grad_norm": grad_norm})
            bar.set_postfix(
                loss=f"{m['loss']:.4f}",
                acc=f"{m['rewards/accuracy']:.2f}",
                margin=f"{m['rewards/margin']:.3f}",
                lr=f"{lr:.2e}",
            )
            bar.update()
            if warn_cpu and step == 3:
                warn_slow_cpu(bar, time.perf_counter() - t0, tc.max_iters - step)
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                val = evaluate(policy, val_batches, val_ref, tc, device, dtype)
                metrics.append({"step": step, **val})
                bar.write(
                    f"step {step}: train loss {m['loss']:.4f}; held-out loss {val['val_loss']:.4f}, "
                    f"reward accuracy {val['val_reward_accuracy']:.3f}, margin "
                    f"{val['val_reward_margin']:.4f}, log-prob accuracy {val['val_logp_accuracy']:.3f}"
                )
                meta["training"].update(step=step, train_loss=m["loss"], after=val)
                files = {}
                if step == tc.max_iters:  # what DPO did, in words: answers to held-out prompts
                    files["eval.json"] = evaluation(policy, tokenizer, val_records, meta, tc, device)
                elapsed = time.perf_counter() - start
                save_run(args.out, policy, optimizer, loader, meta, metrics, elapsed, files)
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
    after = meta["training"]["after"]
    flags = [] if args.out == DEFAULT_DIR else ["--checkpoint", str(args.out)]
    print(
        f"done after {step} steps: held-out DPO loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}, "
        f"reward accuracy {after['val_reward_accuracy']:.3f}, log-prob accuracy "
        f"{before['val_logp_accuracy']:.3f} -> {after['val_logp_accuracy']:.3f}; checkpoint and eval.json "
        f"in {args.out}"
    )
    print(f"try it: {command('generate.py', *flags, '--instruction', repr('Name three primary colors.'))}")
    return 0


def evaluation(policy: GPT, tokenizer, val_records: list[dict], meta: dict, tc: TrainConfig, device) -> bytes:
    """eval.json: held-out metrics before and after, and greedy answers to the first held-out prompts next
    to the chosen and rejected answers."""
    policy.eval()  # no dropout: the answers are the saved model's, as generate.py gives them at temperature 0
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


def check_resume(args, saved: dict) -> None:
    """A resumed run continues exactly only on the same data."""
    recorded = saved["training"].get("data")
    if args.data is not None and str(Path(args.data).resolve()) != recorded:
        raise UserError(
            f"the run in {args.out} trained on {recorded or 'Intel/orca_dpo_pairs'}; --resume continues "
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
    lora_flags = (args.lora, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
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
