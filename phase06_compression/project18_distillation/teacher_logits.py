"""The teacher's top-k log-probs, computed once and streamed with the token shards, so that a distillation run
never runs the teacher (the offline route of distillation pipelines that cache teacher logits).

The rows of a batch always start at a multiple of the context T in their shard (ShardLoader moves by whole
steps of B x T x processes tokens), so the teacher's view of a row is the same in every run that uses this
T, whatever its batch size or number of processes: store row r of shard s once, read it back by (s, r).
Per shard: <name>.logp.npy (rows, T, k) float32 log-probs at the distillation temperature, normalised over
the whole vocabulary; <name>.ids.npy (rows, T, k) int32 token ids. k = 64 costs 512 bytes a token.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import find_checkpoint
from data import DATA_DIR

CACHE_DIR = DATA_DIR / "teacher_logits"


def cache_folder(teacher: str, data: str | None, shards: list, k: int, temperature: float, T: int) -> Path:
    """One folder per (teacher weights, data, k, temperature, context): a retrained teacher or another
    corpus never reads this one's logits."""
    h = hashlib.sha256((find_checkpoint(Path(teacher)) / "model.safetensors").read_bytes())
    h.update(json.dumps([data, [len(s) for s in shards], k, temperature, T]).encode())
    return CACHE_DIR / h.hexdigest()[:16]


@torch.no_grad()
def precompute(teacher, shards: list[np.ndarray], folder: Path, k: int, temperature: float, batch_rows=16):
    """Run the teacher over every row of every shard once and keep its k largest log-probs at temperature
    T. Written under temporary names and renamed, so a cut-off run never leaves half a cache."""
    folder.mkdir(parents=True, exist_ok=True)
    T, device = teacher.config.block_size, next(teacher.parameters()).device
    for s, shard in enumerate(shards):
        if (folder / f"{s}.ids.npy").exists():
            continue
        rows = (len(shard) - 1) // T  # a row's targets reach one token past it
        logp = np.lib.format.open_memmap(folder / f"{s}.logp.tmp.npy", "w+", np.float32, (rows, T, k))
        ids = np.lib.format.open_memmap(folder / f"{s}.ids.tmp.npy", "w+", np.int32, (rows, T, k))
        for r in tqdm(range(0, rows, batch_rows), desc=f"teacher top-{k}, shard {s}", unit="batch"):
            n = min(batch_rows, rows - r)
            x = torch.from_numpy(shard[r * T : (r + n) * T].astype(np.int64)).view(n, T).to(device)
            log_p = F.log_softmax(teacher(x)[0].float() / temperature, dim=-1)  # (n, T, V)
            top = log_p.topk(k, dim=-1)  # (n, T, k) values and ids, largest first
            logp[r : r + n], ids[r : r + n] = top.values.cpu().numpy(), top.indices.int().cpu().numpy()
        logp.flush(), ids.flush()
        del logp, ids
        os.replace(folder / f"{s}.logp.tmp.npy", folder / f"{s}.logp.npy")
        os.replace(folder / f"{s}.ids.tmp.npy", folder / f"{s}.ids.npy")  # last: its presence marks done


class TopKLoader:
    """A training loader whose batches come with the teacher's stored top-k: (x, y, (log-probs, ids))."""

    def __init__(self, loader, folder: Path):
        self.loader = loader
        n = len(loader.shards)
        self.logp = [np.load(folder / f"{s}.logp.npy", mmap_mode="r") for s in range(n)]
        self.ids = [np.load(folder / f"{s}.ids.npy", mmap_mode="r") for s in range(n)]

    def next_batch(self):
        L = self.loader
        row, shard = (L.position + L.rank * L.B * L.T) // L.T, L.shard  # where the next batch starts
        x, y = L.next_batch()
        rows = slice(row, row + L.B)
        logp, ids = np.array(self.logp[shard][rows]), np.array(self.ids[shard][rows])  # (B, T, k) each
        return x, y, (torch.from_numpy(logp), torch.from_numpy(ids).long())

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
