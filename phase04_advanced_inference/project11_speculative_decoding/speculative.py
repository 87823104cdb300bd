"""Speculative decoding (Leviathan, Kalman, Matias 2023; Chen et al. 2023): a cheap drafter proposes k tokens,
the target model scores all of them in one forward pass, and modified rejection sampling keeps each draft with
probability min(1, p(x) / q(x)). The tokens that come out are distributed exactly as the target's own samples
(greedy: the very same tokens), and every target pass yields between 1 and k + 1 of them.

Two drafters: a smaller GPT with its own KV cache (ModelDrafter), and prompt lookup decoding (LookupDrafter,
Saxena 2023), which copies what followed the last n-gram's earlier occurrence in the text so far.

One sequence at a time (batch 1): the rows of a batch would accept different numbers of drafts.
Shapes: k = drafts per step, V = vocab_size, n = tokens so far.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import GPT, probabilities, sample_next_token
from prefix_cache import PrefixCache


@dataclass
class SpeculationStats:
    """What the drafts bought, summed over every speculative step (one target pass each)."""

    steps: int = 0  # target passes that checked drafts (past the context: plain steps, not counted)
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # proposals kept
    rejections: int = 0  # steps that stopped at a rejected draft (the others accepted all they checked)

    @property
    def acceptance_rate(self) -> float:
        """The fraction of proposals kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def alpha(self) -> float:
        """The per-token acceptance probability of Leviathan et al.'s analysis, estimated from the drafts that
        were checked: a step checks its drafts in order until the first rejection, and the ones after it are
        never tried (a geometric count: accepted / (accepted + rejections))."""
        tried = self.accepted + self.rejections
        return self.accepted / tried if tried else 0.0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per target pass: the accepted drafts and the one token the target adds every step."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    def summary(self) -> str:
        return (
            f"[speculative] {self.steps} target passes, {self.accepted}/{self.drafted} drafts accepted "
            f"({self.acceptance_rate:.0%}); {self.tokens_per_step:.2f} tokens per target pass"
        )


# --- the acceptance rule ------------------------------------------------------------------------------------


def accept_sampled(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified rejection sampling (Leviathan et al. 2023, algorithm 1; Chen et al. 2023, algorithm 2).

    p: (B, k + 1, V), the target's probabilities at each draft's position and one after the last;
    q: (B, k, V), the drafter's, from which drafts (B, k) were sampled. Draft i is kept with probability
    min(1, p_i(x) / q_i(x)), in order, until the first rejection; there the next token is sampled from
    norm(max(0, p_i - q_i)), the probability p has and q lacks. With all k kept, one more comes from p_k.
    Returns (accepted (B,), the next token (B,)): a row's output is its accepted drafts, then that token."""
    B, k = drafts.shape
    p_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k): p_i(x_i)
    q_draft = q.gather(-1, drafts[..., None])[..., 0]  # (B, k): q_i(x_i) > 0, as x_i was drawn from q_i
    r = torch.rand((B, k), generator=generator, device=p.device)
    keep = r * q_draft < p_draft  # r < p/q: always when p >= q, else with probability p/q
    accepted = keep.int().cumprod(dim=1).sum(dim=1)  # (B,): kept drafts before the first rejection
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, accepted]  # (B, V): p at the first rejected position, or p_k after k acceptances
    q_next = torch.cat([q, q.new_zeros((B, 1, q.size(-1)))], dim=1)[rows, accepted]  # q_k := 0: the extra
    residual = (p_next - q_next).clamp(min=0)  # (B, V); multinomial normalises it
    # p == q leaves nothing, but then no draft is ever rejected; guard against the rounding of float sums.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    return accepted, torch.multinomial(residual, num_samples=1, generator=generator)[:, 0]


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0: a draft is kept while it is the target's argmax. logits (B, k + 1, V), drafts (B, k).
    Returns (accepted (B,), next token (B,)): the target's argmax after the accepted drafts."""
    best = logits.argmax(dim=-1)  # (B, k + 1): what the target alone would pick at each position
    accepted = (drafts == best[:, :-1]).int().cumprod(dim=1).sum(dim=1)  # (B,)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


