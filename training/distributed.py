"""Several processes, one per GPU, as started by ``accelerate launch`` or ``torchrun``.

Both launchers describe the process through the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the
rendezvous address); a plain ``cot-compress`` call has none of them and is a world of one, for which nothing
here touches ``torch.distributed``. Training gets DDP from accelerate inside the trainer; evaluation uses these
helpers to shard the test set, wait for every rank and let rank 0 merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Process:
    """Where this process stands among its peers."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Process:
    """This process's rank and world size, from the launcher's environment (a world of one without it)."""
    return Process(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup() -> Process:
    """Join the process group when launched with several processes (idempotent), and pin CUDA to this rank.

    Each rank drives ``cuda:{local_rank}``: it becomes the current device, so everything that asks for
    ``cuda`` lands on this rank's own GPU. The backend is NCCL on CUDA and gloo on CPU.
    """
    import torch
    import torch.distributed as dist

    process = current()
    if not process.distributed:
        return process
    if torch.cuda.is_available():
        torch.cuda.set_device(process.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # NVLink multicast (NVLS) must stay off on the shared H100 hosts; a user's own choice wins.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        kwargs = {"device_id": torch.device("cuda", process.local_rank)} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return process


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a world of one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_share(batches: list[T], process: Process) -> list[T]:
    """Batches r, r+N, r+2N, … of a plan shared by N processes: neighbours in a length-sorted plan cost about
    the same, so the ranks finish together."""
    return batches[process.rank :: process.world_size]
