"""The scheduler: at every step, which sequences run. This is Orca's iteration-level scheduling: the batch is
chosen anew at every step, so a request that finishes leaves at once and a waiting one takes its row at the
next step, instead of waiting for the longest request of a batch to end (static batching).

The policy, within three limits:

- running sequences first, in arrival order, one new token each (more only past the context, where the
  window is recomputed): a newcomer's prefill never stalls a request already streaming;
- then waiting requests, first come first served (FIFO): admitted while a row of the KV cache is free and
  the prompt fits the step's remaining token budget; the first one that does not fit stops admission, so no
  later request overtakes it;
- at most max_num_seqs sequences run (one per row: the KV memory budget), and one step computes at most
  max_num_batched_tokens tokens.

A row holds a sequence's whole context, reserved when it is admitted, so a running sequence never runs out
of KV memory and nothing is ever preempted: when every row is taken, new requests wait (refusal by
queueing). Project 13 allocates memory in blocks as sequences grow, which packs more sequences in but must
then preempt one when the blocks run out.
"""

from collections import deque

from sequence import Sequence


class Scheduler:
    def __init__(self, num_rows: int, max_num_batched_tokens: int, context: int, static: bool = False):
        self.max_num_batched_tokens, self.context = max_num_batched_tokens, context
        self.static = static  # the baseline: admit only into an empty batch, which then runs to its end
        self.free_rows = list(range(num_rows))[::-1]  # pop() hands out the lowest free row
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step, running ones first; admitted ones get a row."""
        budget, scheduled = self.max_num_batched_tokens, []
        for seq in self.running:
            cost = len(seq.next_tokens(self.context)[0])
            if cost <= budget:  # else it waits a step (only windows past the context can be that large)
                scheduled.append(seq)
                budget -= cost
        if self.static and self.running:
            return scheduled
        while self.waiting and self.free_rows:
            cost = len(self.waiting[0].next_tokens(self.context)[0])
            if cost > budget:
                break  # first come, first served: no one overtakes the head of the queue
            seq = self.waiting.popleft()
            seq.row = self.free_rows.pop()
            self.running.append(seq)
            scheduled.append(seq)
            budget -= cost
        return scheduled

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, freeing its row at once for the next step."""
        if seq.row is None:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.free_rows.append(seq.row)
            seq.row = None
