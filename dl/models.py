"""Model builders, chosen by `model.kind` in the pipeline config."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from dl.clustering import DecNetwork
from jobs.config import AutoencoderConf, CnnConf, DecConf, LstmAutoencoderConf, MlpConf, RnnConf

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


RECURRENT = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def last_hidden(states, directions: int) -> torch.Tensor:
    """The last layer's final hidden state [N, directions * hidden] from an RNN's h_n (or an LSTM's (h_n, c_n))."""
    hidden = states[0] if isinstance(states, tuple) else states
    return torch.cat(list(hidden[-directions:]), dim=1)


class SequenceNet(nn.Module):
    """A recurrent network read from its last hidden state (both directions when bidirectional), then a linear head.

    Numeric inputs arrive flat [N, L*F] (time-major) and are reshaped to [N, L, F]; with `vocab_size` the inputs
    are token ids [N, L] (PAD 0), embedded, and packed by their count of non-PAD ids so padding never reaches the
    recurrence.
    """

    def __init__(self, conf: RnnConf, input_shape: tuple[int, ...], num_outputs: int, vocab_size: int | None = None):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.embedding = None if vocab_size is None else nn.Embedding(vocab_size, conf.embedding_dim, padding_idx=0)
        width = conf.embedding_dim if vocab_size is not None else self.input_shape[-1]
        self.directions = 2 if conf.bidirectional else 1
        self.rnn = RECURRENT[conf.cell](width, conf.hidden, num_layers=conf.layers, batch_first=True,
                                        bidirectional=conf.bidirectional,
                                        dropout=conf.dropout if conf.layers > 1 else 0.0)
        self.head = nn.Sequential(nn.Dropout(conf.dropout), nn.Linear(self.directions * conf.hidden, num_outputs))

    def forward(self, inputs):
        if self.embedding is None:
            _, states = self.rnn(inputs.float().reshape(-1, *self.input_shape))
        else:
            tokens = inputs.long()
            lengths = (tokens != 0).sum(dim=1).clamp(min=1).cpu()
            packed = pack_padded_sequence(self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
            _, states = self.rnn(packed)
        return self.head(last_hidden(states, self.directions))


class LstmAutoencoder(nn.Module):
    """LSTM encoder -> last hidden state, repeated over the L steps -> LSTM decoder -> linear map back to F inputs.

    Takes and returns flat windows [N, L*F] (time-major), so the anomaly score is the MSE over the whole window.
    """

    def __init__(self, conf: LstmAutoencoderConf, input_shape: tuple[int, ...]):
        super().__init__()
        self.steps, self.width = input_shape
        dropout = conf.dropout if conf.layers > 1 else 0.0
        self.encoder = nn.LSTM(self.width, conf.hidden, conf.layers, batch_first=True, dropout=dropout)
        self.decoder = nn.LSTM(conf.hidden, conf.hidden, conf.layers, batch_first=True, dropout=dropout)
        self.output = nn.Linear(conf.hidden, self.width)

    def embed(self, flat):
        _, states = self.encoder(flat.float().reshape(-1, self.steps, self.width))
        return last_hidden(states, 1)

    def forward(self, flat):
        code = self.embed(flat)
        decoded, _ = self.decoder(code.unsqueeze(1).expand(-1, self.steps, -1))
        return self.output(decoded).reshape(len(flat), -1)


class StandardizedOutput(nn.Module):
    """A regression network that predicts standardized targets: its outputs are `mean + std * network(inputs)`.

    `target_mean`/`target_std` (one per output) are buffers, saved with the weights: fitted on the train split's
    targets when training (so the network learns values near 0 whatever the targets' units), loaded when serving.
    """

    def __init__(self, network: nn.Module, outputs: int, statistics: tuple | None = None):
        super().__init__()
        self.network = network
        mean, std = statistics if statistics is not None else (torch.zeros(outputs), torch.ones(outputs))
        self.register_buffer("target_mean", torch.as_tensor(mean, dtype=torch.float32).reshape(outputs).clone())
        self.register_buffer("target_std", torch.as_tensor(std, dtype=torch.float32).reshape(outputs).clone())

    def forward(self, inputs):
        return self.network(inputs) * self.target_std + self.target_mean


def _sequence_shape(conf, input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) != 2:
        raise ValueError(f"model.kind {conf.kind} needs sequence windows (feature_shape [L, F]), got feature_shape "
                         f"{list(input_shape)}")
    return input_shape


def build_dec(conf: DecConf, input_shape: tuple[int, ...], num_outputs: int | None = None) -> nn.Module:
    """A dense autoencoder with `conf.clusters` centroids in its embedding (DEC; `num_outputs` is unused)."""
    return DecNetwork(Autoencoder(conf.autoencoder, math.prod(input_shape)), conf.clusters, conf.embedding, conf.alpha)


def build_model(
    conf: CnnConf | MlpConf | AutoencoderConf | RnnConf | LstmAutoencoderConf | DecConf, input_shape: tuple[int, ...],
    num_outputs: int, vocab_size: int | None = None, target_statistics: tuple | None = None,
) -> nn.Module:
    """The network for `conf.kind`, taking feature vectors as the dataset stores them.

    `num_outputs` is the class count for classifiers, the values per row for regression (the task says which).
    `vocab_size` (text datasets, `rnn` only) means the inputs are token ids [N, L] rather than numeric features.
    Regression networks (`model.task: regression`) predict standardized targets inside a `StandardizedOutput`;
    `target_statistics` is its (mean, std) per output (None: identity, e.g. before loading saved weights).
    """
    input_shape = tuple(input_shape)
    if vocab_size is not None and conf.kind != "rnn":
        raise ValueError(f"token inputs (a vocabulary of {vocab_size}) need model.kind rnn, not {conf.kind!r}")
    if conf.kind == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model.kind cnn needs image features (feature_shape [C, H, W]), got feature_shape "
                             f"{list(input_shape)}: use mlp, autoencoder or dec for a table")
        network = FlatInput(input_shape, build_cnn(conf, input_shape, num_outputs))
    elif conf.kind == "rnn":
        shape = input_shape if vocab_size is not None else _sequence_shape(conf, input_shape)
        network = SequenceNet(conf, shape, num_outputs, vocab_size)
    elif conf.kind == "lstm_autoencoder":
        network = LstmAutoencoder(conf, _sequence_shape(conf, input_shape))
    else:
        builders = {"mlp": build_mlp, "autoencoder": build_autoencoder, "dec": build_dec}
        network = builders[conf.kind](conf, input_shape, num_outputs)
    if getattr(conf, "task", None) == "regression":
        return StandardizedOutput(network, num_outputs, target_statistics)
    return network
