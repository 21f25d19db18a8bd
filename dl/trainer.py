"""The DDP training loop: per-rank loaders, mixed precision, all-reduced validation, early stopping with best
restore, and checkpoints that let a restarted job continue mid-epoch exactly.

With the Arrow loader every rank runs the same number of steps. petastorm shards by row group and can leave
ranks uneven; then DDP's Join lets a rank that ran out keep answering the others' gradient all-reduces.
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from dl.arrow_loader import ArrowLoader
from dl.augment import AugmentedLoader, ImageAugment
from dl.checkpoint import capture, load_checkpoint, restore, save_checkpoint
from dl.distributed import DistContext, all_reduce_sum, is_master, restart_count
from dl.losses import weight_penalty
from dl.nonfinite import NonFiniteGuard, describe_kept
from dl.optim import build_optimizer, build_scheduler, step_scheduler
from dl.petastorm_reader import COLUMNS as PETASTORM_COLUMNS, PetastormLoader
from dl.tasks import Task, as_task, to_device
from jobs.config import EarlyStoppingConf, TrainConf
from pipelines.shards import check_shardable, split_dir

log = logging.getLogger("dlpipe.trainer")

SPLITS = ("train", "val", "test")
LAST, BEST = "last.pt", "best.pt"
# Slots of a rank's epoch tally: running sums in a float64 tensor, what the epoch-end report is made of.
LOSS_SUM, SAMPLES, WAIT_S, STEP_S, STEPS = range(5)


class Loader(Protocol):
    """What the trainer needs of a loader: an epoch (and step) to start at, batches, and whether ranks run in step."""

    equal_steps: bool

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...

    def __iter__(self) -> Iterator[dict]: ...


@dataclass(frozen=True)
class FitResult:
    """Per-epoch history, the best epoch (1-based), the test metrics of the restored best weights, and the
    calibrated serving state (e.g. the anomaly threshold) that is saved with the model."""

    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    stopped_early: bool
    test_metrics: dict[str, float]
    test_confusion: list[list[int]] | None  # classification only
    serving_state: dict = field(default_factory=dict)
    test_details: object = None  # the task's test evaluation details (what `Task.figures` plots)


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

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.epochs_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.epochs_without_improvement = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: float32) and the gradient scaler (enabled for fp16 only)."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


def build_precision(amp: str, device: torch.device) -> Precision:
    """bf16/fp16 autocast when `train.amp` asks for it and the device is CUDA; float32 otherwise."""
    if amp == "off" or device.type != "cuda":
        if amp != "off":
            log.warning("train.amp=%s needs CUDA; training in float32 on %s", amp, device)
        return Precision(None, torch.amp.GradScaler("cuda", enabled=False))
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return Precision(dtype, torch.amp.GradScaler("cuda", enabled=amp == "fp16"))


def open_loader(conf: TrainConf, path: Path, ctx: DistContext, shuffle: bool,
                columns: tuple[str, ...] = ("features", "label")) -> Loader:
    """This rank's shard of one split through the loader named by `train.loader`, reading `columns`."""
    if conf.loader == "petastorm":
        if not set(columns) <= set(PETASTORM_COLUMNS):
            raise ValueError(f"train.loader petastorm reads {list(PETASTORM_COLUMNS)} only; this task needs "
                             f"{list(columns)}: use train.loader arrow")
        return PetastormLoader(path, conf.batch_size, ctx.rank, ctx.world_size, conf.seed, shuffle)
    return ArrowLoader(path, columns, conf.batch_size, ctx.rank, ctx.world_size, conf.seed, shuffle)


def evaluate(
    network: nn.Module, loader: Loader, task: Task | int, loss_sum: nn.Module, ctx: DistContext,
    state: dict | None = None, details: bool = True,
) -> tuple[dict[str, float], object]:
    """(metrics, details) over a whole split: each rank scores its shard; the task combines all ranks' rows.

    `task` may be a class count (classification; details is then the confusion matrix). `loss_sum` is the
    training loss with `reduction="sum"`; the reported loss is its mean over the rows. `state` is the task's
    calibrated state (the anomaly threshold), for the metrics that need it. `details=False`: the caller uses the
    metrics only (a task may then return None as details, having kept no rows).
    """
    task = as_task(task)
    network.eval()
    meter = task.meter(ctx.device, details)
    loader.set_epoch(0)
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, ctx.device)
            task.update(meter, network(batch["features"]), batch, loss_sum)
    return task.compute(meter, state)


