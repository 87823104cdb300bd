"""A serving engine with continuous (iteration-level) batching, after Orca (Yu et al., OSDI 2022), in the
shape of vLLM's and nano-vllm's LLMEngine: requests come in at any time, and every step

1. the scheduler picks the sequences to run: every running one, then waiting ones while there is room
   (scheduler.py);
2. one forward pass computes all their new tokens together, each sequence in its own row of the KV cache
   (GPT.step_logits: selective batching), its admitted prompts after their prefix-cache hits;
3. each sequence samples its next token with its own parameters and generator;
4. the finished ones (a stop token or string, max_tokens) leave, and their rows are free for the next step.

The API, small enough for a web server to drive (project 28):

    engine = Engine(model, EngineConfig(max_num_seqs=16), tokenizer=tokenizer)
    rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=50))  # or token ids
    while engine.has_unfinished():
        for out in engine.step():  # RequestOutput: request_id, token_ids, text, finished, finish_reason
            ...
    engine.abort(rid)  # frees its row at once; the others do not notice
    for i, out in engine.generate(prompts, params): ...  # all of it for a list of prompts
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from model import GPT, StepBatch, sample_next_token
from prefix_cache import PrefixCache
from scheduler import Scheduler
from sequence import RequestOutput, SamplingParams, Sequence


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences running at once: rows of the KV cache
    max_num_batched_tokens: int = 2048  # tokens one step computes at most; at least the context
    kv_cache_mb: float | None = None  # the KV cache's memory budget; None: max_num_seqs full rows
    static: bool = False  # the baseline: static batching (admit only into an empty batch)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def id_to_bytes(self, token_id: int) -> bytes: ...


class Engine:
    def __init__(
        self,
        model: GPT,
        config: EngineConfig | None = None,
        prefix_cache: PrefixCache | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        """Allocates the KV cache (GPT.setup_cache): one row of the whole context per sequence."""
        config = config or EngineConfig()
        self.model, self.prefix_cache, self.tokenizer = model, prefix_cache, tokenizer
        self.context = model.config.block_size
        if config.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {config.max_num_seqs}")
        if config.max_num_batched_tokens < self.context:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) is below the context "
                f"({self.context}): a long prompt could never run"
            )
        w = model.wte.weight
        c = model.config
        row_bytes = c.n_layer * 2 * self.context * c.n_embd * w.element_size()  # keys and values, all layers
        rows = config.max_num_seqs
        if config.kv_cache_mb is not None:
            rows = min(rows, int(config.kv_cache_mb * 2**20 // row_bytes))
            if rows == 0:
                raise ValueError(
                    f"a KV cache of {config.kv_cache_mb:g} MiB holds no sequence: one needs "
                    f"{row_bytes / 2**20:.2f} MiB ({self.context} positions)"
                )
        self.max_num_seqs = rows
        try:
            model.setup_cache(rows, self.context, w.dtype, w.device)
        except RuntimeError as e:  # more than the device holds (torch.OutOfMemoryError is a RuntimeError)
            raise ValueError(
                f"a KV cache of {rows * row_bytes / 2**20:,.0f} MiB does not fit in memory"
            ) from e
        self.kv_caches = [block.attn.kv_cache for block in model.blocks]  # the pool, one per layer
        self.scheduler = Scheduler(rows, config.max_num_batched_tokens, self.context, config.static)
        self.sequences: dict[int, Sequence] = {}  # waiting and running, by request id
        self._next_id = 0

    # --- the API -------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. A bad request is a ValueError here and never reaches the
        others."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an engine with a tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt)
        prompt = list(prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) > self.context:
            raise ValueError(f"a prompt of {len(prompt)} tokens is longer than the context ({self.context})")
        if not all(isinstance(t, int) and 0 <= t < self.model.config.vocab_size for t in prompt):
            raise ValueError(f"the prompt holds token ids outside [0, {self.model.config.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        request_id, self._next_id = self._next_id, self._next_id + 1
        id_to_bytes = self.tokenizer.id_to_bytes if self.tokenizer is not None else None
        seq = Sequence(request_id, prompt, params, id_to_bytes, self.model.wte.weight.device)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: int) -> bool:
        """Drop a request, waiting or running; its row is free for the next step. False if it was not
        there (finished already, or never added)."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
        return seq is not None

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Serve a list of prompts together: (index of the prompt, output) as each step makes them. One
        SamplingParams for all, or one per prompt. Requests left when the iterator is closed are aborted."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        index = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, each, strict=True)):
                index[self.add_request(prompt, p)] = i
            pending = set(index)
            while pending:
                for out in self.step():
                    if out.request_id in index:
                        yield index[out.request_id], out
                        if out.finished:
                            pending.discard(out.request_id)
        finally:
            for request_id in index:
                self.abort(request_id)  # a no-op for the finished ones

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, one forward pass over every scheduled sequence, sample, retire."""
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        for block, cache in zip(self.model.blocks, self.kv_caches):  # the model's own generate_stream (or
            block.attn.kv_cache = cache  # another engine) may have set up a cache of its own since
        hits = {s: self._reuse_prefix(s) for s in seqs if s.num_cached == 0 and self.prefix_cache is not None}
        plan = [(s, *s.next_tokens(self.context)) for s in seqs]  # (sequence, its tokens, first position)
        # one-token sequences first, by row: one attention group, its rows often consecutive (read in place)
        plan.sort(key=lambda p: (len(p[1]) > 1, p[0].row))
        device = self.model.wte.weight.device
        batch = StepBatch.build([(s.row, first, len(tokens)) for s, tokens, first in plan], device)
        idx = torch.tensor([t for _, tokens, _ in plan for t in tokens], device=device)  # (N,)
        logits = self.model.step_logits(idx, batch)  # (sequences, V)
        for s, tokens, first in plan:
            s.num_cached = first + len(tokens)  # its row now holds these too
            s.slid |= len(s.token_ids) > self.context
        for s, held in hits.items():  # the new prompts' full blocks, for the requests after them
            self._cache_prefix(s)
            self.prefix_cache.release(held)
        outputs = []
        for (s, _, _), token in zip(plan, self._sample([s for s, _, _ in plan], logits)):
            out = s.append(token)
            out.cached_tokens = s.cached_tokens
            if out.finished:
                self._retire(s)
            outputs.append(out)
        return outputs

    # --- inside a step -------------------------------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each sequence's next token, with its own parameters and generator: what it would sample alone."""
        tokens = logits.argmax(dim=-1).tolist()  # greedy rows, all at once
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature > 0:
                row = logits[i : i + 1]  # (1, V), as generating alone samples it
                tokens[i] = sample_next_token(row, p.temperature, p.top_k, p.top_p, s.generator).item()
        return tokens

    def _reuse_prefix(self, seq: Sequence) -> list:
        """Copy the longest cached prefix of a newly admitted sequence into its row: only the rest of the
        prompt is computed. Returns the blocks it holds until they are released."""
        held = self.prefix_cache.match(seq.token_ids)
        size = self.prefix_cache.kv_block_size
        for i, block in enumerate(held):  # each (n_layer, 2, nh, kv_block_size, hs)
            self.model.write_slots(i * size, block.kv, seq.row)
        seq.num_cached = seq.cached_tokens = len(held) * size
        return held

    def _cache_prefix(self, seq: Sequence) -> None:
        """The full blocks of the tokens in a sequence's row, into the prefix cache: unless its window slid,
        when its slots no longer hold positions 0, 1, 2, ..."""
        if not seq.slid:
            tokens = seq.token_ids[: seq.num_cached]
            self.prefix_cache.insert(tokens, lambda start, end: self.model.read_slots(start, end, seq.row))

    def _retire(self, seq: Sequence) -> None:
        if self.prefix_cache is not None:  # its reply too: the next turn of a conversation starts with it
            self._cache_prefix(seq)
        del self.sequences[seq.request_id]
        self.scheduler.remove(seq)
