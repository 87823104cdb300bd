"""Block-sparse attention in Triton: project 09's FlashAttention-2 kernels, forward and backward, visiting
only the key blocks a sparse pattern keeps (Sparse Transformer, Child et al. 2019; Longformer, Beltagy et
al. 2020; BigBird, Zaheer et al. 2020; Mistral 7B's sliding window, Jiang et al. 2023).

A pattern is a token-level rule, mask(q_idx, kv_idx) -> bool (True = attend), always causal. build_layout cuts
its (T, T) mask into BLOCK x BLOCK tiles and keeps, for each query block, the sorted list of key blocks that
hold any True: the *full* ones (every pair visible: no mask needed) and the *partial* ones (some pairs
hidden: their tile of the mask is stored, one byte a pair, and applied exactly). The transposed lists, for
each key block its query blocks, drive the dK/dV pass. This is FlexAttention's BlockMask (kv_num_blocks,
kv_indices, full_kv_num_blocks, ...), with the partial tiles read from memory instead of recomputed from a
compiled mask_mod. Work and memory traffic are proportional to the blocks kept: for a window of w tokens,
about T / BLOCK * (w / BLOCK + 1) tiles instead of dense causal's (T / BLOCK)^2 / 2.

Shapes in comments: B = batch, nh = heads, T = sequence length (queries and keys), hs = head size,
nb = blocks (cdiv(T, BLOCK)), L = the longest block list.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flash_attention import _LOG2E, HEAD_SIZES, LOG2E, _bwd_preprocess, _strides

PATTERNS = ("dense", "window", "longformer", "bigbird", "strided", "fixed")


@dataclass(frozen=True)
class Pattern:
    """Which earlier keys each query sees (always causal: key j <= query i)."""

    name: str = "window"  # one of PATTERNS
    window: int = 256  # the local band i - w < j <= i; the stride of "strided" and "fixed"
    n_global: int = 16  # longformer, bigbird: the first n_global tokens are seen by every query
    n_random: int = 2  # bigbird: random earlier key blocks per query block
    summary: int = 16  # fixed: the last `summary` (< window) positions of each stride, seen by later queries
    block: int = 64  # bigbird's random blocks are chosen at this granularity
    seed: int = 0  # bigbird's random blocks

    def __post_init__(self):
        if self.name not in PATTERNS:
            raise ValueError(f"unknown pattern {self.name!r}: one of {', '.join(PATTERNS)}")
        if min(self.window, self.block) < 1 or min(self.n_global, self.n_random, self.summary) < 0:
            raise ValueError(f"window and block must be positive, the counts not negative: {self}")
        if self.name == "fixed" and self.summary >= self.window:  # every key a summary: dense causal
            raise ValueError(
                f"the fixed pattern's stride (window {self.window}) must be longer than its {self.summary} "
                "summary positions, or every key is a summary and attention is dense"
            )

    def mask_mod(self, T: int, device=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The rule as a function of broadcastable query and key positions, the form FlexAttention's
        create_block_mask takes (it adds batch and head arguments). Every query sees itself, so no row of
        softmax is empty."""
        w, name = self.window, self.name
        random_blocks = self._random_blocks(T, device) if name == "bigbird" else None

        def mask(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            causal, near = kv <= q, q - kv < w
            if name == "dense":
                return causal
            if name == "window":  # Mistral / Longformer's local band
                return causal & near
            if name == "strided":  # Sparse Transformer: the last w keys, then every w-th key before them
                return causal & (near | ((q - kv) % w == 0))
            if name == "fixed":  # Sparse Transformer: the query's own stride, and every stride's summary
                return causal & ((q // w == kv // w) | (kv % w >= w - self.summary))
            seen = near | (kv < self.n_global)  # longformer: the band and the global tokens
            if name == "bigbird":
                seen = seen | random_blocks[q // self.block, kv // self.block]
            return causal & seen

        return mask

    def _random_blocks(self, T: int, device) -> torch.Tensor:
        """(nb, nb) bool: n_random key blocks at or before each query block. Drawn for MAX_BLOCKS blocks and
        cut to nb, so that a query block sees the same random blocks at every length (training, decoding)."""
        nb = triton.cdiv(T, self.block)
        if nb > MAX_BLOCKS:
            raise ValueError(
                f"bigbird's random blocks are drawn for {MAX_BLOCKS * self.block} tokens, not {T}"
            )
        return _random_table(self.n_random, self.seed)[:nb, :nb].to(device)

    def token_mask(self, T: int, device=None) -> torch.Tensor:
        """(T, T) bool, True = attend: the reference that SDPA takes as attn_mask."""
        pos = torch.arange(T, device=device)
        return self.mask_mod(T, device)(pos[:, None], pos[None, :])


MAX_BLOCKS = 1024


@functools.lru_cache(maxsize=4)
def _random_table(n_random: int, seed: int) -> torch.Tensor:
    """(MAX_BLOCKS, MAX_BLOCKS) bool: in each row, n_random columns at or before it, drawn from seed."""
    g = torch.Generator().manual_seed(seed)
    future = torch.ones(MAX_BLOCKS, MAX_BLOCKS, dtype=torch.bool).triu(1)
    keys = torch.rand(MAX_BLOCKS, MAX_BLOCKS, generator=g).masked_fill(future, 2.0)  # future blocks last
    chosen = keys.argsort(dim=1)[:, :n_random]  # the smallest draws among the causal blocks
    return torch.zeros(MAX_BLOCKS, MAX_BLOCKS, dtype=torch.bool).scatter_(1, chosen, True) & ~future


@dataclass
class BlockList:
    """For each block of one side, the blocks of the other side to visit: num (nb,) int32, idx (nb, L) int32
    sorted and padded, and (partial lists only) tile (nb, L) int32, the row of BlockLayout.tiles to apply."""

    num: torch.Tensor
    idx: torch.Tensor
    tile: torch.Tensor | None = None


@dataclass
class BlockLayout:
    """A pattern's mask at one length, cut into BLOCK x BLOCK tiles (see the module's docstring)."""

    T: int
    block: int
    full_kv: BlockList  # per query block: the key blocks it sees whole
    partial_kv: BlockList  # per query block: the key blocks it sees in part
    full_q: BlockList  # per key block: the query blocks that see it whole (the transpose, for dK, dV)
    partial_q: BlockList
    tiles: torch.Tensor  # (n_partial, BLOCK, BLOCK) int8: the mask inside each partial block

    def visited(self) -> int:
        """Tiles each (batch, head) computes in the forward: its work, in units of one BLOCK x BLOCK tile."""
        return int(self.full_kv.num.sum() + self.partial_kv.num.sum())


def _block_list(keep: torch.Tensor, tile_of: torch.Tensor | None = None) -> BlockList:
    """keep (nb, nb) bool -> each row's kept column indices, ascending, padded to the longest row."""
    num = keep.sum(1)  # (nb,)
    # A stable sort of "not kept" puts each row's kept columns first, in ascending order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, : max(1, int(num.max()))]
    tile = None if tile_of is None else tile_of.gather(1, order).to(torch.int32).contiguous()
    return BlockList(num.to(torch.int32), order.to(torch.int32).contiguous(), tile)


def build_layout(mask: torch.Tensor, block: int) -> BlockLayout:
    """The block layout of a (T, T) bool mask: exactly the mask's non-zeros, nothing outside them."""
    T = mask.size(0)
    if not mask.diagonal().all():
        raise ValueError("every query must see at least itself: the mask's diagonal must be True")
    nb = triton.cdiv(T, block)
    padded = F.pad(mask, (0, nb * block - T, 0, nb * block - T))  # positions past T hidden: ragged blocks
    tiles = padded.view(nb, block, nb, block).transpose(1, 2)  # (nb, nb, BLOCK, BLOCK), a view
    any_seen, all_seen = tiles.any(dim=(2, 3)), tiles.all(dim=(2, 3))  # (nb, nb)
    partial = any_seen & ~all_seen
    tile_of = torch.full((nb, nb), -1, dtype=torch.int64, device=mask.device)
    tile_of[partial] = torch.arange(int(partial.sum()), device=mask.device)  # row-major numbering
    return BlockLayout(
        T=T,
        block=block,
        full_kv=_block_list(all_seen),
        partial_kv=_block_list(partial, tile_of),
        full_q=_block_list(all_seen.T),
        partial_q=_block_list(partial.T, tile_of.T),
        tiles=tiles[partial].to(torch.int8).contiguous(),  # (n_partial, BLOCK, BLOCK)
    )


def block_for(device: torch.device) -> int:
    """The layout's tile on a GPU (FA2-like, not yet tuned), and a small one for the interpreter, so that
    short test sequences cross many block boundaries."""
    return 64 if device.type == "cuda" else 16


@functools.lru_cache(maxsize=16)
def layout_for(pattern: Pattern, T: int, block: int, device: torch.device) -> BlockLayout:
    """build_layout of a pattern at a length, built once: the model asks for it in every layer and step."""
    return build_layout(pattern.token_mask(T, device), block)


# fmt: off
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, blocks, tiles, n, tile_ptrs, offs_n, T, qk_scale,
               BLOCK: tl.constexpr, MASK: tl.constexpr):
    """The online softmax over the n key blocks listed at `blocks`; MASK: apply each one's stored tile."""
    for i in range(0, n):
        kb = tl.load(blocks + i)
        cols = kb * BLOCK + offs_n  # (BLOCK,)
        k = tl.load(k_ptrs + kb * BLOCK * stride_kt, mask=cols[:, None] < T, other=0.0)  # (BLOCK, hs)
        v = tl.load(v_ptrs + kb * BLOCK * stride_kt, mask=cols[:, None] < T, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK, BLOCK), base-2 logits
        if MASK:
            seen = tl.load(tile_ptrs + tl.load(tiles + i).to(tl.int64) * BLOCK * BLOCK)  # (BLOCK, BLOCK)
            s = tl.where(seen != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK,)
        # Unlike the dense causal kernel, a row may see nothing in a partial block it meets first (a stride's
        # gap): its max is still -inf, and exp2(-inf - -inf) would be NaN. Subtracting 0 instead keeps it 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # (BLOCK, hs)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sparse_fwd_kernel(Q, K, V, Out, LSE, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_TILE, TILES,
                       stride_qh, stride_qt, stride_kh, stride_kt, stride_full, stride_part, T, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    qb = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)
    rows = qb * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = bh * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]  # (BLOCK, hs)
    k_ptrs = K + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # key block 0
    v_ptrs = V + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    tile_ptrs = TILES + offs_n[:, None] * BLOCK + offs_n[None, :]  # tile 0, (BLOCK, BLOCK): queries x keys
    q = tl.load(Q + q_offs, mask=rows[:, None] < T, other=0.0)

    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    # Two stages, as in project 09: the key blocks every row sees whole without a mask, then the partial
    # ones with theirs. Key blocks in neither list are never loaded: that is the whole saving.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, FULL_IDX + qb * stride_full,
                               TILES, tl.load(FULL_NUM + qb), tile_ptrs, offs_n, T, qk_scale, BLOCK,
                               MASK=False)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, PART_IDX + qb * stride_part,
                               PART_TILE + qb * stride_part, tl.load(PART_NUM + qb), tile_ptrs, offs_n, T,
                               qk_scale, BLOCK, MASK=True)

    # Every row before T sees itself, so l_i > 0 where it is stored; the padding rows past T see nothing.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(Out + q_offs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=rows[:, None] < T)
    tl.store(LSE + bh * T + rows, (m_i + tl.log2(l_i)) / _LOG2E, mask=rows < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, blocks, tiles, n, tile_ptrs,
                offs_m, T, qk_scale, BLOCK: tl.constexpr, MASK: tl.constexpr):
    """One key block's dK, dV over the n query blocks listed at `blocks`, on transposed tiles (keys x
    queries) as in project 09."""
    for i in range(0, n):
        qb = tl.load(blocks + i)
        rows = qb * BLOCK + offs_m  # (BLOCK,)
        q = tl.load(q_ptrs + qb * BLOCK * stride_qt, mask=rows[:, None] < T, other=0.0)  # (BLOCK, hs)
        do = tl.load(do_ptrs + qb * BLOCK * stride_qt, mask=rows[:, None] < T, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rows < T, other=0.0) * _LOG2E  # (BLOCK,), base 2
        delta = tl.load(delta_ptr + rows, mask=rows < T, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK, BLOCK): keys x queries
        if MASK:  # the stored tile is queries x keys: tile_ptrs reads it transposed
            seen = tl.load(tile_ptrs + tl.load(tiles + i).to(tl.int64) * BLOCK * BLOCK)
            p_t = tl.where(seen != 0, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)  # (BLOCK, hs)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])  # dS = P * (dP - delta), transposed
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _sparse_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_TILE,
                        TILES, stride_qh, stride_qt, stride_kh, stride_kt, stride_full, stride_part, T,
                        sm_scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    kb = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_offs = bh * stride_kh + cols[:, None] * stride_kt + offs_d[None, :]  # (BLOCK, hs)
    k = tl.load(K + kv_offs, mask=cols[:, None] < T, other=0.0)
    v = tl.load(V + kv_offs, mask=cols[:, None] < T, other=0.0)
    q_ptrs = Q + bh * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]  # query block 0
    do_ptrs = DO + bh * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    tile_ptrs = TILES + offs_m[None, :] * BLOCK + offs_m[:, None]  # tile 0 transposed: keys x queries
    lse_ptr, delta_ptr = LSE + bh * T, DELTA + bh * T

    dk = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt,
                         FULL_IDX + kb * stride_full, TILES, tl.load(FULL_NUM + kb), tile_ptrs, offs_m, T,
                         qk_scale, BLOCK, MASK=False)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt,
                         PART_IDX + kb * stride_part, PART_TILE + kb * stride_part, tl.load(PART_NUM + kb),
                         tile_ptrs, offs_m, T, qk_scale, BLOCK, MASK=True)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols[:, None] < T)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < T)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, blocks, tiles, n, tile_ptrs, offs_n, T,
              qk_scale, BLOCK: tl.constexpr, MASK: tl.constexpr):
    """One query block's dQ over the n key blocks listed at `blocks`."""
    for i in range(0, n):
        kb = tl.load(blocks + i)
        cols = kb * BLOCK + offs_n
        k = tl.load(k_ptrs + kb * BLOCK * stride_kt, mask=cols[:, None] < T, other=0.0)  # (BLOCK, hs)
        v = tl.load(v_ptrs + kb * BLOCK * stride_kt, mask=cols[:, None] < T, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK, BLOCK)
        if MASK:
            seen = tl.load(tile_ptrs + tl.load(tiles + i).to(tl.int64) * BLOCK * BLOCK)
            p = tl.where(seen != 0, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)  # (BLOCK, hs)
    return dq


