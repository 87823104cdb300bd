"""FlashAttention-2 in Triton: the forward and the backward pass of exact softmax attention, tiled so that the
(T, T) score matrix never exists in memory (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023).

Forward: one program per (query block, batch*head). It keeps its BLOCK_M queries in registers and streams the
keys and values past them in blocks of BLOCK_N, with the online softmax: a running max m and running sum l per
row, and an output accumulator rescaled whenever the max grows. It writes O and the per-row log-sum-exp
LSE = m + log(l), which is all the backward needs to rebuild the attention weights.

Backward (FA2's partitioning): delta = rowsum(dO * O) first; then one program per key block accumulates its dK
and dV over the query blocks, and one program per query block accumulates its dQ over the key blocks. Each
recomputes P = exp(Q K^T * scale - LSE) tile by tile instead of reading a stored P. Splitting dQ from dK/dV
costs a second pass over the scores but needs no atomics, so the gradients are deterministic.

Causal masking aligns the queries to the end of the keys: query i sees keys j <= i + (T_k - T_q). With
T_q == T_k that is the usual mask; with T_q = 1 it is a KV-cache decode step (the query sees the whole cache).
Note that SDPA's is_causal aligns to the start instead; the two agree only when T_q == T_k.

Shapes in comments: B = batch, nh = heads, T_q / T_k = query / key lengths, hs = head size.
"""

import math

import torch
import triton
import triton.language as tl

# The kernels use exp2, the hardware's native exponential: exp(x) = exp2(x * log2(e)). Folding log2(e) into
# the softmax scale makes the scores base-2 logits at the cost of one multiply per score we already do.
LOG2E = 1.4426950408889634
HEAD_SIZES = (16, 32, 64, 128)  # tl.arange needs a power of two; tl.dot at least 16 on GPUs
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copy: a jit function reads only constexpr globals


@triton.jit
def _visible(rows, cols, T_k, offset, CAUSAL: tl.constexpr):
    """Which (query, key) pairs attend: the key exists and, if causal, is not in the query's future.
    rows and cols come already shaped to broadcast, so the mask can be (M, N) or (N, M)."""
    ok = cols < T_k
    if CAUSAL:
        ok = ok & (cols <= rows + offset)
    return ok


