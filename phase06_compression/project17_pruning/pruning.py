"""Pruning, from scratch: which weights to remove, and what to do about the ones that stay.

- Magnitude (the anchors' baseline): drop the smallest |w| of each layer.
- Wanda (Sun et al. 2023): drop the smallest |w_ij| * ||X_j||, compared within each output row, where
  ||X_j|| is the L2 norm of input feature j over the calibration tokens. No weight update.
- SparseGPT (Frantar & Alistarh 2023): GPTQ's loop (project 14) with "prune" in place of "round": column by
  column, a pruned weight's error is moved onto the columns not yet visited, through the inverse Hessian of
  the layer's reconstruction error. Optionally the kept weights are rounded to int4 in the same pass.
- N:M (semi-structured): keep n of every m consecutive input weights of a row (2:4 is what sparse tensor cores
  run), for all three.
- Structured: remove whole attention heads and MLP channels by a first-order Taylor score (LLM-Pruner), which
  gives a smaller dense model.

Only the Linear layers inside the transformer blocks are pruned (qkv, attention projection, MLP up and down);
the embedding, tied to lm_head, and the LayerNorms stay whole, as in all three papers.
Shapes in comments: N = out_features, K = in_features, C = n_embd, hs = head size.
"""

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from data import get_batch
from model import GPT
from quantization import INT4_MAX, block_linears, collect_hessians, int4_params

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Sparsity:
    """What to remove from each layer: a fraction of its weights, or with m > 0 the N:M pattern (keep n of
    every m consecutive input weights of a row, sparsity 1 - n / m)."""

    fraction: float = 0.5
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.fraction:.0%} unstructured"


def check_sparsity(model: nn.Module, sp: Sparsity) -> None:
    """ValueError when the request cannot be met by these layers."""
    if not 0 <= sp.fraction < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sp.fraction}")
    if sp.m:
        if not 0 < sp.n < sp.m:
            raise ValueError(f"an N:M pattern keeps 0 < N < M weights of every M, got {sp.n}:{sp.m}")
        for name, linear in block_linears(model):
            if linear.in_features % sp.m:
                raise ValueError(
                    f"M = {sp.m} does not divide the {linear.in_features} inputs of blocks.{name}"
                )


# --- choosing the weights to keep ---------------------------------------------------------------------------


