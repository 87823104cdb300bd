"""Memory-efficient training: what backward keeps, and three ways to keep less.

- chunked_attention: exact causal attention in query chunks x key chunks with a running max and sum
  (Rabe & Staats 2021), each query chunk checkpointed, so neither forward nor backward ever holds a (T, T)
  matrix: O(chunk x T) instead of O(T^2), on any device, in plain PyTorch.
- checkpoint_block: activation checkpointing of one transformer block, all of it ("full": keep only the
  block's input, recompute the rest in backward) or selectively, through torch.utils.checkpoint's selective
  checkpoint contexts (SAC): keep the matmuls' outputs, recompute the cheap ops between them, and recompute
  the matmuls too inside one region ("attn": the attention core, Korthikanti et al. 2022's selective
  recomputation; "mlp": the feed-forward network).
- offload: the tensors backward needs go to CPU memory during forward and come back for backward
  (torch.autograd.graph.save_on_cpu).
- SavedBytes: a counter of the bytes backward keeps, the same on every device.

Shapes: B = batch, nh = heads, T = sequence length, hs = head size, Q and K = query and key chunk lengths.
"""

import contextlib
import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ATTENTIONS = ("sdpa", "explicit", "chunked")
RECOMPUTE = ("none", "full", "attn", "mlp")  # what checkpoint_block recomputes in backward
CHUNK = 256  # query and key chunk length of chunked_attention (Rabe & Staats: 1024 and 4096 at 16k and more)


# --- counting what backward keeps ---------------------------------------------------------------------

_counters: list["SavedBytes"] = []  # the counters open now


class OverBudget(RuntimeError):
    """A forward pass kept more bytes for backward than a SavedBytes budget allows."""


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the activations kept for backward, counted while the forward pass runs inside `with`.

    Counted: every tensor autograd saves (through this saved-tensors hook), plus what checkpointing keeps by
    itself outside autograd's saved tensors (a checkpoint's inputs, the outputs a selective policy saves),
    which checkpoint_block reports with keep(). Each storage counts once, whole: q, k and v are views of one
    qkv tensor, an input is often saved by two ops, a Linear saves a transposed view of its weight. Not
    counted: `exclude`, the model's parameters and buffers (they exist whether or not anything trains),
    and what backward allocates while it runs (recomputed activations, gradients): torch.cuda's
    max_memory_allocated sees that on a GPU.

    With `offload_from` (a device), the saved tensors are also offloaded as offload() does, and a tensor
    counts only if what offloading keeps of it is still on that device's type: on a GPU, none; on a CPU,
    every one (save_on_cpu's tensor.cpu() is the tensor itself there: nothing moves, nothing is freed)."""

    def __init__(
        self,
        exclude: Iterator[torch.Tensor] = (),
        budget: int | None = None,
        offload_from: torch.device | None = None,
    ):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}  # data_ptr -> bytes: one entry per storage
        self.bytes = 0
        self.budget = budget  # past it, forward stops at once (OverBudget): a step that cannot fit ends early
        self.offload_from = offload_from
        super().__init__(self._pack, lambda t: t)
        if offload_from is not None:  # save_on_cpu's own hooks, the packed tensor counted where it stays
            cpu = offload(offload_from)
            self._to_cpu, self.unpack_hook = cpu.pack_hook, cpu.unpack_hook

    def _pack(self, t: torch.Tensor):
        if self.offload_from is None:
            keep(t)  # the innermost hooks alone see a saved tensor: they tell every counter open
            return t  # kept as it is: the counter only looks
        device, packed = self._to_cpu(t)
        if packed.device.type == self.offload_from.type:  # still in the device's memory: kept there
            keep(packed)
        return device, packed

    def keep(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.storages:
            self.storages[s.data_ptr()] = s.nbytes()
            self.bytes += s.nbytes()
            if self.budget is not None and self.bytes > self.budget:
                raise OverBudget(f"{self.bytes:,} bytes kept for backward: over {self.budget:,}")

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        _counters.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _counters.remove(self)
        super().__exit__(*exc)


def keep(*tensors: torch.Tensor) -> None:
    """Report tensors kept for backward outside autograd's saved-tensor hooks to the open counters."""
    for counter in _counters:
        for t in tensors:
            counter.keep(t)


# --- chunked attention (Rabe & Staats 2021) -----------------------------------------------------------


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None = None, checkpointed: bool = True
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) v, exactly, for q, k, v of shape (B, nh, T, hs), one query chunk at a
    time. With `checkpointed`, each query chunk is recomputed in backward instead of keeping its scores, so
    what backward keeps is q, k and v themselves (Rabe & Staats' point: without it, differentiating the
    loop would keep every chunk's probabilities, the (T, T) matrix again in pieces)."""
    T, chunk = q.size(-2), chunk or CHUNK
    track = checkpointed and torch.is_grad_enabled() and q.requires_grad
    out = []
    for start in range(0, T, chunk):
        q_chunk = q[:, :, start : start + chunk]  # (B, nh, Q, hs)
        attend = partial(_query_chunk, start=start, chunk=chunk)
        if track:
            keep(q, k, v)  # the checkpoint holds its inputs: views of one qkv tensor, counted once
            out.append(checkpoint(attend, q_chunk, k, v, use_reentrant=False))
        else:
            out.append(attend(q_chunk, k, v))
    return torch.cat(out, dim=2)  # (B, nh, T, hs)


def _query_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    """One query chunk (B, nh, Q, hs) starting at position `start` against the keys up to its last query.
    The softmax is built as it goes: a running max m (so exp never overflows), a running sum s of the
    exponentials and a running weighted sum of values; a new, larger max rescales both by
    exp(m_old - m_new)."""
    B, nh, Q, hs = q.shape
    q = q / math.sqrt(hs)  # scaled once here, not once per key chunk
    m = q.new_full((B, nh, Q, 1), float("-inf"))  # running max of each query's scores
    s = q.new_zeros((B, nh, Q, 1))  # running sum of exp(score - m)
    acc = q.new_zeros((B, nh, Q, hs))  # running sum of exp(score - m) * value
    rows = torch.arange(start, start + Q, device=q.device)[:, None]  # (Q, 1) query positions
    for k_start in range(0, start + Q, chunk):  # keys after the chunk's last query are all masked: skipped
        k_chunk, v_chunk = k[:, :, k_start : k_start + chunk], v[:, :, k_start : k_start + chunk]
        scores = q @ k_chunk.transpose(-2, -1)  # (B, nh, Q, K)
        if k_start + k_chunk.size(-2) > start + 1:  # the chunk reaches past some query: mask the future
            cols = torch.arange(k_start, k_start + k_chunk.size(-2), device=q.device)[None, :]  # (1, K)
            scores = scores.masked_fill(cols > rows, float("-inf"))
        # The max only keeps exp in range; the result does not depend on it, so it needs no gradient
        # (Rabe & Staats' stop_gradient). Every query sees key 0 in the first chunk, so m is finite from then.
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True)).detach()  # (B, nh, Q, 1)
        p = torch.exp(scores - m_new)  # (B, nh, Q, K), masked entries exp(-inf) = 0
        rescale = torch.exp(m - m_new)  # how much the sums so far shrink under the new max
        s = s * rescale + p.sum(dim=-1, keepdim=True)
        acc = acc * rescale + p @ v_chunk  # (B, nh, Q, hs)
        m = m_new
    return acc / s


