"""A fused int4 dequantise-and-matmul for decoding, in Triton: y = x @ W^T where W is stored as packed 4-bit
integers with a scale and a zero point per group. Decoding one token reads every weight once and does two
FLOPs with it, so its speed is the bytes it reads: the kernel reads half a byte per weight (and a scale and
a zero point per group) and dequantises in registers, where dequantising first would write the float weight
to memory and read it back.

One program computes BLOCK_N outputs of one row of x, walking along K in steps of BLOCK_K bytes (2 BLOCK_K
input features), all inside one group. Tested under TRITON_INTERPRET=1 against dequantise-then-matmul.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_matmul_kernel(
    X, W, S, Z, Y,  # x (M, K); packed weight (N, K/2) uint8; scales (N, G); zero points (N, G) uint8
    N, K, GROUP,
    stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels
    n_ok = n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K // 2, BLOCK_K):  # k0 counts bytes: input features 2 k0 ... 2 (k0 + BLOCK_K) - 1
        kb = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) byte columns
        packed = tl.load(W + n[:, None] * stride_wn + kb[None, :], mask=n_ok[:, None], other=0)
        low = (packed & 0xF).to(tl.float32)  # input feature 2 kb
        high = (packed >> 4).to(tl.float32)  # input feature 2 kb + 1
        g = (2 * k0) // GROUP  # the block lies in one group: one scale and zero point per channel
        s = tl.load(S + n * stride_sn + g, mask=n_ok, other=0).to(tl.float32)  # (BLOCK_N,)
        z = tl.load(Z + n * stride_sn + g, mask=n_ok, other=0).to(tl.float32)
        x_even = tl.load(X + m * stride_xm + 2 * kb).to(tl.float32)  # (BLOCK_K,)
        x_odd = tl.load(X + m * stride_xm + 2 * kb + 1).to(tl.float32)
        dot = tl.sum(low * x_even[None, :] + high * x_odd[None, :], axis=1)  # sum_k q_k x_k, (BLOCK_N,)
        # sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k): the zero point costs one sum per block
        acc += s * (dot - z * tl.sum(x_even + x_odd, axis=0))
    tl.store(Y + m * stride_ym + n, acc.to(Y.dtype.element_ty), mask=n_ok)


def _block_n(M: int, N: int, device: torch.device) -> int:
    """The widest tile of outputs, 64 or 32, that still gives each of the GPU's SMs two programs, else 16. At
    batch 1 a (4096, 4096) product in tiles of 64 is 64 programs, half of an H100's 132 SMs, and a
    matrix-vector product runs only as fast as its loads in flight. A rule of thumb, not tuned."""
    if device.type != "cuda":
        return 64
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return next((b for b in (64, 32) if M * triton.cdiv(N, b) >= 2 * sms), 16)


@functools.cache
def _sm_count(index: int) -> int:  # asked once per GPU, not at every decode step's matmul
    return torch.cuda.get_device_properties(index).multi_processor_count


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, block_n: int = 0
) -> torch.Tensor:
    """x (M, K) @ dequantised(packed (N, K/2), scales (N, G), zeros (N, G))^T -> (M, N) in x's dtype."""
    M, K = x.shape
    N, G = scales.shape
    block_n = block_n or _block_n(M, N, x.device)  # 0: chosen for the device
    group = K // G
    if packed.shape != (N, K // 2) or zeros.shape != (N, G) or K % G or group % 2:
        shapes = [tuple(t.shape) for t in (x, packed, scales, zeros)]
        raise ValueError(f"int4_matmul: x, packed weight, scales and zero points do not match: {shapes}")
    block_k = min(64, (group // 2) & -(group // 2))  # the largest power of two dividing group/2, at most 64
    x, packed, scales, zeros = (t.contiguous() for t in (x, packed, scales, zeros))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (M, triton.cdiv(N, block_n))
    _int4_matmul_kernel[grid](
        x, packed, scales, zeros, y, N, K, group,
        x.stride(0), packed.stride(0), scales.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y
