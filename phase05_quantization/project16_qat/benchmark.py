"""NEW: quantization-aware training against post-training quantization, on a trained checkpoint. Held-out
perplexity of the float model, of int4 round-to-nearest (RTN) and GPTQ (project 14), and of int4 QAT after N
fine-tuning steps (train.py --init-from --qat int4, exported by round-to-nearest); to separate QAT's gain
from the N extra steps, the float model is also fine-tuned N steps with the same flags and then quantized.
Also: the time of a training step with and without fake quantisation.

The default checkpoint is project 01's character model: its weights are nearly all in the blocks, so int4
costs it perplexity for QAT to recover. Project 03's CPU model is 89% embedding, which stays in floating
point, and int4 barely touches it.

python benchmark.py                                  # project 01's checkpoint, int4 g128, 100 steps
python benchmark.py --checkpoint data/models/mine --data input.txt --preset tiny --steps 10
"""

import copy
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import checkpoint_exists, load_checkpoint
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    pick_device,
    positive_float,
    positive_int,
)
from config import PRESETS
from loader import PROJECT01, calibration_batch, load_float_model, tensor_bytes, token_split, training_data
from qat import QATLinear, convert_qat, fake_quantize, prepare_qat
from quantization import DEFAULT_GROUP_SIZE, check_format, quantize_model
from results import add_output_args, compare, print_table, row, time_it, write_report


