"""Checkpoint files: atomic writes, weights-only reads, every RNG's state as tensors, and whole training states.

Everything in a checkpoint is a tensor or a plain value, so `torch.load(weights_only=True)` reads it back.
A training state holds the `state_dict()` of each stateful object (model, optimizer, scheduler, ...), the
loop's position, and one entry per rank (its RNG states and whatever else differs between ranks).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dl.distributed import all_gather, is_master


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write a checkpoint so that `path` holds the previous one or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(checkpoint, staging)
    os.replace(staging, path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` onto the CPU, refusing anything but tensors and plain values."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's Python, NumPy, torch (and CUDA) generator states, as tensors."""
    version, words, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([position, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore generator states captured by `rng_state`."""
    version, *words = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((version, tuple(words), gauss[0] if gauss else None))
    position, has_gauss, cached = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(position), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def capture(stateful: Mapping[str, Any], position: dict, rank_state: dict) -> dict | None:
    """Collective: the training state on rank 0 (every rank's RNG and `rank_state` gathered), None elsewhere."""
    ranks = all_gather({"rng": rng_state(), **rank_state})
    if not is_master():
        return None
    return {**{name: part.state_dict() for name, part in stateful.items()}, **position, "ranks": ranks}


def restore(checkpoint: dict, stateful: Mapping[str, Any], rank: int) -> dict:
    """Load each stateful object and this rank's RNG states from a `capture`d state; return this rank's entry."""
    for name, part in stateful.items():
        part.load_state_dict(checkpoint[name])
    mine = checkpoint["ranks"][rank]
    set_rng_state(mine["rng"])
    return mine