# --- drafters -----------------------------------------------------------------------------------------------


class ModelDrafter:
    """A smaller GPT, sharing the target's tokenizer, samples k tokens one at a time from its q. Its KV cache
    holds the first `cached` tokens; a step feeds it the ones it has not seen (the last token, two after a
    step that kept every draft) and then its own drafts."""

    def __init__(self, draft: GPT, target: GPT):
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary has {draft.config.vocab_size} tokens and the target's "
                f"{target.config.vocab_size}: speculative decoding needs the same tokenizer for both"
            )
        self.model, self.cached, self.size = draft, 0, 0

    def start(self, size: int, device: torch.device) -> None:
        self.size = min(size, self.model.config.block_size)
        self.model.setup_cache(1, self.size, device=device)
        self.cached = 0

    def room(self, n: int) -> int:
        """Drafts its cache allows after n tokens: draft 1 comes from the pass at slot n - 1, draft i from the
        one at slot n + i - 2 (the last draft is never fed)."""
        return max(0, self.size - n + 1)

    def propose(self, tokens: torch.Tensor, k: int, sampling: tuple, generator) -> tuple[torch.Tensor, ...]:
        """k drafts after tokens (1, n): (k,) token ids and (k, V) their q (None when greedy)."""
        n, temperature = tokens.size(1), sampling[0]
        logits = self.model.verify(tokens[:, self.cached :], self.cached, 1)[:, -1]  # (1, V)
        drafts, qs = [], []
        for i in range(k):
            if i > 0:  # the previous draft into the next slot
                logits = self.model.decode(drafts[-1].view(1, 1), n + i - 1)
            if temperature == 0:
                drafts.append(logits.argmax(dim=-1))  # (1,)
            else:
                qs.append(probabilities(logits, *sampling))  # (1, V): the same filters as the target's p
                drafts.append(torch.multinomial(qs[-1], num_samples=1, generator=generator)[0])
        self.cached = n + k - 1  # the last draft was never fed
        return torch.cat(drafts), (torch.cat(qs) if qs else None)

    def rollback(self, n: int) -> None:
        """Keep only the first n tokens: later slots hold rejected drafts, which the mask hides until the next
        step overwrites them (gpt-fast's static cache needs no copying to roll back)."""
        self.cached = min(self.cached, n)

    def stop(self) -> None:
        self.model.clear_cache()


