"""Byte-level BPE tokenizer in the style of GPT-2, trainable, and exact to tiktoken's "gpt2" encoding.

Text -> ids in three steps:
  1. special tokens (e.g. "<|endoftext|>") are split out first, longest first;
  2. the remaining text is cut into pre-tokens by GPT2_SPLIT_PATTERN (words, numbers, punctuation, spaces);
  3. each pre-token's UTF-8 bytes are merged pair by pair, lowest merge rank first. No merge crosses a
     pre-token, so a pre-token's ids never depend on its neighbours (which is what makes caching work).

Vocabulary layout produced by train_bpe (ids are contiguous):
  0 .. 255                  the 256 single bytes (id == byte value)
  256 .. 256+S-1            the S special tokens, in the order given
  256+S ..                  one id per merge, in merge order
GPT-2's published files order ids differently; Tokenizer.from_gpt2_files keeps GPT-2's own ids.

API: train_bpe(path, vocab_size, special_tokens) / train_bpe_from_text(text, ...) -> (vocab, merges);
Tokenizer(vocab, merges, special_tokens) with encode, decode, encode_iterable, save / load and
Tokenizer.from_gpt2_files(encoder_json, vocab_bpe).
"""

from __future__ import annotations

import gc
import heapq
import json
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain, repeat

import regex

GPT2_SPLIT_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# The same pattern with the contractions factored (as tiktoken writes it): identical matches, but the
# regex module stops trying seven contraction branches at every position, which is ~15% faster.
_SPLIT = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
PARALLEL_MIN_BYTES = 1 << 20  # smaller files are pre-tokenized in-process: a pool costs more than it saves
CHUNK_BYTES = 4 << 20  # training reads files in chunks of about this size, which bounds memory per chunk
LONG_PIECE = 64  # longer pre-tokens use the O(n log n) heap merge instead of the simple rescanning loop
CACHE_MAX = 500_000  # pre-token cache entries kept before the cache is cleared (bounds memory)
NO_RANK = 1 << 62  # rank of a pair that is not a merge: larger than any real rank
FORMAT_VERSION = 1

