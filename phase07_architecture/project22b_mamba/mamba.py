"""Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"): the block that
replaces attention, the selective scan three ways (a sequential reference, a chunked parallel scan, and the
Triton kernel in scan_kernel.py), and the constant-size state that decoding carries instead of a KV cache.

A state-space model keeps, per channel d, a state h of N numbers and reads one input a step:

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t        A diagonal and negative: every state decays
    y_t = C_t . h_t + D u_t                                  D: a skip connection around the state

"Selective": delta (how much of the present to let in), B (what to write) and C (what to read) depend on the
input token, so the model can choose to remember or forget, which a time-invariant SSM (S4) cannot.

Shapes in comments: B = batch, T = sequence length, C = n_embd, Di = d_inner (expand * C), N = d_state,
K = d_conv, R = dt_rank.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton runs on Linux; elsewhere the chunked PyTorch scan does the work
    from scan_kernel import triton_selective_scan
except ImportError:
    triton_selective_scan = None

SCANS = ("ref", "chunked", "triton")


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence above, one time step after another: the formula mamba-ssm's selective_scan_ref
    computes. u, delta: (B, T, Di); A: (Di, N); B, C: (B, T, N); D: (Di,); h0: (B, Di, N) or None (zeros).
    Returns y (B, T, Di) and the last state (B, Di, N)."""
    h = u.new_zeros(u.size(0), u.size(2), A.size(1)) if h0 is None else h0  # (B, Di, N)
    ys = []
    for t in range(u.size(1)):
        decay = torch.exp(delta[:, t, :, None] * A)  # (B, Di, N): in (0, 1), since delta > 0 and A < 0
        write = (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]  # (B, Di, N)
        h = decay * h + write
        ys.append((h * C[:, t, None, :]).sum(-1))  # (B, Di): each channel reads its state through C_t
    y = torch.stack(ys, dim=1)  # (B, T, Di)
    return y + u * D, h


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same result in log2(chunk) + T / chunk tensor steps instead of T. The step h -> a h + b composes
    associatively ((a1, b1) then (a2, b2) is (a2 a1, a2 b1 + b2)), so inside each chunk a Hillis-Steele scan
    combines neighbours 1, 2, 4, ... apart, every position at once; then one short loop carries each chunk's
    last state into the next. Decays only multiply (no exp of a cumulative sum), so nothing overflows."""
    Bsz, T, Di = u.shape
    Q = min(chunk, 1 << (T - 1).bit_length())  # a power of two, no longer than needed
    pad = -T % Q
    a = torch.exp(delta[..., None] * A)  # (B, T, Di, N): per-step decay
    b = (delta * u)[..., None] * B[:, :, None, :]  # (B, T, Di, N): per-step write
    a = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0).view(Bsz, -1, Q, Di, A.size(1))  # (B, nc, Q, Di, N)
    b = F.pad(b, (0, 0, 0, 0, 0, pad)).view_as(a)  # padding: decay 1, write 0, the state passes unchanged
    step = 1
    while step < Q:  # after this loop a[:, c, t], b[:, c, t] take the chunk's start state to its step t
        b = torch.cat([b[:, :, :step], a[:, :, step:] * b[:, :, :-step] + b[:, :, step:]], dim=2)
        a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], dim=2)
        step *= 2
    h = u.new_zeros(Bsz, Di, A.size(1)) if h0 is None else h0  # (B, Di, N)
    states = []
    for c in range(a.size(1)):  # T / Q steps: the carry between chunks
        states.append(a[:, c] * h[:, None] + b[:, c])  # (B, Q, Di, N)
        h = states[-1][:, -1]
    hs = torch.stack(states, dim=1).view(Bsz, -1, Di, A.size(1))[:, :T]  # (B, T, Di, N)
    y = torch.einsum("btdn,btn->btd", hs, C)  # (B, T, Di)
    return y + u * D, hs[:, -1]


def selective_scan(u, delta, A, B, C, D, h0=None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One of the three scans, by name; "auto" is the Triton kernel on a GPU and the chunked scan elsewhere.
    Inputs and outputs are as in selective_scan_ref."""
    if impl == "auto":
        impl = "triton" if u.is_cuda and triton_selective_scan is not None else "chunked"
    if impl not in SCANS:
        raise ValueError(f"unknown scan {impl!r}; choose from {', '.join(SCANS)}")
    if impl == "triton" and triton_selective_scan is None:
        raise RuntimeError("the Triton scan needs the triton package (Linux)")
    with torch.autocast(u.device.type, enabled=False):  # fp32 throughout: autocast would put einsum in bf16
        if impl == "triton":  # its backward recomputes through the chunked scan
            return triton_selective_scan(u, delta, A, B, C, D, h0, selective_scan_chunked)
        scan = selective_scan_chunked if impl == "chunked" else selective_scan_ref
        return scan(u, delta, A, B, C, D, h0)


