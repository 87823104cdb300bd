"""Automatic prefix caching: keep the keys and values of prompts already seen, in blocks of a fixed number of
tokens, and give a new prompt the longest prefix of them it shares, so that only the rest is prefilled.

The scheme is vLLM's automatic prefix caching: a block's key is a hash of its parent block's key and its own
tokens, so equal keys mean (up to a collision, which a token comparison rules out) the same tokens from the
start of the prompt, hence the same positions and the same keys and values. The blocks form a tree, SGLang's
radix tree with one block per edge: the root's children are the first blocks of every cached prompt, a node's
children the blocks that have followed it. Looking a prompt up walks that tree from the root. The cache holds
at most a memory budget of blocks and evicts the least recently used leaf that no request is using.
"""

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

KV_BLOCK_SIZE = (
    16  # tokens per block, vLLM's default: a hit shorter than a block is not worth its bookkeeping
)


def block_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """A block's key: SHA-256 of its parent's key and its tokens. Chaining makes the key depend on every
    token before the block too, so one key names one whole prefix."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


@dataclass(eq=False)
class Block:
    """One cached block: its tokens, their keys and values in every layer, and its place in the tree."""

    key: bytes
    tokens: tuple[int, ...]
    kv: torch.Tensor | None  # (n_layer, 2, nh, KV_BLOCK_SIZE, hs): k and v; None at the root
    parent: "Block | None" = None
    children: dict[bytes, "Block"] = field(default_factory=dict)
    ref_count: int = 0  # requests using this block now; such a block is never evicted
    last_used: int = 0  # the cache's clock at its last hit: the least recent leaf is evicted first


class PrefixCache:
    def __init__(
        self,
        capacity_bytes: int,
        kv_block_size: int = KV_BLOCK_SIZE,
        hash_fn: Callable[[bytes, tuple[int, ...]], bytes] = block_hash,
    ):
        if kv_block_size < 1:
            raise ValueError(f"the block size must be at least 1 token, got {kv_block_size}")
        self.capacity_bytes, self.kv_block_size, self.hash_fn = capacity_bytes, kv_block_size, hash_fn
        self.root = Block(key=b"", tokens=(), kv=None)
        self.num_blocks = 0
        self.bytes_used = 0
        self.clock = 0
        self.queried_tokens = 0  # prompt tokens looked up ...
        self.hit_tokens = 0  # ... and found

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _blocks_of(self, tokens: list[int]) -> list[tuple[int, ...]]:
        """The full blocks of tokens; a trailing partial block is never cached."""
        n = len(tokens) // self.kv_block_size * self.kv_block_size
        return [tuple(tokens[i : i + self.kv_block_size]) for i in range(0, n, self.kv_block_size)]

    def _child(self, node: Block, key: bytes, tokens: tuple[int, ...]) -> Block | None:
        child = node.children.get(key)
        # Comparing the tokens makes a hash collision a miss instead of another prompt's keys and values.
        return child if child is not None and child.tokens == tokens else None

    def match(self, tokens: list[int]) -> list[Block]:
        """The cached blocks of the prompt tokens' longest cached prefix, in order. They are held (ref_count)
        until release(): nothing evicts them while a request reads them. The last token is always left to
        compute, even when the whole prompt is cached: its logits give the first new token."""
        self.clock += 1
        node, path = self.root, []
        for block_tokens in self._blocks_of(tokens[:-1]):
            child = self._child(node, self.hash_fn(node.key, block_tokens), block_tokens)
            if child is None:
                break
            child.ref_count += 1
            child.last_used = self.clock
            node = child
            path.append(child)
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(path) * self.kv_block_size
        return path

    def release(self, blocks: list[Block]) -> None:
        for block in blocks:
            block.ref_count -= 1

    def insert(self, tokens: list[int], read_kv: Callable[[int, int], torch.Tensor]) -> int:
        """Cache every full block of tokens not cached yet. read_kv(start, end) gives the keys and values of
        positions start..end-1, (n_layer, 2, nh, end - start, hs). Returns how many blocks were added; fewer
        than missing when the budget is full of blocks in use."""
        self.clock += 1
        node, added = self.root, 0
        for i, block_tokens in enumerate(self._blocks_of(tokens)):
            key = self.hash_fn(node.key, block_tokens)
            child = self._child(node, key, block_tokens)
            if child is None:
                if key in node.children:  # a collision with a different block: keep the one cached
                    break
                kv = read_kv(i * self.kv_block_size, (i + 1) * self.kv_block_size).clone()
                node.ref_count += 1  # the path so far must survive the evictions that make room
                fits = self._make_room(kv.numel() * kv.element_size())
                node.ref_count -= 1
                if not fits:
                    break
                child = Block(key, block_tokens, kv, parent=node)
                node.children[key] = child
                self.num_blocks += 1
                self.bytes_used += kv.numel() * kv.element_size()
                added += 1
            child.last_used = self.clock
            node = child
        return added

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used free leaves until nbytes more fit the budget. False if they cannot."""
        while self.bytes_used + nbytes > self.capacity_bytes:
            leaves = [b for b in self._walk() if not b.children and b.ref_count == 0]
            if not leaves:
                return False
            self._evict(min(leaves, key=lambda b: b.last_used))
        return True

    def _evict(self, block: Block) -> None:
        # Only leaves go: a block's children hash from its key, so they would be unreachable without it.
        del block.parent.children[block.key]
        self.num_blocks -= 1
        self.bytes_used -= block.kv.numel() * block.kv.element_size()

    def _walk(self):
        """Every cached block (the root excluded), parents before children."""
        stack = list(self.root.children.values())
        while stack:
            block = stack.pop()
            yield block
            stack.extend(block.children.values())
