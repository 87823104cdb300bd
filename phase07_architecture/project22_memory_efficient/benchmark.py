"""Activation memory against step time, side by side, in one run, at one model shape (GPT-2 124M's by default)
and one batch of random tokens:

- forward and backward passes with every way of keeping less for backward (memory.py): nothing recomputed
  (the baseline), full and selective checkpointing per block, saved tensors offloaded to the CPU,
  written-out and chunked attention. For each: the bytes backward keeps (SavedBytes, every device), the
  pass's peak memory (GPUs), its time (the variants take turns), and the largest gradient difference from
  the baseline in fp32;
- the longest context that trains within a fixed budget of saved bytes, doubling the context until the budget
  is passed, for the written-out and the chunked attention: the whole model, and the attention op alone.

python benchmark.py                         # GPT-2 124M's shape: batch 8 x 1024 on a GPU, 1 x 256 on a CPU
python benchmark.py --preset tiny --repeats 1   # seconds
"""

import contextlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import ArgumentParser, add_device_args, exits_cleanly, pick_device, positive_int
from memory import OverBudget, SavedBytes, chunked_attention, offload
from model import GPT, GPTConfig
from precision import PRECISIONS, auto_precision, set_matmul_precision
from results import add_output_args, compare, print_table, row, time_it, write_report
from train import DEFAULT_PRESET, PRESETS

# name -> (model fields, offload); the first is the baseline every ratio is against
VARIANTS = {
    "none": ({}, False),
    "full": ({"recompute": "full"}, False),
    "selective attn": ({"recompute": "attn"}, False),
    "selective mlp": ({"recompute": "mlp"}, False),
    "offload": ({}, True),
    "explicit attention": ({"attention": "explicit"}, False),
    "chunked attention": ({"attention": "chunked"}, False),
}
FIRST_CONTEXT = 256  # the context searches double from here


def measure_saved(model: GPT, x: torch.Tensor, p, cpu: bool = False) -> tuple[int, int]:
    """(bytes the whole forward pass keeps for backward, the part the blocks keep), counted by SavedBytes.
    The second counter is open from the first block's input to the last block's output. With `cpu`, the
    saved tensors are offloaded as they are made, and what stays on x's device is counted (on a CPU, all)."""
    state = [*model.parameters(), *model.buffers()]
    where = x.device if cpu else None
    blocks = SavedBytes(exclude=state, offload_from=where)
    first = model.blocks[0].register_forward_pre_hook(lambda *_: blocks.__enter__() and None)  # None: x as is
    last = model.blocks[-1].register_forward_hook(lambda *_: blocks.__exit__(None, None, None))
    try:
        with SavedBytes(exclude=state, offload_from=where) as total, p.autocast(x.device):
            model(x, x)  # the graph, and what it keeps, goes when the loss does: here
    finally:
        first.remove()
        last.remove()
    return total.bytes, blocks.bytes


