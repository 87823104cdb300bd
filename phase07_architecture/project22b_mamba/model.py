"""GPT-2 in one file: embeddings, causal self-attention, MLP, blocks, and sampling. The defaults are GPT-2
small (124M parameters); attention runs through PyTorch's fused scaled_dot_product_attention.

Shapes in comments: B = batch, T = sequence length, C = n_embd, nh = n_head, hs = head size (C // nh),
V = vocab_size.

Mamba (this project, mamba.py): with arch="mamba" the blocks are residual Mamba blocks, x + mamba(ln(x)), with
no attention, no MLP and no position embedding (the recurrence knows the order). arch="gpt" (the default) is
project 07's model, output for output.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba import Mamba, MambaState

ARCHS = ("gpt", "mamba")


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    block_size: int = 1024  # the context: the most tokens the model sees at once
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    flash: bool = True  # fused attention (F.scaled_dot_product_attention); False = written out
    arch: str = "gpt"  # NEW: "gpt" (attention) or "mamba" (selective state-space blocks)
    d_state: int = 16  # NEW: Mamba: N, the state size per channel
    d_conv: int = 4  # NEW: Mamba: K, the causal convolution's width
    expand: int = 2  # NEW: Mamba: d_inner = expand * n_embd
    dt_rank: int | str = "auto"  # NEW: Mamba: R, delta's low rank; "auto" = ceil(n_embd / 16)

    def __post_init__(self):
        # ValueError, not assert: load_checkpoint and train.py turn it into one line for the user
        if self.arch not in ARCHS:  # NEW: the Mamba fields, checked
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if min(self.d_state, self.d_conv, self.expand) < 1:
            raise ValueError("d_state, d_conv and expand must be at least 1")
        if self.dt_rank != "auto" and not (isinstance(self.dt_rank, int) and self.dt_rank >= 1):
            raise ValueError(f"dt_rank must be 'auto' or a positive integer, got {self.dt_rank!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.n_embd

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.n_embd / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def padded_vocab_size(self) -> int:
        """The embedding and output matrices get a multiple of 64 rows (50257 -> 50304): matmuls on
        such shapes map onto GPU tiles without a ragged remainder. The extra rows are never predicted."""
        return -(-self.vocab_size // 64) * 64


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t only looks at positions <= t."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.flash = config.flash
        if not self.flash:
            # True above the diagonal = the future, which a token may not see. A buffer follows .to(device);
            # not persistent, so it is rebuilt from block_size and never stored in a checkpoint.
            mask = torch.triu(torch.ones(config.block_size, config.block_size, dtype=torch.bool), diagonal=1)
            self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # Split C into heads: each head attends on its own hs-wide slice.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.flash:  # one fused kernel; it never materialises the (T, T) score matrix on GPUs
            dropout = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, nh, T, hs)
        else:
            y = self._explicit_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(y))

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs) + causal mask) v, step by step, as in project 01."""
        T = q.size(-2)
        # Scores: how much each query matches each key. Dividing by sqrt(hs) keeps their variance near 1, so
        # the softmax does not saturate as heads get wider.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
        scores = scores.masked_fill(self.causal_mask[:T, :T], float("-inf"))
        weights = F.softmax(scores, dim=-1)  # each row sums to 1 over the visible past
        weights = self.attn_dropout(weights)
        return weights @ v  # (B, nh, T, hs): a weighted sum of the values


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's tanh approximation of GELU (projects 01-02 use the exact one): GPT-2's weights were trained
        # with it, so they load exactly.
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising the branch input, not the residual stream, leaves a clean identity path from the
        # embeddings to the output: gradients reach early layers undiminished, so deep stacks train stably.
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class MambaBlock(nn.Module):
    """Pre-LayerNorm residual Mamba block: x + mamba(ln(x)). The paper uses RMSNorm; LayerNorm, as the rest
    of this GPT, keeps the comparison with it about the mixer alone."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd)
        self.mamba = Mamba(config.n_embd, config.d_inner, config.d_state, config.d_conv, config.dt_rank_value)

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        return x + self.mamba(self.ln(x), state)

    def step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token, (B, C) -> (B, C), from the layer's state."""
        return x + self.mamba.step(self.ln(x), state)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        mamba = config.arch == "mamba"
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # token embedding
        # NEW: Mamba has no position embedding: the recurrence and the causal conv already see the order
        self.wpe = None if mamba else nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        block = MambaBlock if mamba else Block  # NEW: Mamba blocks in place of attention + MLP
        self.blocks = nn.ModuleList([block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying: reading a token in and writing it out use one matrix. Fewer parameters, and each
        # embedding row is trained by both ends (Press & Wolf, 2017).
        self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so shrinking their output projections
        # by 1/sqrt(2 * n_layer) keeps the residual stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            if name.endswith("mamba.out_proj.weight"):  # NEW: one residual branch per Mamba block
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(config.n_layer))
        for b in self.blocks:
            if isinstance(b, MambaBlock):  # NEW: after the generic init, which would zero delta's bias
                b.mamba.reset_dt()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. Position embeddings are left out by default, as in the scaling-law papers
        (the token embedding is shared with lm_head, so it counts once and stays in)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, V) and, given targets (B, T), the mean loss."""
        logits = self.lm_head(self.hidden(idx))[..., : self.config.vocab_size]  # (B, T, V): padding dropped
        loss = None
        if targets is not None:
            # reshape, not view: the logits are a slice of the padded ones (and targets may be a slice too);
            # the copy costs memory traffic, while the padded lm_head matmul keeps its tile-aligned speed.
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hidden(self, idx: torch.Tensor, states: list[MambaState] | None = None) -> torch.Tensor:
        """The last layer's normalised output at every position: (B, T) token ids -> (B, T, C). Mamba
        `states` given are filled with the state after the last token (the prefill of generation)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))  # positions broadcast over the batch
        x = self.drop(x)
        for block, state in zip(self.blocks, states or [None] * len(self.blocks), strict=True):
            x = block(x, state) if state is not None else block(x)
        return self.ln_f(x)

    def new_states(self, batch: int) -> list[MambaState]:
        """A Mamba model's decoding state: one per layer, zeros, of a size that no context length changes."""
        p = self.wte.weight
        return [b.mamba.new_state(batch, p.device, p.dtype) for b in self.blocks]

    def step(self, idx: torch.Tensor, states: list[MambaState]) -> torch.Tensor:  # NEW: decoding, O(1)
        """One token per row, idx (B,), through every layer's recurrence: logits (B, V); states updated."""
        x = self.wte(idx)  # (B, C)
        for block, state in zip(self.blocks, states, strict=True):
            x = block.step(x, state)
        return self.lm_head(self.ln_f(x))[:, : self.config.vocab_size]

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield one new token per step, (B, 1) each. Without a KV cache every step reruns the whole window;
        project 08 removes that cost. Mamba reads the prompt once and then steps its constant-size state."""
        if self.config.arch == "mamba":  # NEW: a recurrent state, no window and no cache
            yield from self._generate_recurrent(idx, max_new_tokens, temperature, top_k, top_p, generator)
            return
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.block_size :]  # past the context, slide: keep the newest tokens
            # Only the last position is sampled from, so only it goes through lm_head (at GPT-2's 50,257
            # tokens that is the largest matmul of the step).
            logits = self.lm_head(self.hidden(window)[:, -1, :])[:, : self.config.vocab_size]  # (B, V)
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id

    def _generate_recurrent(self, idx, max_new_tokens, temperature, top_k, top_p, generator):  # NEW: Mamba
        """Prefill the states with the whole prompt in one forward, then one step() per token. The state
        summarises everything read so far, so generation goes on past block_size without a sliding window."""
        states = self.new_states(idx.size(0))
        logits = self.lm_head(self.hidden(idx, states)[:, -1, :])[:, : self.config.vocab_size]  # (B, V)
        for i in range(max_new_tokens):
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield next_id
            if i + 1 < max_new_tokens:
                logits = self.step(next_id[:, 0], states)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V). Returns (B, 1).

    temperature 0 is greedy; below 1 sharpens the distribution, above 1 flattens it.
    top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability reaches p
    ("nucleus sampling", Holtzman et al. 2019). Both may be combined; top-k is applied first.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _nucleus_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest most-likely set with total probability >= top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = F.softmax(sorted_logits, dim=-1)  # (B, V), most likely first
    # Drop a token when the tokens more likely than it already reach top_p. The most likely token always
    # survives, so the set is never empty.
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))