@triton.jit
def _key_blocks(start_m, T_q, T_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys for the query block at start_m: [0, n_full) need no mask, [n_full, n_end) do (the diagonal,
    and the ragged last block); keys from n_end on are in every row's future and are skipped."""
    if CAUSAL:
        # With offset = T_k - T_q, the block's first row sees keys up to start_m + offset, so whole key blocks
        # up to there are visible to every row; its last row sees up to start_m + BLOCK_M - 1 + offset.
        first_row_limit = start_m + T_k - T_q
        n_full = (first_row_limit + 1) // BLOCK_N * BLOCK_N
        n_end = tl.minimum(T_k, first_row_limit + BLOCK_M)
    else:
        n_full = T_k // BLOCK_N * BLOCK_N
        n_end = T_k
    return n_full, n_end


@triton.jit
def _query_blocks(start_n, T_q, T_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Queries for the key block at start_n (the mirror of _key_blocks): [m_start, m_full) straddle the
    diagonal and need the mask, [m_full, T_q) see every key of the block, earlier ones see none of it."""
    if CAUSAL:
        offset = T_k - T_q
        m_start = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M  # first query seeing key start_n
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(m_full, tl.cdiv(T_q, BLOCK_M) * BLOCK_M)
    else:
        m_start = 0
        m_full = 0
    return m_start, m_full


# Kernel signatures list many pointers, strides and sizes; they stay packed as in Triton's own code, one
# call per stage on two lines, instead of one argument per line.
# fmt: off
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, rows, offs_n, lo, hi, T_k, offset, qk_scale,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """The online softmax over key blocks [lo, hi); MASK only where some pair must be hidden."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < T_k, other=0.0)  # (BLOCK_N, hs)
        v = tl.load(v_ptrs + start_n * stride_kt, mask=cols[:, None] < T_k, other=0.0)  # (BLOCK_N, hs)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if MASK:
            s = tl.where(_visible(rows[:, None], cols[None, :], T_k, offset, CAUSAL), s, float("-inf"))
        # Every row sees at least one key of the first block it meets, so m_new is finite and exp2 of the
        # -inf entries gives exact zeros (no NaN from -inf - -inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old, smaller max
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), unnormalised weights <= 1
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # (BLOCK_M, hs)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, stride_qh, stride_qt, stride_kh, stride_kt, T_q, T_k, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)  # int64: bh * stride overflows int32 on big batches
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = bh * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]  # (BLOCK_M, hs); Out shares it
    k_ptrs = K + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, hs), block 0
    v_ptrs = V + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # V shares K's layout
    q = tl.load(Q + q_offs, mask=rows[:, None] < T_q, other=0.0)  # (BLOCK_M, hs), kept for the whole loop

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)  # running sum of exp2(s - m_i) * v
    n_full, n_end = _key_blocks(start_m, T_q, T_k, BLOCK_M, BLOCK_N, CAUSAL)
    # Two stages: the blocks every row sees whole run without a mask; only the diagonal and the ragged
    # last block pay for one. Blocks from n_end on (the causal future) are never loaded.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, rows, offs_n,
                               0, n_full, T_k, T_k - T_q, qk_scale, BLOCK_N, CAUSAL, MASK=False)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, rows, offs_n,
                               n_full, n_end, T_k, T_k - T_q, qk_scale, BLOCK_N, CAUSAL, MASK=True)

    o = acc / l_i[:, None]  # normalise once at the end, not in every step
    tl.store(Out + q_offs, o.to(Out.dtype.element_ty), mask=rows[:, None] < T_q)
    lse = (m_i + tl.log2(l_i)) / _LOG2E  # natural-log LSE per row, (BLOCK_M,)
    tl.store(LSE + bh * T_q + rows, lse, mask=rows < T_q)


