"""Attention for one new token per sequence over a paged KV cache (Kwon et al. 2023, vLLM): each sequence's
keys and values live in fixed-size blocks scattered through one pool, and a block table lists which blocks
hold its positions 0, 1, 2, ... in order.

The decode kernel splits each sequence's context across programs (FlashDecoding's split-K; vLLM's
triton_decode_attention has the same two stages): program (b, h, s) reads the blocks of split s through the
block table, runs the online softmax over them, and writes a partial output and its log-sum-exp; the splits
are then combined, weighted by exp(lse - max lse). The reference path gathers each sequence's blocks into a
contiguous tensor and calls SDPA: what the CPU runs, and what the tests compare the kernel with.

Shapes: B = sequences, nh = heads, hs = head size, P = blocks in the pool, L = block size (tokens per
block), M = the block table's width (the most blocks a sequence may have).
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS and Windows: the reference path only
    triton = None


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor, n: int) -> torch.Tensor:
    """Positions 0..n-1 of each sequence, copied out of the pool (P, nh, L, hs) through its block table
    (G, M): (G, nh, n, hs), contiguous. The blocks past a shorter sequence's end are padding (block 0)."""
    G, nh, L, hs = tables.size(0), pool.size(1), pool.size(2), pool.size(3)
    blocks = pool[tables[:, : -(-n // L)].long()]  # (G, M', nh, L, hs)
    return blocks.transpose(1, 2).reshape(G, nh, -1, hs)[:, :, :n]


def paged_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor:
    """q (B, nh, hs), one query per sequence, attending to its lens[b] keys, positions 0..lens[b]-1; pools
    (P, nh, L, hs); tables (B, M) block ids; lens (B,). Returns (B, nh, hs). Gathers every sequence's blocks
    into a contiguous copy (what the kernel avoids) and masks the positions past each one's length."""
    n = tables.size(1) * k_pool.size(2)  # every position the tables can name
    k, v = gather_blocks(k_pool, tables, n), gather_blocks(v_pool, tables, n)  # (B, nh, n, hs)
    mask = torch.arange(n, device=q.device) < lens[:, None]  # (B, n): each sequence's own keys
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None])[:, :, 0]


def paged_kernel_runs_on(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Where the engine sends decoding attention to the kernel: CUDA tensors, with a head size and a block
    size that are powers of two (tl.arange's lengths). Elsewhere, the reference path."""
    hs, L = q.size(-1), k_pool.size(2)
    return triton is not None and q.is_cuda and hs & (hs - 1) == 0 and L & (L - 1) == 0


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, Tables, Lens, Out, Lse,  # pointers
        stride_qb, stride_qh,  # q (B, nh, hs); hs contiguous
        stride_kp, stride_kh, stride_kl,  # pools (P, nh, L, hs); hs contiguous
        stride_tb,  # tables (B, M)
        stride_ob, stride_oh, stride_os,  # out (B, nh, S, hs), lse (B, nh, S) contiguous
        scale, max_blocks,
        L: tl.constexpr, HS: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
    ):  # fmt: skip
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = tl.load(Lens + b)  # this sequence's length
        d = tl.arange(0, HS)
        t = tl.arange(0, L)
        q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32)  # (HS,)
        m = tl.full((), -1e30, tl.float32)  # finite, so that a block with no valid key leaves m - m_new = 0
        l_sum = tl.zeros((), tl.float32)  # the softmax's denominator so far
        acc = tl.zeros((HS,), tl.float32)
        for i in range(BLOCKS_PER_SPLIT):
            logical = split * BLOCKS_PER_SPLIT + i  # the sequence's i-th block of this split
            pos = logical * L + t  # (L,): the positions it holds
            valid = pos < n
            block = tl.load(Tables + b * stride_tb + logical, mask=logical < max_blocks, other=0)
            block = block.to(tl.int64)  # block * stride_kp passes int32 in a pool of over 2**31 numbers
            offs = block * stride_kp + h * stride_kh + t[:, None] * stride_kl + d[None, :]  # (L, HS)
            k = tl.load(K + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))  # (L,)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new)  # (L,): 0 for invalid keys
            alpha = tl.exp(m - m_new)  # rescales what was summed under the old max
            v = tl.load(V + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_sum = l_sum * alpha + tl.sum(p, axis=0)
            m = m_new
        empty = l_sum == 0  # a split past the sequence's end
        out = acc / tl.where(empty, 1.0, l_sum)
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l_sum)))
        tl.store(Out + b * stride_ob + h * stride_oh + split * stride_os + d, out)
        tl.store(Lse + (b * tl.num_programs(1) + h) * tl.num_programs(2) + split, lse)


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    blocks_per_split: int = 8,
) -> torch.Tensor:
    """The Triton kernel's answer to paged_attention_reference: (B, nh, hs)."""
    B, nh, hs = q.shape
    L, max_blocks = k_pool.size(2), tables.size(1)
    splits = -(-max_blocks // blocks_per_split)
    out = torch.empty((B, nh, splits, hs), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, nh, splits), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(B, nh, splits)](
        q, k_pool, v_pool, tables, lens, out, lse,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2), hs**-0.5, max_blocks,
        L=L, HS=hs, BLOCKS_PER_SPLIT=blocks_per_split,
    )  # fmt: skip
    # Combine the splits: each partial output is normalised by its own sum; weight it by that sum relative
    # to the others, exp(lse_s - max lse). Splits with no key have lse = -inf and weight 0.
    weights = torch.softmax(lse, dim=-1)  # (B, nh, S)
    return (weights[..., None] * out).sum(dim=2).to(q.dtype)  # (B, nh, hs)
