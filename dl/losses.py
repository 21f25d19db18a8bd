"""Training losses by `train.loss.name`, and the L1/L2 weight penalties added to them."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from jobs.config import LossConf


class FocalLoss(nn.Module):
    """Softmax focal loss: cross-entropy scaled by (1 - p_true)^gamma, optionally weighted per class."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None, reduction: str = "mean"):
        super().__init__()
        self.gamma, self.reduction = gamma, reduction
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, labels.long().unsqueeze(1)).squeeze(1)
        losses = -((1.0 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            losses = losses * self.weight[labels]
        return losses.sum() if self.reduction == "sum" else losses.mean()


class FloatTargets(nn.Module):
    """An elementwise loss (`reduction="none"`) against float targets shaped like the outputs, averaged per row.

    Class indices become one-hot rows for [N, K] outputs; rows are then averaged, or summed for `reduction="sum"`.
    """

    def __init__(self, loss: nn.Module, reduction: str = "mean"):
        super().__init__()
        self.loss, self.reduction = loss, reduction

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == 2 and outputs.shape[1] > 1 and targets.dim() == 1 and not targets.is_floating_point():
            targets = F.one_hot(targets.long(), outputs.shape[1])
        per_row = self.loss(outputs.float(), targets.reshape(outputs.shape).float()).reshape(len(outputs), -1).mean(1)
        return per_row.sum() if self.reduction == "sum" else per_row.mean()


def build_loss(conf: LossConf, num_classes: int | None = None, reduction: str = "mean") -> nn.Module:
    """The loss named by `conf.name` as `loss(outputs, targets)`; `reduction="sum"` is what evaluation adds up."""
    weight = None
    if conf.class_weights is not None:
        if len(conf.class_weights) != num_classes:
            raise ValueError(f"loss.class_weights has {len(conf.class_weights)} weights for {num_classes} classes")
        weight = torch.tensor(conf.class_weights, dtype=torch.float32)
    if conf.name == "cross_entropy":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=conf.label_smoothing, reduction=reduction)
    if conf.name == "focal":
        return FocalLoss(conf.focal_gamma, weight, reduction)
    elementwise = {
        "bce": nn.BCEWithLogitsLoss(reduction="none"),
        "mse": nn.MSELoss(reduction="none"),
        "mae": nn.L1Loss(reduction="none"),
        "huber": nn.HuberLoss(reduction="none", delta=conf.huber_delta),
    }
    return FloatTargets(elementwise[conf.name], reduction)


def weight_penalty(network: nn.Module, l1: float, l2: float) -> torch.Tensor | float:
    """l1 * sum|w| + l2 * sum(w^2) over the weight matrices and kernels of `network` (biases and norms excluded)."""
    if not (l1 or l2):
        return 0.0
    weights = [p for p in network.parameters() if p.dim() > 1]
    penalty = sum(p.abs().sum() for p in weights) * l1 if l1 else 0.0
    return penalty + (sum(p.pow(2).sum() for p in weights) * l2 if l2 else 0.0)
