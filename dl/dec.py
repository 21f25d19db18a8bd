"""DEC training on the DDP engine (`dl.trainer.fit`), in three phases:

1. the autoencoder is pre-trained to reconstruct the train split (the best val reconstruction loss is kept);
2. k-means (sklearn, seeded, `model.kmeans_init` restarts) on every train row's embedding, on rank 0, sets the
   centroids, broadcast so that every rank holds the same ones;
3. encoder and centroids are refined on KL(P || Q): the target P is recomputed over the whole train split every
   `model.refine.update_interval` epochs, and training stops once fewer than `model.refine.tolerance` of the train
   rows changed cluster since the previous update (or at `model.refine.epochs`, or by early stopping).

Phase 1 checkpoints into `checkpoint_dir` (a restart reopens the same MLflow run), phase 3 into `checkpoint_dir/refine`.
A resumed job (`train.resume`, a torchrun restart) continues the phase it was in: phase 1 from its checkpoint; once
refinement has a checkpoint, phase 1 is restored from its final one and k-means is not rerun (the centroids are in
the refinement checkpoint's model state). The target P and the previous assignments are not checkpointed: a resumed
refinement recomputes P from the restored weights and cannot stop on the tolerance before its second update.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from sklearn.cluster import KMeans

from dl.clustering import DecNetwork
from dl.distributed import DistContext, all_reduce_sum, is_master
from dl.tasks import ClusteringTask, RegressionTask
from dl.trainer import FitResult, Loader, evaluate, fit, open_loader, resumes
from jobs.config import TrainConf
from pipelines.atomic import write_text_atomic
from pipelines.shards import split_dir

log = logging.getLogger("dlpipe.dec")

REFINE_DIR = "refine"
INIT_METRICS = "kmeans_init.json"  # the test metrics right after k-means, kept for a resumed refinement


class ReconstructionTask(RegressionTask):
    """Phase 1: the autoencoder regresses its own input (loss, MAE, MSE, RMSE of the reconstruction)."""

    kind = "reconstruction"
    columns = ("features",)

    def __init__(self):
        super().__init__(0)

    def loss_inputs(self, outputs, batch):
        return outputs, batch["features"].reshape(outputs.shape)

    def update(self, meter, outputs, batch, loss_sum):
        meter.update(outputs, batch["features"], loss_sum(*self.loss_inputs(outputs, batch)))


def _passes(network: DecNetwork, loader: Loader, device: torch.device):
    """The network's outputs for this rank's rows of a split, batch by batch, in the loader's fixed order."""
    network.eval()
    loader.set_epoch(0)
    with torch.no_grad():
        for batch in loader:
            yield network(batch["features"].to(device))


def kmeans_centroids(network: DecNetwork, loader: Loader, ctx: DistContext, restarts: int, seed: int) -> torch.Tensor:
    """k-means on every train row's embedding: gathered to rank 0, fitted there, its centroids broadcast to all."""
    mine = np.concatenate([out.embedding.cpu().numpy() for out in _passes(network, loader, ctx.device)])
    gathered = [None] * ctx.world_size if is_master() else None
    dist.gather_object(mine, gathered, dst=0)
    centroids = [None]
    if is_master():
        embeddings = np.concatenate(gathered)
        kmeans = KMeans(len(network.centroids), n_init=restarts, random_state=seed).fit(embeddings)
        centroids = [kmeans.cluster_centers_.astype(np.float32)]
        log.info("k-means on %d train embeddings: inertia %.4g", len(embeddings), kmeans.inertia_)
    dist.broadcast_object_list(centroids, src=0)
    return torch.from_numpy(centroids[0])


