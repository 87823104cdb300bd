"""GPT-2 in one file: embeddings, causal self-attention, MLP, blocks, and sampling. The defaults are GPT-2
small (124M parameters); attention runs through PyTorch's fused scaled_dot_product_attention. Generation keeps
every layer's keys and values in a KV cache, so each new token costs one position's work, not the prefix's.

Shapes in comments: B = batch, T = sequence length, C = n_embd, nh = n_head, hs = head size (C // nh),
V = vocab_size, S = the KV cache's slots.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton runs on Linux; elsewhere attention falls back to scaled_dot_product_attention
    from flash_attention import flash_attention, kernels_run_on
    from sparse_attention import Pattern, block_for, layout_for, sparse_attention
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
    triton: bool = True  # with flash, our Triton kernels (flash_attention.py) where they run
    pattern: str = "dense"  # NEW: which keys a query sees: dense causal or a sparse_attention.PATTERNS
    window: int = 256  # NEW: the pattern's local band (the stride of "strided" and "fixed")

    @property
    def padded_vocab_size(self) -> int:
        """The embedding and output matrices get a multiple of 64 rows (50257 -> 50304): matmuls on
        such shapes map onto GPU tiles without a ragged remainder. The extra rows are never predicted."""
        return -(-self.vocab_size // 64) * 64


class KVCache(nn.Module):
    """Every layer's keys and values so far, in buffers allocated once at their full size (gpt-fast's
    static cache): a decoding step writes one slot instead of recomputing the whole prefix, and the shapes
    never change, so torch.compile and CUDA graphs capture a step once."""

    def __init__(self, batch_size: int, max_seq_len: int, n_head: int, head_size: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_size)  # (B, nh, S, hs)
        # Buffers follow .to(device); not persistent, so a cache never ends up in a checkpoint.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hs) into slots input_pos (T,); return the whole caches, (B, nh, S, hs)."""
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class RollingKVCache(KVCache):
    """NEW: Mistral's rolling buffer for a sliding window of W tokens: position p goes to slot p % W,
    overwriting the key that has just left the window, so decoding holds W positions however long it runs."""

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        W = self.k_cache.size(2)
        # A prompt longer than the window keeps its last W keys (the older ones would be overwritten anyway).
        return super().update(input_pos[-W:] % W, k[:, :, -W:], v[:, :, -W:])


