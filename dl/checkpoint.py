"""Checkpoint files: atomic writes, weights-only reads, every RNG's state as tensors, and whole training states.

Everything in a checkpoint is a tensor or a plain value, so `torch.load(weights_only=True)` reads it back.
A training state holds the `state_dict()` of each stateful object (model, optimizer, scheduler, ...), the
loop's position, and one entry per rank (its RNG states and whatever else differs between ranks).

Each write keeps the one it replaces as `<name>.prev.pt` and a SHA-256 of the file as `<name>.pt.sha256`; a
checkpoint that is truncated, altered or refused by the weights-only unpickler is reported by path and the
previous one is read instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dl.distributed import all_gather, is_master


log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or neither it nor the previous one can be read; the message names the paths."""


def previous_path(path: Path) -> Path:
    """Where `save_checkpoint` keeps the checkpoint that `path` held before: `last.pt` -> `last.prev.pt`."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def digest_path(path: Path) -> Path:
    """The SHA-256 (hex) of the checkpoint at `path`, written next to it."""
    return path.with_name(f"{path.name}.sha256")


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write a checkpoint so that `path` holds the previous one or the new one, never half of one.

    The checkpoint `path` held moves to `previous_path(path)`; a failed write (disk full) raises
    CheckpointError and leaves both untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staged_digest = digest_path(staging)
    try:
        with open(staging, "wb") as out:
            torch.save(checkpoint, out)
            out.flush()
            os.fsync(out.fileno())
        staged_digest.write_text(_sha256(staging))
    except (OSError, RuntimeError) as exc:
        staging.unlink(missing_ok=True)
        staged_digest.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path}: {exc}") from exc
    _keep_previous(path)
    os.replace(staged_digest, digest_path(path))  # a crash here: `path` fails its digest and the previous is read
    os.replace(staging, path)


def _keep_previous(path: Path) -> None:
    """Link (or, where links fail, copy) `path` and its digest to the previous slot; forget a stale previous one."""
    for current, previous in ((path, previous_path(path)), (digest_path(path), digest_path(previous_path(path)))):
        if not current.exists():
            previous.unlink(missing_ok=True)  # a previous slot must hold what `path` held, not an older run's
            continue
        staging = previous.with_name(f".{previous.name}.tmp-{os.getpid()}")
        staging.unlink(missing_ok=True)
        try:
            os.link(current, staging)
        except OSError:
            staging.write_bytes(current.read_bytes())
        os.replace(staging, previous)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: Path) -> dict:
    """Read one checkpoint onto the CPU with the weights-only unpickler; CheckpointError names the path and the problem."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    digest = digest_path(path)
    if digest.is_file() and digest.read_text().strip() != _sha256(path):
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 differs from {digest.name}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (truncated zip, EOF, refused pickle: all mean unreadable)
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read: {problem}") from exc


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`, refusing anything but tensors and plain values.

    A missing or unreadable `path` falls back, with a warning naming it, to the previous checkpoint.
    """
    path = Path(path)
    previous = previous_path(path)
    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        if not previous.is_file():
            raise
        log.warning("%s; reading the previous checkpoint %s", exc, previous)
        try:
            return read_checkpoint(previous)
        except CheckpointError as older:
            raise CheckpointError(f"{exc}; and the previous one: {older}") from older


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
