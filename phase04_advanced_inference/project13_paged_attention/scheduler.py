"""The scheduler: at every step, which sequences run, and (NEW) which blocks of the KV pool they write. This
is Orca's iteration-level scheduling over vLLM's paged memory: the batch is chosen anew at every step, and a
sequence takes a block only when it needs one.

The policy, within three limits:

- running sequences first, in arrival order, one new token each (more only past the context, where the
  window is recomputed): a newcomer's prefill never stalls a request already streaming. A sequence that
  crosses into a new block takes a free one. NEW: when none is free, the most recently admitted running
  sequence is preempted by recomputation (vLLM's default): its blocks go back to the pool, and it goes back
  to the head of the waiting queue with its prompt and the tokens generated so far, to be prefilled again
  (its own blocks may still be in the prefix cache by then). Its tokens do not change: they are kept, and
  its sampler's generator is not rewound. Swapping its blocks to CPU memory instead is vLLM's other option,
  not done here;
- then waiting requests, first come first served (FIFO): admitted while the free blocks hold the prompt
  and its first new token, and the prompt fits the step's remaining token budget; the first one that does
  not fit stops admission, so no later request overtakes it. No one is admitted in a step that preempted;
- at most max_num_seqs sequences run, and one step computes at most max_num_batched_tokens tokens.

reserve_context=True is the baseline, project 12's contiguous cache in blocks: each admitted sequence takes
the blocks of a whole context at once, so it never needs another (and nothing is preempted).
"""

from collections import deque

from block_manager import BlockManager
from sequence import Sequence


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        context: int,
        reserve_context: bool = False,
    ):
        self.blocks, self.max_num_seqs = blocks, max_num_seqs
        self.max_num_batched_tokens, self.context = max_num_batched_tokens, context
        self.reserve_context = reserve_context
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step, running ones first, each with blocks for what it writes."""
        budget, scheduled, kept = self.max_num_batched_tokens, [], []
        queue = deque(self.running)
        preempted = False
        while queue:
            seq = queue.popleft()
            tokens, first = seq.next_tokens(self.context)
            if len(tokens) > budget:  # it waits a step (only windows past the context can be that large)
                kept.append(seq)
                continue
            end = first + len(tokens)
            while self.blocks.blocks_needed(seq, first, end) > self.blocks.num_free:  # NEW: out of blocks
                preempted = True
                victim = queue.pop() if queue else seq  # the most recently admitted: maybe itself
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.make_writable(seq, first, end)
                kept.append(seq)
                scheduled.append(seq)
                budget -= len(tokens)
        self.running = kept
        while self.waiting and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens, _ = seq.next_tokens(self.context)
            # NEW: room for the prompt and the first new token's key and value (all of a context, reserving)
            need = self.context if self.reserve_context else min(len(seq.token_ids) + 1, self.context)
            if len(tokens) > budget or self.blocks.blocks_for(need) > self.blocks.num_free:
                break  # first come, first served: no one overtakes the head of the queue
            self.waiting.popleft()
            self._admit(seq)
            scheduled.append(seq)
            budget -= len(tokens)
        return scheduled

    def _admit(self, seq: Sequence) -> None:
        """NEW: blocks for a newly admitted sequence: its prompt's cached prefix shared, the rest new."""
        if self.blocks.prefix_caching and len(seq.token_ids) <= self.context:  # a slid window shares nothing
            seq.num_cached = self.blocks.match_prefix(seq)
            seq.cached_tokens = min(seq.num_cached, seq.num_prompt_tokens)
        tokens, first = seq.next_tokens(self.context)
        end = self.context if self.reserve_context else first + len(tokens)
        self.blocks.make_writable(seq, first, end)
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """NEW: recompute preemption: free its blocks; it waits at the head of the queue, tokens kept."""
        self.blocks.free(seq)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, freeing its blocks at once for the next step."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.blocks.free(seq)
