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


def finish() -> None:
    """A successful run's last collective: no process tears its connections down while another
    still works (the main one writes the final weights or the metrics after the last exchange).
    Seen twice in ~50 two-process CPU runs on a busy host without it: the other process aborted
    in teardown ("terminate called without an active exception") after its work was done (the
    final weights were written), and torchrun reported the run failed."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every process rank 0's parameters and buffers (they start equal; this makes sure)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: list[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """Average the gradients of ``parameters`` over the processes, after this step's backward passes.

    The training loop back-propagates several times per step (one round of prompts at a time, then
    the image encoder), so gradients are exchanged once here, in flat buckets, instead of by DDP's
    hooks inside one backward pass. A parameter that received no gradient on any process keeps
    ``grad = None`` (AdamW then skips it, as it would in one process running the whole batch); one
    that has a gradient on some process only counts zeros elsewhere. No-op for one process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    device = next((p.grad.device for p in parameters if p.grad is not None), None)
    if device is None:
        device = parameters[0].device if parameters else torch.device("cpu")
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.uint8, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    live = [p for p, flag in zip(parameters, has_grad.tolist()) if flag]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in live + [None]:  # type: ignore[list-item]
        if p is not None and (not bucket or (p.grad.dtype == bucket[0].grad.dtype and size < bucket_bytes)):
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
            continue
        if bucket:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for q in bucket:
                n = q.grad.numel()
                q.grad.copy_(flat[offset : offset + n].view_as(q.grad))
                offset += n
        bucket, size = ([p], p.grad.numel() * p.grad.element_size()) if p is not None else ([], 0)
