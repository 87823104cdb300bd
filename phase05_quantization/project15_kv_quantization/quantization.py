"""Post-training weight quantization, from scratch: the number formats, the layers that compute with them, and
the two ways to choose the integers.

- int8, per output channel, symmetric (absmax): w ~ q * s, q in [-127, 127], one scale per row of W.
- int4, group-wise, asymmetric (min-max with an integer zero point): w ~ (q - z) * s, q in [0, 15], one scale
  and one zero point per group of `group_size` consecutive input features of a row; two q's per byte.
- Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al. 2022) rounds one input column
  at a time and moves each column's rounding error onto the columns not yet rounded, weighted by the inverse
  Hessian of the layer's reconstruction error on calibration activations.
- LLM.int8() (Dettmers et al. 2022): int8 weights and int8 activations, except the input features where
  some activation reaches the outlier threshold (6.0), which are multiplied in floating point.

Only the Linear layers inside the transformer blocks are quantized; the embedding, tied to lm_head, and the
LayerNorms stay in floating point (as in GPTQ and LLM.int8(); see the README). Shapes in comments:
N = out_features, K = in_features, M = tokens, G = K // group_size groups per row.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton runs on Linux; elsewhere Int4Linear always dequantises, then multiplies
    from kernels import int4_matmul
except ImportError:
    int4_matmul = None

METHODS = ("int8", "int4", "gptq", "int8-outlier")
BITS = {"int8": 8, "int4": 4, "int8-outlier": 8}  # gptq: 4 or 8, its formats are RTN's
INT8_MAX, INT4_MAX = 127, 15
DEFAULT_GROUP_SIZE = 128  # GPTQ's and gpt-fast's int4 default


# --- number formats -------------------------------------------------------------------------------------


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as it is stored (fp16), rounded up, never down: then no weight lands outside the integer
    range, and the error of every weight stays within half a step of the stored scale."""
    scale = scale.clamp(min=1e-12)  # an all-zero row or group still gets a positive step
    s16 = scale.to(torch.float16)
    next_up = (s16.view(torch.int16) + 1).view(torch.float16)  # positive floats: the next bit pattern
    s16 = torch.where(s16.float() < scale, next_up, s16)
    return s16.float()