def windows(tokens: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every full T-token window of the held-out tokens, (n, T), and the next tokens, (n, T)."""
    n = (len(tokens) - 1) // T
    if n == 0:
        raise UserError(f"the held-out split has {len(tokens)} tokens, fewer than one {T}-token window")
    ids = torch.from_numpy(tokens[: n * T + 1].astype(np.int64))
    return ids[:-1].view(n, T), ids[1:].view(n, T)


@torch.no_grad()
def token_losses(model, x: torch.Tensor, y: torch.Tensor, device, batch: int = 16) -> torch.Tensor:
    """Every held-out token's loss, -log p(next token), (n * T,): perplexity is exp of their mean, and two
    models' losses on the same tokens give a paired difference with a standard error."""
    model.eval()
    out = []
    for xb, yb in zip(x.split(batch), y.split(batch)):
        logits = model(xb.to(device))[0].float()  # (B, T, V)
        out.append(F.cross_entropy(logits.flatten(0, 1), yb.flatten().to(device), reduction="none").cpu())
    return torch.cat(out)


def fine_tune(ckpt: Path, data: Path, args, out: Path, qat: bool) -> Path:
    """train.py's own fine-tuning, run as a user runs it: N steps from the checkpoint, float or
    quantization-aware, same seed, same batches, same learning rate."""
    flags = ["--init-from", ckpt, "--preset", args.preset, "--data", data, "--max-iters", args.steps,
             "--lr", args.lr, "--eval-interval", args.steps, "--eval-iters", 1, "--device", args.device,
             "--dtype", "float32", "--out", out]  # fmt: skip
    if qat:
        flags += ["--qat", "int4", "--group-size", args.group_size]
    script = Path(__file__).with_name("train.py")
    if subprocess.run([sys.executable, str(script), *map(str, flags)]).returncode != 0:
        raise UserError(f"fine-tuning {'with' if qat else 'without'} QAT failed (see above)")
    return out


def quality(args, device) -> tuple[list[dict], dict]:
    ckpt = args.checkpoint or PROJECT01
    if not checkpoint_exists(ckpt):
        raise UserError(f"no checkpoint in {ckpt}: train one first (project 01), or pass --checkpoint")
    model, meta = load_float_model(ckpt, None, device)
    g = args.group_size
    try:
        check_format(model, 4, g)
    except ValueError as e:
        raise UserError(f"--group-size: {e}") from e
    data = training_data(args.data, meta)
    T = model.config.block_size
    chars = meta["tokenizer"].get("chars")
    x, y = windows(token_split(data, "val", chars)[: args.eval_tokens], T)
    train_tokens = token_split(data, "train", chars)
    calibration = calibration_batch(train_tokens, args.calibration_samples, T, 0).to(device)
    losses = {}
    fp = f"int4 g{g}"
    losses["fp32"] = token_losses(model, x, y, device)
    losses[f"{fp} RTN"] = token_losses(quantize_model(copy.deepcopy(model), "int4", g), x, y, device)
    gptq = quantize_model(copy.deepcopy(model), "gptq", g, calibration=calibration)
    losses[f"{fp} GPTQ"] = token_losses(gptq, x, y, device)

    with tempfile.TemporaryDirectory() as tmp:
        tuned, _ = load_checkpoint(fine_tune(ckpt, data, args, Path(tmp) / "fp", qat=False), device)
        qat, _ = load_checkpoint(fine_tune(ckpt, data, args, Path(tmp) / "qat", qat=True), device)
    n = args.steps
    losses[f"fp32, fine-tuned {n} steps"] = token_losses(tuned, x, y, device)
    losses[f"{fp} RTN of the fine-tuned fp32"] = token_losses(quantize_model(tuned, "int4", g), x, y, device)
    prepare_qat(qat, "int4", g)
    losses[f"{fp} QAT, fake-quantised ({n} steps)"] = token_losses(qat, x, y, device)
    losses[f"{fp} QAT {n} steps, exported (RTN)"] = token_losses(convert_qat(qat), x, y, device)

    ppl = {name: math.exp(v.mean().item()) for name, v in losses.items()}
    rows = [
        row("perplexity", name, p, "", None if name == "fp32" else ("fp32", ppl["fp32"]))
        for name, p in ppl.items()
    ]
    fq, exported = (
        losses[f"{fp} QAT, fake-quantised ({n} steps)"],
        losses[f"{fp} QAT {n} steps, exported (RTN)"],
    )
    rows.append(
        row(
            "qat_export_max_token_loss_diff",
            "exported vs fake-quantised",
            (fq - exported).abs().max().item(),
            "nats",
        )
    )
    rows += recovery_rows(ppl, losses, fp, n)
    rows += [row("weight_mib", "fp32", tensor_bytes(model) / 2**20, "MiB"),
             row("weight_mib", f"{fp} QAT, exported", tensor_bytes(qat) / 2**20, "MiB")]  # fmt: skip
    calibrated = f"{args.calibration_samples} x {T} tokens of the train split, seed 0"
    config = dict(checkpoint=str(ckpt), data=str(data), held_out_tokens=y.numel(), group_size=g,
                  fine_tune_steps=n, lr=args.lr, train_preset=args.preset,
                  calibration=calibrated)  # fmt: skip
    return rows, config


def recovery_rows(ppl: dict, losses: dict, fp: str, n: int) -> list[dict]:
    """The target: the share of int4 RTN's perplexity degradation that QAT recovers. Matched: against the
    float model fine-tuned the same N steps (what QAT adds beyond the steps); as the issue writes it: against
    the original checkpoint (which counts the N steps' own gain too). And the paired loss difference between
    QAT and RTN of the fine-tuned model, with its standard error (tokens taken as independent)."""
    tuned, tuned_rtn = ppl[f"fp32, fine-tuned {n} steps"], ppl[f"{fp} RTN of the fine-tuned fp32"]
    qat = ppl[f"{fp} QAT {n} steps, exported (RTN)"]
    base, rtn = ppl["fp32"], ppl[f"{fp} RTN"]
    matched = 100 * (tuned_rtn - qat) / (tuned_rtn - tuned) if tuned_rtn > tuned else None
    literal = 100 * (rtn - qat) / (rtn - base) if rtn > base else None
    diff = losses[f"{fp} QAT {n} steps, exported (RTN)"] - losses[f"{fp} RTN of the fine-tuned fp32"]
    small = "int4 RTN costs this model under 0.5% perplexity: a share of that recovered means little"
    return [
        row("qat_recovered_pct", f"{fp}, vs fp32 fine-tuned {n} steps and its RTN", matched, "%",
            note="RTN of the fine-tuned model has nothing to recover" if matched is None
            else small if tuned_rtn < 1.005 * tuned else None),
        row("qat_recovered_pct", f"{fp}, vs the original fp32 and its RTN", literal, "%",
            note="RTN has no degradation to recover" if literal is None
            else small if rtn < 1.005 * base else None),
        row("loss_diff_qat_minus_rtn", f"{fp}, fine-tuned {n} steps, mean", diff.mean().item(), "nats/token"),
        row("loss_diff_qat_minus_rtn", f"{fp}, fine-tuned {n} steps, standard error",
            (diff.std() / math.sqrt(diff.numel())).item(), "nats/token"),
    ]  # fmt: skip


def step_time_rows(args, device) -> list[dict]:
    """A training step (forward, backward, AdamW) of one micro-batch of the train preset, with the blocks'
    Linears plain and fake-quantised, taking turns so that both meet the same (shared) machine."""
    ckpt = args.checkpoint or PROJECT01
    models = {"plain": load_float_model(ckpt, None, device)[0]}
    qat = f"QAT int4 g{args.group_size}"
    models[qat] = prepare_qat(load_float_model(ckpt, None, device)[0], "int4", args.group_size)
    _, tc = PRESETS[args.preset]
    T = models["plain"].config.block_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(models["plain"].config.vocab_size, (tc.batch_size, T + 1), generator=g).to(device)
    steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            model(x[:, :-1], x[:, 1:])[1].backward()
            optimizer.step()

        step()  # warm-up
        steps[name] = step
    times = {name: [] for name in steps}
    for _ in tqdm(range(args.timing_repeats), desc="step time", disable=None):
        for name, step in steps.items():
            times[name].append(time_it(step, device, warmup=0, repeats=1)[0])
    what = f", {tc.batch_size} x {T} tokens"
    medians = {name + what: statistics.median(t) * 1e3 for name, t in times.items()}
    return compare("train_step_ms", "ms", medians) + [fake_quant_row(models[qat], device)]


def fake_quant_row(model, device) -> dict:
    """What fake quantisation itself adds to a step, timed alone: every block weight rounded to its grid and
    back, and the masked gradient. A small cost inside a step, which a shared machine's noise can hide."""
    layers = [m for m in model.blocks.modules() if isinstance(m, QATLinear)]

    def fake_quantise_all():
        for m in layers:
            fake_quantize(m.weight, m.bits, m.group_size).sum().backward()

    seconds, _ = time_it(fake_quantise_all, device, warmup=2, repeats=20)
    return row("fake_quant_ms", f"forward + backward, the {len(layers)} block weights", seconds * 1e3, "ms")


def parse_args(argv):
    p = ArgumentParser(description="Benchmark int4 QAT against int4 RTN and GPTQ (held-out perplexity).")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help=f"a trained checkpoint (default: {PROJECT01.name}'s)"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="held-out and training data (default: the checkpoint's)"
    )
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="held-out tokens (default: all)")
    p.add_argument(
        "--group-size", type=positive_int, default=DEFAULT_GROUP_SIZE, help="int4 input features per scale"
    )
    p.add_argument("--steps", type=positive_int, default=100, help="fine-tuning steps, float and QAT alike")
    p.add_argument("--lr", type=positive_float, default=3e-5, help="fine-tuning learning rate, float and QAT")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="train.py's batch sizes")
    p.add_argument(
        "--calibration-samples", type=positive_int, default=128, help="GPTQ's calibration sequences"
    )
    p.add_argument(
        "--timing-repeats", type=positive_int, default=7, help="timed steps; the median is reported"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p, dtype=False)
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows, config = quality(args, device)
    rows += step_time_rows(args, device)
    print_table(rows)
    config.update(timing_repeats=args.timing_repeats, threads=torch.get_num_threads())
    write_report(args, "Quantization-aware training", device, args.preset, "gpt2", config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
