"""The distilled student against the same student trained alone and against its teacher, in one run. Both
students start from the same weights (the teacher's embeddings and every other block, DistilBERT's recipe)
and train on the same batches for the same steps with the same schedule; one of them also learns from the
teacher's soft targets (forward KL at T = 2, alpha 0.5: distill.py's defaults). Reported: held-out loss and
perplexity on the whole validation split, the share of the teacher-student gap that distillation closes,
parameters, decode and training tokens/s, the loss curves, and what keeping only the teacher's top k
log-probs costs against the full KL.

python benchmark.py --checkpoint data/models/project07_mixed_precision   # the teacher; cpu preset on a CPU
python benchmark.py --preset tiny --steps 4 --checkpoint DIR             # seconds
"""

import copy
import io
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from checkpoint import MODELS_DIR, load_checkpoint
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    command,
    exits_cleanly,
    has_bf16,
    pick_device,
    positive_float,
    positive_int,
    sync,
)
from data import make_loaders
from distill import DistillConfig, Distiller, init_from_teacher, kl, soft_loss, student_config
from distributed import Dist
from model import GPT, GPTConfig
from precision import PRECISIONS, auto_precision, make_scaler, set_matmul_precision
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import DEFAULT_PRESET, PRESETS, estimate_loss, lr_at, make_optimizer, train_step

DEFAULT_TEACHER = MODELS_DIR / "project07_mixed_precision"
# preset -> (training steps per student, sequences per step): sized to finish in minutes on its device
SIZES = {"tiny": (4, 4), "cpu": (100, 8), "gpt2": (100, 16)}


def load_teacher(args) -> tuple[GPT, str]:
    """--checkpoint, else project 07's default checkpoint; without a trained teacher there is nothing to
    distil, so this is an error rather than random weights."""
    path = args.checkpoint or DEFAULT_TEACHER
    if args.checkpoint is None and not (path / "config.json").exists():
        train = command("train.py", "--preset", "cpu", "--data", "DIR", project="project07_mixed_precision")
        raise UserError(f"no teacher in {path}; train one first ({train}) or pass --checkpoint")
    model, _ = load_checkpoint(path, "cpu", tokenizer="tiktoken")
    return model, str(path)