def gradients(model: GPT, x: torch.Tensor, cpu: bool) -> torch.Tensor:
    """Every parameter's gradient after one forward and backward, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    with offload(x.device) if cpu else contextlib.nullcontext():
        _, loss = model(x, x)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def train_pass(model: GPT, x: torch.Tensor, cpu: bool, p) -> Callable[[], None]:
    """A forward and backward pass of the model on x (what checkpointing changes; the optimizer step, the
    same for every variant, is left out), its gradients freed after it."""

    def run() -> None:
        with p.autocast(x.device), offload(x.device) if cpu else contextlib.nullcontext():
            _, loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def interleaved(passes: dict[str, Callable[[], None]], device, warmup: int, repeats: int) -> dict:
    """name -> (median seconds, peak MiB above what was allocated before, or None off the GPU). The variants
    take turns, one pass each per round: a machine whose load drifts (other processes) slows all alike."""
    for run in passes.values():
        for _ in range(warmup):
            run()
    times, peaks = {n: [] for n in passes}, dict.fromkeys(passes)
    for _ in range(repeats):
        for name, run in passes.items():
            before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0
            seconds, peak = time_it(run, device, 0, 1)
            times[name].append(seconds)
            if peak is not None:  # the pass's own activations and gradients: the other models' weights not
                peaks[name] = max(peaks[name] or 0.0, peak - before)
    return {n: (statistics.median(times[n]), peaks[n]) for n in passes}


def run_variant(mc: GPTConfig, fields: dict, cpu: bool, x, p, reference) -> dict:
    torch.manual_seed(0)  # every variant starts from the same weights
    model = GPT(replace(mc, **fields)).to(x.device)
    # Offloaded, counted too: on a GPU none stays on the device, on a CPU all do (nothing moves)
    saved, blocks = measure_saved(model, x, p, cpu)
    set_matmul_precision(PRECISIONS["fp32"])  # gradients compared in strict fp32
    grads = gradients(model, x, cpu)
    model.zero_grad(set_to_none=True)
    diff = None if reference is None else (grads - reference).abs().max().item()
    set_matmul_precision(p)
    return {
        "saved": saved,
        "blocks": blocks,
        "grads": grads,
        "diff": diff,
        "pass": train_pass(model, x, cpu, p),
    }


def longest_context(fits, lengths: list[int]) -> tuple[int | None, dict[int, int]]:
    """Run fits(T) -> saved bytes for each T, doubling, until one passes the budget (fits returns None).
    Returns (the longest T that fitted, bytes by T measured)."""
    best, measured = None, {}
    for T in lengths:
        saved = fits(T)
        if saved is None:
            break
        measured[T], best = saved, T
    return best, measured


def model_fits(mc: GPTConfig, attention: str, budget: int, device) -> Callable[[int], int | None]:
    """T -> bytes a training step of the model at context T keeps for backward, or None past the budget.
    The step is run: forward, counted, then backward; a forward that passes the budget stops there."""

    def fits(T: int) -> int | None:
        torch.manual_seed(0)
        model = GPT(replace(mc, block_size=T, attention=attention)).to(device)
        x = torch.randint(0, mc.vocab_size, (1, T), device=device)
        try:
            with SavedBytes(exclude=[*model.parameters(), *model.buffers()], budget=budget) as counter:
                _, loss = model(x, x)
        except OverBudget:
            return None
        loss.backward()
        return counter.bytes

    return fits


def op_fits(mc: GPTConfig, attention: str, budget: int, device) -> Callable[[int], int | None]:
    """The same for the attention op alone: q, k, v of (1, nh, T, hs) that require grad, one backward."""
    hs = mc.n_embd // mc.n_head

    def fits(T: int) -> int | None:
        q, k, v = (torch.randn(1, mc.n_head, T, hs, device=device, requires_grad=True) for _ in range(3))
        mask = torch.ones(T, T, dtype=torch.bool, device=device).triu(1) if attention == "explicit" else None
        try:
            with SavedBytes(exclude=[mask] if mask is not None else [], budget=budget) as counter:
                if attention == "chunked":
                    y = chunked_attention(q, k, v)
                else:  # written out, as model.py's explicit attention (whose mask is a buffer)
                    scores = (q @ k.transpose(-2, -1)) / hs**0.5
                    y = F.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
        except OverBudget:
            return None
        y.sum().backward()
        return counter.bytes

    return fits


def parse_args(argv):
    p = ArgumentParser(description="Benchmark checkpointing, offloading and chunked attention against none.")
    p.add_argument("--preset", choices=PRESETS, default=None, help=f"model shape (default: {DEFAULT_PRESET})")
    p.add_argument("--layers", type=positive_int, default=None, help="blocks (default: the preset's)")
    p.add_argument("--context", type=positive_int, default=None, help="tokens (default: 1024 GPU, 256 CPU)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences (default: 8 GPU, 1 CPU)")
    p.add_argument("--warmup", type=positive_int, default=1, help="untimed passes before the timed ones")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed passes each; the median counts")
    p.add_argument(
        "--budget-mib",
        type=positive_int,
        default=None,
        help="saved-bytes budget of the whole-model context search (default: 8192 GPU, 2048 CPU)",
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=None,
        help="longest context the whole-model search tries, from 256 (default: 16384 GPU, 8192 CPU)",
    )
    p.add_argument(
        "--op-budget-mib", type=positive_int, default=64, help="saved-bytes budget of the attention-op search"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    add_device_args(p, dtype=False)
    add_output_args(p)
    args = p.parse_args(argv)
    if args.max_context is not None and args.max_context < FIRST_CONTEXT:
        p.error(f"--max-context must be at least {FIRST_CONTEXT}, where the context search starts")
    return args


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or DEFAULT_PRESET
    mc = PRESETS[preset][0]
    T = args.context or (1024 if gpu else 256)
    mc = replace(mc, n_layer=args.layers or mc.n_layer, block_size=max(T, mc.block_size), dropout=0.0)
    batch = args.batch_size or (8 if gpu else 1)
    p = PRECISIONS[auto_precision(device)]  # bf16 autocast on GPUs that have it, fp32 elsewhere
    x = torch.randint(0, mc.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0)).to(device)
    print(f"{preset} preset, {mc.n_layer} layers, batch {batch} x {T} tokens, {p.name}", file=sys.stderr)

    runs, reference = {}, None
    for name, (fields, cpu) in tqdm(VARIANTS.items(), desc="variants"):
        runs[name] = run_variant(mc, fields, cpu, x, p, reference)
        grads = runs[name].pop("grads")  # a model's worth of memory: only the baseline's stays, as reference
        reference = grads if reference is None else reference
    del reference
    passes = {n: r.pop("pass") for n, r in runs.items()}
    print(f"timing, {args.repeats} rounds of {len(passes)} passes", file=sys.stderr)
    timed = interleaved(passes, device, args.warmup, args.repeats)
    MiB = 2**20
    rows = [
        *compare("saved_mib", "MiB", {n: r["saved"] / MiB for n, r in runs.items()}),
        *compare("blocks_saved_mib", "MiB", {n: r["blocks"] / MiB for n, r in runs.items()}),
        *compare("pass_ms", "ms", {n: 1e3 * s for n, (s, _) in timed.items()}),
        *compare("pass_peak_mib", "MiB", {n: peak for n, (_, peak) in timed.items()}),
        *[
            row("grad_max_abs_diff_fp32", n, r["diff"], "abs")
            for n, r in runs.items()
            if r["diff"] is not None
        ],
    ]

    del passes  # and with them the variants' models, before the long contexts need the memory
    budget = (args.budget_mib or (8192 if gpu else 2048)) * MiB
    top = args.max_context or (16384 if gpu else 8192)
    lengths = [FIRST_CONTEXT * 2**i for i in range(20) if FIRST_CONTEXT * 2**i <= top]
    op_lengths = [FIRST_CONTEXT * 2**i for i in range(20) if FIRST_CONTEXT * 2**i <= max(top, 16384)]
    for scope, make, b, ls in (
        ("model", model_fits, budget, lengths),
        ("attention_op", op_fits, args.op_budget_mib * MiB, op_lengths),
    ):
        best = {}
        for attention in ("explicit", "chunked"):
            best[attention], measured = longest_context(make(mc, attention, b, device), ls)
            for n, saved in measured.items():
                rows.append(row(f"{scope}_saved_mib_at_{n}", attention, saved / MiB, "MiB"))
            print(f"{scope}, {attention}: fits up to {best[attention]} tokens", file=sys.stderr)
        rows += compare(f"{scope}_longest_context", "tokens", best)
        for r in rows[-2:]:  # a search that ran out of lengths before the budget found a lower bound only
            if r["value"] == ls[-1]:
                r["note"] = f"at least: the search stopped at {ls[-1]} tokens within the budget"
            elif r["value"] is None:  # measured: the first context already passed the budget
                r["note"] = f"none: {ls[0]} tokens already pass the budget"
    print_table(rows)
    config = {**vars(mc), "batch_size": batch, "context": T, "precision": p.name, "budget_mib": budget / MiB}
    config.update(op_budget_mib=args.op_budget_mib, max_context=top, threads=torch.get_num_threads())
    write_report(args, "Memory-efficient training", device, preset, DEFAULT_PRESET, config, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