@dataclass
class MambaState:
    """What one layer remembers between decoding steps, whatever the context length: the last K inputs of
    the causal convolution and the SSM state. A transformer's KV cache instead grows by 2 C numbers per
    token and layer."""

    conv: torch.Tensor  # (B, Di, K): the convolution's window, oldest input first
    ssm: torch.Tensor  # (B, Di, N)

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


class Mamba(nn.Module):
    """The mixer of a Mamba block (the paper's figure 3): in_proj splits into a main path and a gate; the main
    path runs a causal depthwise conv1d, SiLU, then the selective SSM; the gate's SiLU multiplies the result;
    out_proj goes back to C."""

    def __init__(self, n_embd: int, d_inner: int, d_state: int, d_conv: int, dt_rank: int):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.in_proj = nn.Linear(n_embd, 2 * d_inner, bias=False)  # main path and gate in one matmul
        # groups=Di: each channel has its own K-tap filter (depthwise). Padding K - 1 on both sides and
        # keeping the first T outputs makes it causal: output t sees inputs t-K+1 .. t.
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(
            d_inner, dt_rank + 2 * d_state, bias=False
        )  # delta (low rank), B, C: selective
        self.dt_proj = nn.Linear(dt_rank, d_inner)  # R -> Di: delta's rank-R bottleneck (R = C / 16)
        # A = -exp(A_log), kept in log form so it stays negative whatever the optimizer does. S4D-real's
        # init: row n is -(n + 1), the same for every channel.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (Di, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))  # the skip u * D around the SSM
        self.out_proj = nn.Linear(d_inner, n_embd, bias=False)
        self.scan = "auto"  # which selective scan runs (SCANS); the benchmark and tests switch it

    @torch.no_grad()
    def reset_dt(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """The paper's delta init, applied after the model's generic init (which would zero this bias):
        softplus(bias) = dt sampled log-uniformly in [dt_min, dt_max], so each channel starts with its own
        time scale, from ~10 steps (dt 0.1) to ~1000 (dt 0.001)."""
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt) = dt + log(1 - e^-dt)

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). A `state` given is overwritten with the one after the last token, so
        that step() can carry on from there (the prompt's prefill)."""
        T = x.size(1)
        u, z = self.in_proj(x).chunk(2, dim=-1)  # 2 x (B, T, Di)
        conv_in = u.transpose(1, 2)  # (B, Di, T): Conv1d wants channels first
        u = F.silu(self.conv1d(conv_in)[..., :T].transpose(1, 2))  # (B, T, Di): causal, first T outputs
        delta, B, C = self._selection(u)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        # the scan in fp32 whatever autocast does: the state accumulates T steps of products
        y, h = selective_scan(
            u.float(), delta.float(), A, B.float(), C.float(), self.D.float(), impl=self.scan
        )
        if state is not None:
            K = state.conv.size(-1)
            state.conv.copy_(F.pad(conv_in, (max(0, K - T), 0))[..., -K:])  # the last K inputs, zeros before
            state.ssm.copy_(h)
        return self.out_proj(y.to(x.dtype) * F.silu(z))  # the gate: SiLU(z) decides what leaves the block

    def _selection(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input-dependent delta (..., Di) (positive, by softplus), B and C (..., N) of each token."""
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def new_state(self, batch: int, device, dtype) -> MambaState:
        K = self.conv1d.kernel_size[0]
        return MambaState(
            conv=torch.zeros(batch, self.d_inner, K, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: x (B, C) -> (B, C), updating `state` in place. O(1) in the context length: the
        recurrence, one step of it, instead of attention over every cached key."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # 2 x (B, Di)
        state.conv.copy_(torch.cat([state.conv[..., 1:], u[..., None]], dim=-1))  # slide the window by one
        w = self.conv1d.weight.squeeze(1)  # (Di, K)
        u = F.silu((state.conv * w).sum(-1) + self.conv1d.bias)  # (B, Di): the conv's output at this step
        delta, B, C = (t.float() for t in self._selection(u))  # (B, Di), (B, N), (B, N)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        uf = u.float()
        state.ssm.copy_(torch.exp(delta[..., None] * A) * state.ssm + (delta * uf)[..., None] * B[:, None, :])
        y = (state.ssm * C[:, None, :]).sum(-1) + self.D * uf  # (B, Di)
        return self.out_proj(y.to(x.dtype) * F.silu(z))
