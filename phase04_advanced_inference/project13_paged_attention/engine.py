"""A serving engine with continuous (iteration-level) batching, after Orca (Yu et al., OSDI 2022), over a
paged KV cache, after vLLM (Kwon et al., SOSP 2023), in the shape of vLLM's and nano-vllm's LLMEngine:
requests come in at any time, and every step

1. the scheduler picks the sequences to run: every running one, then waiting ones while there is room, and
   gives each the blocks of the KV pool it writes, preempting the newest when the pool runs out
   (scheduler.py, block_manager.py);
2. one forward pass computes all their new tokens together, each sequence reading and writing its own blocks
   through its block table (GPT.step_logits: selective batching), its admitted prompts after their
   prefix-cache hits, which are blocks shared in place;
3. each sequence samples its next token with its own parameters and generator;
4. the finished ones (a stop token or string, max_tokens) leave, and their blocks are free for the next step.

The API, small enough for a web server to drive (project 28):

    engine = Engine(model, EngineConfig(max_num_seqs=16), tokenizer=tokenizer)
    rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=50))  # or token ids
    while engine.has_unfinished():
        for out in engine.step():  # RequestOutput: request_id, token_ids, text, finished, finish_reason
            ...
    engine.abort(rid)  # frees its blocks at once; the others do not notice
    for i, out in engine.generate(prompts, params): ...  # all of it for a list of prompts
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from block_manager import BlockManager
from model import GPT, StepBatch, sample_next_token
from scheduler import Scheduler
from sequence import RequestOutput, SamplingParams, Sequence


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens one step computes at most; at least the context
    kv_cache_mb: float | None = None  # the KV pool's memory budget; None: max_num_seqs whole contexts
    kv_block_size: int = 16  # NEW: positions per block of the KV pool (vLLM's default)
    enable_prefix_caching: bool = True  # NEW: equal prompt prefixes share their full blocks (vLLM's name)
    reserve_context: bool = False  # NEW: the baseline: a whole context's blocks per sequence (project 12)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def id_to_bytes(self, token_id: int) -> bytes: ...


class Engine:
    def __init__(self, model: GPT, config: EngineConfig | None = None, tokenizer: Tokenizer | None = None):
        """Allocates the KV pool (GPT.setup_kv_pool): kv_cache_mb of blocks, or max_num_seqs contexts."""
        config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.block_size
        if config.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {config.max_num_seqs}")
        if config.max_num_batched_tokens < self.context:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) is below the context "
                f"({self.context}): a long prompt could never run"
            )
        if not 1 <= config.kv_block_size <= self.context:
            raise ValueError(
                f"kv_block_size must be from 1 to the context ({self.context}), got {config.kv_block_size}"
            )
        w = model.wte.weight
        c = model.config
        # NEW: keys and values of kv_block_size positions in every layer
        self.block_bytes = c.n_layer * 2 * config.kv_block_size * c.n_embd * w.element_size()
        per_sequence = -(-self.context // config.kv_block_size)  # the blocks of one whole context
        num_blocks = config.max_num_seqs * per_sequence
        if config.kv_cache_mb is not None:
            num_blocks = int(config.kv_cache_mb * 2**20 // self.block_bytes)
            if num_blocks < per_sequence:  # one sequence must always be able to reach the context
                raise ValueError(
                    f"a KV cache of {config.kv_cache_mb:g} MiB holds no sequence: one needs "
                    f"{per_sequence * self.block_bytes / 2**20:.2f} MiB ({self.context} positions)"
                )
        self.max_num_seqs = config.max_num_seqs
        try:
            self.kv_pools = model.setup_kv_pool(
                num_blocks, config.kv_block_size, w.dtype, w.device
            )  # per layer
        except RuntimeError as e:  # more than the device holds (torch.OutOfMemoryError is a RuntimeError)
            raise ValueError(
                f"a KV pool of {num_blocks * self.block_bytes / 2**20:,.0f} MiB does not fit in memory"
            ) from e
        self.block_manager = BlockManager(num_blocks, config.kv_block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.context,
            config.reserve_context,
        )
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
        """Drop a request, waiting or running; its blocks are free for the next step. False if it was not
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
        seqs = self.scheduler.schedule()  # with the blocks each one writes
        if not seqs:
            return []
        for block, pool in zip(self.model.blocks, self.kv_pools):  # another engine on the same model may
            block.attn.kv_pool = pool  # have set up a pool of its own since
        if self.block_manager.copies:  # NEW: copy-on-write, before anything writes into the copies
            sources, destinations = zip(*self.block_manager.copies)
            for pool in self.kv_pools:
                pool.copy_blocks(list(sources), list(destinations))
            self.block_manager.copies.clear()
        plan = [(s, *s.next_tokens(self.context)) for s in seqs]  # (sequence, its tokens, first position)
        plan.sort(key=lambda p: len(p[1]) > 1)  # one-token sequences first: one attention group
        device = self.model.wte.weight.device
        layout = [(s.block_table, first, len(tokens)) for s, tokens, first in plan]
        batch = StepBatch.build(layout, self.block_manager.kv_block_size, device)
        idx = torch.tensor([t for _, tokens, _ in plan for t in tokens], device=device)  # (N,)
        logits = self.model.step_logits(idx, batch)  # (sequences, V)
        for s, tokens, first in plan:
            s.num_cached = first + len(tokens)  # its blocks now hold these too
            s.slid |= len(s.token_ids) > self.context
            if self.block_manager.prefix_caching and not s.slid:  # its new full blocks, for later prompts
                self.block_manager.register(s)
        outputs = []
        for (s, _, _), token in zip(plan, self._sample([s for s, _, _ in plan], logits)):
            out = s.append(token)
            out.cached_tokens = s.cached_tokens
            if out.finished:
                del self.sequences[s.request_id]
                self.scheduler.remove(s)
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
