"""torchrun's environment, and the order in which the processes see the data.

One process: ``python train.py ...``. Many: ``torchrun --nproc_per_node N train.py ...`` (add
``--nnodes``/``--rdzv-endpoint`` for several machines). NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a no-op for one process). Returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def epoch_batches(
    num_samples: int, global_batch: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This process's sample indices for every step of an epoch.

    The shuffled order depends only on (seed, epoch), so every process, and a resumed run, agrees on
    it. Each step takes the next ``global_batch`` indices (an incomplete last batch is dropped, as
    the seed did) and process r gets slice r of them: N processes together see exactly the batch
    one process would.
    """
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {world_size} processes")
    order = np.random.default_rng([seed, epoch, 0x5A3]).permutation(num_samples)
    per_rank = global_batch // world_size
    steps = num_samples // global_batch
    return [
        order[s * global_batch + rank * per_rank : s * global_batch + (rank + 1) * per_rank].tolist()
        for s in range(steps)
    ]


def shard_indices(num_samples: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Evaluation: every sample exactly once over all processes (no padding duplicates)."""
    return list(range(rank, num_samples, world_size))
