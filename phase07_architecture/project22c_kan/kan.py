"""Kolmogorov-Arnold network layers (Liu et al. 2024), in efficient-kan's formulation.

An MLP puts a learnable weight on each edge and a fixed nonlinearity on each node. A KAN puts a learnable
one-variable function on each edge, phi_ji(x_i) = w_b,ji * silu(x_i) + sum_s c_jis * B_s(x_i), and a node
only adds its incoming edges: y_j = sum_i phi_ji(x_i). The B_s are the G + k B-spline bases of order k on a
grid of G intervals. Evaluating every edge apart would be an (N, out, in) tensor; instead the bases are
computed once per input, (N, in, G + k), flattened to (N, in * (G + k)), and one matmul with the spline
coefficients (out, in * (G + k)) sums all edges at once.

Shapes: N = inputs (tokens), I = in_features, O = out_features, G = grid_size, k = spline_order, S = G + k
bases per input, K = G + 2k + 1 knots per input.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def uniform_grid(in_features: int, grid_size: int, order: int, lo: float, hi: float) -> torch.Tensor:
    """(I, K) knots: G equal intervals on [lo, hi], and k more on each side so that every one of the G + k
    bases has its full support of k + 1 intervals (the bases sum to one only inside [lo, hi])."""
    h = (hi - lo) / grid_size
    knots = lo + h * torch.arange(-order, grid_size + order + 1, dtype=torch.float32)  # (K,)
    return knots.expand(in_features, -1).contiguous()


def b_spline_bases(x: torch.Tensor, grid: torch.Tensor, order: int) -> torch.Tensor:
    """Cox-de Boor recursion for all bases and inputs at once: x (..., I), grid (I, K) -> (..., I, K-1-order).
    Order 0 is the indicator of each knot interval [t_s, t_s+1); order p blends two neighbours of order p-1:
    B_s,p(x) = (x - t_s) / (t_s+p - t_s) B_s,p-1(x) + (t_s+p+1 - x) / (t_s+p+1 - t_s+1) B_s+1,p-1(x)."""
    x = x.unsqueeze(-1)  # (..., I, 1): against every knot of its own input's grid
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)  # (..., I, K-1)
    for p in range(1, order + 1):
        left = (x - grid[:, : -(p + 1)]) / (grid[:, p:-1] - grid[:, : -(p + 1)])  # (..., I, K-1-p)
        right = (grid[:, p + 1 :] - x) / (grid[:, p + 1 :] - grid[:, 1:-p])  # (..., I, K-1-p)
        bases = left * bases[..., :-1] + right * bases[..., 1:]
    return bases


def refit_coefficients(
    x: torch.Tensor, old_grid: torch.Tensor, coef: torch.Tensor, new_grid: torch.Tensor, order: int
) -> torch.Tensor:
    """Coefficients (O, I, S) on new_grid whose splines are the least-squares fit, on the samples x (N, I), of
    the splines with coefficients coef on old_grid. Per input i, with A = new bases (N, S) and B = old bases:
    min |A c' - B c| gives c' = pinv(A^T A) (A^T B) c, so only S x S matrices are formed, never the (N, I, O)
    edge values (17 GB at GPT-2's width and 8k tokens). pinv, not a solve: a basis no sample reaches makes
    A^T A singular (and CUDA's lstsq needs full rank); float64, because A^T A squares A's condition number."""
    A = b_spline_bases(x.double(), new_grid.double(), order)  # (N, I, S)
    B = b_spline_bases(x.double(), old_grid.double(), order)  # (N, I, S)
    gram = torch.einsum("nis,nit->ist", A, A)  # (I, S, S)
    cross = torch.einsum("nis,nit->ist", A, B)  # (I, S, S)
    lift = torch.linalg.pinv(gram, hermitian=True) @ cross  # (I, S, S): old coefficients -> new, per input
    new = lift @ coef.double().permute(1, 2, 0)  # (I, S, S) @ (I, S, O) -> (I, S, O)
    return new.permute(2, 0, 1).to(coef.dtype)  # (O, I, S)


class KANLinear(nn.Module):
    """I -> O through I x O learnable edge functions: a SiLU base branch plus a B-spline on each edge."""

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range: tuple[float, float] = (-1.0, 1.0)):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spline_order = spline_order
        # A buffer, not a parameter: the grid moves only by update_grid, and the checkpoint keeps it. In fp32
        # even in a 16-bit model (_apply): bf16's 8 bits round nearby quantiles to one knot, and a repeated
        # knot divides 0 by 0 in the recursion.
        self.register_buffer("grid", uniform_grid(in_features, grid_size, spline_order, *grid_range))
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))  # (O, I)
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        # nn.Linear's init for the base branch, so that at the start the layer is close to an MLP layer; small
        # spline coefficients (efficient-kan fits them to 0.1-scale noise) that training grows where it pays.
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.normal_(self.spline_weight, std=0.1 / math.sqrt(in_features))

    def _apply(self, fn, recurse: bool = True):
        """.to(), .cuda(), .bfloat16() and the like: the grid moves with the module but stays fp32 (at least)
        when the weights become 16-bit."""
        grid = self.grid
        super()._apply(fn, recurse)
        if self.grid.dtype in (torch.float16, torch.bfloat16):
            self.grid = grid.to(self.grid.device, torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # (N, I)
        base = F.linear(F.silu(x), self.base_weight)  # (N, O)
        # In the grid's precision (fp32 for 16-bit inputs), then in the weights' for the matmul.
        bases = b_spline_bases(x, self.grid, self.spline_order).to(self.spline_weight.dtype)  # (N, I, S)
        # The efficient formulation: sum over every edge and basis in one matmul, (N, I*S) @ (I*S, O).
        spline = F.linear(bases.reshape(x.size(0), -1), self.spline_weight.reshape(self.out_features, -1))
        return (base + spline).reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01, uniform_fraction: float = 0.02) -> None:
        """Move the grid to where the inputs x (N, I) are, keeping the function on them: knots at the inputs'
        quantiles (dense where inputs are dense), mixed with a little of a uniform grid over their range
        (pykan's grid_eps), then coefficients re-fitted by least squares to the old splines' values."""
        x = x.reshape(-1, self.in_features).to(self.grid.dtype)  # the knots in the grid's precision (fp32)
        G, k = self.grid.size(1) - 2 * self.spline_order - 1, self.spline_order
        xs = x.sort(0).values  # (N, I)
        adaptive = xs[torch.linspace(0, x.size(0) - 1, G + 1, device=x.device).long()]  # (G+1, I) quantiles
        h = (xs[-1] - xs[0] + 2 * margin) / G  # (I,): the uniform grid's step over the inputs' range
        steps = torch.arange(G + 1, device=x.device, dtype=x.dtype).unsqueeze(1)  # (G+1, 1)
        uniform = xs[0] - margin + h * steps  # (G+1, I)
        inner = uniform_fraction * uniform + (1 - uniform_fraction) * adaptive  # (G+1, I)
        ext = h * torch.arange(1, k + 1, device=x.device, dtype=x.dtype).unsqueeze(1)  # (k, I)
        grid = torch.cat([inner[:1] - ext.flip(0), inner, inner[-1:] + ext]).T  # (I, K)
        self.spline_weight.copy_(refit_coefficients(x, self.grid, self.spline_weight, grid, k))
        self.grid.copy_(grid)

    def regularization_loss(self, entropy: float = 0.0) -> torch.Tensor:
        """efficient-kan's stand-in for the paper's sparsity loss: the L1 norm of each edge is the mean |c|
        of its spline coefficients (the paper takes the mean |phi(x)| over the batch's activations, which
        needs them kept), summed over edges; plus `entropy` times the entropy of the edges' shares of it."""
        per_edge = self.spline_weight.abs().mean(-1)  # (O, I)
        l1 = per_edge.sum()
        share = per_edge / l1
        return l1 - entropy * (share * torch.log(share + 1e-12)).sum()


class KANMLP(nn.Module):
    """The GPT block's MLP as a two-layer KAN, C -> H -> C: no activation between the layers, the edges are
    the nonlinearity. The inputs come from LayerNorm (about unit variance), so the grid spans [-2, 2]."""

    def __init__(self, n_embd: int, hidden: int, grid_size: int, spline_order: int, dropout: float):
        super().__init__()
        self.fc = KANLinear(n_embd, hidden, grid_size, spline_order, grid_range=(-2.0, 2.0))
        self.proj = KANLinear(hidden, n_embd, grid_size, spline_order, grid_range=(-2.0, 2.0))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.fc(x)))  # (B, T, C) -> (B, T, H) -> (B, T, C)

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor) -> None:
        """Both layers' grids from x (N, C): the second layer's from the first's new outputs."""
        self.fc.update_grid(x)
        self.proj.update_grid(self.fc(x))
