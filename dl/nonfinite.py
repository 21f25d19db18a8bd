"""Stop training when the loss or the weights become NaN/Inf, on every rank at once, before a checkpoint saves them.

Each step `observe` notes on the device the first step whose loss is not finite (no host sync per step); `check`
is a collective, run before each checkpoint write and at each epoch end, that raises `NonFiniteLoss` on all ranks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dl.distributed import all_gather

HINT = "lower train.optimizer.lr, set train.grad_clip_norm, or look for NaN/Inf in the input features"


class NonFiniteLoss(RuntimeError):
    """The training loss (or the weights) became NaN/Inf; the message says where and what to try."""


class NonFiniteGuard:
    """The first non-finite training loss of this rank since the last check: its global step and value."""

    def __init__(self, global_step: int, device: torch.device):
        self.step = torch.full((), float(global_step), dtype=torch.float64, device=device)
        self.first = torch.zeros(2, dtype=torch.float64, device=device)  # [global step (0: none), loss]

    def observe(self, loss: torch.Tensor) -> None:
        """Count one step; remember it (and its loss) if its loss is the first non-finite one."""
        self.step += 1
        hit = ~torch.isfinite(loss) & (self.first[0] == 0)
        self.first = torch.where(hit, torch.stack([self.step, loss.detach().double()]), self.first)

    def check(self, network: nn.Module, epoch: int, epoch_start: int, kept: str) -> None:
        """Collective: raise NonFiniteLoss on every rank if any rank saw a non-finite loss or the weights are not
        finite. `epoch_start` is the global step before the epoch's first; `kept` says which checkpoint survives."""
        weights_finite = bool(torch.stack([torch.isfinite(p).all() for p in network.parameters()]).all())
        step, loss = self.first.tolist()
        reports = all_gather((int(step), loss, weights_finite))
        seen = [(step, rank, loss) for rank, (step, loss, _) in enumerate(reports) if step]
        if seen:
            step, rank, loss = min(seen, key=lambda hit: hit[:2])  # the earliest step; the lowest rank on a tie
            where = f"epoch {epoch} step {step - epoch_start} (global step {step}, rank {rank})"
            raise NonFiniteLoss(f"training loss is {loss} at {where}; {kept}; {HINT}")
        if not all(finite for _, _, finite in reports):
            now = int(self.step.item())
            raise NonFiniteLoss(f"the weights are not finite after epoch {epoch} step {now - epoch_start} "
                                f"(global step {now}) although every loss was; {kept}; {HINT}")


def describe_kept(*paths: Path) -> str:
    """What a NonFiniteLoss leaves behind: the checkpoints that exist (none were overwritten)."""
    existing = [str(path) for path in paths if path.is_file()]
    return f"kept the last good checkpoints {', '.join(existing)}" if existing else "no checkpoint was written yet"