def train_step(model: nn.Module, batch: dict, optimizer, criterion: nn.Module, conf: TrainConf,
               precision: Precision, device: torch.device, task: Task | None = None) -> torch.Tensor:
    """One optimizer step on one batch (loss + weight penalties, scaled for fp16, clipped); returns the batch loss.

    A batch marked `ignore` (no rows the task fits) still runs forward and backward, with zero weight, so
    every rank takes part in each gradient all-reduce.
    """
    task = task or as_task(0)
    batch = to_device(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast(device):
        loss = criterion(*task.loss_inputs(model(batch["features"]), batch))
    if batch.get("ignore"):
        loss = loss * 0.0
    objective = loss.float() + weight_penalty(model, conf.loss.l1, conf.loss.l2)
    precision.scaler.scale(objective).backward()
    if conf.grad_clip_norm:
        precision.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), conf.grad_clip_norm)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return loss.detach()


def timed(batches: Iterable[dict], tally: torch.Tensor) -> Iterator[dict]:
    """Yield `batches`, adding the seconds spent waiting for each to tally[WAIT_S] and whole steps to tally[STEP_S]."""
    iterator = iter(batches)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        tally[WAIT_S] += time.perf_counter() - started
        yield batch
        tally[STEP_S] += time.perf_counter() - started


