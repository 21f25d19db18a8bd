"""Losses, optimizers, LR schedules, weight penalties, clipping and precision: each on a small problem it must improve."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dl.losses import FocalLoss, build_loss, weight_penalty
from dl.optim import build_optimizer, build_scheduler, step_scheduler, warmup_cosine
from dl.trainer import build_precision, train_step
from jobs.config import ConfigError, LossConf, OptimizerConf, SchedulerConf, TrainConf, validate_config

CPU = torch.device("cpu")


def classification_problem(classes: int = 3, rows: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around one centre per class in 4-D: linearly separable, so a linear model can fit them."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(rows) % classes
    centres = torch.randn(classes, 4, generator=generator) * 3
    return centres[labels] + torch.randn(rows, 4, generator=generator), labels


def regression_problem(rows: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x . w + 1 + small noise, with a float target per row."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(rows, 4, generator=generator)
    return features, features @ torch.tensor([1.5, -2.0, 0.5, 3.0]) + 1 + 0.05 * torch.randn(rows, generator=generator)


def losses_over_training(conf: TrainConf, outputs: int, problem, epochs: int = 30) -> list[float]:
    """Full-batch `train_step`s of a linear model; the training loss before each step and after the last."""
    features, targets = problem
    torch.manual_seed(0)
    model = nn.Linear(features.shape[1], outputs)
    optimizer = build_optimizer(model.parameters(), conf.optimizer)
    scheduler = build_scheduler(optimizer, conf.scheduler, epochs, "min")
    criterion, precision = build_loss(conf.loss, outputs), build_precision(conf.amp, CPU)
    losses = []
    for _ in range(epochs):
        loss = float(train_step(model, {"features": features, "label": targets}, optimizer, criterion, conf, precision, CPU))
        losses.append(loss)
        step_scheduler(scheduler, loss)
    with torch.no_grad():
        return losses + [float(criterion(model(features), targets))]


def _conf(loss: dict | None = None, optimizer: dict | None = None, **train) -> TrainConf:
    return TrainConf.model_validate(
        {"loss": loss or {}, "optimizer": {"name": "adam", "lr": 0.05, **(optimizer or {})}, **train}
    )


@pytest.mark.parametrize(
    ("loss", "factor"),
    [
        ({"name": "cross_entropy"}, 0.5),
        ({"name": "cross_entropy", "label_smoothing": 0.1}, 0.6),  # smoothing keeps a floor under the loss
        ({"name": "cross_entropy", "class_weights": [1.0, 2.0, 0.5]}, 0.5),
        ({"name": "focal", "focal_gamma": 2.0, "class_weights": [1.0, 1.0, 3.0]}, 0.5),
        ({"name": "bce"}, 0.5),  # one logit per class against one-hot targets
        ({"name": "mse"}, 0.5),  # logits regressed onto one-hot targets
    ],
)
def test_classification_losses_fall_when_training(loss, factor):
    losses = losses_over_training(_conf(loss), 3, classification_problem())
    assert losses[-1] < factor * losses[0], losses


@pytest.mark.parametrize("loss", [{"name": "mse"}, {"name": "mae"}, {"name": "huber", "huber_delta": 0.5}])
def test_regression_losses_fall_when_training(loss):
    losses = losses_over_training(_conf(loss, optimizer={"lr": 0.2}), 1, regression_problem(), epochs=60)
    assert losses[-1] < 0.1 * losses[0], losses


def test_binary_cross_entropy_on_one_logit():
    features, labels = classification_problem(classes=2)
    losses = losses_over_training(_conf({"name": "bce"}), 1, (features, labels))
    assert losses[-1] < 0.5 * losses[0]


def test_focal_loss_matches_its_formula():
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]), torch.tensor([0, 2])
    p_true = F.softmax(logits, dim=1)[torch.arange(2), labels]
    weights = torch.tensor([1.0, 1.0, 4.0])
    expected = -((1 - p_true) ** 2 * p_true.log() * weights[labels])
    torch.testing.assert_close(FocalLoss(2.0, weights)(logits, labels), expected.mean())
    torch.testing.assert_close(FocalLoss(2.0, weights, reduction="sum")(logits, labels), expected.sum())
    torch.testing.assert_close(FocalLoss(0.0)(logits, labels), F.cross_entropy(logits, labels))  # gamma 0 is CE


@pytest.mark.parametrize("name", ["cross_entropy", "focal", "bce", "mse", "mae", "huber"])
def test_summed_loss_is_the_mean_times_rows(name):
    """Evaluation adds up `reduction="sum"` losses over ranks and divides by rows: that must equal the training mean."""
    logits, labels = torch.randn(10, 3, generator=torch.Generator().manual_seed(2)), torch.arange(10) % 3
    conf = LossConf(name=name)
    torch.testing.assert_close(build_loss(conf, 3, reduction="sum")(logits, labels), build_loss(conf, 3)(logits, labels) * 10)


def test_class_weights_must_match_the_classes():
    with pytest.raises(ValueError, match="2 weights for 3 classes"):
        build_loss(LossConf(class_weights=[1.0, 2.0]), 3)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "lr": 0.05, "momentum": 0.0},
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"name": "adam"},
        {"name": "adam", "amsgrad": True},
        {"name": "adamw", "weight_decay": 0.01},
        {"name": "adamw", "amsgrad": True},
        {"name": "rmsprop", "lr": 0.01},
        {"name": "adagrad", "lr": 0.2},
    ],
)
def test_every_optimizer_reduces_the_loss(optimizer):
    conf = _conf(optimizer=optimizer)
    losses = losses_over_training(conf, 3, classification_problem())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"name": "sgd", "nesterov": True}, (torch.optim.SGD, "nesterov", True)),
        ({"name": "adam", "amsgrad": True}, (torch.optim.Adam, "amsgrad", True)),
        ({"name": "adamw", "weight_decay": 0.01}, (torch.optim.AdamW, "weight_decay", 0.01)),
        ({"name": "rmsprop", "momentum": 0.5}, (torch.optim.RMSprop, "momentum", 0.5)),
        ({"name": "adagrad", "lr": 0.1}, (torch.optim.Adagrad, "lr", 0.1)),
    ],
)
def test_build_optimizer_applies_the_configured_options(options, expected):
    optimizer = build_optimizer(nn.Linear(2, 2).parameters(), OptimizerConf.model_validate(options))
    kind, key, value = expected
    assert type(optimizer) is kind and optimizer.defaults[key] == value


def _lrs(conf: SchedulerConf, epochs: int, metrics: list[float] | None = None) -> list[float]:
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, conf, epochs, "min")
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_scheduler(scheduler, metrics[epoch] if metrics else 0.0)
    return lrs


def test_schedules_follow_their_curves():
    assert _lrs(SchedulerConf(name="none"), 3) == [1.0, 1.0, 1.0]
    assert _lrs(SchedulerConf(name="step", step_epochs=2, gamma=0.5), 5) == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    cosine = _lrs(SchedulerConf(name="cosine", warmup_epochs=2, min_lr=0.1), 6)
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 4)]
    assert cosine[3:] == pytest.approx(expected)
    assert warmup_cosine(2, 6, 0.1)(100) == pytest.approx(0.1)  # past the end: the floor
    plateau = _lrs(SchedulerConf(name="plateau", patience=1, gamma=0.5), 6, [3.0, 2.0, 2.0, 2.0, 2.0, 1.0])
    assert plateau == pytest.approx([1, 1, 1, 1, 0.5, 0.5])  # 2 epochs without improvement (> patience 1)


@pytest.mark.parametrize(
    "scheduler",
    [{"name": "step", "step_epochs": 10, "gamma": 0.5}, {"name": "cosine", "warmup_epochs": 3},
     {"name": "plateau", "patience": 2}],
)
def test_every_schedule_trains(scheduler):
    losses = losses_over_training(_conf(scheduler=scheduler), 3, classification_problem())
    assert losses[-1] < 0.5 * losses[0], losses


def test_weight_penalties_by_hand_and_in_training():
    network = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    with torch.no_grad():
        assert weight_penalty(network, 0.0, 0.0) == 0.0
        assert float(weight_penalty(network, 0.1, 0.0)) == pytest.approx(0.1 * 3.5)  # biases, norm weights excluded
        assert float(weight_penalty(network, 0.1, 0.01)) == pytest.approx(0.35 + 0.01 * 5.25)
    problem = classification_problem()

    def weight_norm(loss: dict) -> float:
        torch.manual_seed(0)
        model, conf = nn.Linear(4, 3), _conf(loss)
        optimizer, criterion = build_optimizer(model.parameters(), conf.optimizer), build_loss(conf.loss, 3)
        for _ in range(60):
            train_step(model, {"features": problem[0], "label": problem[1]}, optimizer, criterion, conf,
                       build_precision("off", CPU), CPU)
        return float(model.weight.detach().abs().sum())

    plain = weight_norm({})
    assert weight_norm({"l1": 0.05}) < 0.7 * plain and weight_norm({"l2": 0.05}) < 0.7 * plain


def test_gradient_clipping_bounds_the_update():
    features, labels = classification_problem()
    conf = _conf(optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0}, grad_clip_norm=0.01)
    model = nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model.parameters(), conf.optimizer)
    train_step(model, {"features": features, "label": labels}, optimizer, build_loss(conf.loss, 3), conf,
               build_precision("off", CPU), CPU)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert float(step.norm()) == pytest.approx(0.01, rel=1e-4)  # lr 1 x the clipped gradient norm


def test_amp_is_off_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="dlpipe.trainer"):
        precision = build_precision("fp16", CPU)
    assert precision.dtype is None and not precision.scaler.is_enabled()
    assert "train.amp=fp16 needs CUDA" in caplog.text


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"optimizer": {"name": "adam", "nesterov": True}}, "nesterov needs name 'sgd'"),
        ({"optimizer": {"name": "sgd", "amsgrad": True}}, "amsgrad applies to 'adam' and 'adamw' only"),
        ({"loss": {"name": "mse", "label_smoothing": 0.1}}, "label_smoothing applies to 'cross_entropy' only"),
        ({"loss": {"name": "bce", "class_weights": [1.0]}}, "class_weights applies to 'cross_entropy' and 'focal'"),
        ({"scheduler": {"name": "linear"}}, "train.scheduler.name"),
    ],
)
def test_options_that_do_not_apply_are_config_errors(train, message):
    base = {"name": "x", "run_dir": "r", "source": {"kind": "image_folder", "path": "p"}, "model": {"kind": "cnn"}}
    with pytest.raises(ConfigError, match=message):
        validate_config({**base, "train": train}, "conf.yaml")