def keep_mask(scores: torch.Tensor, sp: Sparsity, per_row: bool) -> torch.Tensor:
    """(N, K) scores -> (N, K) bool, True = keep: the lowest scores go, exactly as many as asked (topk, not a
    threshold, so ties cannot prune more). per_row: the same count in every output row (Wanda's comparison
    group); else across the whole layer (magnitude's)."""
    N, K = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool)
    if sp.m:  # in every group of m inputs of a row, the m - n lowest go
        groups = scores.reshape(N, K // sp.m, sp.m)
        drop = groups.topk(sp.m - sp.n, dim=-1, largest=False).indices
        return mask.view(N, K // sp.m, sp.m).scatter(-1, drop, False).view(N, K)
    if per_row:
        drop = scores.topk(int(K * sp.fraction), dim=1, largest=False).indices
        return mask.scatter(1, drop, False)
    drop = scores.flatten().topk(int(N * K * sp.fraction), largest=False).indices
    return mask.flatten().scatter(0, drop, False).view(N, K)


def magnitude_mask(weight: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    return keep_mask(weight.abs(), sp, per_row=False)


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """|W_ij| * ||X_j||: H = 2 X X^T / tokens, so sqrt(H_jj) is ||X_j|| up to a constant that no row's
    ranking sees. A weight on an input feature with large activations matters more than its size says."""
    norms = torch.diag(hessian).clamp(min=0).sqrt()  # (K,)
    return keep_mask(weight.abs() * norms[None, :], sp, per_row=True)


# --- SparseGPT ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sp: Sparsity,
    bits: int | None = None,
    group_size: int = 128,
    block: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) for one layer: prune W (N, K) while minimising
    ||W X - W' X||^2 on the calibration inputs, H = 2 X X^T (K, K). Returns W' (N, K): pruned weights are
    exactly 0 and the kept ones updated to make up for them (and, with bits=4, on an int4 grid in groups of
    group_size). block: columns whose mask is chosen together and whose updates are applied lazily (made a
    multiple of M for N:M, so that no group of M columns straddles two blocks)."""
    W = weight.detach().float().clone()  # (N, K), updated as columns are visited
    N, K = W.shape
    H = hessian.float().clone()
    # Inputs that were always 0: nothing to compensate with. (The reference code also zeroes their weights;
    # here they stay, so that the sparsity is exactly what was asked.)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(K, device=H.device)  # dampening keeps the inverse stable
    # Upper Cholesky factor of H^-1, as in GPTQ: row i holds how column i's error spreads over later columns.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block = sp.m * max(1, block // sp.m) if sp.m else block
    if bits is not None and (block % group_size or K % group_size):
        raise ValueError(
            f"group size {group_size} must divide the {K} inputs and the block of {block} columns"
        )

    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (b,)
        # OBS saliency: removing w costs w^2 / [H^-1]_jj^2 (the Cholesky factor's diagonal, as the paper's
        # code). Unstructured: the block's mask is chosen at once ("adaptive mask selection").
        saliency = W1**2 / d[None, :] ** 2  # (N, b)
        mask = keep_mask(saliency, sp, per_row=False) if not sp.m else torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if sp.m and i % sp.m == 0:  # N:M: each group's mask from the weights as updated so far
                group = slice(i, i + sp.m)
                mask[:, group] = keep_mask(W1[:, group] ** 2 / d[None, group] ** 2, sp, per_row=True)
            if bits is not None and (i1 + i) % group_size == 0:  # int4: a group's grid, from W as updated
                scale, zero = int4_params(W1[:, i : i + group_size])  # (N,) each
            w = W1[:, i]  # (N,)
            q = torch.where(mask[:, i], w, torch.zeros_like(w))  # prune
            if bits is not None:  # and round what stays: (q - z) s, with 0.0 exactly on the grid
                q = (((q / scale).round() + zero).clamp(0, INT4_MAX) - zero) * scale
            err = (w - q) / d[i]  # (N,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # onto the block's later columns at once
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # and once per block onto every column after it
    return W.to(weight.dtype)


# --- the whole model, block by block ------------------------------------------------------------------------


@torch.no_grad()
def prune_model(
    model: GPT,
    method: str,
    sp: Sparsity,
    calibration: torch.Tensor | None = None,
    bits: int | None = None,
    group_size: int = 128,
) -> GPT:
    """Prune every Linear of the blocks in place. Wanda and SparseGPT need calibration token ids (B, T) and
    run block by block, as their reference code: a block's calibration inputs come from the blocks before it,
    already pruned, so each block is fitted to the inputs it will get. bits=4: SparseGPT's joint 4-bit."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if bits is not None and method != "sparsegpt":
        raise ValueError("only SparseGPT rounds the weights it keeps (bits=4)")
    check_sparsity(model, sp)
    if method == "magnitude":
        for _, linear in block_linears(model):
            linear.weight.mul_(magnitude_mask(linear.weight, sp))
        return model
    if calibration is None:
        raise ValueError(f"{method} needs calibration data")
    for block, hessians in block_hessians(model, calibration):
        for name, h in hessians.items():
            linear = block.get_submodule(name)
            if method == "wanda":
                linear.weight.mul_(wanda_mask(linear.weight, h, sp))
            else:
                linear.weight.copy_(sparsegpt(linear.weight, h, sp, bits, group_size))
    return model


def block_hessians(model: GPT, calibration: torch.Tensor):
    """Block by block, each block with the Hessians of its Linear layers {name: H (K, K)}, from its inputs on
    the calibration windows (B, T): the outputs of the blocks before it, as they are once the caller has
    moved on from them (pruned, in prune_model), as in Wanda's and SparseGPT's reference code."""
    T = calibration.size(1)
    x = model.wte(calibration) + model.wpe(torch.arange(T, device=calibration.device))  # (B, T, C)
    for block in model.blocks:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        yield block, collect_hessians(block, x, names)  # every layer's inputs, before any is pruned
        x = torch.cat([block(chunk) for chunk in x.split(8)])  # this block's outputs (pruned) feed the next


def sparsity_of(model: GPT) -> float:
    """The fraction of the blocks' Linear weights that are exactly zero."""
    weights = [linear.weight for _, linear in block_linears(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# --- structured: whole heads and channels -------------------------------------------------------------------


def taylor_scores(model: GPT, calibration: torch.Tensor, batch: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """LLM-Pruner's first-order importance of each head and MLP channel: removing a weight w changes the loss
    by about -w * dL/dw (Taylor), and a group scores the sum of |w * dL/dw| over its weights (LLM-Pruner's
    element-wise importance). Per block: (heads (nh,), channels (4C,))."""
    model.zero_grad(set_to_none=True)
    for chunk in calibration.split(batch):  # next-token loss on the calibration windows
        model(chunk[:, :-1], chunk[:, 1:])[1].backward()
    scores = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        nh, hs = attn.n_head, attn.head_size
        qkv = (attn.qkv.weight * attn.qkv.weight.grad).abs().sum(1)  # (3 nh hs,): each output row
        qkv += (attn.qkv.bias * attn.qkv.bias.grad).abs()
        proj = (attn.proj.weight * attn.proj.weight.grad).abs().sum(0)  # (nh hs,): each input column
        heads = qkv.view(3, nh, hs).sum((0, 2)) + proj.view(nh, hs).sum(1)  # (nh,)
        fc = (mlp.fc.weight * mlp.fc.weight.grad).abs().sum(1) + (mlp.fc.bias * mlp.fc.bias.grad).abs()
        channels = fc + (mlp.proj.weight * mlp.proj.weight.grad).abs().sum(0)  # (4C,)
        scores.append((heads, channels))
    model.zero_grad(set_to_none=True)
    return scores


@torch.no_grad()
def structured_prune(
    model: GPT, heads: float, channels: float, calibration: torch.Tensor
) -> tuple[GPT, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A new, smaller GPT without the least important fraction `heads` of each layer's attention heads and
    `channels` of its MLP channels (the same fraction in every layer, rounded to the nearest count, halves
    removed; at least one of each stays). Returns it and, per block, the (heads, channels) kept, in their
    original order."""
    for what, fraction in (("heads", heads), ("channels", channels)):
        if not 0 <= fraction < 1:
            raise ValueError(f"the fraction of {what} to remove must be in [0, 1), got {fraction}")
    with torch.enable_grad():
        scores = taylor_scores(model, calibration)
    kept = []
    left = lambda n, fraction: max(1, n - math.floor(n * fraction + 0.5))  # halves removed
    for head_score, channel_score in scores:
        n_heads, n_channels = left(len(head_score), heads), left(len(channel_score), channels)
        kept.append(
            (
                head_score.topk(n_heads).indices.sort().values,
                channel_score.topk(n_channels).indices.sort().values,
            )
        )
    config = replace(model.config, layer_heads=[len(h) for h, _ in kept], layer_mlp=[len(c) for _, c in kept])
    small = GPT(config).to(model.wte.weight.device)
    state = model.state_dict()
    for i, (h, c) in enumerate(kept):
        attn = model.blocks[i].attn
        hs = attn.head_size
        cols = (h[:, None] * hs + torch.arange(hs, device=h.device)).flatten()  # (heads kept * hs,)
        rows = torch.cat([cols + part * attn.n_head * hs for part in range(3)])  # the same slice of q, k, v
        p = f"blocks.{i}."
        state[p + "attn.qkv.weight"] = state[p + "attn.qkv.weight"][rows]
        state[p + "attn.qkv.bias"] = state[p + "attn.qkv.bias"][rows]
        state[p + "attn.proj.weight"] = state[p + "attn.proj.weight"][:, cols]
        state[p + "mlp.fc.weight"] = state[p + "mlp.fc.weight"][c]
        state[p + "mlp.fc.bias"] = state[p + "mlp.fc.bias"][c]
        state[p + "mlp.proj.weight"] = state[p + "mlp.proj.weight"][:, c]
    small.load_state_dict(state)
    return small.eval(), kept


# --- recovery -----------------------------------------------------------------------------------------------


def recover(model: GPT, tokens: np.ndarray, iters: int, lr: float, batch_size: int, seed: int = 0) -> list:
    """A short fine-tune of the pruned model on the training split (AdamW, constant lr). Weights pruned to
    zero stay exactly zero: each step's update is multiplied by the mask afterwards, so neither the gradient
    nor AdamW's momentum nor weight decay can bring them back. Returns the losses."""
    device = model.wte.weight.device
    masks = [(linear.weight, linear.weight != 0) for _, linear in block_linears(model)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in tqdm(range(iters), desc="recovery", disable=None):
        x, y = get_batch(tokens, batch_size, model.config.block_size, g, device)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for weight, keep in masks:
                weight.mul_(keep)
        losses.append(loss.item())
    return losses
