"""torchrun support: process group, device, DDP or FSDP wrapping and the few collectives the loop needs.

Without ``--shard``: DDP. Only tensors that require a gradient are registered by DDP for
all-reduce, so only adapter parameters are synchronised; the frozen base is never communicated,
and every process holds all of it. With ``--shard``: FSDP2 (:mod:`lorakit.train.sharding`), each
process holding 1/N of the base and of the adapters.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shard: bool = False

    @classmethod
    def from_env(cls, shard: bool = False) -> Distributed:
        """The process group torchrun describes; ``shard`` (FSDP) also under torchrun with one
        process, which runs the sharded code path on one device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        shard = shard and "WORLD_SIZE" in os.environ
        if world == 1 and not shard:
            return cls(0, 1, torch.device("cuda" if cuda else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return cls(dist.get_rank(), world, device, shard)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to run forward passes through: itself (one process), sharded in place
        (``--shard``) or inside DDP. Parameters must be collected after this (FSDP replaces them)."""
        if self.shard:
            from lorakit.train.sharding import shard_model

            return shard_model(model, self.device, self.world)
        model = model.to(self.device)
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module):
        """Skip the gradient exchange for a micro-batch that is not the step's last."""
        if self.shard:
            from lorakit.train.sharding import gradient_sync

            return gradient_sync(model, enabled=False)
        return model.no_sync() if self.world > 1 else contextlib.nullcontext()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if (self.world > 1 or self.shard) and dist.is_initialized():
            dist.destroy_process_group()