def int8_params(w: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (...,) scales: the largest |w| of each row maps to 127."""
    return _fp16_scale(w.abs().amax(dim=-1) / INT8_MAX)


def int4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., g) -> scales (...,) and integer zero points (...,): [min, max] of each group, widened to hold
    0, is spread over the 16 levels, and z is the level that stands for 0.0."""
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = _fp16_scale((hi - lo) / INT4_MAX)
    zero = (-lo / scale).round().clamp(0, INT4_MAX)
    return scale, zero


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8 and scales (N,) fp16."""
    scale = int8_params(w.float())
    q = (w.float() / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale.half()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]  # (N, K)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) uint8 in [0, 15], scales (N, G) fp16, zero points (N, G) uint8."""
    N, K = w.shape
    groups = w.float().view(N, K // group_size, group_size)  # (N, G, g)
    scale, zero = int4_params(groups)  # (N, G) each
    q = ((groups / scale[..., None]).round() + zero[..., None]).clamp(0, INT4_MAX)
    return q.view(N, K).to(torch.uint8), scale.half(), zero.to(torch.uint8)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Back to (N, K) float: each group's (q - z) * s."""
    N, K = q.shape
    groups = q.view(N, scale.size(1), -1).float()  # (N, G, g)
    return ((groups - zero.float()[..., None]) * scale.float()[..., None]).view(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) bytes: input feature 2j in the low nibble, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) values in [0, 15]: the exact inverse of pack_int4."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.size(0), -1)


# --- the layers ------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """Weight-only int8 (gpt-fast's WeightOnlyInt8Linear): y = (x @ q^T) * s + b. The scale belongs to an
    output channel, so it factors out of the matmul and multiplies the output instead of every weight. Not in
    fp16: x @ q^T, with q up to 127, can pass fp16's largest number (65,504) before the scale shrinks it, so
    there the weights are scaled first."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) fp16
        self.register_buffer("bias", bias)  # (N,) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            y = F.linear(x, self.weight.to(x.dtype) * self.scales[:, None].to(x.dtype))
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """Weight-only int4, group-wise (gpt-fast's WeightOnlyInt4Linear): on a GPU, a decode step's few rows go
    through the fused Triton kernel (kernels.py), which reads the packed bytes and dequantises in registers;
    elsewhere, and for long prompts, the weight is dequantised and multiplied by PyTorch."""

    def __init__(
        self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None
    ):
        super().__init__()
        self.register_buffer("weight", packed)  # (N, K/2) uint8, two 4-bit values a byte
        self.register_buffer("scales", scales)  # (N, G) fp16
        self.register_buffer("zeros", zeros)  # (N, G) uint8 in [0, 15]
        self.register_buffer("bias", bias)  # (N,) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_runs_on(x):
            y = int4_matmul(x.reshape(-1, x.size(-1)), self.weight, self.scales, self.zeros)  # (M, N)
            y = y.view(*x.shape[:-1], -1)
        else:
            w = dequantize_int4(unpack_int4(self.weight), self.scales, self.zeros)  # (N, K)
            y = F.linear(x, w.to(x.dtype))
        return y if self.bias is None else y + self.bias


def kernel_runs_on(x: torch.Tensor) -> bool:
    """The fused kernel is a matrix-vector product: for decode steps (a few rows) on a GPU."""
    return int4_matmul is not None and x.is_cuda and x.numel() // x.size(-1) <= 16


class Int8OutlierLinear(Int8Linear):
    """LLM.int8()'s mixed-precision decomposition. Activations are quantized too, each token's row to int8
    by its own absmax (vector-wise), and multiplied in integers; but an input feature with any activation of
    magnitude >= threshold is taken out first and multiplied in floating point: a single 60.0 in a row would
    otherwise set that row's scale and round every ordinary activation beside it to 0 or +-1."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, threshold: float):
        super().__init__(q, scales, bias)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1)).float()  # (M, K)
        outlier = (x2.abs() >= self.threshold).any(dim=0)  # (K,): features with an outlier in some token
        regular = x2.masked_fill(outlier, 0.0)
        x_scale = regular.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / INT8_MAX  # (M, 1)
        xq = (regular / x_scale).round().to(torch.int8)
        acc = int8_matmul(xq, self.weight.t())  # (M, N) int32: int8 x int8, summed in integers
        y = acc.float() * x_scale * self.scales.float()  # both scales, outer product
        w_out = dequantize_int8(self.weight[:, outlier], self.scales)  # (N, #outliers)
        y = y + x2[:, outlier] @ w_out.t()  # the outlier features, in floating point
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32. torch._int_mm on CPUs; CUDA's wants more than 16 rows, so
    there the integers are multiplied in fp32 (exact while a sum stays below 2**24, i.e. K <= 1,040)."""
    if a.is_cuda:
        return (a.float() @ b.float()).round().to(torch.int32)
    return torch._int_mm(a, b)


# --- GPTQ ------------------------------------------------------------------------------------------------


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    lazy_batch: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, ...]:
    """GPTQ (Frantar et al. 2022, Algorithm 1) for one layer: minimise ||W X - Q X||^2 over the calibration
    inputs X, whose Hessian is H = 2 X X^T (K, K). Returns the formats' tensors: (q, scales) for 8 bits,
    per channel, and (q, scales, zeros) for 4 bits, in groups of group_size (None: one group per row).
    lazy_batch: the columns rounded one by one before the columns after them are updated at once (B)."""
    W = weight.detach().float().clone()  # (N, K), updated as columns are rounded
    N, K = W.shape
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(K, device=H.device)  # dampening keeps the inverse stable
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    g = group_size if bits == 4 and group_size else K  # 8 bits: per channel, one group the whole row
    batch = g * max(1, lazy_batch // g) if g < K else lazy_batch  # a group never straddles two batches
    lo, hi = (0, INT4_MAX) if bits == 4 else (-INT8_MAX, INT8_MAX)
    q, scales, zeros = torch.zeros_like(W), [], []
    for i1 in range(0, K, batch):  # lazy batch updates: the columns after a batch are updated once per batch
        i2 = min(i1 + batch, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % g == 0:  # a new group: its scale from the weights as updated so far
                scale, zero = scale_and_zero(W1[:, i : i + g] if g < K else W, bits)  # (N,) each
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]  # (N,)
            q[:, i1 + i] = qi = ((w / scale).round() + zero).clamp(lo, hi)  # this column, to nearest
            err = (w - (qi - zero) * scale) / Hinv1[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # onto the batch's later columns at once
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # and, once per batch, onto every column after the batch
    scales, zeros = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)  # (N, G)
    if bits == 4:
        return q.to(torch.uint8), scales.half(), zeros.to(torch.uint8)
    return q.to(torch.int8), scales[:, 0].half()


def scale_and_zero(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, g) -> each row's scale and zero point in a format (int8's zero point is always 0)."""
    if bits == 4:
        return int4_params(w)
    scale = int8_params(w)
    return scale, torch.zeros_like(scale)


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


# --- the whole model -------------------------------------------------------------------------------------


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers of the transformer blocks, by name: what gets quantized."""
    return [(n, m) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


def check_format(model: nn.Module, bits: int, group_size: int | None) -> None:
    """ValueError when the format cannot hold these layers."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 8:
        return
    if not group_size or group_size % 2:
        raise ValueError(
            f"an int4 group size must be a positive even number (two values a byte), got {group_size}"
        )
    for name, linear in block_linears(model):
        if linear.in_features % group_size:
            raise ValueError(
                f"group size {group_size} does not divide the {linear.in_features} input features of "
                f"blocks.{name}"
            )


def quantized_layer(q_tensors: tuple, bias: torch.Tensor | None, threshold: float | None) -> nn.Module:
    """The layer for a format's tensors: (q, scales) -> int8, (q, scales, zeros) -> packed int4."""
    bias = None if bias is None else bias.detach().clone()
    if len(q_tensors) == 3:
        q, scales, zeros = q_tensors
        return Int4Linear(pack_int4(q), scales, zeros, bias)
    if threshold is not None:
        return Int8OutlierLinear(*q_tensors, bias, threshold)
    return Int8Linear(*q_tensors, bias)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int | None = DEFAULT_GROUP_SIZE,
    bits: int | None = None,
    calibration: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> nn.Module:
    """Swap every Linear of the blocks for its quantized layer, in place. method: int8 and int4 round to
    nearest (int4 in groups of group_size), int8-outlier is LLM.int8(), gptq needs calibration token ids
    (B, T) and bits (4, group-wise, or 8, per channel). 8-bit formats ignore group_size."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    bits = bits or BITS.get(method, 4)
    if method in BITS and bits != BITS[method]:
        raise ValueError(f"{method} is {BITS[method]}-bit; bits {bits} applies to gptq")
    group_size = group_size if bits == 4 else None
    check_format(model, bits, group_size)
    threshold = threshold if method == "int8-outlier" else None
    if method == "gptq":
        if calibration is None:
            raise ValueError("gptq needs calibration data")
        return _gptq_model(model, bits, group_size, calibration)
    rtn = (lambda w: quantize_int4(w, group_size)) if bits == 4 else quantize_int8
    for name, linear in block_linears(model):
        _replace(model.blocks, name, quantized_layer(rtn(linear.weight), linear.bias, threshold))
    return model


def _gptq_model(model: nn.Module, bits: int, group_size: int | None, calibration: torch.Tensor) -> nn.Module:
    """Block by block, as GPTQ's reference code: the calibration activations run through the blocks already
    quantized, so each block's Hessians see the inputs it will get at inference time."""
    T = calibration.size(1)
    x = model.wte(calibration) + model.wpe(torch.arange(T, device=calibration.device))  # (B, T, C)
    for block in model.blocks:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        hessians = collect_hessians(block, x, names)
        modules = dict(block.named_modules())
        for name in names:
            linear = modules[name]
            q_tensors = gptq(linear.weight, hessians[name], bits, group_size)
            _replace(block, name, quantized_layer(q_tensors, linear.bias, None))
        x = torch.cat([block(chunk) for chunk in x.split(8)])  # the quantized block's outputs feed the next
    return model


def _replace(root: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, layer)
