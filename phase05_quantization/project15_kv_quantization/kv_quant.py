"""KIVI (Liu et al. 2024): the KV cache in 8, 4 or 2 bits. Keys are quantised per channel, in groups of G
tokens, because a few key channels carry much larger values than the rest (outlier channels); values are
quantised per token. The newest tokens stay in full precision (the residual window), so what attention
weighs most is exact. Attention reads the cache dequantised (PyTorch, on read).

Number format (both keys and values): asymmetric min-max, KIVI's. A group of numbers x gets a zero point
z = min(x), rounded down to fp16, and a scale s = (max(x) - z) / (2^bits - 1), rounded up to fp16; then
q = round((x - z) / s) in [0, 2^bits - 1] and x ~ q * s + z. Integers narrower than a byte are packed along
the channels: 2 per byte at 4 bits, 4 at 2 bits, element i of a byte in bits [bits * i, bits * (i + 1)).

Shapes: B = batch, nh = heads, S = the cache's slots, hs = head size, G = key group (tokens), R = residual.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

BITS = (8, 4, 2)


@dataclass(frozen=True)
class KVFormat:
    """How the cache is stored. KIVI's defaults: G = 32, R = 32..128 (R = 32 suits a 128-token context)."""

    bits: int = 4  # 8, 4 or 2
    residual: int = 32  # the newest tokens, kept in full precision
    group_size: int = 32  # keys: tokens that share one scale and zero point per channel
    per_channel_keys: bool = True  # False: keys per token like the values (the ablation KIVI argues against)

    def check(self, head_size: int) -> None:
        """ValueError when a cache of this format cannot hold heads of head_size channels."""
        if self.bits not in BITS:
            raise ValueError(f"KV cache bits must be one of {BITS} (16: the plain cache), got {self.bits}")
        if self.residual < 0 or self.group_size < 1:
            raise ValueError(f"residual {self.residual} must be >= 0 and group size {self.group_size} >= 1")
        if head_size % (8 // self.bits):
            per_byte = 8 // self.bits
            raise ValueError(
                f"{self.bits}-bit values pack {per_byte} a byte: head size {head_size} is not a multiple"
            )


# --- the number format -------------------------------------------------------------------------------------


def _to_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x rounded to an fp16 value, up (>= x) or down (<= x), returned as float32: rounding the stored scale
    up and the zero point down keeps every x inside the grid, so no value is clamped by more than s / 2."""
    h = x.to(torch.float16)
    off = h.float() < x if up else h.float() > x
    # The next fp16 by bit pattern (torch.nextafter has no fp16 on every device): the pattern grows with |h|,
    # so one step up is +1 for a positive h and -1 for a negative one, and the other way round for down.
    bits = h.view(torch.int16)
    step = torch.where((bits < 0) != up, 1, -1).to(torch.int16)
    return torch.where(off, (bits + step).view(torch.float16), h).float()


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max over `dim`: q (x's shape) uint8 in [0, 2^bits - 1], and the scale and zero point
    of each group (x's shape with `dim` of size 1), fp16. A constant group gets the smallest scale, not 0."""
    x = x.float()
    levels = 2**bits - 1
    zero = _to_fp16(x.amin(dim, keepdim=True), up=False)
    scale = _to_fp16(((x.amax(dim, keepdim=True) - zero) / levels).clamp(min=2**-24), up=True)
    q = ((x - zero) / scale).round().clamp(0, levels)
    return q.to(torch.uint8), scale.half(), zero.half()


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float() + zero.float()  # scales and zero points broadcast over their group


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integers below 2^bits -> (..., n * bits / 8) bytes: 8 // bits neighbours share a byte."""
    per_byte = 8 // bits
    q = q.to(torch.uint8).view(
        *q.shape[:-1], q.size(-1) // per_byte, per_byte
    )  # (..., n / per_byte, per_byte)
    out = q[..., 0].clone()
    for i in range(1, per_byte):
        out |= q[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The exact inverse of pack: (..., m) bytes -> (..., m * 8 / bits) integers."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (8 // bits,)
    q = (packed[..., None] >> shifts) & (2**bits - 1)  # (..., m, 8 // bits)
    return q.flatten(-2)


# --- the cache ---------------------------------------------------------------------------------------------


def window_size(fmt: KVFormat, max_seq_len: int) -> int:
    """Full-precision slots per head: the newest R tokens, plus up to G - 1 keys waiting for their group of
    G to be complete (per-channel keys are quantised a whole group at a time)."""
    pending = fmt.group_size - 1 if fmt.per_channel_keys else 0
    return max(1, min(max_seq_len, fmt.residual + pending))


def bytes_per_token(fmt: KVFormat, n_head: int, head_size: int) -> float:
    """One layer's quantised storage per token: the packed keys and values, the values' scale and zero point
    (fp16 each, per token and head), and the keys' (per channel, shared by a group of G tokens)."""
    packed = 2 * head_size * fmt.bits / 8
    key_params = 4 * head_size / fmt.group_size if fmt.per_channel_keys else 4
    return n_head * (packed + key_params + 4)


def cache_bytes(fmt: KVFormat, batch_size: int, max_seq_len: int, n_head: int, head_size: int, dtype) -> int:
    """One layer's QuantizedKVCache in bytes (when G divides max_seq_len): the quantised storage for every
    slot plus the full-precision window in `dtype`."""
    window = 2 * n_head * window_size(fmt, max_seq_len) * head_size * torch.finfo(dtype).bits // 8
    return int(batch_size * (max_seq_len * bytes_per_token(fmt, n_head, head_size) + window))


class QuantizedKVCache(nn.Module):
    """KVCache's interface (update -> the whole keys and values, (B, nh, S, hs)), stored KIVI's way.

    Positions [0, k_done) hold quantised keys, [0, v_done) quantised values; every later position is in the
    window, in full precision, at slot position % W. k_done is the newest multiple of G at least R tokens
    back, v_done is R tokens back: the newest R tokens are always exact. Writes go on where the last one
    ended (decoding), or start again at slot 0 (a new prefill)."""

    def __init__(
        self, batch_size: int, max_seq_len: int, n_head: int, head_size: int, dtype, device=None,
        fmt: KVFormat = KVFormat(),
    ):  # fmt: skip
        super().__init__()
        fmt.check(head_size)
        self.fmt, self.max_seq_len, self.window = fmt, max_seq_len, window_size(fmt, max_seq_len)
        B, S, hs, G = batch_size, max_seq_len, head_size, fmt.group_size
        key_groups = (B, n_head, -(-S // G), hs) if fmt.per_channel_keys else (B, n_head, S, 1)
        shapes = {
            "k_q": ((B, n_head, S, hs * fmt.bits // 8), torch.uint8),  # packed along the channels
            "k_scale": (key_groups, torch.float16),  # per channel and group of G tokens
            "k_zero": (key_groups, torch.float16),
            "v_q": ((B, n_head, S, hs * fmt.bits // 8), torch.uint8),
            "v_scale": ((B, n_head, S, 1), torch.float16),  # per token (and head)
            "v_zero": ((B, n_head, S, 1), torch.float16),
            "k_window": ((B, n_head, self.window, hs), dtype),  # the residual window, full precision
            "v_window": ((B, n_head, self.window, hs), dtype),
        }
        for name, (shape, dt) in shapes.items():  # not persistent: a cache never goes into a checkpoint
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device), persistent=False)
        self.length = self.k_done = self.v_done = 0  # positions written, keys and values quantised

    def _done(self, length: int) -> tuple[int, int]:
        """(k_done, v_done) once `length` positions are written."""
        old = max(length - self.fmt.residual, 0)  # positions outside the residual window
        return (old // self.fmt.group_size * self.fmt.group_size if self.fmt.per_channel_keys else old), old

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hs) at slots input_pos (T,), quantise what left the window; return the
        whole keys and values dequantised, (B, nh, S, hs), unwritten slots zero (the mask hides them)."""
        start, T = int(input_pos[0]), k.size(2)  # one host sync: where this write starts
        if start == 0:
            self.length = self.k_done = self.v_done = 0
        elif start != self.length:
            raise ValueError(f"a quantised KV cache is written in order: slot {start} after {self.length}")
        end, first = start + T, self.k_done  # k_done <= v_done: the window holds [k_done, length)
        old = torch.arange(first, start, device=k.device) % self.window
        k_all = torch.cat(
            [self.k_window[:, :, old], k.to(self.k_window.dtype)], dim=2
        )  # positions first..end-1
        v_all = torch.cat([self.v_window[:, :, old], v.to(self.v_window.dtype)], dim=2)
        k_done, v_done = self._done(end)
        self._store_keys(k_all[:, :, self.k_done - first : k_done - first], self.k_done)
        self._store_values(v_all[:, :, self.v_done - first : v_done - first], self.v_done)
        keep = torch.arange(k_done, end, device=k.device)  # still in full precision
        self.k_window[:, :, keep % self.window] = k_all[:, :, keep - first]
        self.v_window[:, :, keep % self.window] = v_all[:, :, keep - first]
        self.length, self.k_done, self.v_done = end, k_done, v_done
        return self._read()

    def _store_keys(self, k: torch.Tensor, at: int) -> None:
        """k (B, nh, n, hs): positions at..at+n-1, whole groups of G when per channel."""
        B, nh, n, hs = k.shape
        G, bits = self.fmt.group_size, self.fmt.bits
        if self.fmt.per_channel_keys:  # NEW: per channel: min and max over each channel's G tokens
            q, s, z = quantize(k.reshape(B, nh, n // G, G, hs), bits, dim=-2)  # params (B, nh, n / G, 1, hs)
            q, s, z, first, count = q.view(B, nh, n, hs), s.squeeze(-2), z.squeeze(-2), at // G, n // G
        else:
            q, s, z = quantize(k, bits, dim=-1)  # params (B, nh, n, 1)
            first, count = at, n
        self.k_q[:, :, at : at + n] = pack(q, bits)
        self.k_scale[:, :, first : first + count] = s
        self.k_zero[:, :, first : first + count] = z

    def _store_values(self, v: torch.Tensor, at: int) -> None:
        """v (B, nh, n, hs): positions at..at+n-1, each token's head vector on its own."""
        n = v.size(2)
        q, s, z = quantize(v, self.fmt.bits, dim=-1)  # NEW: per token: min/max over the head's channels
        self.v_q[:, :, at : at + n] = pack(q, self.fmt.bits)
        self.v_scale[:, :, at : at + n] = s
        self.v_zero[:, :, at : at + n] = z

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantise on read: the quantised prefixes, then the window's positions, in the window's dtype."""
        dtype, bits, W = self.k_window.dtype, self.fmt.bits, self.window
        B, nh, _, hs = self.k_window.shape
        keys = torch.zeros(B, nh, self.max_seq_len, hs, dtype=dtype, device=self.k_q.device)
        values = torch.zeros_like(keys)
        kd, vd = self.k_done, self.v_done
        if kd:
            s, z = self.k_scale, self.k_zero
            if self.fmt.per_channel_keys:  # each group's parameters serve its G tokens
                G = self.fmt.group_size
                s, z = (
                    s[:, :, : kd // G].repeat_interleave(G, dim=2),
                    z[:, :, : kd // G].repeat_interleave(G, 2),
                )
            keys[:, :, :kd] = dequantize(unpack(self.k_q[:, :, :kd], bits), s[:, :, :kd], z[:, :, :kd]).to(
                dtype
            )
        if vd:
            v = dequantize(unpack(self.v_q[:, :, :vd], bits), self.v_scale[:, :, :vd], self.v_zero[:, :, :vd])
            values[:, :, :vd] = v.to(dtype)
        recent = torch.arange(kd, self.length, device=keys.device)  # (n,) positions in the window
        keys[:, :, recent] = self.k_window[:, :, recent % W]
        recent = torch.arange(vd, self.length, device=keys.device)
        values[:, :, recent] = self.v_window[:, :, recent % W]
        return keys, values
