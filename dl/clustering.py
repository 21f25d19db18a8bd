"""DEC (deep embedded clustering) pieces: Student-t soft assignments, the sharpened target distribution, KL loss.

Training (`model.kind: dec`: autoencoder pre-training, k-means initialisation, refinement) builds on these.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def soft_assignment(embeddings: torch.Tensor, centroids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """q_ij: a Student-t kernel (1 + |z_i - mu_j|^2 / alpha)^-((alpha + 1) / 2), normalised over clusters j."""
    distances = torch.cdist(embeddings.float(), centroids.float()).pow(2)
    kernel = (1.0 + distances / alpha).pow(-(alpha + 1.0) / 2.0)
    return kernel / kernel.sum(dim=1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """p_ij = (q_ij^2 / f_j) normalised over clusters j, with cluster frequencies f_j = sum_i q_ij."""
    weight = q.pow(2) / q.sum(dim=0)
    return weight / weight.sum(dim=1, keepdim=True)


def dec_loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(P || Q), averaged over rows (P is a fixed target: no gradient flows into it)."""
    return F.kl_div(q.clamp_min(1e-12).log(), p.detach(), reduction="batchmean")
