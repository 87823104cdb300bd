"""Mixture of experts: the MLP of a block becomes E expert MLPs and a learned router that sends each token to
k of them (Switch Transformer k = 1, Mixtral k = 2). Three pieces, one idea each:

    Router    fp32 logits, top-k choice, gates; the load-balancing loss and the router z-loss
    Experts   E MLPs as stacked weights (E, C, H) and (E, H, C), run on contiguous slices of sorted tokens
    MoE       dispatch (sort by expert), capacity (drop the overflow), combine (index_add back, gate-weighted)

Shapes: N = tokens (B * T), C = n_embd, E = experts, k = experts per token, H = an expert's hidden width,
M = routed token slots kept (N * k, less the dropped ones).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Router(nn.Module):
    """A linear map C -> E scored in fp32 (bf16's 8 bits would flip near-ties between experts and make the
    softmax's exponentials coarse; Switch computes the router in fp32 for this reason)."""

    def __init__(self, n_embd: int, n_expert: int, top_k: int, bias_update: float):
        super().__init__()
        self.gate = nn.Linear(n_embd, n_expert, bias=False)
        self.top_k = top_k
        self.bias_update = bias_update  # DeepSeek-V3's gamma; 0 = no bias balancing
        # Added to the scores for choosing experts only, never to the gates: it steers load without changing
        # what a chosen expert's output is worth. Learned by a rule, not by gradients, so a buffer.
        self.register_buffer("expert_bias", torch.zeros(n_expert))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> expert ids (N, k), gates (N, k), probabilities (N, E) and logits (N, E), all fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        ids = torch.topk(probs + self.expert_bias, self.top_k, dim=-1).indices  # (N, k)
        gates = probs.gather(-1, ids)  # (N, k)
        if self.top_k > 1:  # Mixtral: a softmax over the chosen k. Top-1 keeps p (renormalised it would be 1,
            gates = gates / gates.sum(-1, keepdim=True)  # and the router would get no gradient: Switch)
        return ids, gates, probs, logits

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, once per training step on the step's counts (E,):
        raise the bias of an expert that got fewer tokens than the mean, lower it for one that got more, by
        a fixed step gamma."""
        self.expert_bias += self.bias_update * torch.sign(counts.float().mean() - counts.float())


def balance_loss(probs: torch.Tensor, ids: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss without alpha: E * sum_i f_i * P_i, where f_i is the fraction of
    routed token slots that chose expert i (counted, no gradient) and P_i the mean router probability of
    expert i (differentiable). Uniform routing gives E * E * (1/E * 1/E) = 1; all on one expert gives E."""
    f = torch.bincount(ids.flatten(), minlength=n_expert).float() / ids.numel()  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return n_expert * (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean of logsumexp(logits)^2. Keeps the router's logits small, so its softmax
    stays in the range where fp32 rounding does not decide which expert wins (Zoph et al. 2022)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class Experts(nn.Module):
    """E GPT-2 MLPs (C -> H, GELU, H -> C) stored as stacked tensors, so that one grouped matmul can run
    all of them on a (M, C) batch sorted by expert."""

    def __init__(self, n_expert: int, n_embd: int, hidden: int, n_layer: int):
        super().__init__()
        self.w_fc = nn.Parameter(torch.randn(n_expert, n_embd, hidden) * 0.02)  # (E, C, H)
        self.b_fc = nn.Parameter(torch.zeros(n_expert, hidden))  # (E, H)
        # GPT-2's scaled init of a residual branch's output projection, as the dense MLP's proj gets
        self.w_proj = nn.Parameter(torch.randn(n_expert, hidden, n_embd) * 0.02 / math.sqrt(2 * n_layer))
        self.b_proj = nn.Parameter(torch.zeros(n_expert, n_embd))  # (E, C)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
        """x (M, C), sorted so that expert e's rows are contiguous, counts[e] of them -> (M, C)."""
        if grouped:
            return self._grouped(x, counts)
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):  # a loop over E experts, never over tokens
            h = F.gelu(x[start : start + n] @ self.w_fc[e] + self.b_fc[e], approximate="tanh")  # (n, H)
            out.append(h @ self.w_proj[e] + self.b_proj[e])  # (n, C)
            start += n
        return torch.cat(out)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same with torch's grouped GEMM: one kernel for all experts (CUTLASS on sm90 in bf16; a
        reference loop elsewhere). offs[e] is where expert e's rows end."""
        offs = counts.cumsum(0).to(torch.int32)  # (E,)
        arange = torch.arange(len(counts), device=x.device)
        expert = torch.repeat_interleave(arange, counts, output_size=len(x))  # (M,); no sync on GPUs
        w_fc, w_proj = self.w_fc.to(x.dtype), self.w_proj.to(x.dtype)
        h = F.gelu(F.grouped_mm(x, w_fc, offs=offs) + self.b_fc[expert].to(x.dtype), approximate="tanh")
        return F.grouped_mm(h, w_proj, offs=offs) + self.b_proj[expert].to(x.dtype)  # (M, C)


