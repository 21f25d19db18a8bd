"""Optimizers by `train.optimizer.name` and learning-rate schedules by `train.scheduler.name` (stepped per epoch)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau, StepLR

from jobs.config import OptimizerConf, SchedulerConf


def build_optimizer(params, conf: OptimizerConf) -> torch.optim.Optimizer:
    """The optimizer named by `conf.name`, with the options that apply to it."""
    if conf.name == "sgd":
        return torch.optim.SGD(
            params, lr=conf.lr, momentum=conf.momentum, nesterov=conf.nesterov, weight_decay=conf.weight_decay
        )
    if conf.name == "adam":
        return torch.optim.Adam(params, lr=conf.lr, weight_decay=conf.weight_decay, amsgrad=conf.amsgrad)
    if conf.name == "adamw":
        return torch.optim.AdamW(params, lr=conf.lr, weight_decay=conf.weight_decay, amsgrad=conf.amsgrad)
    if conf.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=conf.lr, momentum=conf.momentum, weight_decay=conf.weight_decay)
    return torch.optim.Adagrad(params, lr=conf.lr, weight_decay=conf.weight_decay)


def warmup_cosine(warmup_epochs: int, epochs: int, floor: float):
    """LR factor per finished epoch: linear warm-up to 1 over `warmup_epochs`, then a cosine down to `floor`."""

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        progress = min(1.0, (epoch - warmup_epochs) / max(1, epochs - warmup_epochs))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, conf: SchedulerConf, epochs: int, mode: str) -> LRScheduler:
    """The schedule named by `conf.name`; `mode` ("max"/"min") is the direction of the metric `plateau` watches."""
    if conf.name == "step":
        return StepLR(optimizer, step_size=conf.step_epochs, gamma=conf.gamma)
    if conf.name == "cosine":
        floor = conf.min_lr / optimizer.defaults["lr"]
        return LambdaLR(optimizer, warmup_cosine(conf.warmup_epochs, epochs, floor))
    if conf.name == "plateau":
        return ReduceLROnPlateau(optimizer, mode=mode, factor=conf.gamma, patience=conf.patience, min_lr=conf.min_lr)
    return LambdaLR(optimizer, lambda epoch: 1.0)


def step_scheduler(scheduler: LRScheduler, monitored: float) -> None:
    """Advance the schedule by one epoch; `plateau` takes the monitored validation metric."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(monitored)
    else:
        scheduler.step()
