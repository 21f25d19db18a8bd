"""Model builders, chosen by `model.kind` in the pipeline config."""
from __future__ import annotations

import math

from torch import nn

from jobs.config import AutoencoderConf, CnnConf, MlpConf

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def build_cnn(conf: CnnConf, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Conv blocks (conv, optional batch-norm, ReLU, 2x2 max-pool while the image allows, dropout) + dense head."""
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in conf.channels:
        layers += [nn.Conv2d(channels, out_channels, conf.kernel_size, padding=conf.kernel_size // 2)]
        layers += [nn.BatchNorm2d(out_channels)] if conf.batch_norm else []
        layers += [nn.ReLU()]
        if height >= 2 and width >= 2:
            layers += [nn.MaxPool2d(2)]
            height, width = height // 2, width // 2
        layers += [nn.Dropout(conf.dropout)] if conf.dropout else []
        channels = out_channels
    head = [nn.Flatten(), nn.Linear(channels * height * width, conf.hidden), nn.ReLU()]
    head += [nn.Dropout(conf.dropout)] if conf.dropout else []
    head += [nn.Linear(conf.hidden, num_classes)]
    return nn.Sequential(*layers, *head)


class FlatInput(nn.Module):
    """Reshape flat feature vectors [N, C*H*W] (the Parquet layout) into images [N, C, H, W]."""

    def __init__(self, input_shape: tuple[int, int, int], network: nn.Module):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.network = network

    def forward(self, flat):
        return self.network(flat.reshape(-1, *self.input_shape))


def dense_block(sizes: list[int], width: int, activation: str = "relu", batch_norm: bool = False,
                dropout: float = 0.0) -> tuple[list[nn.Module], int]:
    """Linear layers of `sizes` from `width` inputs, each with optional batch-norm, the activation and dropout."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(width, size)]
        layers += [nn.BatchNorm1d(size)] if batch_norm else []
        layers += [ACTIVATIONS[activation]()]
        layers += [nn.Dropout(dropout)] if dropout else []
        width = size
    return layers, width


def build_mlp(conf: MlpConf, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Hidden dense blocks then a linear output layer: logits per class, or `conf.outputs` regression values."""
    layers, width = dense_block(conf.hidden, math.prod(input_shape), "relu", conf.batch_norm, conf.dropout)
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, num_outputs))


class Autoencoder(nn.Module):
    """Encoder (dense blocks to a linear bottleneck) and a mirrored decoder; `embed` gives the bottleneck codes."""

    def __init__(self, conf: AutoencoderConf, width: int):
        super().__init__()
        encoder, hidden = dense_block(conf.encoder, width, conf.activation, conf.batch_norm, conf.dropout)
        self.encoder = nn.Sequential(*encoder, nn.Linear(hidden, conf.bottleneck))
        decoder, hidden = dense_block(list(reversed(conf.encoder)), conf.bottleneck, conf.activation,
                                      conf.batch_norm, conf.dropout)
        self.decoder = nn.Sequential(ACTIVATIONS[conf.activation](), *decoder, nn.Linear(hidden, width))

    def embed(self, flat):
        return self.encoder(flat)

    def forward(self, flat):
        return self.decoder(self.encoder(flat))


def build_autoencoder(conf: AutoencoderConf, input_shape: tuple[int, ...], num_outputs: int | None = None) -> nn.Module:
    """A dense autoencoder over flat feature vectors of `prod(input_shape)` values (`num_outputs` is unused)."""
    return Autoencoder(conf, math.prod(input_shape))


def build_model(conf: CnnConf | MlpConf | AutoencoderConf, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The network for `conf.kind`, taking flat feature vectors as the dataset stores them.

    `num_outputs` is the class count for classifiers, the values per row for regression (the task says which).
    """
    if conf.kind == "cnn":
        return FlatInput(input_shape, build_cnn(conf, input_shape, num_outputs))
    builders = {"mlp": build_mlp, "autoencoder": build_autoencoder}
    return builders[conf.kind](conf, tuple(input_shape), num_outputs)
