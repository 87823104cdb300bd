"""Measure project 01's GPT: training step time and tokens/s, generation tokens/s, peak memory, parameter
count, and the validation loss of a trained checkpoint.

The baseline, side by side in the same run: the same model and weights with attention computed by PyTorch's
fused F.scaled_dot_product_attention instead of the written-out softmax(QK^T/sqrt(d))V of model.py.

    python benchmark.py                   # the shakespeare preset; writes results/<device>.json
    python benchmark.py --preset tiny     # seconds on a CPU
"""

import json
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import DEFAULT_DIR, checkpoint_exists, load_checkpoint
from cli import (
    PROJECT,
    ArgumentParser,
    UserError,
    add_device_args,
    autocast,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
    sync,
)
from data import CharTokenizer, read_text, train_val_split
from model import GPT, CausalSelfAttention
from train import DEFAULT_PRESET, PRESETS, TrainConfig, estimate_loss, make_optimizer, train_step

TITLE = "Minimal GPT"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class SDPAAttention(CausalSelfAttention):
    """The reference: identical parameters, but PyTorch's fused attention kernel does the math."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        dropout = self.attn_dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


def use_sdpa(model: GPT) -> GPT:
    """Switch every block to the reference attention in place (same weights, same state dict)."""
    for block in model.blocks:
        block.attn.__class__ = SDPAAttention
    return model


def time_it(fn, device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after warm-up, with the GPU synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_variant(model: GPT, tc: TrainConfig, args, device, dtype) -> dict:
    """Training step time, peak training memory and generation speed for one attention implementation."""
    T, V = model.config.block_size, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(V, (tc.batch_size, T), generator=gen).to(device)  # timing does not depend on the text
    y = torch.randint(V, (tc.batch_size, T), generator=gen).to(device)
    optimizer = make_optimizer(model, tc, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = time_it(lambda: train_step(model, optimizer, x, y, tc.lr, tc, device, dtype), device,
                     args.warmup, args.repeats)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    with autocast(device, dtype):
        gen_s = time_it(lambda: model.generate(prompt, args.gen_tokens), device, 1, max(1, args.repeats // 3))
    return {"train_step_ms": step_s * 1e3, "train_tok_per_s": tc.batch_size * T / step_s,
            "generate_tok_per_s": args.gen_tokens / gen_s, "peak_train_memory_mb": peak}  # fmt: skip


@torch.no_grad()
def max_logit_difference(a: GPT, b: GPT, device) -> float:
    """How far apart the two attention implementations' logits are on the same input (eval mode)."""
    a.eval(), b.eval()
    T, V = a.config.block_size, a.config.vocab_size
    idx = torch.randint(V, (2, T), generator=torch.Generator().manual_seed(1)).to(device)
    return (a(idx)[0].float() - b(idx)[0].float()).abs().max().item()


def checkpoint_val_loss(args, device, dtype) -> tuple[float | None, str]:
    """The validation loss of a trained checkpoint, estimated exactly as train.py does (same batches).
    Returns (loss, a note saying which checkpoint it was)."""
    if not checkpoint_exists(args.checkpoint):
        return None, f"not measured: no checkpoint at {args.checkpoint}"
    model, config = load_checkpoint(args.checkpoint, device)
    tokenizer = CharTokenizer(config["tokenizer"]["chars"])
    text = read_text(args.data if args.data else config["training"]["data"])
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    _, val_ids = train_val_split(ids, model.config.block_size)
    tc = TrainConfig(**config["training"]["train_config"])
    training = config["training"]
    note = f"checkpoint trained with the {training['preset']} preset for {training['step']} steps"
    return estimate_loss(model, {"val": val_ids}, tc, device, dtype)["val"], note


def device_info(device: torch.device) -> dict:
    try:
        import triton  # noqa: PLC0415 - optional: not installed on macOS or Windows

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple MPS"
    else:
        name = cpu_name()
    torch_version = torch.__version__.split("+")[0]
    return {"type": device.type, "name": name, "torch": torch_version, "triton": triton_version,
            "python": platform.python_version()}  # fmt: skip


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_rows(
    results: dict, params: int, logit_diff: float, val_loss: tuple[float | None, str]
) -> list[dict]:
    rows = [{"metric": "params", "variant": "model", "value": params, "unit": "params"}]
    units = {"train_step_ms": "ms", "train_tok_per_s": "tok/s", "generate_tok_per_s": "tok/s",
             "peak_train_memory_mb": "MiB"}  # fmt: skip
    base_name, base = next(iter(results.items()))
    for metric, unit in units.items():
        for variant, values in results.items():
            row = {"metric": metric, "variant": variant, "value": values[metric], "unit": unit}
            if values[metric] is None:
                row["note"] = "not measured on this device"
            elif variant != base_name and base[metric]:
                row.update(baseline=base_name, ratio=round(values[metric] / base[metric], 3))
            rows.append(row)
    rows.append({"metric": "max_abs_logit_diff", "variant": "torch sdpa", "value": logit_diff, "unit": "",
                 "baseline": base_name})  # fmt: skip
    loss, note = val_loss
    rows.append(
        {"metric": "val_loss", "variant": "checkpoint", "value": loss, "unit": "nats/char", "note": note}
    )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'metric':<22} {'variant':<20} {'value':>14} {'unit':<10} vs baseline")
    for r in rows:
        value = "not measured" if r["value"] is None else _fmt(r["value"])
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        print(f"{r['metric']:<22} {r['variant']:<20} {value:>14} {r['unit']:<10} {ratio}")


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def parse_args(argv):
    p = ArgumentParser(description="Benchmark project 01: written-out attention vs PyTorch's fused SDPA.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help="model size to time")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help="trained checkpoint for the val loss")
    p.add_argument(
        "--data", type=Path, default=None, help="text for the val loss (default: the checkpoint's)"
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON results")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed steps; the median is reported")
    p.add_argument("--gen-tokens", type=positive_int, default=200, help="tokens generated per timing")
    p.add_argument("--seed", type=int, default=1337)
    add_device_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():  # found now, not after minutes of measuring
        raise UserError(f"--out {args.out} is a file; it must be a directory for the results")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    mc, tc = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    explicit = GPT(mc).to(device)
    sdpa = use_sdpa(GPT(mc).to(device))
    sdpa.load_state_dict(explicit.state_dict())
    logit_diff = max_logit_difference(explicit, sdpa, device)  # before timing: training steps change weights

    print(f"benchmarking the {args.preset} preset on {device.type} ({str(dtype).removeprefix('torch.')})",
          file=sys.stderr)  # fmt: skip
    val_loss = checkpoint_val_loss(args, device, dtype)  # first: a bad checkpoint fails before the timing
    results = {"explicit attention": bench_variant(explicit, tc, args, device, dtype),
               "torch sdpa": bench_variant(sdpa, tc, args, device, dtype)}  # fmt: skip
    rows = build_rows(results, explicit.num_params(), logit_diff, val_loss)
    print_table(rows)

    info = device_info(device)
    config = {**vars(mc), **vars(tc), "dtype": str(dtype).removeprefix("torch.")}
    report = {"schema": 1, "project": PROJECT, "title": TITLE,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": info,
              "preset": args.preset, "config": config, "rows": rows}  # fmt: skip
    name = slug(info["name"]) + ("" if args.preset == DEFAULT_PRESET else f"-{args.preset}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
