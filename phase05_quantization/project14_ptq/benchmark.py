"""Post-training quantization side by side. Quality on a trained checkpoint: held-out perplexity, checkpoint
size and weight memory of fp32, bf16, int8 RTN, int4 RTN and GPTQ in groups of 32, 64 and 128, int8 GPTQ, and
LLM.int8() with and without its outlier decomposition. By default the checkpoint is project 01's character
model, whose weights are nearly all in the blocks that quantization touches (project 03's CPU model is 89%
embedding, which stays in floating point). Speed at GPT-2 124M's shape (random weights: a decode step costs
the same whatever the values): decode tokens/s at batch 1 per format, and on a GPU the Triton int4 kernel
against the 16-bit matmul.

Off CUDA only Triton's interpreter runs the kernel: the benchmark reports its error against dequantise-then-
matmul, and the kernel's speed is "not measured".

python benchmark.py --threads 1                      # project 01's checkpoint; speed at 124M's shape
python benchmark.py --checkpoint data/models/mine --data input.txt --preset cpu
"""

import copy
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton is imported: on a CPU its kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safetensors.torch import save_model  # noqa: E402
from tqdm import tqdm  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from checkpoint import checkpoint_exists  # noqa: E402
from cli import (  # noqa: E402
    DTYPES,
    ArgumentParser,
    UserError,
    add_device_args,
    check_dtype,
    exits_cleanly,
    pick_device,
    positive_int,
)
from config import PRESETS  # noqa: E402
from kernels import int4_matmul  # noqa: E402
from loader import (  # noqa: E402
    PROJECT01,
    calibration_batch,
    layers_bytes,
    load_float_model,
    tensor_bytes,
    token_split,
    training_data,
)
from model import GPT  # noqa: E402
from quantization import block_linears, dequantize_int4, pack_int4, quantize_int4, quantize_model  # noqa: E402
from results import add_output_args, compare, print_table, row, time_it, write_report  # noqa: E402


def headline(group_sizes: list[int]) -> int:
    """The int4 group size of the targets and the speed table: 128 (GPTQ's and gpt-fast's) if measured."""
    return 128 if 128 in group_sizes else max(group_sizes)


def variants(group_sizes: list[int]) -> dict[str, tuple | None]:
    """name -> (method, quantize_model's keywords); None = the float model."""
    out = {"fp32": None, "bf16": None, "int8 RTN": ("int8", {}), "int8 GPTQ": ("gptq", {"bits": 8})}
    for g in sorted(group_sizes, reverse=True):
        out[f"int4 RTN g{g}"] = ("int4", {"group_size": g})
        out[f"int4 GPTQ g{g}"] = ("gptq", {"group_size": g})
    out["LLM.int8() (outliers >= 6.0)"] = ("int8-outlier", {"threshold": 6.0})
    out["W8A8, no outlier decomposition"] = ("int8-outlier", {"threshold": math.inf})
    return out


def quantized_copy(model: GPT, name: str, spec, calibration: torch.Tensor | None) -> GPT:
    model = copy.deepcopy(model)
    if spec is None:
        return model.to(torch.bfloat16) if name == "bf16" else model
    method, kwargs = spec
    return quantize_model(model, method, calibration=calibration if method == "gptq" else None, **kwargs)