@triton.jit
def _bwd_preprocess(Out, DO, DELTA, stride_h, stride_t, T_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax backward's per-row term, computed once."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(0).to(tl.int64)
    offs = bh * stride_h + rows[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(Out + offs, mask=rows[:, None] < T_q, other=0.0).to(tl.float32)  # (BLOCK_M, hs)
    do = tl.load(DO + offs, mask=rows[:, None] < T_q, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T_q + rows, tl.sum(o * do, 1), mask=rows < T_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, cols, offs_m, lo, hi, T_q, T_k,
                qk_scale, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """Accumulate one key block's dK, dV over query blocks [lo, hi), working on transposed tiles (keys
    along the rows) so that dV += P^T dO and dK += dS^T Q are plain dots."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m  # (BLOCK_M,)
        # Rows past T_q load as zeros: their dO = 0 and delta = 0 make both their dV and dK terms vanish.
        q = tl.load(q_ptrs + start_m * stride_qt, mask=rows[:, None] < T_q, other=0.0)  # (BLOCK_M, hs)
        do = tl.load(do_ptrs + start_m * stride_qt, mask=rows[:, None] < T_q, other=0.0)  # (BLOCK_M, hs)
        lse = tl.load(lse_ptr + rows, mask=rows < T_q, other=0.0) * _LOG2E  # (BLOCK_M,), base 2
        delta = tl.load(delta_ptr + rows, mask=rows < T_q, other=0.0)  # (BLOCK_M,)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])  # the forward's attention weights, recomputed
        if MASK:
            p_t = tl.where(_visible(rows[None, :], cols[:, None], T_k, T_k - T_q, CAUSAL), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)  # (BLOCK_N, hs)
        dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward: dS = P * (dP - delta)
        dk += tl.dot(ds_t.to(q.dtype), q)  # (BLOCK_N, hs)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, stride_qh, stride_qt, stride_kh, stride_kt, T_q, T_k,
                     sm_scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    start_n = tl.program_id(1) * BLOCK_N
    bh = tl.program_id(0).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_offs = bh * stride_kh + cols[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, hs)
    k = tl.load(K + kv_offs, mask=cols[:, None] < T_k, other=0.0)  # (BLOCK_N, hs), kept for the whole loop
    v = tl.load(V + kv_offs, mask=cols[:, None] < T_k, other=0.0)
    q_ptrs = Q + bh * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]  # (BLOCK_M, hs), block 0
    do_ptrs = DO + bh * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]  # dO shares Q's layout

    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    m_start, m_full = _query_blocks(start_n, T_q, T_k, BLOCK_M, BLOCK_N, CAUSAL)
    # Diagonal blocks masked, then the rest unmasked. Key columns past T_k need no mask here: each column's
    # dK, dV depends only on that column, and those columns are never stored.
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + bh * T_q, DELTA + bh * T_q, stride_qt, cols,
                         offs_m, m_start, m_full, T_q, T_k, qk_scale, BLOCK_M, CAUSAL, MASK=True)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + bh * T_q, DELTA + bh * T_q, stride_qt, cols,
                         offs_m, m_full, T_q, T_q, T_k, qk_scale, BLOCK_M, CAUSAL, MASK=False)

    dk *= sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=cols[:, None] < T_k)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < T_k)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, rows, offs_n, lo, hi, T_k, offset, qk_scale,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """Accumulate one query block's dQ over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < T_k, other=0.0)  # (BLOCK_N, hs)
        v = tl.load(v_ptrs + start_n * stride_kt, mask=cols[:, None] < T_k, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            p = tl.where(_visible(rows[:, None], cols[None, :], T_k, offset, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)  # (BLOCK_M, hs)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, stride_qh, stride_qt, stride_kh, stride_kt, T_q, T_k,
                   sm_scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = bh * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]  # (BLOCK_M, hs)
    q = tl.load(Q + q_offs, mask=rows[:, None] < T_q, other=0.0)
    do = tl.load(DO + q_offs, mask=rows[:, None] < T_q, other=0.0)
    lse = tl.load(LSE + bh * T_q + rows, mask=rows < T_q, other=0.0) * _LOG2E  # (BLOCK_M,), base 2
    delta = tl.load(DELTA + bh * T_q + rows, mask=rows < T_q, other=0.0)
    k_ptrs = K + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, hs), block 0
    v_ptrs = V + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]

    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    n_full, n_end = _key_blocks(start_m, T_q, T_k, BLOCK_M, BLOCK_N, CAUSAL)  # the forward's two stages
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, rows, offs_n,
                   0, n_full, T_k, T_k - T_q, qk_scale, BLOCK_N, CAUSAL, MASK=False)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, rows, offs_n,
                   n_full, n_end, T_k, T_k - T_q, qk_scale, BLOCK_N, CAUSAL, MASK=True)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None] < T_q)
# fmt: on


def _launch_config(q: torch.Tensor, backward: bool) -> dict:
    """Tile sizes and warps. On a GPU: FA2-like tiles, not yet tuned; elsewhere (the interpreter on the CPU)
    small tiles, so short test sequences still cross several block boundaries."""
    if not q.is_cuda:
        return dict(BLOCK_M=16, BLOCK_N=16)
    hs, T_q, wide = q.size(-1), q.size(-2), q.element_size() == 4  # fp32 tiles take twice the shared memory
    if backward:  # dK, dV (or dQ) and K, V (or Q, dO) all stay in registers: smaller tiles
        return dict(BLOCK_M=64, BLOCK_N=64 if hs <= 64 and not wide else 32, num_warps=4, num_stages=2)
    # A decode step has one query: a 128-row tile would be 127 rows of padding.
    block_m = 16 if T_q <= 16 else 64 if wide else 128
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4 if hs <= 64 else 8, num_stages=2 if wide else 3)


