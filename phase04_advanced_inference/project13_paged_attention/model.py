"""GPT-2 in one file: embeddings, causal self-attention, MLP, blocks, and sampling. The defaults are GPT-2
small (124M parameters); attention runs through PyTorch's fused scaled_dot_product_attention. Generation keeps
every layer's keys and values, so each new token costs one position's work, not the prefix's: the serving
engine (engine.py) runs many sequences at once through step_logits, one step computing every sequence's new
tokens together (Orca's selective batching), each reading its keys and values through its block table from a
pool of fixed-size blocks (NEW: vLLM's PagedAttention, paged_attention.py). generate_stream keeps no cache
at all: it reruns the window every step, the baseline of generate.py --no-cache.

Shapes in comments: B = batch, T = sequence length, C = n_embd, nh = n_head, hs = head size (C // nh),
V = vocab_size, N = an engine step's tokens, P = the pool's blocks, L = positions per block.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from paged_attention import gather_blocks, paged_attention, paged_attention_reference, paged_kernel_runs_on

try:  # Triton runs on Linux; elsewhere attention falls back to scaled_dot_product_attention
    from flash_attention import flash_attention, kernels_run_on
except ImportError:
    flash_attention = None


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    block_size: int = 1024  # the context: the most tokens the model sees at once
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    flash: bool = True  # fused attention (F.scaled_dot_product_attention); False = written out
    triton: bool = True  # with flash, our FlashAttention-2 kernels (flash_attention.py) where they run

    @property
    def padded_vocab_size(self) -> int:
        """The embedding and output matrices get a multiple of 64 rows (50257 -> 50304): matmuls on
        such shapes map onto GPU tiles without a ragged remainder. The extra rows are never predicted."""
        return -(-self.vocab_size // 64) * 64


class PagedKVCache(nn.Module):
    """NEW: one layer's keys and values for the serving engine, as a pool of blocks of kv_block_size positions
    (vLLM's PagedAttention). A sequence's positions live in the blocks its block table lists, wherever they
    are in the pool (block_manager.py hands them out)."""

    def __init__(self, num_blocks: int, kv_block_size: int, n_head: int, head_size: int, dtype, device=None):
        super().__init__()
        shape = (num_blocks, n_head, kv_block_size, head_size)  # (P, nh, L, hs)
        self.register_buffer("k_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Token i's k, v (N, nh, hs) into block blocks[i] at offset offsets[i]: one indexed write a step."""
        self.k_pool[blocks, :, offsets] = k
        self.v_pool[blocks, :, offsets] = v

    def copy_blocks(self, sources: list[int], destinations: list[int]) -> None:
        """Copy-on-write: the shared blocks' contents into the blocks a sequence now holds alone."""
        self.k_pool[destinations] = self.k_pool[sources]
        self.v_pool[destinations] = self.v_pool[sources]


@dataclass
class AttentionGroup:
    """Sequences of an engine step that attend alike: the same number of new tokens each, so that their
    queries stack into one (G, nh, T, hs) tensor. Every decoding sequence (one token) is in one group; each
    prefill is a group of its own."""

    start: int  # the group's tokens are the step's tokens start..end-1, sequence after sequence
    end: int
    tables: torch.Tensor  # NEW: (G, M) int32: each sequence's block table, padded with block 0
    lens: torch.Tensor  # NEW: (G,) int32: each sequence's positions after this step (its keys)
    max_len: int  # NEW: the longest of them
    mask: torch.Tensor | None  # (1, 1, T, max_len): a prefill after a prefix hit; None: decoding, or a
    # prefill from position 0


@dataclass
class StepBatch:
    """Where the N tokens of one engine step come from and go to. The tokens of all sequences are laid end
    to end: every layer but attention treats them as one (1, N) batch with no padding (Orca's selective
    batching); attention runs per group of sequences, each reading its own blocks of the KV pool."""

    blocks: torch.Tensor  # (N,): NEW: the block that holds each token's key and value ...
    offsets: torch.Tensor  # (N,): ... and its place in that block
    positions: torch.Tensor  # (N,): each token's position
    last: torch.Tensor  # (number of sequences,): the index of each sequence's last token
    groups: list[AttentionGroup]

    @staticmethod
    def build(layout: list[tuple[list[int], int, int]], kv_block_size: int, device) -> "StepBatch":
        """layout: (block table, first position, number of tokens) of each sequence, in token order.
        Sequences with one token each (decoding) next to one another share one attention group."""
        blocks, positions, groups, start = [], [], [], 0
        for table, first, n in layout:
            positions += range(first, first + n)
            blocks += [table[p // kv_block_size] for p in range(first, first + n)]  # NEW: through its table
            if n == 1 and groups and groups[-1][2] == 1:
                groups[-1][1] += 1  # one more decoding sequence in the open group
                groups[-1][3].append(table)
            else:
                groups.append([start, start + n, n, [table]])
            start += n
        pos_t = torch.tensor(positions, device=device)
        counts = torch.tensor([n for _, _, n in layout], device=device)
        groups = [_group(*g, positions, kv_block_size, device) for g in groups]
        blocks_t = torch.tensor(blocks, device=device)
        return StepBatch(blocks_t, pos_t % kv_block_size, pos_t, counts.cumsum(0) - 1, groups)


def _group(
    start: int, end: int, n: int, tables: list[list[int]], positions: list[int], kv_block_size: int, device
):
    """An AttentionGroup of the step's tokens start..end-1, n per sequence. NEW: each sequence's block table,
    and how many positions its last query sees. A prefill from position 0 attends causally to its own keys
    (through the Triton kernels on a GPU); a prefill after a prefix hit sees its blocks up to each query's
    position. Built from host lists: no GPU round trip."""
    lens = [p + 1 for p in positions[start + n - 1 : end : n]]  # (G,): each sequence's last position + 1
    width = -(-max(lens) // kv_block_size)  # the blocks that hold the longest one's positions
    padded = [t[:width] + [0] * (width - len(t)) for t in tables]  # (G, M)
    mask = None
    if n > 1 and positions[start] > 0:
        pos = torch.tensor(positions[start:end], device=device)  # (T,)
        mask = (torch.arange(lens[0], device=device) <= pos[:, None])[None, None]  # (1, 1, T, S)
    tables_t = torch.tensor(padded, dtype=torch.int32, device=device)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    return AttentionGroup(start, end, tables_t, lens_t, max(lens), mask)


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
        self.triton = config.triton and flash_attention is not None
        self.kv_pool: PagedKVCache | None = None  # NEW: set by GPT.setup_kv_pool for the serving engine
        if not self.flash:
            # True above the diagonal = the future, which a token may not see. A buffer follows .to(device);
            # not persistent, so it is rebuilt from block_size and never stored in a checkpoint.
            mask = torch.triu(torch.ones(config.block_size, config.block_size, dtype=torch.bool), diagonal=1)
            self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        """x (B, T, C): the whole sequence, causally masked; with batch, an engine step's tokens (1, N, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        if batch is not None:  # many sequences' tokens end to end; attention per group of sequences
            return self.resid_dropout(self.proj(self._step_attention(q[0], k[0], v[0], batch)[None]))
        # Split C into heads: each head attends on its own hs-wide slice.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = self._attend(q, k, v, None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(y))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs)) v through the fastest path that applies: (B, nh, T, hs)."""
        dropout = self.attn_dropout.p if self.training else 0.0
        if self.flash and self.triton and mask is None and dropout == 0 and kernels_run_on(q):
            return flash_attention(q, k, v, causal=True)  # our FlashAttention-2 kernels, (B, nh, T, hs)
        if self.flash:  # one fused kernel; it never materialises the (T, T) score matrix on GPUs
            # A prefill after a prefix hit brings its own mask: its queries are not at positions 0..T-1
            # (the Triton kernels take no mask, so it stays here, with dropout and the CPU's fallback).
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None
            )  # (B, nh, T, hs)
        return self._explicit_attention(q, k, v, mask)

    def _step_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        """q, k, v (N, C): one engine step's tokens, every sequence's end to end. NEW: each token's key and
        value go into its sequence's block at its offset; then each group's queries attend to their own
        blocks, through the block tables. Returns (N, C)."""
        N, C = q.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = (t.view(N, nh, hs) for t in (q, k, v))
        pool = self.kv_pool
        pool.write(batch.blocks, batch.offsets, k, v)
        y = torch.empty_like(q)  # (N, nh, hs)
        for g in batch.groups:
            if g.end - g.start == len(g.lens):  # NEW: decoding, one query per sequence, (G, nh, hs)
                attend = paged_attention if self.triton and paged_kernel_runs_on(q, pool.k_pool) else None
                attend = attend or paged_attention_reference  # elsewhere: gather the blocks, then SDPA
                y[g.start : g.end] = attend(q[g.start : g.end], pool.k_pool, pool.v_pool, g.tables, g.lens)
                continue
            q_g = q[g.start : g.end].transpose(0, 1)[None]  # a prefill: (1, nh, T, hs)
            if g.mask is None:  # from position 0: its own keys and values are all it sees
                k_g, v_g = k[g.start : g.end].transpose(0, 1)[None], v[g.start : g.end].transpose(0, 1)[None]
            else:  # NEW: after a prefix hit, its blocks up to its last position: (1, nh, S, hs)
                k_g = gather_blocks(pool.k_pool, g.tables, g.max_len)
                v_g = gather_blocks(pool.v_pool, g.tables, g.max_len)
            y[g.start : g.end] = self._attend(q_g, k_g, v_g, g.mask)[0].transpose(0, 1)
        return y.view(N, C)

    def _explicit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs) + causal mask) v, step by step, as in project 01."""
        T = q.size(-2)
        # Scores: how much each query matches each key. Dividing by sqrt(hs) keeps their variance near 1, so
        # the softmax does not saturate as heads get wider.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T), or (B, nh, T, S) cached
        hidden = self.causal_mask[:T, :T] if mask is None else ~mask  # SDPA's mask marks what is seen
        scores = scores.masked_fill(hidden, float("-inf"))
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

    def forward(self, x: torch.Tensor, batch: StepBatch | None = None) -> torch.Tensor:
        # Normalising the branch input, not the residual stream, leaves a clean identity path from the
        # embeddings to the output: gradients reach early layers undiminished, so deep stacks train stably.
        x = x + self.attn(self.ln_1(x), batch)  # an engine step's blocks and groups, when serving
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
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
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, V) and, given targets (B, T), the mean loss."""
        x = self.hidden(idx)  # (B, T, C)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V): the vocabulary's padding dropped
        loss = None
        if targets is not None:
            # reshape, not view: the logits are a slice of the padded ones (and targets may be a slice too);
            # the copy costs memory traffic, while the padded lm_head matmul keeps its tile-aligned speed.
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The last layer's normalised output at every position: (B, T) token ids -> (B, T, C)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        pos = torch.arange(T, device=idx.device)  # (T,); attention masks causally itself
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C); positions broadcast over the batch
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def next_token_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, V): the logits of the token after idx's last. Only the last position goes through lm_head (at
        GPT-2's 50,257 tokens that is the largest matmul of a step)."""
        return self.lm_head(self.hidden(idx)[:, -1, :])[:, : self.config.vocab_size]

    # --- the serving engine (engine.py) -------------------------------------------------------------------

    def setup_kv_pool(self, num_blocks: int, kv_block_size: int, dtype, device) -> list[PagedKVCache]:
        """NEW: give every attention layer a pool of num_blocks blocks of kv_block_size positions. Returns
        them, one per layer: the engine's KV memory."""
        hs = self.config.n_embd // self.config.n_head
        for block in self.blocks:
            block.attn.kv_pool = PagedKVCache(
                num_blocks, kv_block_size, self.config.n_head, hs, dtype, device
            )
        return [block.attn.kv_pool for block in self.blocks]

    def step_logits(self, idx: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """One engine step. idx (N,): the new tokens of several sequences, laid end to end as batch says; each
        goes into its sequence's blocks of the KV pool and attends to those alone. Returns
        (number of sequences, V): the logits of each sequence's next token."""
        x = self.drop(self.wte(idx) + self.wpe(batch.positions))[None]  # (1, N, C): no padding anywhere
        for block in self.blocks:
            x = block(x, batch=batch)
        x = self.ln_f(x[0, batch.last])  # (sequences, C): only each sequence's last token goes on
        return self.lm_head(x)[:, : self.config.vocab_size]

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
        """Yield one new token per step, (B, 1) each, without any cache: every step reruns the whole window
        (project 12's contiguous cache gives the same tokens; the engine serves with the paged one)."""
        sampling = (temperature, top_k, top_p, generator)
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.block_size :]  # past the context, slide: keep the newest tokens
            next_id = sample_next_token(self.next_token_logits(window), *sampling)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id


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
