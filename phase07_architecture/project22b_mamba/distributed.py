"""Data parallelism with torchrun and DistributedDataParallel.

Every process (one per GPU, or per CPU process with gloo) holds a full copy of the model and trains on its
own slice of each batch. During backward, DDP averages the gradients across processes with an all-reduce,
so every copy takes the identical optimizer step: N processes behave like one process with an N times
larger batch.

    torchrun --standalone --nproc_per_node=8 train.py                       # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
             --master_addr=HOST --master_port=29500 train.py             # node 0; node 1: --node_rank=1

torchrun sets RANK (global process index), LOCAL_RANK (index on this node) and WORLD_SIZE; without them
this is a plain single process.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import UserError, pick_device


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, evaluates to the console and writes checkpoints."""
        return self.rank == 0


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group if started by torchrun, and pick this process's device."""
    if "RANK" not in os.environ:
        return Dist(), pick_device(device_name)
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise UserError("distributed training on mps is not supported; use cuda (nccl) or cpu (gloo)")
    # NCCL moves gradients GPU to GPU (NVLink, InfiniBand); gloo is the CPU fallback.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The average of a scalar over all processes (for logging: each rank saw different data)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= d.world_size
    return value


def gather(obj, d: Dist) -> list:
    """Every rank's copy of a small picklable object (e.g. its data-loader position), on every rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out