def _broadcast_buffers(network: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics drift apart over an epoch's last steps)."""
    for buffer in network.buffers():
        dist.broadcast(buffer, src=0)


def _epoch_report(tally: torch.Tensor, world_size: int) -> dict[str, float]:
    """Train loss, samples, samples/s and the input-pipeline wait fraction of one epoch, over all ranks."""
    loss_sum, samples, wait_s, step_s, _ = all_reduce_sum(tally.clone()).tolist()
    return {
        "train_loss": loss_sum / max(samples, 1.0),
        "train_samples": int(samples),
        "samples_per_s": samples * world_size / max(step_s, 1e-9),
        "data_wait_fraction": wait_s / max(step_s, 1e-9),
    }


def resumes(conf: TrainConf, checkpoint_dir: Path) -> bool:
    """True when `fit` will continue from `checkpoint_dir/last.pt`: asked to (`train.resume`) or restarted by torchrun."""
    return bool(conf.resume or restart_count()) and (checkpoint_dir / LAST).is_file()


def fit(
    network: nn.Module,
    conf: TrainConf,
    dataset_dir: Path,
    task: Task | int,
    ctx: DistContext,
    checkpoint_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    before_epoch: Callable[[int], bool] | None = None,
    augment: ImageAugment | None = None,
) -> FitResult:
    """Train `network` in place with DDP, keep and restore the best epoch's weights, then score the test split.

    Rank 0 writes `best.pt` (best weights) and `last.pt` (the whole training state, every
    `checkpoint_every_steps` steps and at each epoch end) to `checkpoint_dir`, and passes each epoch's
    metrics to `log_metrics`. With `conf.resume`, or when torchrun restarted the job, training continues
    from `last.pt`. `task` (or a class count, for classification) says what is fitted and measured.
    `before_epoch(epoch)` runs on every rank before each epoch (a resumed one too); True ends training there.
    `augment` transforms the training split's batches (never val/test).
    """
    task = as_task(task)
    stopping_conf = task.check(conf)
    paths = {split: split_dir(dataset_dir, split) for split in SPLITS}
    for path in paths.values():
        check_shardable(path, ctx.world_size)
    loaders = {split: open_loader(conf, path, ctx, split == "train", task.columns) for split, path in paths.items()}
    if augment is not None:
        loaders["train"] = AugmentedLoader(loaders["train"], augment)
    network.to(ctx.device)
    optimizer = build_optimizer(network.parameters(), conf.optimizer)
    scheduler = build_scheduler(optimizer, conf.scheduler, conf.epochs, stopping_conf.mode)
    precision = build_precision(conf.amp, ctx.device)
    criterion = task.criterion(conf.loss).to(ctx.device)
    loss_sum = task.criterion(conf.loss, reduction="sum").to(ctx.device)
    stopping = EarlyStopping(stopping_conf)
    stateful = {"model": network, "optimizer": optimizer, "scheduler": scheduler, "scaler": precision.scaler,
                "early_stopping": stopping}
    position = {"epoch": 1, "step": 0, "global_step": 0, "history": [], "best_state": {}}
    tally = torch.zeros(5, dtype=torch.float64, device=ctx.device)
    last = checkpoint_dir / LAST
    if resumes(conf, checkpoint_dir):
        checkpoint = load_checkpoint(last)
        if checkpoint["world_size"] != ctx.world_size:
            raise ValueError(f"{last}: written by {checkpoint['world_size']} ranks, cannot resume on {ctx.world_size}")
        tally = restore(checkpoint, stateful, ctx.rank)["tally"].to(ctx.device)
        position = {key: checkpoint[key] for key in position}
        if is_master():
            log.info("resuming from %s at epoch %d step %d", last, position["epoch"], position["step"])
    elif is_master() and last.exists():
        last.unlink()  # a fresh run must never be resumed into someone else's progress
    model = DistributedDataParallel(network, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    guard = NonFiniteGuard(position["global_step"], ctx.device)

    def check_finite() -> None:  # collective: before a checkpoint write or an epoch's report, stop on NaN/Inf
        kept = describe_kept(last, checkpoint_dir / BEST)
        guard.check(network, position["epoch"], position["global_step"] - position["step"], kept)

    def checkpoint_training() -> None:
        state = capture(stateful, {**position, "world_size": ctx.world_size}, {"tally": tally.cpu()})
        if state is not None:
            save_checkpoint(state, last)

    train, history = loaders["train"], position["history"]
    while position["epoch"] <= conf.epochs and not stopping.should_stop:
        epoch, started = position["epoch"], time.perf_counter()
        if before_epoch is not None and before_epoch(epoch):
            break
        train.set_epoch(epoch, position["step"])
        model.train()
        with warnings.catch_warnings(), nullcontext() if train.equal_steps else Join([model]):
            # (Join's exit installs a global "once" warnings filter; the catch undoes it)
            for batch in timed(train, tally):
                batch = task.training_batch(batch)
                loss = train_step(model, batch, optimizer, criterion, conf, precision, ctx.device, task)
                rows = task.rows(batch)
                tally[LOSS_SUM] += loss.double() * rows  # no .item(): no GPU sync per step
                tally[SAMPLES] += rows
                tally[STEPS] += 1
                guard.observe(loss)
                position["step"] += 1
                position["global_step"] += 1
                if conf.checkpoint_every_steps and position["global_step"] % conf.checkpoint_every_steps == 0:
                    check_finite()
                    checkpoint_training()
        check_finite()
        _broadcast_buffers(network)
        report = _epoch_report(tally, ctx.world_size)
        val, _ = evaluate(network, loaders["val"], task, loss_sum, ctx, details=False)
        row = {**report, **{f"val_{name}": value for name, value in val.items()}, "lr": optimizer.param_groups[0]["lr"],
               "epoch_seconds": time.perf_counter() - started}
        history.append({"epoch": epoch, **row, "steps": int(tally[STEPS])})
        improved = stopping.update(row[stopping_conf.metric], epoch)
        step_scheduler(scheduler, row[stopping_conf.metric])
        if improved:
            position["best_state"] = {name: value.detach().cpu().clone() for name, value in network.state_dict().items()}
        position.update(epoch=epoch + 1, step=0)
        tally.zero_()
        if is_master():
            if improved:
                save_checkpoint({"epoch": epoch, "score": stopping.best, "state_dict": position["best_state"]},
                                checkpoint_dir / BEST)
            if log_metrics is not None:
                log_metrics(row, epoch)
            shown = " ".join(f"val_{name}={val[name]:.4f}" for name in task.logged if name in val)
            log.info(
                "epoch %d/%d train_loss=%.4f %s lr=%.2g %.0f samples/s data_wait=%.0f%%%s", epoch, conf.epochs,
                row["train_loss"], shown, row["lr"], row["samples_per_s"], 100 * row["data_wait_fraction"],
                " *" if improved else "",
            )
        checkpoint_training()
    if stopping.should_stop and is_master():
        log.info("early stop: %s has not improved for %d epochs; best epoch %d (%s=%.4f)",
                 stopping_conf.metric, stopping_conf.patience, stopping.best_epoch, stopping_conf.metric, stopping.best)
    network.load_state_dict(position["best_state"])
    state = task.calibrate(evaluate(network, loaders["val"], task, loss_sum, ctx)[1]) if task.calibrated else {}
    if state and is_master():
        log.info("calibrated on the validation split: %s", state)
    test, details = evaluate(network, loaders["test"], task, loss_sum, ctx, state)
    confusion = details.tolist() if isinstance(details, torch.Tensor) else None
    return FitResult(history, stopping.best_epoch, stopping.best, stopping.should_stop, test, confusion, state, details)