def train_student(teacher32: GPT, mc: GPTConfig, tc, distiller, args, device) -> dict:
    """`tc.max_iters` steps of the student from the teacher's layers, with or without the teacher; the
    held-out loss every `eval_every` steps (step 0 included) for the curves."""
    p = PRECISIONS[auto_precision(device)]
    model = GPT(mc)
    init_from_teacher(model, teacher32)
    model = model.to(device)
    optimizer, scaler = make_optimizer(model, tc, device), make_scaler(p, device)
    loader, make_val, _ = make_loaders(args.data, tc.batch_size, mc.block_size, Dist())
    evaluate = lambda: estimate_loss(model, make_val, tc, device, p, Dist())  # noqa: E731
    curve, losses, seconds = [(0, evaluate())], [], []
    for step in tqdm(range(tc.max_iters), desc="distilled" if distiller else "alone", unit="step"):
        sync(device)
        t0 = time.perf_counter()
        loss, _, _ = train_step(
            model, optimizer, scaler, loader, 1, lr_at(step, tc), tc, device, p, Dist(), distiller
        )
        sync(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == tc.max_iters:
            curve.append((step + 1, evaluate()))
    timed = seconds[min(args.warmup, len(seconds) - 1) :]
    return {"model": model.eval(), "curve": curve, "losses": losses, "step_s": statistics.median(timed)}


def teacher_step_seconds(teacher32: GPT, tc, args, device) -> float:
    """The teacher's own training step (plain cross-entropy) on the same batches: what a token of training
    costs at the teacher's size."""
    p = PRECISIONS[auto_precision(device)]
    model = copy.deepcopy(teacher32).to(device).train()
    optimizer, scaler = make_optimizer(model, tc, device), make_scaler(p, device)
    loader, _, _ = make_loaders(args.data, tc.batch_size, model.config.block_size, Dist())
    step = lambda: train_step(model, optimizer, scaler, loader, 1, tc.lr, tc, device, p, Dist())  # noqa: E731
    return time_it(step, device, warmup=1, repeats=args.repeats)[0]


def decode_tok_per_s(model: GPT, prompt: torch.Tensor, args, device) -> float:
    decode = lambda: list(model.generate_stream(prompt, args.gen_tokens, temperature=0))  # noqa: E731
    return args.gen_tokens / time_it(decode, device, warmup=1, repeats=args.repeats)[0]


def tail_costs(teacher: GPT, student: GPT, batch, ks: list[int], cfg: DistillConfig) -> dict:
    """Against the full soft loss on one held-out batch: the top-k loss, the teacher's tail mass m, and the
    L1 error of the gradient on the student's (temperature-scaled) logits with its bound 2m, per token."""
    x = batch[0]
    with torch.no_grad():
        t_logits, s_logits = teacher(x)[0].float(), student(x)[0].float()
    log_p = F.log_softmax(t_logits / cfg.temperature, dim=-1)  # (B, T, V)
    scale = x.numel() / cfg.temperature  # d soft_loss / d z = T (q - p) / positions: back to q - p
    z = s_logits.requires_grad_()
    (g_full,) = torch.autograd.grad(soft_loss(z, t_logits, cfg), z)
    out = {"full": kl(log_p, F.log_softmax(s_logits.detach() / cfg.temperature, -1)).mean().item()}
    for k in ks:
        top = log_p.topk(k, dim=-1)
        loss = soft_loss(z, (top.values, top.indices), cfg)
        (g_k,) = torch.autograd.grad(loss, z)
        mass = 1 - top.values.exp().sum(-1)  # (B, T) the teacher's probability outside its top k
        err = (g_full - g_k).abs().sum(-1) * scale  # (B, T)
        out[k] = {
            "kl": loss.item() / cfg.temperature**2,
            "mass": mass.mean().item(),
            "err": err.mean().item(),
            "bound": 2 * mass.mean().item(),
            "worst": (err / (2 * mass).clamp(min=1e-12)).max().item(),  # <= 1 where the bound holds
        }
    return out


def plot_curves(runs: dict, teacher_val: float, title: str) -> bytes:
    """Held-out loss against training steps, student alone vs distilled, and the teacher's level."""
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    for name, r in runs.items():
        line = ax.plot(*zip(*r["curve"]), "o-", label=f"{name}: held-out cross-entropy")[0]
        steps, what = (
            range(1, len(r["losses"]) + 1),
            "its objective" if "distilled" in name else "cross-entropy",
        )
        ax.plot(
            steps, r["losses"], lw=0.6, alpha=0.4, color=line.get_color(), label=f"{name}: training, {what}"
        )
    ax.axhline(teacher_val, color="k", ls="--", lw=1, label="teacher: held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def parse_args(argv):
    p = ArgumentParser(description="Benchmark a distilled student against the student alone and the teacher.")
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: gpt2 on a GPU, cpu elsewhere")
    p.add_argument("--data", type=Path, default=None, help="text file or shards (default: data/wikitext)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"the teacher, a checkpoint of the training line (default: {DEFAULT_TEACHER.name}'s)",
    )
    sizes = ", ".join(f"{name} {s} x {b}" for name, (s, b) in SIZES.items())
    p.add_argument("--steps", type=positive_int, default=None, help=f"steps per student ({sizes} sequences)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (as above)")
    p.add_argument(
        "--lr",
        type=positive_float,
        default=5e-4,
        help="the students' peak learning rate (Hugging Face's distillation script's; they start trained)",
    )
    p.add_argument("--eval-every", type=positive_int, default=20, help="steps between held-out evaluations")
    p.add_argument("--warmup", type=positive_int, default=2, help="first steps left out of the step time")
    p.add_argument("--gen-tokens", type=positive_int, default=64, help="tokens decoded per model")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--top-k", default="1,8,64,512", help="k values whose truncated KL is measured")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p, dtype=False)
    add_output_args(p)
    args = p.parse_args(argv)
    args.data = args.data and str(args.data.resolve())
    try:
        args.top_k = [int(k) for k in args.top_k.split(",")]
    except ValueError:
        p.error(f"argument --top-k: must be integers separated by commas, got {args.top_k}")
    if min(args.top_k) < 1:
        p.error("argument --top-k: every k must be at least 1")
    return args


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or (DEFAULT_PRESET if device.type == "cuda" else "cpu")
    teacher32, source = load_teacher(args)  # first: a wrong --checkpoint fails before any work
    cfg = DistillConfig()
    mc = student_config(teacher32.config, cfg, GPTConfig().vocab_size, dropout=0.0)
    steps, batch = args.steps or SIZES[preset][0], args.batch_size or SIZES[preset][1]
    tokens = batch * mc.block_size  # one micro-batch a step
    tc = replace(
        PRESETS[preset][1],
        max_iters=steps,
        lr=args.lr,
        warmup_iters=max(1, steps // 10),
        batch_size=batch,
        total_batch_tokens=tokens,
        eval_iters=10**9,  # evaluation reads the whole validation split
    )
    set_matmul_precision(PRECISIONS[auto_precision(device)])
    teacher = copy.deepcopy(teacher32).to(device)
    distiller = Distiller(teacher, cfg, torch.bfloat16 if has_bf16(device) else torch.float32)
    print(f"{steps} steps of {batch} x {mc.block_size} tokens per student, teacher {source}", file=sys.stderr)
    runs = {
        "student alone": train_student(teacher32, mc, tc, None, args, device),
        "student distilled": train_student(teacher32, mc, tc, distiller, args, device),
    }
    p = PRECISIONS[auto_precision(device)]
    teacher32 = teacher32.to(device)
    _, make_val, _ = make_loaders(args.data, batch, mc.block_size, Dist())
    teacher_val = estimate_loss(teacher32, make_val, tc, device, p, Dist())
    start = runs["student alone"]["curve"][0][1]  # both students start from the same weights
    val = {
        **{n: r["curve"][-1][1] for n, r in runs.items()},
        "teacher": teacher_val,
        "student at start": start,
    }
    ppl = {n: torch.tensor(v).exp().item() for n, v in val.items()}
    gap = ppl["student alone"] - ppl["teacher"]
    closed = 100 * (ppl["student alone"] - ppl["student distilled"]) / gap if gap > 0 else None
    loader, n_eval = make_val(), 0
    while loader.epoch == 0:  # the tokens every evaluation reads: the whole split, in windows of the context
        n_eval += loader.next_batch()[0].numel()

    batch0 = tuple(t.to(device) for t in make_val().next_batch())
    student = runs["student distilled"]["model"]
    prompt = batch0[0][:1, :16]  # (1, 16)
    decode = {
        n: decode_tok_per_s(m, prompt, args, device)
        for n, m in (("teacher", teacher32), ("student", student))
    }
    teacher_step = teacher_step_seconds(teacher32, tc, args, device)
    tail = tail_costs(teacher32, student, batch0, args.top_k, cfg)
    full, tops = tail["full"], [(k, tail[k]) for k in args.top_k]

    def non_embedding(m: GPT) -> int:
        return m.num_params(non_embedding=False) - m.wte.weight.numel() - m.wpe.weight.numel()

    step_s = {"teacher": teacher_step, **{n: r["step_s"] for n, r in runs.items()}}
    params = {"teacher": teacher32, "student": student}
    rows = [
        *compare("val_loss", "nats/token", val),
        *compare("val_ppl", "perplexity", ppl),
        row("gap_closed_percent", "student distilled", closed, "%", note=None if gap > 0 else "no gap"),
        *compare("params", "count", {n: m.num_params(non_embedding=False) for n, m in params.items()}),
        *compare("non_embedding_params", "count", {n: non_embedding(m) for n, m in params.items()}),
        *compare("decode_tok_per_s", "tok/s", decode),
        *compare("step_ms", "ms", {n: s * 1e3 for n, s in step_s.items()}),
        *compare("train_tok_per_s", "tok/s", {n: tokens / s for n, s in step_s.items()}),
        row("soft_kl", "full vocabulary", full, "nats/token"),
        *[row("soft_kl", f"top-{k}", t["kl"], "nats/token", ("full vocabulary", full)) for k, t in tops],
        *[row("teacher_tail_mass", f"top-{k}", t["mass"], "probability") for k, t in tops],
        *[row("tail_grad_error_l1", f"top-{k}", t["err"], "per token", note=f"bound 2m = {t['bound']:.4g}; "
              f"worst token at {t['worst']:.3f} of its bound") for k, t in tops],
    ]  # fmt: skip
    print_table(rows)
    config = {
        "teacher": source,
        "teacher_model": asdict(teacher32.config),
        "student_model": asdict(mc),
        **asdict(cfg),
        **{k: v for k, v in asdict(tc).items() if k != "eval_iters"},
        "data": args.data,
        "eval_tokens": n_eval,
        "eval_windows": f"non-overlapping windows of {mc.block_size} tokens (stride {mc.block_size})",
    }
    path = write_report(args, "Knowledge distillation", device, preset, DEFAULT_PRESET, config, rows)
    png = path.with_name(f"loss_curves-{path.stem}.png")
    png.write_bytes(plot_curves(runs, teacher_val, f"{preset} preset, {device.type}: {steps} steps each"))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
