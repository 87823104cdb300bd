"""NEW: the KV memory as a pool of fixed-size blocks (Kwon et al. 2023, vLLM's PagedAttention), managed the
way nano-vllm's BlockManager does it.

A sequence's keys and values live in blocks of kv_block_size (L) positions each, anywhere in the pool; its
block table (Sequence.block_table) lists them in order, as a page table lists a process's pages: position p
lives in block block_table[p // L] at offset p % L. A block is allocated when a sequence first writes into it,
so a sequence holds at most one partly filled block (internal fragmentation below one block), and any free
block fits any sequence (no external fragmentation). Blocks go back to the pool when their
sequence finishes, is aborted or is preempted.

Prefix sharing (project 10's chained hashes, now in place): a full block's key is a hash of its parent's key
and its own tokens. Once computed, a full block is registered under its key; a later prompt with the same
prefix takes the same block, counted (ref_count), instead of a copy. A freed block keeps its key and its keys
and values until the allocator hands it out again, least recently freed first: the pool's free blocks are the
prefix cache, and evicting one costs nothing. A sequence that would write into a block it shares copies it
first (copy-on-write): here, one whose window slides past the context and rewrites positions 0, 1, 2, ...
"""

import hashlib
import struct
from collections import deque

from sequence import Sequence


def block_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """A block's key: SHA-256 of its parent's key and its tokens. Chaining makes the key depend on every
    token before the block too, so one key names one whole prefix."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


class Block:
    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0  # sequences whose block tables hold it; 0 = free (and maybe still cached)
        self.key: bytes | None = None  # set while it holds a registered full block of known tokens
        self.tokens: tuple[int, ...] = ()  # those tokens: a hash collision is then a miss, not wrong keys


class BlockManager:
    def __init__(self, num_blocks: int, kv_block_size: int, prefix_caching: bool = True):
        if kv_block_size < 1:
            raise ValueError(f"the block size must be at least 1 token, got {kv_block_size}")
        self.kv_block_size, self.prefix_caching = kv_block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids = deque(range(num_blocks))  # least recently freed first: the eviction order
        self.cached: dict[bytes, int] = {}  # key -> id of the block holding that full block
        self.copies: list[tuple[int, int]] = []  # (source, destination) blocks the engine copies next step
        self.queried_tokens = 0  # prompt tokens looked up ...
        self.hit_tokens = 0  # ... and found

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return -(-positions // self.kv_block_size)

    def _take_free(self) -> int:
        """A free block for new keys and values: the least recently freed, whose cached block is dropped."""
        block = self.blocks[self.free_ids.popleft()]
        if block.key is not None:  # evict it from the prefix cache
            del self.cached[block.key]
            block.key, block.tokens = None, ()
        block.ref_count = 1
        return block.id

    def match_prefix(self, seq: Sequence) -> int:
        """A newly admitted sequence takes the registered blocks of its prompt's longest cached prefix, shared
        in place. The last token is always left to compute: its logits give the next token. Returns the
        number of positions found."""
        L, parent = self.kv_block_size, b""
        for i in range(0, len(seq.token_ids) - 1 - L + 1, L):
            tokens = tuple(seq.token_ids[i : i + L])
            key = block_hash(parent, tokens)
            block_id = self.cached.get(key)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:  # free, but its keys and values are still there
                self.free_ids.remove(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(key)
            parent = key
        self.queried_tokens += len(seq.token_ids)
        self.hit_tokens += len(seq.block_table) * L
        return len(seq.block_table) * L

    def blocks_needed(self, seq: Sequence, first: int, end: int) -> int:
        """Free blocks that writing positions first..end-1 takes: one for each block not allocated yet and
        one for each shared block (copied on write)."""
        needed = 0
        for i in range(first // self.kv_block_size, self.blocks_for(end)):
            needed += i >= len(seq.block_table) or self.blocks[seq.block_table[i]].ref_count > 1
        return needed

    def make_writable(self, seq: Sequence, first: int, end: int) -> None:
        """Give positions first..end-1 blocks this sequence alone holds: allocate the missing ones, copy the
        shared ones (the copy is made by the engine before the next forward pass), and unregister any of its
        own cached blocks, whose keys and values are about to change."""
        for i in range(first // self.kv_block_size, self.blocks_for(end)):
            if i == len(seq.block_table):
                seq.block_table.append(self._take_free())
                continue
            block = self.blocks[seq.block_table[i]]
            if block.ref_count > 1:  # copy-on-write: the others keep the original
                block.ref_count -= 1
                seq.block_table[i] = self._take_free()
                self.copies.append((block.id, seq.block_table[i]))
            elif block.key is not None:
                del self.cached[block.key]
                block.key, block.tokens = None, ()
        del seq.block_hashes[first // self.kv_block_size :]

    def register(self, seq: Sequence) -> None:
        """After a step: register the sequence's newly computed full blocks under their keys, for the prompts
        after it (its reply too: a conversation's next turn starts with it)."""
        L = self.kv_block_size
        for i in range(len(seq.block_hashes), seq.num_cached // L):
            tokens = tuple(seq.token_ids[i * L : (i + 1) * L])
            key = block_hash(seq.block_hashes[-1] if seq.block_hashes else b"", tokens)
            seq.block_hashes.append(key)
            block = self.blocks[seq.block_table[i]]
            if key not in self.cached and block.key is None:  # else an equal block is registered already
                self.cached[key] = block.id
                block.key, block.tokens = key, tokens

    def free(self, seq: Sequence) -> None:
        """Give back a finished, aborted or preempted sequence's blocks. Its last blocks go first in the free
        list, so they are evicted before the prefix they extend."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(block_id)
        seq.block_table, seq.block_hashes = [], []
