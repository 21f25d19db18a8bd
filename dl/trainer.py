"""The DDP training loop: sharded epochs under Join, all-reduced validation, early stopping, best restore.

Every rank runs `fit`; ranks may hold different numbers of batches (petastorm shards by row group), and
DDP's Join lets a rank that ran out keep answering the others' gradient all-reduces until all are done.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from dl.distributed import DistContext, all_reduce_sum, is_master
from dl.metrics import ClassificationMeter
from dl.petastorm_reader import check_shardable, iter_batches, split_dir
from jobs.config import EarlyStoppingConf, OptimizerConf, TrainConf

log = logging.getLogger("dlpipe.trainer")

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FitResult:
    """Per-epoch history, the best epoch (1-based) and the test metrics of the restored best weights."""

    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    stopped_early: bool
    test_metrics: dict[str, float]
    test_confusion: list[list[int]]


def build_optimizer(params, conf: OptimizerConf) -> torch.optim.Optimizer:
    """The optimizer named by `train.optimizer.name`, with the options that apply to it."""
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


class EarlyStopping:
    """Tracks the monitored metric: `update` says whether it improved, `should_stop` when patience ran out."""

    def __init__(self, conf: EarlyStoppingConf):
        self.conf = conf
        self.best: float | None = None
        self.best_epoch = 0
        self.epochs_without_improvement = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it beats the best so far by more than `min_delta`."""
        if self.best is None:
            improved = True
        elif self.conf.mode == "max":
            improved = value > self.best + self.conf.min_delta
        else:
            improved = value < self.best - self.conf.min_delta
        if improved:
            self.best, self.best_epoch, self.epochs_without_improvement = value, epoch, 0
        else:
            self.epochs_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_improvement >= self.conf.patience


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write a checkpoint so that `path` holds the previous one or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(checkpoint, staging)
    os.replace(staging, path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` (tensors and plain values only) onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def evaluate(
    network: nn.Module, path: Path, num_classes: int, batch_size: int, ctx: DistContext
) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, confusion) of `network` over a whole split: each rank scores its shard, counts are summed."""
    network.eval()
    meter = ClassificationMeter(num_classes, ctx.device)
    with torch.no_grad():
        for batch in iter_batches(path, batch_size, ctx.rank, ctx.world_size, shuffle=False):
            features, labels = batch["features"].to(ctx.device), batch["label"].to(ctx.device)
            logits = network(features)
            meter.update(logits, labels, F.cross_entropy(logits, labels, reduction="sum"))
    return meter.compute()


def train_epoch(model: DistributedDataParallel, optimizer, criterion, path: Path, conf: TrainConf, epoch: int,
                ctx: DistContext) -> tuple[float, int]:
    """One pass over this rank's shard under Join; returns (mean loss, samples) over all ranks."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    samples = torch.zeros((), dtype=torch.int64, device=ctx.device)
    batches = iter_batches(path, conf.batch_size, ctx.rank, ctx.world_size, seed=conf.seed + epoch)
    with warnings.catch_warnings(), Join([model]):  # Join's exit installs a global "once" filter; undo it
        for batch in batches:
            features, labels = batch["features"].to(ctx.device), batch["label"].to(ctx.device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(features), labels)
            loss.backward()
            if conf.grad_clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), conf.grad_clip_norm)
            optimizer.step()
            loss_sum += loss.detach().double() * len(labels)
            samples += len(labels)
    all_reduce_sum(loss_sum)
    all_reduce_sum(samples)
    return float(loss_sum / samples.clamp(min=1)), int(samples)


def _broadcast_buffers(network: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics drift apart over an epoch's last steps)."""
    for buffer in network.buffers():
        dist.broadcast(buffer, src=0)


def fit(
    network: nn.Module,
    conf: TrainConf,
    dataset_dir: Path,
    num_classes: int,
    ctx: DistContext,
    checkpoint_path: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> FitResult:
    """Train `network` in place with DDP, keep and restore the best epoch's weights, then score the test split.

    Rank 0 writes the best weights to `checkpoint_path` and passes each epoch's metrics to `log_metrics`.
    """
    paths = {split: split_dir(dataset_dir, split) for split in SPLITS}
    for path in paths.values():
        check_shardable(path, ctx.world_size)
    network.to(ctx.device)
    model = DistributedDataParallel(network, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = build_optimizer(model.parameters(), conf.optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=conf.loss.label_smoothing)
    stopping = EarlyStopping(conf.early_stopping)
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    for epoch in range(1, conf.epochs + 1):
        started = time.perf_counter()
        train_loss, samples = train_epoch(model, optimizer, criterion, paths["train"], conf, epoch, ctx)
        train_seconds = time.perf_counter() - started
        _broadcast_buffers(network)
        val, _ = evaluate(network, paths["val"], num_classes, conf.batch_size, ctx)
        seconds = time.perf_counter() - started
        row = {"train_loss": train_loss, **{f"val_{name}": value for name, value in val.items()}}
        history.append({"epoch": epoch, **row, "train_samples": samples, "seconds": seconds})
        improved = stopping.update(row[conf.early_stopping.metric], epoch)
        if improved:
            best_state = {name: value.detach().cpu().clone() for name, value in network.state_dict().items()}
        if is_master():
            if improved:
                save_checkpoint({"epoch": epoch, "score": stopping.best, "state_dict": best_state}, checkpoint_path)
            if log_metrics is not None:
                log_metrics({**row, "epoch_seconds": seconds, "samples_per_s": samples / train_seconds}, epoch)
            log.info(
                "epoch %d/%d train_loss=%.4f val_loss=%.4f val_accuracy=%.4f val_f1_macro=%.4f %.1fs %.0f samples/s%s",
                epoch, conf.epochs, train_loss, val["loss"], val["accuracy"], val["f1_macro"], seconds,
                samples / train_seconds, " *" if improved else "",
            )
        if stopping.should_stop:
            if is_master():
                log.info("early stop: %s has not improved for %d epochs; best epoch %d (%s=%.4f)",
                         conf.early_stopping.metric, conf.early_stopping.patience, stopping.best_epoch,
                         conf.early_stopping.metric, stopping.best)
            break
    network.load_state_dict(best_state)
    test, confusion = evaluate(network, paths["test"], num_classes, conf.batch_size, ctx)
    return FitResult(history, stopping.best_epoch, stopping.best, stopping.should_stop, test, confusion.tolist())
