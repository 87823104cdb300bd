"""The selective scan's forward as a Triton kernel; its backward recomputes through the chunked PyTorch scan.

One program per (batch row, block of BLOCK_D channels) walks the sequence from t = 0 to T - 1 with its
(BLOCK_D, N) slice of the state in registers: each step reads u, delta (BLOCK_D,) and B, C (N,) once and
writes y (BLOCK_D,) once, so the (B, T, Di, N) tensors that the PyTorch scans build never touch memory. That
is the paper's hardware-aware point (section 3.3): the state is N times larger than the input and output, so
keep it on chip. Time stays sequential inside a program; the parallelism is over batch x channels.

Under TRITON_INTERPRET=1 the same kernel runs on the CPU (the tests use that).

Shapes: B = batch, T = sequence length, Di = channels, N = d_state.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, h_ptr,
    T, Di, N,
    HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channel indices
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) state indices; BLOCK_N is N rounded up to a power of two
    dmask, nmask = d < Di, n < N
    mask = dmask[:, None] & nmask[None, :]  # (BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask, other=0.0)  # (BLOCK_D, BLOCK_N)
    Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0)
    state = b * Di * N + d[:, None] * N + n[None, :]  # offsets of this program's slice of (B, Di, N)
    if HAS_H0:
        h = tl.load(h0_ptr + state, mask=mask, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range(T):
        row = (b * T + t) * Di + d  # (BLOCK_D,) offsets into (B, T, Di)
        u = tl.load(u_ptr + row, mask=dmask, other=0.0)
        dt = tl.load(delta_ptr + row, mask=dmask, other=0.0)
        Bt = tl.load(B_ptr + (b * T + t) * N + n, mask=nmask, other=0.0)  # (BLOCK_N,)
        Ct = tl.load(C_ptr + (b * T + t) * N + n, mask=nmask, other=0.0)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]  # the recurrence, in registers
        y = tl.sum(h * Ct[None, :], axis=1) + Dskip * u  # (BLOCK_D,)
        tl.store(y_ptr + row, y, mask=dmask)
    tl.store(h_ptr + state, h, mask=mask)


def scan_forward(u, delta, A, B, C, D, h0=None, block_d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch: fp32 contiguous inputs as in mamba.selective_scan_ref; returns (y, last state)."""
    Bsz, T, Di = u.shape
    N = A.size(1)
    u, delta, A, B, C, D = (t.float().contiguous() for t in (u, delta, A, B, C, D))
    y = torch.empty_like(u)  # (B, T, Di)
    h = torch.empty(Bsz, Di, N, device=u.device, dtype=torch.float32)
    h0c = h0.float().contiguous() if h0 is not None else h  # a placeholder pointer when there is no h0
    grid = (Bsz, triton.cdiv(Di, block_d))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D, h0c, y, h, T, Di, N,
        HAS_H0=h0 is not None, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(N),
    )  # fmt: skip
    return y, h


class _TritonScan(torch.autograd.Function):
    """Forward: the kernel. Backward: `recompute` (mamba.py's chunked PyTorch scan) run again under autograd
    on the saved inputs: nothing of size (B, T, Di, N) is kept between forward and backward."""

    @staticmethod
    def forward(ctx, recompute, u, delta, A, B, C, D, h0):
        ctx.recompute = recompute
        ctx.save_for_backward(u, delta, A, B, C, D, h0)
        return scan_forward(u, delta, A, B, C, D, h0)

    @staticmethod
    def backward(ctx, dy, dh):
        inputs = ctx.saved_tensors
        with torch.enable_grad(), torch.autocast(dy.device.type, enabled=False):
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
            y, h = ctx.recompute(*leaves)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((y, h), wanted, (dy, dh), allow_unused=True))
        return (None, *(next(grads) if t is not None and t.requires_grad else None for t in leaves))


def triton_selective_scan(u, delta, A, B, C, D, h0, recompute) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba.selective_scan_ref's interface and result, computed by the Triton kernel; `recompute` is the
    PyTorch scan whose autograd gives the backward."""
    return _TritonScan.apply(recompute, u, delta, A, B, C, D, h0)
