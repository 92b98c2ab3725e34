"""Device choice and the (optional) DistributedDataParallel process group.

A run launched by `torchrun --nproc_per_node N -m cli train ...` sees WORLD_SIZE/RANK/
LOCAL_RANK in its environment and trains one model with N processes (gloo on CPU, nccl on
CUDA); a plain launch is the 1-process special case of the same code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from domadapt.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank r of world_size, and its device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, ..., obj of rank world_size-1] on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (in place, also returned)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


DEVICES = "auto | cpu | cuda | mps"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA when available, else CPU (never MPS: asked for by name, as it is not
    tested yet); "cuda" under torchrun -> cuda:LOCAL_RANK; "mps" -> the Apple GPU. A device
    that is not there is a UserError (one line)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device; use {DEVICES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():  # Apple GPU (Metal Performance Shaders)
            raise UserError(f"--device {device}: no Apple GPU (MPS) on this machine; use "
                            f"--device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r}: use {DEVICES}")
    return dev


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistContext]:
    """Yield this process's DistContext; under torchrun, init (and afterwards destroy) the
    process group unless the caller already did."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        yield DistContext(device=dev)
        return
    if dev.type == "mps":
        raise UserError("--device mps: one process only (torchrun/DDP needs cpu or cuda)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    try:
        yield DistContext(device=dev, rank=dist.get_rank(), world_size=dist.get_world_size())
    finally:
        if owner:
            dist.destroy_process_group()