def _strides(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """Steps between heads and between positions of contiguous (B, nh, T, hs) tensors, from their shapes: the
    head step also steps over the batch, as the kernels index batch and head together as bh = b * nh + h.
    (Not .stride(): with one head PyTorch calls a tensor contiguous whatever its stride(1) says.)"""
    return q.size(2) * q.size(3), q.size(3), k.size(2) * k.size(3), k.size(3)


def _flash_forward(q, k, v, causal: bool, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, nh, T_q, hs) and the fp32 LSE (B, nh, T_q) for contiguous q, k, v."""
    B, nh, T_q, hs = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, nh, T_q), device=q.device, dtype=torch.float32)
    qk_scale = LOG2E / math.sqrt(hs)  # softmax scale 1/sqrt(hs), in base 2
    # One program per (batch*head, query block): batch*head on the grid's first axis, which may hold 2**31 - 1
    # programs (the others stop at 65,535).
    grid = (B * nh, triton.cdiv(T_q, cfg["BLOCK_M"]))
    _fwd_kernel[grid](
        q, k, v, o, lse, *_strides(q, k), T_q, k.size(2), qk_scale, HEAD_DIM=hs, CAUSAL=causal, **cfg
    )
    return o, lse


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, blocks: dict | None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _flash_forward(q, k, v, causal, blocks or _launch_config(q, backward=False))
        ctx.save_for_backward(q, k, v, o, lse)  # O(T) extra memory: the LSE, not the (T, T) weights
        ctx.causal, ctx.blocks = causal, blocks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        B, nh, T_q, hs = q.shape
        T_k = k.size(2)
        cfg = ctx.blocks or _launch_config(q, backward=True)
        meta = dict(HEAD_DIM=hs, CAUSAL=ctx.causal, **cfg)
        sizes = (*_strides(q, k), T_q, T_k, 1.0 / math.sqrt(hs), LOG2E / math.sqrt(hs))

        delta = torch.empty_like(lse)  # (B, nh, T_q), fp32
        grid = (B * nh, triton.cdiv(T_q, 64))
        _bwd_preprocess[grid](o, do, delta, *_strides(q, k)[:2], T_q, HEAD_DIM=hs, BLOCK_M=64)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid = (B * nh, triton.cdiv(T_k, cfg["BLOCK_N"]))  # one program per (batch*head, key block)
        _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, *sizes, **meta)
        grid = (B * nh, triton.cdiv(T_q, cfg["BLOCK_M"]))  # one program per (batch*head, query block)
        _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, *sizes, **meta)
        return dq, dk, dv, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.size(-1) != k.size(-1):
        raise ValueError(f"expected q (B, nh, T_q, hs) and k, v (B, nh, T_k, hs), got {q.shape}, {k.shape}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    hs = q.size(-1)
    if hs not in HEAD_SIZES:  # tl.arange needs a power of two; tl.dot at least 16 on GPUs
        raise ValueError(f"head size {hs} is not supported (16, 32, 64 or 128)")
    if q.size(2) == 0 or k.size(2) == 0 or (causal and q.size(2) > k.size(2)):
        raise ValueError(f"causal attention needs 1 <= T_q <= T_k, got T_q={q.size(2)}, T_k={k.size(2)}")


def kernels_run_on(t: torch.Tensor) -> bool:
    """Where the model sends attention here: 16-bit CUDA tensors with a head size the kernels take. Elsewhere
    Triton has no compiler (its interpreter, TRITON_INTERPRET=1, runs the tests on a CPU, far too slowly for
    real use), and fp32 would run tl.dot in TF32, which fp32 (--dtype float32) promises not to."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and t.size(-1) in HEAD_SIZES


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, blocks: dict | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs), masked) v for q (B, nh, T_q, hs) and k, v (B, nh, T_k, hs), differentiable.

    T_q may differ from T_k: a decode step is T_q = 1 against the T_k cached keys. Causal queries are aligned
    to the end of the keys (query i sees keys <= i + T_k - T_q). fp32 inputs run tl.dot in TF32 on GPUs, so
    expect about 1e-3 relative error there. blocks (e.g. dict(BLOCK_M=16, BLOCK_N=32)) overrides the tiles."""
    _check_inputs(q, k, v, causal)
    return FlashAttention.apply(q, k, v, causal, blocks)