Vocab = dict[int, bytes]
Merges = list[tuple[bytes, bytes]]


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by its vocab.bpe / encoder.json.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) are shifted to
    chr(256 + n) so that every token is a visible string without spaces.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return dict(sorted(mapping.items()))


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _to_readable(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _from_readable(text: str) -> bytes:
    return bytes(_CHAR_TO_BYTE[c] for c in text)


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector. Training and table building allocate millions of small tuples
    and lists but no reference cycles, and each full collection would walk all of them (2-3x slower)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _special_regex(special_tokens: Iterable[str], capture: bool = False) -> regex.Pattern | None:
    """Alternation of special tokens, longest first, so the longest one wins where several overlap."""
    ordered = sorted(set(special_tokens), key=len, reverse=True)
    if not ordered:
        return None
    body = "|".join(regex.escape(s) for s in ordered)
    return regex.compile(f"({body})" if capture else body)


# ----------------------------------------------------------------------------------------------------------
# Training: pre-token counting (optionally in parallel)


def _count_pretokens(text: str, special_tokens: Sequence[str]) -> Counter[bytes]:
    """Count pre-tokens (as UTF-8 bytes) in text; special tokens only separate text, they are not counted."""
    split_re = _special_regex(special_tokens)
    counts: Counter[str] = Counter()
    for segment in split_re.split(text) if split_re else (text,):
        counts.update(_SPLIT.findall(segment))
    return Counter({piece.encode("utf-8"): n for piece, n in counts.items()})


def _count_file_chunk(job: tuple[str, int, int, Sequence[str]]) -> Counter[bytes]:
    """Worker: read bytes [start, end) of the file and count their pre-tokens."""
    path, start, end, special_tokens = job
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return _count_pretokens(data.decode("utf-8"), special_tokens)


# A chunk may also start at a whitespace byte that follows printable ASCII: no pre-token holds a non-space
# followed by a space, and the lookahead in `\s+(?!\S)` sees "not \S" both at a chunk end and at a space,
# so such a cut changes no pre-token. (Cutting *after* a newline is not exact: " \n  \nx" differs.)
_WHITESPACE_CUT = regex.compile(rb"[\x21-\x7e][\t\n\r ]")


def _next_cut(f, pos: int, size: int, split_tokens: Sequence[bytes], patience: int = 1 << 20) -> int:
    """First cut at or after pos: the start of a special token or, if there are none (or none within
    `patience` bytes, and no special token contains whitespace), a whitespace cut."""
    whitespace_ok = not any(c in t for t in split_tokens for c in b"\t\n\r ")
    overlap = max([1] + [len(t) - 1 for t in split_tokens])  # so that matches across two reads are seen
    f.seek(pos)
    window, window_start = b"", pos
    while data := f.read(1 << 16):
        window += data
        if hits := [i for i in (window.find(t) for t in split_tokens) if i >= 0]:
            return window_start + min(hits)
        patience_over = not split_tokens or window_start + len(window) - pos > patience
        if whitespace_ok and patience_over and (m := _WHITESPACE_CUT.search(window)):
            return window_start + m.start() + 1
        keep_from = max(0, len(window) - overlap)
        window, window_start = window[keep_from:], window_start + keep_from
    return size


def find_chunk_boundaries(path: str | os.PathLike, n_chunks: int, split_tokens: Sequence[bytes]) -> list[int]:
    """Byte offsets cutting the file into about n_chunks pieces that can be pre-tokenized independently.

    Seeks to equally spaced offsets and scans forward to the next special token (or, with none, to a safe
    whitespace cut). Returns sorted, distinct offsets starting at 0 and ending at the file size.
    """
    size = os.path.getsize(path)
    bounds = [size * i // n_chunks for i in range(n_chunks)] + [size]
    with open(path, "rb") as f:
        for i in range(1, n_chunks):
            bounds[i] = _next_cut(f, bounds[i], size, split_tokens)
    return sorted(set(bounds))


def _count_file(path: str, special_tokens: Sequence[str], num_workers: int) -> Counter[bytes]:
    """Pre-token counts of a whole file, chunk by chunk (bounded memory), in a process pool if it is large."""
    size = os.path.getsize(path)
    parallel = num_workers > 1 and size >= PARALLEL_MIN_BYTES
    n_chunks = max(1, -(-size // CHUNK_BYTES), num_workers if parallel else 1)
    bounds = find_chunk_boundaries(path, n_chunks, [t.encode("utf-8") for t in special_tokens])
    jobs = [(path, start, end, special_tokens) for start, end in zip(bounds, bounds[1:])]
    total: Counter[bytes] = Counter()
    if not parallel:
        for job in jobs:
            total.update(_count_file_chunk(job))
        return total
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_workers) as pool:
        for counts in pool.imap_unordered(_count_file_chunk, jobs):
            total.update(counts)  # addition commutes, so arrival order does not matter
    return total


# ----------------------------------------------------------------------------------------------------------
# Training: the merge loop with incremental pair counts


_INVERT = str.maketrans({chr(i): chr(255 - i) for i in range(256)})


def _descending_key(token: bytes) -> str:
    """A string whose ascending order is the descending order of the bytes (prefixes included).

    heapq is a min-heap but ties must go to the greatest (a, b): invert every byte and end with chr(256),
    which sorts after any inverted byte, so a prefix ranks after its extensions, as b"ab" > b"a" requires.
    """
    return token.decode("latin-1").translate(_INVERT) + "\u0100"


def _index_pairs(words: list[list[int]], freqs: list[int]) -> tuple[dict, dict]:
    """Count every adjacent pair (weighted by word frequency) and remember which words contain it."""
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(wi)
    return pair_counts, pair_words


def _pop_best(heap: list, pair_counts: dict, keys: dict) -> tuple[int, int] | None:
    """Most frequent pair, ties to the greatest bytes. Heap entries are lazily invalidated: an entry whose
    count is out of date is dropped, or pushed back with the current (lower) count."""
    while heap:
        neg, _, _, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count == -neg:
            return a, b
        if count > 0:
            heapq.heappush(heap, (-count, keys[a], keys[b], a, b))
    return None


def _apply_merge(pair, new, words, freqs, pair_counts, pair_words) -> set[tuple[int, int]]:
    """Merge pair into new in the words that contain it, adjusting only the pair counts next to each
    occurrence: (x, a) -> (x, new) on the left and (b, y) -> (new, y) on the right. (Between two adjacent
    occurrences the old (b, a) becomes (new, new), handled once, by the second one.)

    Returns the pairs whose count grew (those containing new); counts that fell are fixed up lazily.
    """
    a, b = pair
    grown = set()
    for wi in pair_words.pop(pair):
        word, freq = words[wi], freqs[wi]
        if b not in word:
            continue  # stale index entry: an earlier merge used this occurrence
        out, start, n, i = [], 0, len(word), -1
        for _ in range(word.count(a)):  # jump from a to a with C-level index() rather than step by step
            i = word.index(a, i + 1)
            if i < start or i + 1 == n or word[i + 1] != b:
                continue
            out += word[start:i]
            if i:
                pair_counts[word[i - 1], a] -= freq
                grown.add(left := (out[-1], new))
                pair_counts[left] += freq
                pair_words[left].add(wi)
            if i + 2 < n and not (word[i + 2] == a and i + 3 < n and word[i + 3] == b):
                pair_counts[b, word[i + 2]] -= freq
                grown.add(right := (new, word[i + 2]))
                pair_counts[right] += freq
                pair_words[right].add(wi)
            out.append(new)
            start = i + 2
        if start:
            words[wi] = out + word[start:]
    pair_counts.pop(pair, None)
    return grown


def _train_merges(counts: dict[bytes, int], vocab: Vocab, n_merges: int) -> Merges:
    """Run up to n_merges BPE merges over the pre-token counts, appending new tokens to vocab in place."""
    words, freqs = [list(w) for w in counts], list(counts.values())
    pair_counts, pair_words = _index_pairs(words, freqs)
    keys = {i: _descending_key(t) for i, t in vocab.items()}
    heap = [(-n, keys[a], keys[b], a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    # Words hold one id per distinct byte string, so a token reachable by two different merges is
    # counted as one symbol, exactly as if words were tuples of bytes.
    canonical = {bytes([i]): i for i in range(256)}
    merges: Merges = []
    while len(merges) < n_merges and (pair := _pop_best(heap, pair_counts, keys)):
        a, b = pair
        merges.append((vocab[a], vocab[b]))
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        sym = canonical.setdefault(vocab[new_id], new_id)
        keys[sym] = _descending_key(vocab[sym])
        for p in _apply_merge(pair, sym, words, freqs, pair_counts, pair_words):
            heapq.heappush(heap, (-pair_counts[p], keys[p[0]], keys[p[1]], *p))
    return merges


def _train_from_counts(counts: dict[bytes, int], vocab_size: int, special_tokens: Sequence[str]):
    vocab: Vocab = {i: bytes([i]) for i in range(256)}
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab)} (256 bytes + special tokens)")
    with _gc_paused():
        merges = _train_merges(counts, vocab, vocab_size - len(vocab))
    return vocab, merges


def train_bpe(
    input: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    num_workers: int | None = None,
) -> tuple[Vocab, Merges]:
    """Train a byte-level BPE on the UTF-8 text file at path `input` (use train_bpe_from_text for strings).

    Returns (vocab, merges) in the layout described at the top of this module. Ties between equally
    frequent pairs go to the lexicographically greatest (bytes, bytes). Training stops early (smaller
    vocab) if no pair is left to merge. Files of PARALLEL_MIN_BYTES or more are pre-tokenized by
    num_workers processes (default: os.cpu_count()); the result does not depend on num_workers.
    """
    special_tokens = list(special_tokens)
    counts = _count_file(os.fspath(input), special_tokens, num_workers or os.cpu_count() or 1)
    return _train_from_counts(counts, vocab_size, special_tokens)


def train_bpe_from_text(
    text: str, vocab_size: int, special_tokens: Sequence[str] = ()
) -> tuple[Vocab, Merges]:
    """Like train_bpe, but on an in-memory string (always in-process)."""
    special_tokens = list(special_tokens)
    return _train_from_counts(_count_pretokens(text, special_tokens), vocab_size, special_tokens)


# ----------------------------------------------------------------------------------------------------------
# Encoding and decoding

# In a stream, text may be cut before a whitespace character that follows a non-whitespace one (same
# argument as _WHITESPACE_CUT, with the regex module's own \s). "(?r)" searches backwards: the last cut.
_LAST_TEXT_CUT = regex.compile(r"(?r)\S\s")


class _PieceCache(dict):
    """pre-token -> ids; a miss runs BPE. Cleared when full, so memory stays bounded on endless streams."""

    def __init__(self, bpe):
        super().__init__()
        self.bpe = bpe

    def __missing__(self, piece: str) -> tuple[int, ...]:
        if len(self) >= CACHE_MAX:
            self.clear()
        ids = self[piece] = self.bpe(piece.encode("utf-8"))
        return ids


class Tokenizer:
    """Byte-level BPE: vocab (id -> bytes), merges in rank order, and special tokens (str -> id)."""

    def __init__(
        self, vocab: Vocab, merges: Merges, special_tokens: Iterable[str] | dict[str, int] | None = None
    ):
        self.vocab = dict(vocab)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens = self._register_specials(special_tokens or ())
        self._byte_ids, self._ranks, self._rank_pairs, self._rank_ids = self._merge_tables()
        self._whole = self._self_encoding_tokens()  # token bytes -> id, for tokens that encode to themselves
        self._special_split = _special_regex(self.special_tokens, capture=True)
        self._max_special_len = max(map(len, self.special_tokens), default=1)
        self._cache = _PieceCache(self._bpe)  # pre-token -> ids

    def _register_specials(self, special_tokens: Iterable[str] | dict[str, int]) -> dict[str, int]:
        """Map each special token to an id: the given one, else an existing entry with its bytes, else a
        new id after the largest."""
        if isinstance(special_tokens, dict):
            self.vocab.update({i: s.encode("utf-8") for s, i in special_tokens.items()})
            return dict(special_tokens)
        by_bytes = {t: i for i, t in sorted(self.vocab.items(), reverse=True)}  # lowest id wins
        specials = {}
        for token in special_tokens:
            raw = token.encode("utf-8")
            if raw not in by_bytes:
                by_bytes[raw] = max(self.vocab, default=-1) + 1
                self.vocab[by_bytes[raw]] = raw
            specials[token] = by_bytes[raw]
        return specials

    def _merge_tables(self) -> tuple[list[int], dict[tuple[int, int], int], list, list[int]]:
        """Encoding tables on canonical ids (the lowest non-special id of each byte string): the id of every
        byte, pair -> rank, and per rank the pair and the id it merges into."""
        special_ids = set(self.special_tokens.values())
        ids: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            if i not in special_ids:
                ids.setdefault(self.vocab[i], i)
        if any(bytes([b]) not in ids for b in range(256)):
            raise ValueError("vocab must contain all 256 single bytes")
        ranks, rank_pairs, rank_ids = {}, [], []
        for rank, (a, b) in enumerate(self.merges):
            pair = (ids[a], ids[b])
            ranks.setdefault(pair, rank)
            rank_pairs.append(pair)
            rank_ids.append(ids[a + b])
        return [ids[bytes([b])] for b in range(256)], ranks, rank_pairs, rank_ids

    def _self_encoding_tokens(self) -> dict[bytes, int]:
        """Tokens whose own bytes encode to just themselves: a pre-token equal to one skips the merge loop.

        (tiktoken takes this shortcut for every token; here only where the merges agree.) Merges apply in
        rank order, so T = a + b (rank r) encodes to itself iff a and b do and no pair straddling the a|b
        boundary merges first. At the boundary sit a's right spine (a, its right part, that one's right
        part, ...) and b's left spine, each token alive from the rank that made it to the rank that used
        it; a straddling pair merges iff its rank falls inside both lifetimes.
        """
        born = {i: -1 for i in self._byte_ids}  # rank that created each token
        parts: dict[int, tuple[int, int]] = {}
        for rank, ((a, b), t) in enumerate(zip(self._rank_pairs, self._rank_ids)):
            if t in born or a not in born or b not in born or self._ranks[a, b] != rank:
                return {}  # not a plain BPE merge list (a token made twice, ...): no shortcut
            born[t], parts[t] = rank, (a, b)
        good = set(self._byte_ids)
        for t, (a, b) in parts.items():
            if a in good and b in good and not self._straddles(a, b, born[t], born, parts):
                good.add(t)
        return {self.vocab[t]: t for t in good}

    def _straddles(self, a: int, b: int, rank: int, born: dict, parts: dict) -> bool:
        """Does some pair across the a|b boundary merge before rank (see _self_encoding_tokens)?"""
        x, x_dies = a, rank
        while True:
            y, y_dies = b, rank
            while True:
                r = self._ranks.get((x, y))
                if r is not None and born[x] < r < x_dies and born[y] < r < y_dies:
                    return True
                if y not in parts:
                    break
                y, y_dies = parts[y][0], born[y]
            if x not in parts:
                return False
            x, x_dies = parts[x][1], born[x]

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the embedding table size); len(vocab) for contiguous ids."""
        return max(self.vocab) + 1

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; streaming decoders buffer these until they form valid UTF-8."""
        return self.vocab[token_id]

    # --- encoding ---

    def encode(self, text: str) -> list[int]:
        """Ids for text. Special-token strings in the text become their special ids (longest match first)."""
        if self._special_split is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:  # split() with a capture group alternates text, special, text, ...
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids for text, treating special-token strings as plain text."""
        pieces = _SPLIT.findall(text)
        return list(chain.from_iterable(map(self._cache.__getitem__, pieces)))  # the hot loop stays in C

    def _bpe(self, data: bytes) -> tuple[int, ...]:
        """Merge one pre-token: while some adjacent pair is a merge, apply the lowest-rank one at every
        occurrence, left to right (exactly what training did). Pair ranks are updated only next to a merge."""
        if (token := self._whole.get(data)) is not None:
            return (token,)
        ids = list(map(self._byte_ids.__getitem__, data))
        if len(ids) > LONG_PIECE:
            return tuple(self._bpe_long(ids))  # rescanning min(ranks) would be quadratic in the length
        get, rank_ids = self._ranks.get, self._rank_ids
        ranks = list(map(get, zip(ids, ids[1:]), repeat(NO_RANK)))  # ranks[i]: pair (ids[i], ids[i+1])
        while ranks and (rank := min(ranks)) != NO_RANK:
            new = rank_ids[rank]
            while rank in ranks:
                i = ranks.index(rank)
                ids[i : i + 2] = (new,)
                del ranks[i]
                if i < len(ranks):
                    ranks[i] = get((new, ids[i + 1]), NO_RANK)
                if i > 0:
                    ranks[i - 1] = get((ids[i - 1], new), NO_RANK)
        return tuple(ids)

    def _bpe_long(self, ids: list[int]) -> list[int]:
        """Same merges as _bpe in O(n log n): symbols in a linked list, candidate pairs in a heap of
        (rank, position). All candidates of the lowest rank are applied left to right, then the pairs
        they formed are pushed; stale candidates are recognised and skipped."""
        n, ranks = len(ids), self._ranks
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # n / -1 mean "no neighbour"
        heap: list[tuple[int, int, int, int]] = []

        def push(i: int) -> None:
            if i >= 0 and nxt[i] < n and (r := ranks.get((ids[i], ids[nxt[i]]))) is not None:
                heapq.heappush(heap, (r, i, ids[i], ids[nxt[i]]))

        for i in range(n - 1):
            push(i)
        while heap:
            rank, merged_at = heap[0][0], []
            while heap and heap[0][0] == rank:
                _, i, a, b = heapq.heappop(heap)
                j = nxt[i]
                if ids[i] != a or j >= n or ids[j] != b:
                    continue  # stale: a symbol here was merged since this candidate was pushed
                ids[i], ids[j], nxt[i] = self._rank_ids[rank], -1, nxt[j]
                if nxt[j] < n:
                    prv[nxt[j]] = i
                merged_at.append(i)
            for i in merged_at:
                push(prv[i])
                push(i)
        return [t for t in ids if t >= 0]

    def encode_iterable(self, chunks: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. a text file, line by line): same ids as encode() of
        their concatenation. Text is buffered only up to the last cut that later text cannot change, so
        memory is bounded by the longest stretch without one (normally less than a line)."""
        buf, lo = "", 0
        for chunk in chunks:
            buf += chunk
            cut, lo = self._last_safe_cut(buf, lo)
            if cut:
                yield from self.encode(buf[:cut])
                buf, lo = buf[cut:], lo - cut
        yield from self.encode(buf)

    def _last_safe_cut(self, buf: str, lo: int) -> tuple[int, int]:
        """Last p with encode(buf[:p]) + encode(rest) == encode(buf + rest) for any rest (0 if none).

        Safe: the end of a special token, or a _LAST_TEXT_CUT in plain text. Only positions up to
        len(buf) - longest special are settled, since a special token starting later may be completed by
        the next chunk. Positions below lo were ruled out by an earlier call; returns (cut, new lo).
        """
        limit = len(buf) - self._max_special_len
        if limit < lo:
            return 0, lo
        cut, text_from = 0, lo
        if self._special_split is not None:
            for m in self._special_split.finditer(buf, lo):
                if m.start() > limit:
                    break
                cut = text_from = m.end()
        if m := _LAST_TEXT_CUT.search(buf, max(text_from - 1, 0), limit + 1):
            cut = m.start() + 1
        return cut, max(text_from, limit + 1)

    # --- decoding ---

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(map(self.vocab.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids; byte sequences that are not valid UTF-8 become U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- files ---

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a file written by save()."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), source=str(path))

    def to_json(self) -> str:
        """A readable JSON document (one entry per line):
        {"format": "bpe-tokenizer", "version": 1, "pattern": <split regex>,
         "special_tokens": {"<|endoftext|>": 256, ...},
         "vocab": {"0": "Ā", ..., "300": "Ġthe", ...},      # id -> token, specials excluded
         "merges": ["Ġ t", "h e", ...]}                      # rank order, the two parts space-separated
        Tokens are written with GPT-2's byte -> character map (bytes_to_unicode), as in its vocab.bpe:
        printable characters stand for themselves, "Ġ" is a space, and no token contains a real space."""
        special_ids = set(self.special_tokens.values())
        data = {
            "format": "bpe-tokenizer",
            "version": FORMAT_VERSION,
            "pattern": GPT2_SPLIT_PATTERN.pattern,
            "special_tokens": self.special_tokens,
            "vocab": {str(i): _to_readable(t) for i, t in sorted(self.vocab.items()) if i not in special_ids},
            "merges": [f"{_to_readable(a)} {_to_readable(b)}" for a, b in self.merges],
        }
        return json.dumps(data, ensure_ascii=False, indent=0)

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer") -> Tokenizer:
        """The inverse of to_json()."""
        data = json.loads(text)
        if (
            not isinstance(data, dict)
            or data.get("format") != "bpe-tokenizer"
            or data.get("version") != FORMAT_VERSION
        ):
            raise ValueError(f"{source}: not a version-{FORMAT_VERSION} bpe-tokenizer file")
        if data["pattern"] != GPT2_SPLIT_PATTERN.pattern:
            raise ValueError(f"{source}: unsupported split pattern")
        vocab = {int(i): _from_readable(t) for i, t in data["vocab"].items()}
        merges = [tuple(map(_from_readable, line.split(" "))) for line in data["merges"]]
        return cls(vocab, merges, data["special_tokens"])

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> Tokenizer:
        """Load OpenAI's GPT-2 encoder.json (token -> id) and vocab.bpe (merges), keeping GPT-2's ids."""
        with open(encoder_json, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(vocab_bpe, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        vocab = {i: _from_readable(t) for t, i in encoder.items()}
        merges = [tuple(map(_from_readable, line.split(" "))) for line in lines]
        return cls(vocab, merges, {"<|endoftext|>": encoder["<|endoftext|>"]})