class MoE(nn.Module):
    """The block's MLP as a mixture: route, dispatch, run the experts, combine. After each forward pass the
    layer holds `counts` (tokens per expert, kept or dropped) and `aux` (the weighted auxiliary losses)."""

    def __init__(self, config):
        super().__init__()
        C, E = config.n_embd, config.n_expert
        self.n_expert, self.top_k = E, config.top_k
        self.capacity_factor = config.capacity_factor
        self.aux_loss_alpha, self.z_loss_coef = config.aux_loss_alpha, config.z_loss_coef
        self.router = Router(C, E, config.top_k, config.bias_update)
        self.experts = Experts(E, C, config.expert_width, config.n_layer)
        # DeepSeekMoE's shared experts: always on for every token, one MLP S experts wide
        S = config.n_shared_expert
        self.shared = Experts(1, C, S * config.expert_width, config.n_layer) if S else None
        self.dropout = nn.Dropout(config.dropout)
        self.grouped: bool | None = None  # None: grouped GEMM on sm90 GPUs in bf16, the loop elsewhere

    def capacity(self, n_tokens: int) -> int:
        """Slots per expert: capacity_factor x the even share N k / E (Switch); every slot when dropless."""
        if not self.capacity_factor:
            return n_tokens * self.top_k
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        ids, gates, probs, logits = self.router(x)  # (N, k), (N, k), (N, E), (N, E)
        self.aux = {
            "balance": self.aux_loss_alpha * balance_loss(probs, ids, self.n_expert),
            "z": self.z_loss_coef * z_loss(logits),
        }

        # Dispatch: sort the k N (token, expert) slots by expert. Choice-major (slot j N + n is token n's j-th
        # choice) and stable, so within an expert every first choice comes before any second choice, and
        # earlier tokens before later ones: first choices win its capacity (GShard), then token order.
        N = B * T
        flat = ids.T.flatten()  # (k N,)
        order = torch.argsort(flat, stable=True)  # (k N,)
        counts = torch.bincount(flat, minlength=self.n_expert)  # (E,)
        self.counts = counts.detach()
        starts = counts.cumsum(0) - counts  # (E,): where each expert's slots begin in sorted order
        rank = torch.arange(len(flat), device=x.device) - starts[flat[order]]  # place in the expert's queue
        keep = order[rank < self.capacity(N)]  # (M,): the kept slots, still sorted by expert
        kept_counts = counts.clamp(max=self.capacity(N))  # (E,)
        token = keep % N  # (M,): slot j N + n is token n's j-th choice

        y = self.experts(self.cast(x[token]), kept_counts, self.use_grouped(x))  # (M, C)
        y = y.float() * gates.T.flatten()[keep, None]  # gate-weighted, summed in fp32 below
        # Combine: each token gets the sum of its kept experts' outputs. A token all of whose slots were
        # dropped gets zero here, so the block passes it on as its residual, unchanged.
        out = torch.zeros(N, C, device=x.device, dtype=torch.float32).index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(self.cast(x), torch.tensor([N]), False).float()
        return self.dropout(out.to(x.dtype).view(B, T, C))

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Under autocast, the experts' matmuls run in its dtype (grouped_mm is not on autocast's list)."""
        if torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def use_grouped(self, x: torch.Tensor) -> bool:
        """The grouped GEMM where PyTorch has a fast one: CUDA sm90 in bf16, rows a multiple of 16 bytes."""
        if self.grouped is not None:
            return self.grouped
        aligned = x.size(-1) % 8 == 0 and self.experts.w_fc.size(-1) % 8 == 0  # 8 bf16 values = 16 bytes
        fast = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)
        return fast and aligned and self.cast(x).dtype == torch.bfloat16