def windows(tokens: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every full T-token window of the held-out tokens, (n, T), and the next tokens, (n, T)."""
    n = (len(tokens) - 1) // T
    if n == 0:
        raise UserError(f"the held-out split has {len(tokens)} tokens, fewer than one {T}-token window")
    ids = torch.from_numpy(tokens[: n * T + 1].astype(np.int64))
    return ids[:-1].view(n, T), ids[1:].view(n, T)


@torch.no_grad()
def evaluate(model: GPT, reference: GPT | None, x, y, device, batch: int = 16) -> tuple[float, float]:
    """Held-out perplexity, exp(mean next-token loss), and the mean KL divergence from the reference
    model's next-token distribution to this one's (0 without a reference): a finer measure of what
    quantization changed, since it compares whole distributions, not just the right token's probability."""
    loss = kl = 0.0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        logp = F.log_softmax(model(xb.to(device))[0].float(), dim=-1).flatten(0, 1)  # (B*T, V)
        loss += F.nll_loss(logp, yb.flatten().to(device), reduction="sum").item()
        if reference is not None:
            ref = F.log_softmax(reference(xb.to(device))[0].float(), dim=-1).flatten(0, 1)
            kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
    return math.exp(loss / y.numel()), kl / y.numel()


@torch.no_grad()
def layer_inputs(model: GPT, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """What each named Linear of the blocks receives when the float model reads x: (tokens, K) each."""
    seen, modules = {}, dict(model.blocks.named_modules())

    def keep(name):
        def hook(module, args, _output):
            seen[name] = args[0].flatten(0, 1)

        return hook

    hooks = [modules[n].register_forward_hook(keep(n)) for n in names]
    model(x)
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def layer_error(model: GPT, reference: GPT, inputs: dict[str, torch.Tensor]) -> float:
    """GPTQ's objective on held-out inputs: ||layer(a) - W a|| / ||W a||, averaged over the layers."""
    errors = []
    for name, a in inputs.items():
        layer, exact = model.blocks.get_submodule(name), reference.blocks.get_submodule(name)
        want = exact(a)
        got = layer(a.to(model.wte.weight.dtype)).float()  # (bf16 layers take bf16 inputs)
        errors.append(((got - want).norm() / want.norm()).item())
    return sum(errors) / len(errors)


def file_bytes(model: GPT) -> int:
    """Size of model.safetensors as quantize.py writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def quality_rows(args, device) -> tuple[list[dict], dict]:
    """Perplexity, KL divergence, layer error, checkpoint size and weight memory of every variant of the
    trained checkpoint."""
    ckpt = args.checkpoint or PROJECT01
    if args.checkpoint is None and not checkpoint_exists(ckpt):
        print(f"note: no checkpoint in {ckpt} (project 01's): quality is not measured", file=sys.stderr)
        return [row("perplexity", "fp32", None, "", note=f"no trained checkpoint in {ckpt}")], {}
    model, meta = load_float_model(ckpt, None, device)
    check_group_sizes(model.config, args.group_sizes, f"the checkpoint's {model.config.n_embd}")
    data = training_data(args.data, meta)
    T = model.config.block_size
    chars = meta["tokenizer"].get("chars")  # project 01's character model
    x, y = windows(token_split(data, "val", chars)[: args.eval_tokens], T)
    train = token_split(data, "train", chars)
    calibration = calibration_batch(train, args.calibration_samples, T, 0).to(device)
    names = [n for n, _ in block_linears(model)]
    inputs = layer_inputs(model, x[:8].to(device), names)  # held-out, not calibration, activations
    outliers = sum(int((a.abs() >= 6.0).any(dim=0).sum()) for a in inputs.values())
    features = sum(a.size(1) for a in inputs.values())
    what = f"of the blocks' Linear layers' {features} input features, in {inputs[names[0]].size(0)} tokens"
    rows, ppl = [row("outlier_features", f"|x| >= 6.0 (LLM.int8()'s outliers) {what}", outliers, "")], {}
    for name, spec in tqdm(variants(args.group_sizes).items(), desc="quality", disable=None):
        q = quantized_copy(model, name, spec, calibration)
        ppl[name], kl = evaluate(q, None if name == "fp32" else model, x, y, device)
        rows += [
            row("perplexity", name, ppl[name], "", None if name == "fp32" else ("fp32", ppl["fp32"])),
            row("kl_vs_fp32", name, kl, "nats/token"),
            row("layer_rel_error", name, layer_error(q, model, inputs), ""),
            row("checkpoint_mib", name, file_bytes(q) / 2**20, "MiB"),
            row("weight_mib", name, tensor_bytes(q) / 2**20, "MiB"),
            row("linear_weight_mib", name, layers_bytes(q, names) / 2**20, "MiB"),
        ]
    calibrated = f"{args.calibration_samples} x {T} tokens of the train split, seed 0"
    config = dict(checkpoint=str(ckpt), data=str(data), held_out_tokens=y.numel(), calibration=calibrated)
    return rows + target_rows(rows, ppl, args.group_sizes), config


def target_rows(rows: list[dict], ppl: dict, group_sizes: list[int]) -> list[dict]:
    """The issue's targets, computed: GPTQ's share of RTN's gap, int8's perplexity cost, int4's size."""
    g = headline(group_sizes)
    rtn, gptq, base = ppl[f"int4 RTN g{g}"], ppl[f"int4 GPTQ g{g}"], ppl["fp32"]
    closed = 100 * (rtn - gptq) / (rtn - base) if rtn > base else None
    size = {r["variant"]: r["value"] for r in rows if r["metric"] == "linear_weight_mib"}
    return [
        row(
            "gptq_gap_closed_pct",
            f"int4 g{g}: GPTQ vs RTN",
            closed,
            "%",
            note=None if closed is not None else "RTN has no gap to close",
        ),  # fmt: skip
        row("ppl_increase_pct", "int8 RTN vs fp32", 100 * (ppl["int8 RTN"] / base - 1), "%"),
        row("linear_weights_smaller", f"int4 g{g} vs bf16", size["bf16"] / size[f"int4 RTN g{g}"], "x"),
    ]


def check_group_sizes(config, sizes: list[int], what: str) -> None:
    """Refuse, before measuring, a group size that does not divide the blocks' widths (n_embd, 4 n_embd)."""
    bad = [g for g in sizes if config.n_embd % g]
    if bad:
        raise UserError(f"--group-sizes: {bad} do not divide {what} features; give divisors of it")


FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def speed_formats(group_sizes: list[int], dtype) -> dict[str, tuple[tuple | None, torch.dtype]]:
    """name -> (quantize_model's method and keywords, or None for a float model; the activations' dtype).
    The quantized formats compute in `dtype`; the float model in that dtype comes first, the baseline."""
    floats = {name: d for name, d in FLOATS.items() if name != "fp16" or d == dtype}
    first = next(name for name, d in floats.items() if d == dtype)
    formats = {first: (None, dtype), **{name: (None, d) for name, d in floats.items() if name != first}}
    g = headline(group_sizes)
    formats["int8"] = (("int8", {}), dtype)
    formats[f"int4 g{g} (RTN or GPTQ)"] = (("int4", {"group_size": g}), dtype)
    formats["LLM.int8()"] = (("int8-outlier", {"threshold": 6.0}), dtype)
    return formats


@torch.no_grad()
def decode_steps(model: GPT, dtype, args, device):
    """A function that runs --decode-tokens decode steps at batch 1, after a 16-token prefill (done here)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (1, 16), generator=g).to(device)
    model.setup_cache(1, 16 + args.decode_tokens, dtype, device)
    next_id = model.prefill(prompt).argmax(-1, keepdim=True)  # (1, 1)

    @torch.no_grad()
    def steps():
        for i in range(args.decode_tokens):
            model.decode(next_id, 16 + i)

    steps()  # warm-up
    return steps


def speed_rows(args, device, dtype) -> list[dict]:
    """Decode tokens/s at batch 1 at the preset's shape, and each format's weights in memory. The formats
    take turns, one timed run each per round, so that every one of them meets the same machine: a shared
    CPU's load, a GPU's clocks."""
    mc, _ = PRESETS[args.preset]
    torch.manual_seed(0)
    base = GPT(mc).eval()
    names = [n for n, _ in block_linears(base)]
    runs, memory, linear = {}, {}, {}
    for name, (spec, act) in speed_formats(args.group_sizes, dtype).items():
        model = quantized_copy(base, name, spec, None).to(device=device, dtype=act)
        memory[f"{name}, {args.preset} shape"] = tensor_bytes(model) / 2**20  # before the KV cache exists
        linear[f"{name}, {args.preset} shape"] = layers_bytes(model, names) / 2**20
        runs[f"{name}, batch 1"] = decode_steps(model, act, args, device)
    del base
    times = {name: [] for name in runs}
    for _ in tqdm(range(args.repeats), desc="decode", disable=None):
        for name, run in runs.items():
            times[name].append(time_it(run, device, warmup=0, repeats=1)[0])
    speed = {name: args.decode_tokens / statistics.median(t) for name, t in times.items()}
    rows = compare("decode_tok_per_s", "tok/s", speed) + compare("weight_mib", "MiB", memory)
    return rows + compare("linear_weight_mib", "MiB", linear)


SHAPES_124M = ((2304, 768), (768, 768), (3072, 768), (768, 3072))  # (N, K): qkv, proj, fc, mlp proj
SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))  # q/k/v/o, gate/up, down


@torch.no_grad()
def kernel_rows(device) -> list[dict]:
    """The Triton kernel against dequantise-then-matmul: its error (small shapes, any device), and on a GPU
    its time against the 16-bit matmul at batch 1, at GPT-2 124M's four Linear shapes and at Llama-2-7B's
    three (gpt-fast's model), whose weights are large enough (32-86 MiB in fp16) for their bytes to set the
    time rather than the launch. do_bench times on the GPU (CUDA events) and empties the L2 cache before each
    call, which would otherwise keep a small weight from one call to the next."""
    g = torch.Generator().manual_seed(0)
    on = device if device.type == "cuda" else torch.device("cpu")
    w = torch.randn(96, 256, generator=g)
    q, s, z = quantize_int4(w, 64)
    x = torch.randn(2, 256, generator=g)
    ref = x @ dequantize_int4(q, s, z).t()
    err = (int4_matmul(x.to(on), pack_int4(q).to(on), s.to(on), z.to(on)).cpu() - ref).abs().max().item()
    rows = [row("int4_kernel_max_abs_diff", KERNEL_CHECK, err, "")]
    if device.type != "cuda":
        return rows + [row("int4_kernel_us", "triton int4 matmul", None, "us", note="needs a CUDA GPU")]
    for N, K in SHAPES_124M + SHAPES_7B:
        w = torch.randn(N, K, device=device, dtype=torch.float16)
        x = torch.randn(1, K, device=device, dtype=torch.float16)
        q, s, z = quantize_int4(w, 128)
        packed = pack_int4(q)
        fp16 = do_bench(lambda: F.linear(x, w), return_mode="median") * 1e3  # noqa: B023  (ms -> us)
        ours = do_bench(lambda: int4_matmul(x, packed, s, z), return_mode="median") * 1e3  # noqa: B023
        rows.append(row("int4_kernel_us", f"fp16 matmul, ({N}, {K})", fp16, "us"))
        rows.append(row("int4_kernel_us", f"triton int4, ({N}, {K})", ours, "us", ("fp16 matmul", fp16)))
    return rows


KERNEL_CHECK = "triton vs dequantise-then-matmul, x (2, 256), W (96, 256), g64, fp32"


def group_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2 or any(s % 2 for s in sizes):
        raise UserError(f"--group-sizes: a comma-separated list of even positive integers, got {text!r}")
    return sizes


def parse_args(argv):
    p = ArgumentParser(description="Benchmark int8/int4 RTN, GPTQ and LLM.int8() against fp32 and bf16.")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help=f"a trained checkpoint (default: {PROJECT01.name}'s)"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="held-out and calibration data (default: the checkpoint's)"
    )
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="held-out tokens (default: all)")
    p.add_argument("--group-sizes", default="32,64,128", help="int4 group sizes, comma-separated")
    p.add_argument(
        "--calibration-samples", type=positive_int, default=128, help="GPTQ's calibration sequences"
    )
    p.add_argument("--preset", choices=list(PRESETS), default="gpt2", help="the model shape for speed")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs; the median is reported")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p, dtype=False)
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="activations of the quantized models; auto: float16 on GPUs, float32 elsewhere",
    )
    add_output_args(p)
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.group_sizes = group_sizes(args.group_sizes)
    if args.threads:  # decoding one sequence gains little from more threads, and waits at every OpenMP
        torch.set_num_threads(args.threads)  # barrier when another process holds one of the cores
    device = pick_device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("off the GPU the kernel needs Triton's interpreter: run with TRITON_INTERPRET=1")
    auto = torch.float16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else DTYPES[args.dtype]
    check_dtype(dtype, device)
    mc, _ = PRESETS[args.preset]
    check_group_sizes(mc, [headline(args.group_sizes)], f"the {args.preset} preset's {mc.n_embd}")
    if 16 + args.decode_tokens > mc.block_size:
        raise UserError(
            f"--decode-tokens: 16 prompt tokens + {args.decode_tokens} exceed the context ({mc.block_size})"
        )
    rows, config = quality_rows(args, device)
    rows += speed_rows(args, device, dtype) + kernel_rows(device)
    print_table(rows)
    config.update(group_sizes=args.group_sizes, decode_tokens=args.decode_tokens, repeats=args.repeats,
                  dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())  # fmt: skip
    write_report(args, "Post-training quantization", device, args.preset, "gpt2", config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