def pattern_of(config: GPTConfig) -> "Pattern | None":
    """NEW: the attention pattern of a config, None for dense causal attention."""
    return None if config.pattern == "dense" else Pattern(config.pattern, config.window)


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
        self.kv_cache: KVCache | None = None  # set by GPT.setup_cache for generation
        self.pattern = pattern_of(config)
        if not self.flash:
            # True above the diagonal = the future, which a token may not see. A buffer follows .to(device);
            # not persistent, so it is rebuilt from block_size and never stored in a checkpoint.
            mask = torch.triu(torch.ones(config.block_size, config.block_size, dtype=torch.bool), diagonal=1)
            self.register_buffer("causal_mask", mask, persistent=False)

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Without input_pos: x is the whole sequence, causally masked. With it (the cached path): x
        holds the tokens at cache slots input_pos (T,), and mask (T, S) or (B, 1, T, S) says which slots each
        of them may see (True = attend)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # Split C into heads: each head attends on its own hs-wide slice.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if input_pos is not None:  # store this step's keys and values, attend to every slot so far
            k_all, v_all = self.kv_cache.update(
                input_pos, k, v
            )  # (B, nh, S, hs); the mask hides unwritten slots
            if mask is not None:  # else a prefill from slot 0, whose own keys are all it may see
                k, v = k_all, v_all
        dropout = self.attn_dropout.p if self.training else 0.0
        kernels = self.flash and self.triton and mask is None and dropout == 0 and kernels_run_on(q)
        if self.pattern is not None and mask is None and not kernels:  # NEW: the pattern as a (T, T) mask
            mask = self.pattern.token_mask(T, q.device)
        if kernels and self.pattern is not None:  # NEW: only the key blocks the pattern keeps
            y = sparse_attention(q, k, v, layout_for(self.pattern, T, block_for(q.device), q.device))
        elif kernels:
            y = flash_attention(q, k, v, causal=True)  # our FlashAttention-2 kernels, (B, nh, T, hs)
        elif self.flash:  # one fused kernel; it never materialises the (T, T) score matrix on GPUs
            # Decoding brings its own mask: its queries are not at positions 0..T-1 (the Triton kernels take
            # no mask, so decoding stays here, with dropout and the explicit path's CPU fallback).
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None
            )  # (B, nh, T, hs)
        else:
            y = self._explicit_attention(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(y))

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

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Normalising the branch input, not the residual stream, leaves a clean identity path from the
        # embeddings to the output: gradients reach early layers undiminished, so deep stacks train stably.
        x = x + self.attn(self.ln_1(x), input_pos, mask)  # cache slots and mask, when generating
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
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, V) and, given targets (B, T), the mean loss.
        input_pos: the cached path (see hidden)."""
        x = self.hidden(idx, input_pos)  # (B, T, C)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V): the vocabulary's padding dropped
        loss = None
        if targets is not None:
            # reshape, not view: the logits are a slice of the padded ones (and targets may be a slice too);
            # the copy costs memory traffic, while the padded lm_head matmul keeps its tile-aligned speed.
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hidden(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, prefill: bool = False
    ) -> torch.Tensor:
        """The last layer's normalised output at every position: (B, T) token ids -> (B, T, C).

        With input_pos (T,), after setup_cache(), idx holds the tokens at those cache slots, and they
        attend to every slot written so far. prefill: input_pos is 0..T-1, so the tokens need see only each
        other."""
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(
                    f"sequence of {T} tokens is longer than the context ({self.config.block_size})"
                )
            pos, mask = torch.arange(T, device=idx.device), None  # (T,); attention masks causally itself
        else:
            pos, mask = input_pos, self._cached_mask(input_pos, prefill)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C); positions broadcast over the batch
        for block in self.blocks:
            x = block(x, input_pos, mask)
        return self.ln_f(x)

    def next_token_logits(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, prefill: bool = False
    ) -> torch.Tensor:
        """(B, V): the logits of the token after idx's last. Only the last position goes through lm_head (at
        GPT-2's 50,257 tokens that is the largest matmul of a step)."""
        x = self.hidden(idx, input_pos, prefill)[:, -1, :]  # (B, C)
        return self.lm_head(x)[:, : self.config.vocab_size]

    # --- the KV cache --------------------------------------------------------------------------------------

    def setup_cache(
        self, batch_size: int, max_seq_len: int, dtype=None, device=None, rolling: bool = False
    ) -> None:
        """Give every attention layer a KVCache of max_seq_len slots. dtype: the dtype the keys come out
        in (autocast's under autocast); by default the weights' dtype and device. rolling: a "window"
        pattern's RollingKVCache of min(window, max_seq_len) slots instead."""
        if max_seq_len > self.config.block_size:  # a position past the context has no embedding
            raise ValueError(
                f"a KV cache of {max_seq_len} positions is longer than the context ({self.config.block_size})"
            )
        if rolling and self.config.pattern != "window":  # NEW: only a window forgets what lies behind it
            raise ValueError(f"a rolling KV cache needs the window pattern, not {self.config.pattern!r}")
        w = self.wte.weight
        hs = self.config.n_embd // self.config.n_head
        cache, slots = (
            (RollingKVCache, min(self.config.window, max_seq_len)) if rolling else (KVCache, max_seq_len)
        )
        self.cache_positions = max_seq_len  # NEW: the positions it takes (a rolling cache has fewer slots)
        for block in self.blocks:
            block.attn.kv_cache = cache(
                batch_size, slots, self.config.n_head, hs, dtype or w.dtype, device or w.device
            )

    def clear_cache(self) -> None:
        """Drop the caches (their memory goes back to the allocator)."""
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def cache_size(self) -> int:
        """Slots in each layer's KV cache (S)."""
        cache = self.blocks[0].attn.kv_cache
        if cache is None:
            raise ValueError("no KV cache: call setup_cache() first")
        return cache.k_cache.size(2)

    def _cached_mask(self, input_pos: torch.Tensor, prefill: bool) -> torch.Tensor | None:
        """The slots that tokens at cache slots input_pos (T,) may see, (T, S); None for a prefill, whose
        slots 0..T-1 see only each other."""
        if prefill:  # the prompt's own keys: no mask, so the Triton kernels can take it
            return None
        slots = torch.arange(self.cache_size, device=input_pos.device)  # (S,)
        pattern = self.blocks[0].attn.pattern
        if pattern is None or isinstance(self.blocks[0].attn.kv_cache, RollingKVCache):
            # Causal: unwritten slots all lie ahead, so hidden too. A rolling cache holds only the window,
            # in slots p % W: once full, every slot is in the window; before, exactly slots <= p are written.
            return slots <= input_pos[:, None]  # (T, S)
        return pattern.mask_mod(self.cache_size, slots.device)(input_pos[:, None], slots)  # NEW: (T, S)

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """The whole prompt (B, T) in one forward pass, into cache slots 0..T-1. Returns (B, V), the
        logits of the first new token: this pass is the time to first token."""
        if idx.size(1) > self.cache_positions:
            raise ValueError(
                f"a prompt of {idx.size(1)} tokens does not fit the KV cache ({self.cache_positions})"
            )
        slots = torch.arange(idx.size(1), device=idx.device)  # (T,)
        return self.next_token_logits(idx, slots, prefill=True)

    def decode(self, next_id: torch.Tensor, slot: int) -> torch.Tensor:
        """One token per row, (B, 1), at cache slot `slot`: one position's work, attending to the slots
        before it. Returns (B, V)."""
        if slot >= self.cache_positions:
            raise ValueError(
                f"slot {slot} is past the KV cache's {self.cache_positions}; setup_cache() a larger one"
            )
        pos = torch.arange(slot, slot + 1, device=next_id.device)  # (1,): made on the device, no host sync
        return self.next_token_logits(next_id, pos)

    def _activation_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype keys come out in, which the cache must hold: autocast's when it is on, else the
        weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.wte.weight.dtype

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        rolling: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield one new token per step, (B, 1) each. With use_cache, the prompt is prefilled once and
        every step then computes one position; use_cache=False reruns the whole window every step.
        rolling: with the window pattern, cache only the window (RollingKVCache); else every position."""
        sampling = (temperature, top_k, top_p, generator)
        if use_cache:  # prefill once, then one position per step
            rolling = rolling and self.config.pattern == "window"  # NEW: O(window) decode memory
            yield from self._generate_cached(idx, max_new_tokens, sampling, rolling)
            return
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.block_size :]  # past the context, slide: keep the newest tokens
            next_id = sample_next_token(self.next_token_logits(window), *sampling)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id

    def _generate_cached(
        self, idx: torch.Tensor, max_new_tokens: int, sampling: tuple, rolling: bool
    ) -> Iterator[torch.Tensor]:
        """Prefill the prompt, then decode one token per step into the next cache slot.

        Past the context (block_size) the window slides, and with learned absolute positions every token
        then moves to a new position: every cached key is stale. So once the cache is full, each step
        re-prefills the newest window. That gives exactly the tokens of use_cache=False, at its speed: the
        cache's speed-up ends at the context length."""
        B, T = idx.shape
        block_size = self.config.block_size
        size = min(T + max_new_tokens, block_size)  # the prompt and every new token, up to the context
        self.setup_cache(B, size, self._activation_dtype(idx.device), idx.device, rolling)
        try:
            for step in range(max_new_tokens):
                if idx.size(1) > block_size:  # the cache is full: re-prefill the newest window
                    logits = self.prefill(idx[:, -block_size:])  # (B, V)
                elif step == 0:
                    logits = self.prefill(idx)
                else:  # the newest token goes into the next slot
                    logits = self.decode(idx[:, -1:], idx.size(1) - 1)
                next_id = sample_next_token(logits, *sampling)  # (B, 1)
                idx = torch.cat([idx, next_id], dim=1)
                yield next_id
        finally:
            self.clear_cache()


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
