"""Token shards on disk, and the loader that streams contiguous batches out of them (llm.c style).

A pre-training corpus is billions of tokens: far too many to tokenize on every run or to hold in memory.
prepare.py tokenizes it once into shards, files of a fixed number of tokens, and training memory-maps them:
the operating system pages in only the part a batch reads.

Shard file format (the same as llm.c's, so its tools and ours read each other's shards):

    header   256 x int32, little-endian (1,024 bytes)
             [0] MAGIC = 20240520   tells a shard from any other file
             [1] VERSION = 1        token layout below
             [2] token count N
             [3:256] zero           room for later fields
    tokens   N x uint16, little-endian

uint16 halves the disk and page-cache footprint of int32, and GPT-2's 50,257 token ids all fit below 65,536.
Files are named {name}_{split}_{index:06d}.bin, e.g. wikitext_train_000003.bin, with split "train" or "val".
"""

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cli import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
HEADER_DTYPE = np.dtype("<i4")
TOKEN_DTYPE = np.dtype("<u2")  # explicit little-endian: a shard written on one machine reads on any other
SPLITS = ("train", "val")


def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray) -> Path:
    """Write tokens to path as one shard. The bytes go to a temporary name first and os.replace moves them
    into place, so a reader (or a crash) never sees half a shard under the real name."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a shard holds a 1-D token array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"token ids must lie in [0, 65535] to be stored as uint16 ({path})")
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a read-only uint16 memory map, after checking the header against the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype=HEADER_DTYPE)
    except OSError as e:
        raise UserError(f"cannot read token shard {path}: {e.strerror}") from e
    if len(header) < HEADER_INTS:
        raise UserError(
            f"{path} is not a token shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header"
        )
    if header[0] != MAGIC:
        raise UserError(f"{path} is not a token shard (magic number {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise UserError(f"{path} is a version {header[1]} token shard; this code reads version {VERSION}")
    count = int(header[2])
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise UserError(
            f"token shard {path} is damaged: its header says {count} tokens ({expected} bytes), "
            f"but the file has {size} bytes (truncated by an interrupted copy?)"
        )
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def list_shards(folder: str | Path, split: str) -> list[Path]:
    """The shards of one split in folder, in index order (zero-padded indexes sort as text)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(folder)
    pattern = re.compile(rf".+_{split}_\d{{6}}\.bin")
    files = sorted(p for p in folder.glob(f"*_{split}_*.bin") if pattern.fullmatch(p.name))
    if not files:
        raise UserError(
            f"no {split} shards (NAME_{split}_000000.bin, ...) in {folder}; write them with prepare.py"
        )
    return files


class ShardLoader:
    """Contiguous batches from a list of shards, with every rank of a data-parallel run reading its own.

    One step of all ranks together reads the window tokens[p : p + B*T*W + 1] of the current shard (W =
    world_size) and rank r takes the B*T tokens at p + r*B*T (plus one more for the targets). So the W ranks'
    batches stacked in rank order are exactly the batch a single process with batch size W*B reads: data
    parallelism changes who computes a batch, not which tokens are trained on. p then advances by B*T*W; once
    a shard has too few tokens left for another full step, all ranks move to the next shard together (its
    leftover tail is skipped), and after the last shard back to the first, counting an epoch.

    The state (shard, position, epoch) is the same on every rank, since it names the step, not the rank's
    offset: a checkpoint saved by rank 0 alone would resume every rank correctly.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        batch_size: int,
        block_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not files:
            raise UserError("no token shards to load")
        self.files = [Path(f) for f in files]
        # Memory maps cost address space, not memory: pages are read only when a batch touches them.
        self._setup([read_shard(f) for f in self.files], batch_size, block_size, rank, world_size)

    def _setup(
        self, shards: list[np.ndarray], batch_size: int, block_size: int, rank: int, world_size: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.shards = shards
        self.B, self.T, self.rank, self.world_size = batch_size, block_size, rank, world_size
        self.step_tokens = batch_size * block_size * world_size
        need = self.step_tokens + 1  # the targets of the last position are one token further on
        for i, shard in enumerate(shards):
            if len(shard) < need:
                raise UserError(
                    f"{self._describe(i)} has {len(shard):,} tokens, but a batch of {batch_size} x "
                    f"{block_size} tokens on {world_size} process(es) needs at least {need:,} per shard; "
                    "use a smaller batch or context, or write larger shards (prepare.py --shard-tokens)"
                )
        self.reset()

    def _describe(self, i: int) -> str:
        return f"token shard {self.files[i]}"

    def reset(self) -> None:
        """Back to the start of the first shard, e.g. to evaluate on the same validation batches each time."""
        self.shard, self.position, self.epoch = 0, 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (B, T) int64 on the CPU: B consecutive rows of T tokens, y = x shifted by one."""
        B, T = self.B, self.T
        start = self.position + self.rank * B * T
        buf = torch.from_numpy(self.shards[self.shard][start : start + B * T + 1].astype(np.int64))
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self._advance()
        return x, y

    def _advance(self) -> None:
        self.position += self.step_tokens
        if self.position + self.step_tokens + 1 > len(self.shards[self.shard]):
            self.shard, self.position = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1

    def state_dict(self) -> dict:
        """Where the next batch comes from, as plain ints (JSON- and torch.save-friendly)."""
        return {"shard": self.shard, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(): the following batches are those the saved loader would have read."""
        shard, position, epoch = (int(state[k]) for k in ("shard", "position", "epoch"))
        fits = (
            0 <= shard < len(self.shards)
            and position >= 0
            and position + self.step_tokens + 1 <= len(self.shards[shard])
        )
        if not fits or epoch < 0:
            raise UserError(
                f"the saved data position (shard {shard}, token {position}) does not fit these "
                f"{len(self.shards)} shard(s) and this batch size; were the shards re-prepared, or the "
                "batch changed?"
            )
        self.shard, self.position, self.epoch = shard, position, epoch


class TokenLoader(ShardLoader):
    """The same batches out of one in-memory token array (a small --data FILE), as if it were one shard."""

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor,
        batch_size: int,
        block_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        self.files = []
        self._setup([tokens], batch_size, block_size, rank, world_size)

    def _describe(self, i: int) -> str:
        return "the token array"
