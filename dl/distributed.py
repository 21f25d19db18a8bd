"""Process-group set-up from torchrun's environment (TorchDistributor sets the same), rank-0 guard, teardown.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (a plain
`python` run) the process joins a one-rank group of its own, so training code never branches on it.
"""
from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("dlpipe.distributed")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device


def resolve_backend(backend: str) -> str:
    """`auto` -> nccl when CUDA is available, else gloo; an explicit backend is kept."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def is_master() -> bool:
    """True on rank 0 (or without a process group): the one process that logs and writes."""
    return not dist.is_initialized() or dist.get_rank() == 0


def seed_everything(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch with `seed + rank`: reproducible, yet different dropout per rank."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def restart_count() -> int:
    """How many times torchrun (`--max-restarts`) has relaunched this job's ranks; 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def all_gather(value: object) -> list:
    """Every rank's `value` (picklable), in rank order; `[value]` without a process group."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks (unchanged without a process group) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wait_released(tensor: torch.Tensor, timeout_s: float = 30.0) -> bool:
    """Wait until no backend thread holds `tensor` any more (its use count is ours alone); False after `timeout_s`.

    A collective's work, and the tensors it holds, may outlive the call that waited for it: gloo's worker thread
    wakes the caller first and lets go of the work just after.
    """
    deadline = time.monotonic() + timeout_s
    while tensor._use_count() > 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def leave_together(device: torch.device, timeout_s: float = 30.0) -> None:
    """Wait until every rank gets here, then until the backend has let go of that last collective.

    A rank must not leave while its peers still work (rank 0 logging and registering the model): torchrun would
    see it exit early. And it must not leave while gloo's worker thread still holds the last collective: if that
    thread lets go once the interpreter is shutting down, it cannot take the GIL to release the tensors' Python
    objects, and the rank dies with SIGABRT ("terminate called without an active exception").
    `destroy_process_group` does not join that thread: DDP keeps the group alive. So the last collective
    all-reduces a tensor of our own, and we wait until the backend holds it no more.
    """
    token = torch.zeros(1, device=device)
    dist.all_reduce(token)
    token.item()  # NCCL returns once the all-reduce is queued: wait until it has run, as barrier() did
    if dist.get_backend() != "gloo":  # seen with gloo; NCCL is shut down by destroy_process_group (no GPU here)
        return
    if not wait_released(token, timeout_s):
        log.warning("gloo still holds the last collective after %gs; leaving anyway", timeout_s)


@contextmanager
def distributed(backend: str = "auto", seed: int = 0) -> Iterator[DistContext]:
    """Join the process group described by the environment, seed this rank, and tear the group down on exit."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = resolve_backend(backend)
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    seed_everything(seed, rank)
    try:
        yield DistContext(rank, local_rank, world_size, backend, device)
        leave_together(device)  # on an exception there is no wait: that rank fails at once
    finally:
        dist.destroy_process_group()