# --- activation checkpointing -------------------------------------------------------------------------

_regions: list[str] = []  # the named parts of a block running now, innermost last


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """Mark the ops run inside as part of `name` ("attn" or "mlp"), for a selective recomputation policy.
    Backward reruns the same forward, so the same ops get the same mark again."""
    _regions.append(name)
    try:
        yield
    finally:
        _regions.pop()


def _recompute(name: str) -> bool:
    return bool(_regions) and _regions[-1] == name


# The ops whose outputs a selective policy keeps: matmuls, whose recomputation costs FLOPs, and fused
# attention, whose output is O(T). Everything else (layer norms, GELU, residual adds, softmax, copies) is
# cheap to redo from them. A (T, T) product of explicit or chunked attention (bmm) is never kept.
KEPT_OPS = {
    torch.ops.aten.mm,
    torch.ops.aten.addmm,
    torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_efficient_attention,
    torch.ops.aten._scaled_dot_product_cudnn_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
}


def _saves(name: str, op) -> bool:
    """Whether the selective policy of mode `name` keeps op's output: a kept op outside the region."""
    return op.overloadpacket in KEPT_OPS and not _recompute(name)


def _policy(name: str, _ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    """SAC's question for every op of the block: keep its output, or recompute it in backward?"""
    return CheckpointPolicy.MUST_SAVE if _saves(name, op) else CheckpointPolicy.PREFER_RECOMPUTE


class _CountSaved(TorchDispatchMode):
    """SAC keeps the outputs of MUST_SAVE ops in a cache of its own, out of the saved-tensor hooks' sight:
    this mode, inside SAC's, sees every op's output and reports those the policy keeps."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _saves(self.name, func):
            keep(*(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)))
        return out


def _selective_contexts(name: str):
    save, recompute = create_selective_checkpoint_contexts(partial(_policy, name))
    forward = contextlib.ExitStack()
    forward.enter_context(save)
    if _counters:  # only while something counts: a dispatch mode costs Python per op
        forward.enter_context(_CountSaved(name))
    return forward, recompute


def checkpoint_block(
    block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str
) -> torch.Tensor:
    """block(x), keeping for backward what `mode` says (RECOMPUTE): everything ("none"), only x ("full"),
    or x and the matmul outputs outside the region named by the mode ("attn", "mlp"); backward recomputes
    the rest.

    use_reentrant=False: the older reentrant checkpoint runs the block under no_grad and redoes it in a
    backward of its own, which only starts if an *input* requires grad. A block whose input needs no gradient
    (the first block of a frozen embedding, say) then silently gives its parameters no gradient at all
    (tests/test_project22_memory_efficient.py shows it). The non-reentrant form hooks saved tensors instead,
    and supports the selective policies."""
    if mode == "none" or not torch.is_grad_enabled():
        return block(x)
    keep(x)  # the checkpoint holds its input itself, whatever it recomputes
    if mode == "full":
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False, context_fn=partial(_selective_contexts, mode))


def offload(device: torch.device) -> contextlib.AbstractContextManager:
    """Saved tensors go to CPU memory as forward makes them and come back for backward: device memory for
    PCIe traffic. Pinned CPU memory lets the copies overlap compute on a GPU."""
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