class TargetUpdates:
    """`fit`'s `before_epoch` hook for refinement: every `update_interval` epochs (and whenever no target is set, as
    after a resume) recompute P over the whole train split; True (stop) once the share of train rows whose cluster
    changed since the previous update is below `tolerance`."""

    def __init__(self, network: DecNetwork, task: ClusteringTask, loader: Loader, ctx: DistContext,
                 log_metrics: Callable[[dict[str, float], int], None] | None = None):
        self.network, self.task, self.loader, self.ctx, self.log_metrics = network, task, loader, ctx, log_metrics
        self.previous: torch.Tensor | None = None  # this rank's clusters at the previous update, in loader order
        self.updated_for: int | None = None  # the epoch the current target was computed for

    def __call__(self, epoch: int) -> bool:
        due = self.task.reference is None or (epoch - 1) % self.task.conf.refine.update_interval == 0
        return due and epoch != self.updated_for and self.refresh(epoch)

    def refresh(self, epoch: int) -> bool:
        """Set the target for `epoch` from the current weights; True when the assignments have converged."""
        q_sum = torch.zeros(len(self.network.centroids), dtype=torch.float64, device=self.ctx.device)
        clusters = []
        for out in _passes(self.network, self.loader, self.ctx.device):
            q_sum += out.q.double().sum(dim=0)
            clusters.append(out.distance.argmin(dim=1))
        clusters = torch.cat(clusters)
        self.task.set_target(copy.deepcopy(self.network), all_reduce_sum(q_sum).float())
        self.updated_for, previous, self.previous = epoch, self.previous, clusters
        if previous is None:
            return False
        counts = torch.tensor([float((clusters != previous).sum()), float(len(clusters))], dtype=torch.float64,
                              device=self.ctx.device)
        changed, rows = all_reduce_sum(counts).tolist()
        share = changed / max(rows, 1.0)
        if self.log_metrics is not None:
            self.log_metrics({"assignments_changed": share}, epoch)
        converged = share < self.task.conf.refine.tolerance
        if is_master():
            log.info("target update before epoch %d: %.4f of %d train rows changed cluster%s", epoch, share, rows,
                     " (below the tolerance: converged)" if converged else "")
        return converged


def _prefixed(log_metrics: Callable[[dict[str, float], int], None] | None, prefix: str):
    if log_metrics is None:
        return None
    return lambda row, epoch: log_metrics({prefix + name: value for name, value in row.items()}, epoch)


def fit_dec(
    network: DecNetwork,
    conf: TrainConf,
    dataset_dir: Path,
    task: ClusteringTask,
    ctx: DistContext,
    checkpoint_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> FitResult:
    """Pre-train, initialise the centroids with k-means, refine; the result is refinement's, its test metrics
    joined by those right after k-means as `init_<metric>`. Phase 1 metrics are logged as `pretrain_<metric>`."""
    dec = task.conf
    network.to(ctx.device)
    stopping = conf.early_stopping.model_copy(update={"metric": "val_loss", "mode": "min"})
    pretrain = conf.model_copy(update={"epochs": dec.pretrain.epochs, "early_stopping": stopping})
    fit(network.autoencoder, pretrain, dataset_dir, ReconstructionTask(), ctx, checkpoint_dir,
        _prefixed(log_metrics, "pretrain_"))
    refine = conf.model_copy(update={"epochs": dec.refine.epochs})
    refine_dir = checkpoint_dir / REFINE_DIR
    train = open_loader(refine, split_dir(dataset_dir, "train"), ctx, shuffle=False, columns=("features",))
    updates = TargetUpdates(network, task, train, ctx, log_metrics)
    if resumes(refine, refine_dir):
        saved = refine_dir / INIT_METRICS
        init = json.loads(saved.read_text()) if saved.is_file() else {}
    else:
        network.centroids.data.copy_(kmeans_centroids(network, train, ctx, dec.kmeans_init, conf.seed))
        updates.refresh(1)
        test = open_loader(refine, split_dir(dataset_dir, "test"), ctx, shuffle=False, columns=task.columns)
        metrics, _ = evaluate(network, test, task, task.criterion(conf.loss, "sum").to(ctx.device), ctx)
        init = {f"init_{name}": value for name, value in metrics.items()}
        if is_master():
            log.info("after k-means initialisation: %s", " ".join(f"test_{k}={v:.4f}" for k, v in init.items()))
            write_text_atomic(refine_dir / INIT_METRICS, json.dumps(init))
    if not dec.refine.reconstruction:
        network.autoencoder.decoder.requires_grad_(False)  # no loss reaches it: DDP must not wait for its gradients
    refined = fit(network, refine, dataset_dir, task, ctx, refine_dir, log_metrics, before_epoch=updates)
    return dataclasses.replace(refined, test_metrics={**refined.test_metrics, **init})
