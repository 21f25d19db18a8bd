"""DEC (deep embedded clustering) pieces: the network (autoencoder + centroids), Student-t soft assignments, the
sharpened target distribution and the refinement loss. `dl/dec.py` trains them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


def soft_assignment(embeddings: torch.Tensor, centroids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """q_ij: a Student-t kernel (1 + |z_i - mu_j|^2 / alpha)^-((alpha + 1) / 2), normalised over clusters j."""
    return _kernel(torch.cdist(embeddings.float(), centroids.float()), alpha)


def _kernel(distances: torch.Tensor, alpha: float) -> torch.Tensor:
    kernel = (1.0 + distances.pow(2) / alpha).pow(-(alpha + 1.0) / 2.0)
    return kernel / kernel.sum(dim=1, keepdim=True)


def target_distribution(q: torch.Tensor, frequencies: torch.Tensor | None = None) -> torch.Tensor:
    """p_ij = (q_ij^2 / f_j) normalised over clusters j, with cluster frequencies f_j = sum_i q_ij (by default over
    the rows of `q`; the whole train split's when given)."""
    weight = q.pow(2) / (q.sum(dim=0) if frequencies is None else frequencies)
    return weight / weight.sum(dim=1, keepdim=True)


def dec_loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(P || Q), averaged over rows (P is a fixed target: no gradient flows into it)."""
    return F.kl_div(q.clamp_min(1e-12).log(), p.detach(), reduction="batchmean")


class DecOutput(NamedTuple):
    """What the DEC network computes for a batch of rows."""

    embedding: torch.Tensor  # [N, E]
    distance: torch.Tensor  # [N, K] Euclidean distance to each centroid
    q: torch.Tensor  # [N, K] soft assignment
    reconstruction: torch.Tensor  # [N, D] the decoder's output


class DecNetwork(nn.Module):
    """An autoencoder (with `encoder` and `decoder`) plus `clusters` centroids in its embedding, a parameter that
    the state dict saves with the weights, so a registered model assigns clusters by itself."""

    def __init__(self, autoencoder: nn.Module, clusters: int, embedding: int, alpha: float = 1.0):
        super().__init__()
        self.autoencoder, self.alpha = autoencoder, alpha
        self.centroids = nn.Parameter(torch.zeros(clusters, embedding))

    def forward(self, flat: torch.Tensor) -> DecOutput:
        embedding = self.autoencoder.encoder(flat)
        distance = torch.cdist(embedding.float(), self.centroids.float())
        return DecOutput(embedding, distance, _kernel(distance, self.alpha), self.autoencoder.decoder(embedding))


class DecLoss(nn.Module):
    """Per row KL(p_i || q_i) + `weight` * the row's reconstruction loss, then the mean (or the sum) over rows;
    `reconstruction` is a `reduction="sum"` loss (per-row losses added up)."""

    def __init__(self, reconstruction: nn.Module, weight: float, reduction: str = "mean"):
        super().__init__()
        self.reconstruction, self.weight, self.reduction = reconstruction, weight, reduction

    def forward(self, q: torch.Tensor, p: torch.Tensor, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        kl = dec_loss(q, p) * len(q)
        total = kl + self.weight * self.reconstruction(outputs, inputs) if self.weight else kl
        return total if self.reduction == "sum" else total / max(len(q), 1)
