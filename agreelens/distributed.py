"""Data-parallel training under ``torchrun`` (DDP): process group, sharding, collectives.

``torchrun --standalone --nproc_per_node N -m agreelens train --model large`` (or ``agreelens train
--model large --nproc N``) starts N processes; each takes an equal share of the batch's columns (the B
contiguous token streams of :func:`agreelens.train.batchify`), and DDP averages the gradients. Since
every rank's loss is the mean over its own columns, the averaged gradient is the full batch's: N
processes with ``train.batch_size`` B train the same model as one process with B (up to the order of
floating-point sums; tested with 2 gloo processes on a CPU). Backend: NCCL on CUDA (one GPU per
process, ``cuda:LOCAL_RANK``), gloo on CPUs.

With dropout, each rank draws its own masks, so the runs are alike in distribution, not in their
bits. Rank 0 alone evaluates, logs to MLflow, writes checkpoints and the model; the others receive its
validation perplexity so that LR schedule and early stopping stay in step everywhere. Every rank reads
the project folder (data, checkpoints): on several machines it must be a shared filesystem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place in the job: ``rank`` of ``size`` processes (1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> "World":
        """The job torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); joins
        its process group. Without torchrun: one process on CUDA if present, else the CPU."""
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        cuda = torch.cuda.is_available()
        if size <= 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"torchrun started {local_size} processes on this machine but it has "
                                   f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node <= the GPU count")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, size, local_rank, local_size, device)

    def threads(self, configured: int) -> int:
        """CPU threads for this process: ``train.threads``, else the cores shared out among local ranks."""
        return configured or max(1, (os.cpu_count() or 1) // self.local_size)

    def shard(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a batchified ``(T, B)`` stream (all of them without DDP)."""
        if not self.distributed:
            return data
        b = data.size(1)
        if b % self.size:
            raise ValueError(f"train.batch_size {b} is not divisible by the {self.size} DDP processes; "
                             f"choose a batch size that is a multiple of {self.size}")
        per = b // self.size
        return data[:, self.rank * per:(self.rank + 1) * per]

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over all ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_columns(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' column shards of a ``(layers, B/size, H)`` state, concatenated in rank order."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=1)

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, unused: bool = True) -> torch.nn.Module:
    """``model`` in DDP for training when distributed (else itself). ``unused``: some parameters may get
    no gradient in a step (an adaptive softmax's tail cluster in a batch without one of its words)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=unused)
