"""What pruning reuses of project 14's quantization: the Hessian of a layer's reconstruction error, collected
block by block from calibration activations (SparseGPT's inverse Hessian and Wanda's input norms both come
from it), and int4's group-wise format, which SparseGPT can round the weights it keeps to, in the same pass
that prunes them.

Shapes in comments: N = out_features, K = in_features, M = tokens.
"""

import torch
import torch.nn as nn

INT4_MAX = 15


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as it is stored (fp16), rounded up, never down: then no weight lands outside the integer
    range, and the error of every weight stays within half a step of the stored scale."""
    scale = scale.clamp(min=1e-12)  # an all-zero row or group still gets a positive step
    s16 = scale.to(torch.float16)
    next_up = (s16.view(torch.int16) + 1).view(torch.float16)  # positive floats: the next bit pattern
    s16 = torch.where(s16.float() < scale, next_up, s16)
    return s16.float()


def int4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., g) -> scales (...,) and integer zero points (...,): [min, max] of each group, widened to hold
    0, is spread over the 16 levels, and z is the level that stands for 0.0."""
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = _fp16_scale((hi - lo) / INT4_MAX)
    zero = (-lo / scale).round().clamp(0, INT4_MAX)
    return scale, zero


def collect_hessians(block: nn.Module, x: torch.Tensor, names: list[str], batch: int = 8) -> dict:
    """H = 2 X X^T / tokens for each named Linear of `block`, from its inputs while `block` runs on x
    (B, T, C): forward hooks see every layer's input without changing the model's code."""
    modules = dict(block.named_modules())
    hessians, counts = {}, dict.fromkeys(names, 0)

    def hook(name):
        def accumulate(module, inputs, _output):
            a = inputs[0].reshape(-1, inputs[0].size(-1)).float()  # (tokens, K)
            hessians[name] = hessians.get(name, 0) + 2 * a.t() @ a
            counts[name] += a.size(0)

        return accumulate

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        for chunk in x.split(batch):
            block(chunk)
    finally:
        for h in handles:
            h.remove()
    return {name: hessians[name] / counts[name] for name in names}


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers of the transformer blocks, by name: what gets quantized."""
    return [(n, m) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]
