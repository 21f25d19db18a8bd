"""Model builders, chosen by `model.kind` in the pipeline config."""
from __future__ import annotations

from torch import nn

from jobs.config import CnnConf


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


def build_model(conf: CnnConf, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network for `conf.kind`, taking flat feature vectors as the dataset stores them."""
    builders = {"cnn": build_cnn}
    return FlatInput(input_shape, builders[conf.kind](conf, input_shape, num_classes))