@triton.jit
def _sparse_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_TILE, TILES,
                      stride_qh, stride_qt, stride_kh, stride_kt, stride_full, stride_part, T, sm_scale,
                      qk_scale, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    qb = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = bh * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=rows[:, None] < T, other=0.0)
    do = tl.load(DO + q_offs, mask=rows[:, None] < T, other=0.0)
    lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
    k_ptrs = K + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + bh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    tile_ptrs = TILES + offs_n[:, None] * BLOCK + offs_n[None, :]

    dq = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, FULL_IDX + qb * stride_full, TILES,
                   tl.load(FULL_NUM + qb), tile_ptrs, offs_n, T, qk_scale, BLOCK, MASK=False)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, PART_IDX + qb * stride_part,
                   PART_TILE + qb * stride_part, tl.load(PART_NUM + qb), tile_ptrs, offs_n, T, qk_scale,
                   BLOCK, MASK=True)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None] < T)
# fmt: on


def _lists(full: BlockList, partial: BlockList) -> tuple:
    """The kernels' block-list arguments, in their order."""
    return full.num, full.idx, partial.num, partial.idx, partial.tile


def _launch_options(q: torch.Tensor) -> dict:
    """Warps and pipeline stages on a GPU (not yet tuned); nothing for the interpreter."""
    return dict(num_warps=4, num_stages=2) if q.is_cuda else {}


class SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, nh, T, hs = q.shape
        o = torch.empty_like(q)
        lse = torch.empty((B, nh, T), device=q.device, dtype=torch.float32)
        strides = (layout.full_kv.idx.stride(0), layout.partial_kv.idx.stride(0))
        grid = (B * nh, triton.cdiv(T, layout.block))  # one program per (batch*head, query block)
        _sparse_fwd_kernel[grid](
            q, k, v, o, lse, *_lists(layout.full_kv, layout.partial_kv), layout.tiles, *_strides(q, k),
            *strides, T, LOG2E / math.sqrt(hs), HEAD_DIM=hs, BLOCK=layout.block, **_launch_options(q),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout = layout
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        layout, do = ctx.layout, do.contiguous()
        B, nh, T, hs = q.shape
        meta = dict(HEAD_DIM=hs, BLOCK=layout.block, **_launch_options(q))
        scales = (T, 1.0 / math.sqrt(hs), LOG2E / math.sqrt(hs))
        delta = torch.empty_like(lse)  # (B, nh, T): rowsum(dO * O), project 09's kernel
        _bwd_preprocess[(B * nh, triton.cdiv(T, 64))](
            o, do, delta, *_strides(q, k)[:2], T, HEAD_DIM=hs, BLOCK_M=64
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid = (B * nh, triton.cdiv(T, layout.block))
        cols = (layout.full_q, layout.partial_q)  # each key block's query blocks
        _sparse_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, *_lists(*cols), layout.tiles, *_strides(q, k),
            cols[0].idx.stride(0), cols[1].idx.stride(0), *scales, **meta,
        )  # fmt: skip
        rows = (layout.full_kv, layout.partial_kv)  # each query block's key blocks, as in the forward
        _sparse_dq_kernel[grid](
            q, k, v, do, lse, delta, dq, *_lists(*rows), layout.tiles, *_strides(q, k),
            rows[0].idx.stride(0), rows[1].idx.stride(0), *scales, **meta,
        )  # fmt: skip
        return dq, dk, dv, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) restricted to the layout's mask) v for q, k, v (B, nh, T, hs), differentiable.
    The layout (build_layout, or layout_for a Pattern) must be of length T and on q's device."""
    if q.dim() != 4 or not q.shape == k.shape == v.shape:
        raise ValueError(f"expected q, k, v of one shape (B, nh, T, hs), got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.size(-1) not in HEAD_SIZES:
        raise ValueError(f"head size {q.size(-1)} is not supported (16, 32, 64 or 128)")
    if q.size(2) != layout.T:
        raise ValueError(f"the layout is for {layout.T} tokens, the input has {q.size(2)}")
    return SparseAttention.apply(q, k, v, layout)


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same attention written out with the (T, T) mask (True = attend): the tests' ground truth."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
