"""A request as the engine sees it: how to sample it (SamplingParams), its tokens so far and where their keys
and values live (Sequence: its block table), and what each step reports about it (RequestOutput). The names
are vLLM's.

A Sequence decides for itself when it is finished: a stop token, a stop string in its text, or max_tokens.
Its text is decoded as it grows, whole characters only, and text that might be the start of a stop string is
held back until the next tokens tell: a streamed delta never has to be taken back.
"""

import codecs
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it ends. Checked when made: a bad value is a ValueError here,
    before the request reaches the engine."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # sample only from the k likeliest tokens
    top_p: float | None = None  # sample from the smallest set with probability mass p
    seed: int | None = None  # the request's own random generator: the same tokens whatever runs beside it
    max_tokens: int = 16  # new tokens at most (vLLM's default)
    stop: tuple[str, ...] = ()  # the text ends before any of these (needs an engine with a tokenizer)
    stop_token_ids: tuple[int, ...] = ()  # these end it too, and are not part of the output

    def __post_init__(self):
        if not _whole(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (self.temperature == 0 or 1e-3 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be 0 (greedy) or at least 0.001, got {self.temperature}")
        if self.top_k is not None and (not _whole(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer of at least 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (not _whole(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


def _whole(value) -> bool:
    """An int, not a bool or a float: top_k=50.0 would pass a range check and fail later, inside a step
    that other requests share."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class RequestOutput:
    """What one step added to one request."""

    request_id: int
    token_ids: list[int]  # the new token (none when a stop token ended the request)
    text: str  # the new text: whole characters, none of a stop string
    finished: bool = False
    finish_reason: str | None = None  # "stop" (a stop token or string) or "length" (max_tokens)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class Sequence:
    """One request inside the engine: its prompt and the tokens generated so far, the blocks of the KV pool
    that hold its keys and values while it runs (NEW: its block table), and how many tokens they hold."""

    def __init__(
        self,
        request_id: int,
        prompt: list[int],
        params: SamplingParams,
        id_to_bytes: Callable[[int], bytes] | None = None,
        device: torch.device | str = "cpu",
    ):
        self.request_id, self.params, self.id_to_bytes = request_id, params, id_to_bytes
        self.token_ids = list(prompt)  # the prompt, then every generated token
        self.num_prompt_tokens = len(prompt)
        self.block_table: list[int] = []  # NEW: the pool's blocks holding its positions 0, 1, 2, ... in order
        self.block_hashes: list[bytes] = []  # NEW: the keys of its full blocks (block_manager.block_hash)
        self.num_cached = 0  # tokens whose keys and values its blocks hold, from the first
        self.cached_tokens = 0  # of those, the prompt tokens the prefix cache supplied
        self.slid = False  # it outgrew the context once: its blocks no longer hold positions 0, 1, 2, ...
        self.generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        self.text = ""  # decoded so far (up to a stop string)
        self._sent = 0  # characters of text already reported
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character back
        self._hold = max((len(s) for s in params.stop), default=1) - 1  # may be a stop string's beginning

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def next_tokens(self, context: int) -> tuple[list[int], int]:
        """The tokens this sequence puts through the model in its next step, and the position of the first:
        those its blocks do not hold yet (the whole prompt when it is admitted, then the newest token). Past
        the context the window slides, and with learned positions every cached key is then stale: each step
        recomputes the newest `context` tokens, as GPT.generate_stream does."""
        if len(self.token_ids) > context:
            return self.token_ids[-context:], 0
        return self.token_ids[self.num_cached :], self.num_cached

    def append(self, token: int) -> RequestOutput:
        """Add a sampled token and report what it adds; the sequence finishes here when it should."""
        if token in self.params.stop_token_ids:
            return self._finish("stop", [])
        self.token_ids.append(token)
        if self.id_to_bytes is not None:
            before = len(self.text)
            self.text += self._utf8.decode(self.id_to_bytes(token))
            for stop in self.params.stop:  # only where the new characters could complete it
                at = self.text.find(stop, max(0, before - len(stop) + 1))
                if at >= 0:
                    self.text = self.text[:at]
                    return self._finish("stop", [token], flush=False)
        if self.num_output_tokens == self.params.max_tokens:
            return self._finish("length", [token])
        return RequestOutput(self.request_id, [token], self._new_text(len(self.text) - self._hold))

    def _finish(self, reason: str, token_ids: list[int], flush: bool = True) -> RequestOutput:
        if flush and self.id_to_bytes is not None:
            self.text += self._utf8.decode(b"", final=True)  # an incomplete character becomes U+FFFD
        return RequestOutput(self.request_id, token_ids, self._new_text(len(self.text)), True, reason)

    def _new_text(self, upto: int) -> str:
        """The text from what was last reported up to `upto`."""
        if upto <= self._sent:
            return ""
        new, self._sent = self.text[self._sent : upto], upto
        return new