class LookupDrafter:
    """Prompt lookup decoding (Saxena 2023; transformers' prompt_lookup_num_tokens): find the last n tokens
    (n = max_ngram down to 1) earlier in the text so far and propose the k tokens that followed them there. No
    model: free to run, and strong wherever the output repeats its input (code edits, summaries, quotes, and a
    small model's greedy loops). A deterministic proposal: q is one-hot, so a draft x is kept with
    probability p(x) and a rejection samples from p without x."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def start(self, size: int, device: torch.device) -> None:
        pass

    def room(self, n: int) -> int:
        return n  # no cache to fill; a continuation is shorter than the text anyway

    def propose(self, tokens: torch.Tensor, k: int, sampling: tuple, generator) -> tuple[torch.Tensor, None]:
        """Up to k drafts after tokens (1, n), perhaps none, and None for q: a one-hot proposal. The earliest
        match that has a continuation wins, as in transformers."""
        ids = tokens[0]
        n = ids.size(0)
        drafts = ids[:0]
        for size in range(min(self.max_ngram, n - 1), 0, -1):
            windows = ids.unfold(0, size, 1)[: n - size]  # (n - size, size): every earlier n-gram
            starts = (windows == ids[n - size :]).all(dim=1).nonzero()[:, 0]  # (matches,)
            if starts.numel():
                begin = starts[0].item() + size
                drafts = ids[begin : begin + k]
                break
        return drafts, None

    def rollback(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


# --- the decoding loop --------------------------------------------------------------------------------------


class SpeculativeDecoder:
    """The target model with a drafter: generate_stream has GPT.generate_stream's signature and yields the
    same tokens greedily, and tokens of the same distribution when sampling."""

    def __init__(self, target: GPT, drafter: ModelDrafter | LookupDrafter, k: int = 5):
        if k < 1:
            raise ValueError(f"k, the drafts per step, must be at least 1, got {k}")
        self.target, self.drafter, self.k = target, drafter, k
        self.config = target.config  # what generate.py reads of a model
        self.stats = SpeculationStats()
        self.cached = 0  # the target's KV cache holds the first `cached` tokens

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
        prefix_cache: PrefixCache | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens one at a time, (1, 1) each, as GPT.generate_stream does (a step makes 1 to
        k + 1 of them). With prefix_cache, the target's prefill reuses a cached prefix (project 10) and gives
        the first token; the drafts start after it. A prompt longer than the context slides the window, as the
        target alone does (no prefix is reused then)."""
        if idx.size(0) != 1:
            raise ValueError(f"speculative decoding takes one sequence, not a batch of {idx.size(0)}")
        if not use_cache:
            raise ValueError("speculative decoding verifies drafts against the KV cache: it needs use_cache")
        size = min(idx.size(1) + max_new_tokens, self.config.block_size)  # as the target's own cache
        self.target.setup_cache(1, size, device=idx.device)
        self.drafter.start(size, idx.device)
        self.cached, tokens = 0, idx
        try:
            if prefix_cache is not None and max_new_tokens > 0 and idx.size(1) <= self.config.block_size:
                logits = self.target.prefill_with_prefix_cache(idx, prefix_cache)  # slots 0..n-1
                first = sample_next_token(logits, temperature, top_k, top_p, generator)  # (1, 1)
                self.cached, tokens = idx.size(1), torch.cat([idx, first], dim=1)
                yield first
            while tokens.size(1) < idx.size(1) + max_new_tokens:
                left = idx.size(1) + max_new_tokens - tokens.size(1)
                new = self.step(tokens, left, (temperature, top_k, top_p), generator)  # (1, m), 1 <= m
                tokens = torch.cat([tokens, new], dim=1)
                yield from new.split(1, dim=1)
        finally:
            self.target.clear_cache()
            self.drafter.stop()

    def step(self, tokens: torch.Tensor, left: int, sampling: tuple, generator) -> torch.Tensor:
        """The tokens after tokens (1, n): draft, check in one target pass, accept. (1, m), m <= left."""
        n, block = tokens.size(1), self.config.block_size
        if n > block:  # past the context the window slides and every cached key is stale: the target alone,
            logits = self.target.prefill(tokens[:, -block:])  # re-prefilling as its own generate_stream does
            return sample_next_token(logits, *sampling, generator)
        # drafts at slots n..n+k-1: within the context, the cache, and the tokens still wanted
        k = min(self.k, left - 1, block - n, self.drafter.room(n))
        drafts, q = self.drafter.propose(tokens, k, sampling, generator) if k > 0 else (tokens[0, :0], None)
        k = drafts.numel()
        # one target pass over the tokens it has not seen and the k drafts: p after each of them
        fresh = torch.cat([tokens[:, self.cached :], drafts[None]], dim=1)  # (1, n - cached + k)
        logits = self.target.verify(fresh, self.cached, k + 1)  # (1, k + 1, V)
        if sampling[0] == 0:
            accepted, next_id = accept_greedy(logits, drafts[None])
        else:
            p = probabilities(logits, *sampling)  # (1, k + 1, V)
            if q is None:  # a deterministic proposal: q puts all its mass on the draft
                q = F.one_hot(drafts, p.size(-1)).float()  # (k, V)
            accepted, next_id = accept_sampled(p, q[None], drafts[None], generator)
        m = accepted.item()
        self.stats.steps += 1
        self.stats.drafted, self.stats.accepted = self.stats.drafted + k, self.stats.accepted + m
        self.stats.rejections += int(m < k)
        # roll both caches back to the accepted length: slots n+m.. are stale, hidden, and overwritten later
        self.cached = n + m
        self.drafter.rollback(n + m)
        return torch.cat([drafts[:m], next_id])[None]  # (1, m + 1)
