"""NEW: quantization-aware training (Jacob et al. 2018; torchao's QAT): prepare -> fine-tune -> convert.

prepare_qat swaps the blocks' Linear layers (the ones quantization.py quantizes) for QATLinear, whose
forward multiplies by its weight rounded to project 14's int8 or int4 grid and back ("fake quantisation"),
so the loss is the loss of the quantized model. Rounding has no useful gradient (zero almost everywhere), so
the backward pass is the straight-through estimator (Bengio et al. 2013): the gradient of a weight the grid
can represent (to within half a step) passes unchanged, that of a weight beyond the grid's ends, which
clamping pins to the end, is zero. The latent weights stay float; convert_qat rounds them once with project
14's round-to-nearest, which gives exactly the weights the fine-tuning computed with.

Scales are not learned: each forward computes them from the current weights, as quantize_int4/quantize_int8
do (absmax per channel for int8; min-max per group, with a zero point, for int4), and treats them as
constants in the backward pass. FakeQuantize also takes fixed scales, given from outside.
"""

import torch
import torch.nn.functional as F
from torch import nn

from cli import UserError
from model import GPT, GPTConfig
from quantization import (
    DEFAULT_GROUP_SIZE,
    INT4_MAX,
    INT8_MAX,
    block_linears,
    check_format,
    int4_params,
    int8_params,
    quantize_model,
)

QAT_FORMATS = {"int4": 4, "int8": 8}


def weight_qparams(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> scales and zero points shaped (N, G, 1), as project 14 computes them (int8: G = 1, z = 0)."""
    N, K = w.shape
    if bits == 8:
        scale = int8_params(w.float())  # (N,)
        return scale.view(N, 1, 1), torch.zeros(N, 1, 1, device=w.device)
    scale, zero = int4_params(w.float().view(N, K // group_size, group_size))  # (N, G) each
    return scale[..., None], zero[..., None]


class FakeQuantize(torch.autograd.Function):
    """w -> dequantize(quantize(w)) on the grid of `scale` and `zero` (N, G, 1), bit for bit project 14's
    round trip; backward: the straight-through estimator, masked to the weights inside the grid's range."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        N, K = w.shape
        lo, hi = (0, INT4_MAX) if bits == 4 else (-INT8_MAX, INT8_MAX)
        groups = w.float().view(N, scale.size(1), -1)  # (N, G, g)
        q = (groups / scale).round() + zero  # the level each weight rounds to, before clamping
        inside = (q >= lo) & (q <= hi)  # i.e. w within half a step of the grid's ends
        ctx.save_for_backward(inside)
        return ((q.clamp(lo, hi) - zero) * scale).view(N, K).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside.view(grad.shape), None, None, None  # d round(x)/dx taken as 1 inside, 0 outside


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """w through the grid that its own current values define (scales recomputed, not learned)."""
    with torch.no_grad():
        scale, zero = weight_qparams(w, bits, group_size)
    return FakeQuantize.apply(w, scale, zero, bits)


class QATLinear(nn.Linear):
    """An nn.Linear that computes with its weight fake-quantised. Same parameters, same state_dict keys: a
    QAT checkpoint is an ordinary float checkpoint, and quantize_model (project 14) finds these layers."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the trained parameters themselves, not copies
        self.bits, self.group_size = bits, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits, self.group_size), self.bias)


def prepare_qat(model: nn.Module, qat: str | None, group_size: int | None) -> nn.Module:
    """Swap every Linear of the blocks for a QATLinear in the format `qat` ("int4" in groups of group_size,
    or "int8" per channel), in place; None leaves the model as it is. ValueError when the format cannot hold
    the layers."""
    if qat is None:
        return model
    bits = QAT_FORMATS[qat]
    group_size = group_size if bits == 4 else None
    check_format(model, bits, group_size)
    for name, linear in block_linears(model):
        parent, _, attr = name.rpartition(".")
        setattr(
            model.blocks.get_submodule(parent) if parent else model.blocks,
            attr,
            QATLinear(linear, bits, group_size),
        )
    return model


def qat_spec(qat: str | None, group_size: int | None, config: GPTConfig) -> dict:
    """What train.py --qat records, {"qat": format, "group_size": g}, checked against the model's widths
    before any work; {} without --qat."""
    if qat != "int4" and group_size:
        raise UserError("--group-size applies to --qat int4; int8 has one scale per output channel")
    if qat is None:
        return {}
    group_size = (group_size or DEFAULT_GROUP_SIZE) if qat == "int4" else None
    try:
        with torch.device("meta"):  # the layers' shapes only, nothing allocated
            prepare_qat(GPT(config), qat, group_size)
    except ValueError as e:
        raise UserError(f"--group-size: {e}") from e
    return {"qat": qat, "group_size": group_size}


def convert_qat(model: nn.Module) -> nn.Module:
    """The export: project 14's round-to-nearest in the format the layers were trained for, which yields the
    same weights that their fake-quantised forward used. In place."""
    layer = next(m for _, m in block_linears(model) if isinstance(m, QATLinear))
    method = "int4" if layer.bits == 4 else "int8"
    return quantize_model(model, method, group_size=layer.group_size)
