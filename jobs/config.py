"""Pipeline configuration: one YAML per pipeline, loaded into typed, validated, frozen objects.

`load_config(path, overrides)` is the only way stages get their settings; the resolved config it
returns is what every stage runs with and what MLflow records.
"""
from __future__ import annotations

import codecs
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import pandas as pd
import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, TypeAdapter, ValidationError,
                      field_validator, model_validator)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_SPARK_MASTER = re.compile(r"local(\[(\*|[1-9]\d*)(,[1-9]\d*)?\])?|yarn|(spark|k8s|mesos)://\S+|local-cluster\[[^]]+\]")
_JVM_SIZE = re.compile(r"[1-9]\d*[kKmMgGtT]?")


def _setting_text(value: Any) -> Any:
    """A YAML scalar as the text of a Spark setting (true -> "true"); anything else as it is, for the type check."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (int, float)) else value


class SparkConf(_Strict):
    master: str = "local[*]"
    driver_memory: str = "2g"
    shuffle_partitions: PositiveInt = 8
    progress_seconds: float = Field(30.0, ge=0)  # a log line per running Spark stage this often; 0: none
    conf: dict[str, str] = Field(default_factory=dict)  # Spark settings, e.g. spark.sql.adaptive.enabled: true

    @field_validator("conf", mode="before")
    @classmethod
    def _settings_as_text(cls, conf: Any) -> Any:
        """Spark settings are text: a YAML true, 4 or 0.5 is written as Spark reads it ("true", "4", "0.5")."""
        if not isinstance(conf, dict):
            return conf
        return {key: _setting_text(value) for key, value in conf.items()}

    @field_validator("master")
    @classmethod
    def _a_spark_master(cls, master: str) -> str:
        if not _SPARK_MASTER.fullmatch(master):
            raise ValueError(f"{master!r} is not a Spark master URL: local, local[N], local[*], spark://HOST:PORT, "
                             f"yarn, k8s://HOST:PORT")
        return master

    @field_validator("driver_memory")
    @classmethod
    def _a_jvm_size(cls, size: str) -> str:
        if not _JVM_SIZE.fullmatch(size):
            raise ValueError(f"{size!r} is not a JVM memory size such as 2g or 1536m")
        return size


class ImageLabels(_Strict):
    """A CSV (with a header) that labels the images: one row per image, its path below `source.path` and its label."""

    path: Path
    path_column: str = Field("path", min_length=1)
    label_column: str = Field("label", min_length=1)


class ImageFolderSource(_Strict):
    """A folder of images, labelled by the name of each file's folder (one sub-folder per class), or by `labels`."""

    kind: Literal["image_folder"]
    path: Path
    sample: str | None = None  # the `dlpipe sample` data set that writes this folder (used by `dlpipe demo`)
    image_size: tuple[PositiveInt, PositiveInt] = (8, 8)
    channels: Literal[1, 3] = 1
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # an image whose header claims more pixels is quarantined before any pixel is decoded (default 8192 x 8192)
    max_image_pixels: PositiveInt = 1 << 26
    labels: ImageLabels | None = None  # a labels CSV: images may then sit anywhere below `path`, folders or not


class ColumnSpec(_Strict):
    """One declared input column: its type and the values a clean row may hold."""

    name: str = Field(min_length=1)
    type: Literal["string", "int", "long", "float", "double", "boolean", "date", "timestamp"] = "double"
    nullable: bool = True
    allowed: list[str | int | float] | None = None  # the only values a clean row may hold
    min: float | None = None
    max: float | None = None
    # date / timestamp only: the text's pattern in Spark's datetime pattern letters (e.g. "M/d/yyyy", "dd.MM.yyyy
    # HH:mm"); without it, ISO 8601 ("2021-01-31", "2021-01-31 13:45:00")
    format: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _format_for_times_only(self) -> "ColumnSpec":
        if self.format is not None and self.type not in ("date", "timestamp"):
            raise ValueError(f"column '{self.name}': a format is for date and timestamp columns, not {self.type}")
        return self


_OUTPUT_COLUMNS = ("id", "label", "features", "raw_features", "split", "source_file", "record", "reason")


_CSV_ONLY = ("header", "delimiter", "multiline", "escape", "encoding")  # source options that only CSV reading has


class _FileTableSource(_Strict):
    """Rows read from CSV / JSON Lines / Parquet files under `path`, checked against the declared `columns`."""

    path: Path
    sample: str | None = None  # the `dlpipe sample` data set that writes `path` (used by `dlpipe demo`)
    columns: list[ColumnSpec] = Field(min_length=1)
    key: str | None = None  # the row key (`id`); default: a hash of the whole record
    duplicates: Literal["keep_first", "fail"] = "keep_first"  # rows repeating a key: quarantine or fail the job
    header: bool = True  # CSV only
    delimiter: str = Field(",", min_length=1, max_length=1)  # CSV only
    multiline: bool = False  # CSV only: a quoted value may span lines (then each file is read by one task)
    # CSV only: what escapes a quote inside a quoted value: '"' doubles it (RFC 4180: pandas, Python's csv, Excel);
    # '\\' is what Spark's CSV writer uses by default
    escape: Literal['"', "\\"] = '"'
    encoding: str = Field("UTF-8", min_length=1)  # CSV only (JSON Lines and Parquet text is UTF-8): e.g. ISO-8859-1
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)

    @field_validator("encoding")
    @classmethod
    def _a_known_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} (e.g. UTF-8, ISO-8859-1, windows-1252)") from None
        return encoding

    @model_validator(mode="after")
    def _lines_end_at_a_newline_byte(self) -> "_FileTableSource":
        newline = "\n\n".encode(self.encoding)[len("\n".encode(self.encoding)):]  # past any byte-order mark
        if newline != b"\n" and not self.multiline:
            raise ValueError(f"source.encoding {self.encoding} needs source.multiline: true (Spark splits lines at "
                             f"the byte \\n, which {self.encoding} text does not hold on its own)")
        return self

    @model_validator(mode="after")
    def _csv_options_for_csv_only(self) -> "_FileTableSource":
        if self.file_format != "csv":
            changed = [name for name in _CSV_ONLY if getattr(self, name) != type(self).model_fields[name].default]
            if changed:
                utf8 = " (JSON Lines and Parquet text is UTF-8)" if changed[0] == "encoding" else ""
                raise ValueError(f"source.{changed[0]} is a CSV option; this source reads {self.file_format}{utf8}")
        return self

    def column(self, name: str | None) -> ColumnSpec | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The columns whose values form the row key `id` (none: a hash of the whole record)."""
        return (self.key,) if self.key else ()

    def _check_declared(self, *names: str | None) -> None:
        declared = [c.name for c in self.columns]
        if len(set(declared)) != len(declared):
            raise ValueError(f"source.columns: duplicate column names in {declared}")
        missing = [name for name in names if name is not None and name not in declared]
        if missing:
            raise ValueError(f"source: {', '.join(missing)} not among the declared columns {declared}")
        taken = [name for name in declared if name in _OUTPUT_COLUMNS and name not in names]
        if taken:
            raise ValueError(f"source.columns: {', '.join(taken)} is an output column name; rename it in the input")


class TableSource(_FileTableSource):
    """A table: numeric columns become one `features` vector, string columns categorical indices."""

    kind: Literal["csv", "json", "parquet"]
    label: str | None = None  # the class column (kept out of the features)

    @property
    def file_format(self) -> str:
        return self.kind

    @model_validator(mode="after")
    def _roles_are_declared(self) -> "TableSource":
        self._check_declared(self.key, self.label)
        return self


class WindowConf(_Strict):
    """Sliding windows over each series: `length` input steps, then `horizon` target steps; a new one every `stride`.

    Windows are made of consecutive rows. With `frequency` (the time between two steps), a window whose steps are
    not that far apart (a missing or quarantined step inside it) is not made.
    """

    length: PositiveInt = 14
    horizon: PositiveInt = 1
    stride: PositiveInt = 1
    frequency: str | None = None  # a fixed duration: "1 day", "1h", "15min" (pandas.Timedelta's forms)

    @field_validator("frequency")
    @classmethod
    def _a_positive_duration(cls, frequency: str | None) -> str | None:
        if frequency is None:
            return None
        try:
            positive = pd.Timedelta(frequency) > pd.Timedelta(0)
        except ValueError:
            positive = False
        if not positive:
            raise ValueError(f"{frequency!r} is not a positive fixed duration such as '1 day', '1h' or '15min'")
        return frequency

    @property
    def step_micros(self) -> int | None:
        """`frequency` in microseconds (None without one)."""
        return None if self.frequency is None else pd.Timedelta(self.frequency).value // 1000


_NUMERIC = ("int", "long", "float", "double")


class TimeSeriesSource(_FileTableSource):
    """CSV / JSON Lines rows, one time step of one series each; windows of consecutive steps become the examples."""

    kind: Literal["timeseries"]
    format: Literal["csv", "json"] = "csv"
    time_column: str  # a date or timestamp column; with series_key, (series, time) is the row key
    series_key: str | None = None  # the column naming the series a row belongs to (none: one series)
    inputs: list[str] | None = None  # the numeric columns of each step (default: all besides time and series key)
    target: str  # the numeric column to forecast; must be one of the inputs
    window: WindowConf = Field(default_factory=WindowConf)
    baseline_lags: PositiveInt | None = None  # the ridge baseline's lags (default: the whole window.length)

    @property
    def file_format(self) -> str:
        return self.format

    @property
    def key_columns(self) -> tuple[str, ...]:
        return (self.series_key, self.time_column) if self.series_key else (self.time_column,)

    @property
    def ridge_lags(self) -> int:
        """How many of a window's last target values the ridge baseline regresses on."""
        return self.baseline_lags or self.window.length

    @property
    def input_columns(self) -> list[str]:
        roles = (self.time_column, self.series_key)
        return self.inputs or [c.name for c in self.columns if c.name not in roles and c.type in _NUMERIC]

    @model_validator(mode="after")
    def _roles_are_declared(self) -> "TimeSeriesSource":
        self._check_declared(self.time_column, self.series_key, self.target, *(self.inputs or []))
        if self.key is not None:
            raise ValueError("source.key: time series rows are keyed by series_key and time_column")
        if self.column(self.time_column).type not in ("date", "timestamp"):
            raise ValueError(f"source.time_column '{self.time_column}' must be declared as a date or timestamp")
        not_numeric = [n for n in self.input_columns if self.column(n).type not in _NUMERIC]
        if not_numeric or not self.input_columns:
            raise ValueError(f"source.inputs must be numeric columns, got {not_numeric or 'none'}")
        if self.target not in self.input_columns:
            raise ValueError(f"source.target '{self.target}' must be one of the inputs {self.input_columns}")
        if self.baseline_lags and self.baseline_lags > self.window.length:
            raise ValueError(f"source.baseline_lags {self.baseline_lags} exceeds window.length {self.window.length}")
        return self


# What the default `source.token_pattern` splits on, by code point, so that Spark (Java regex) and the served model
# (Python `re`) split the same way: ASCII's non-word characters (exactly Java's default `\W`) and the spaces and
# punctuation of other scripts that text commonly holds. Letters, digits and marks of every script stay in tokens
# (`\W+` would cut "café" to "caf": Java's `\W` is ASCII unless the pattern asks for Unicode).
_TOKEN_SEPARATORS = (
    r"\x00-\x20\x7f",  # ASCII controls and space
    r"!-/:-@\[-^`{-~",  # ASCII punctuation and symbols, not '_'
    r"\u0080-\u00a1\u00ab\u00bb\u00bf",  # C1 controls, no-break space, inverted marks, guillemets
    r"\u2000-\u200b\u2010-\u2029\u202f-\u205f",  # spaces, dashes, quotes, ellipsis, line/paragraph separators
    r"\u3000-\u3003\u3008-\u3011\u3014-\u301f",  # CJK space, commas, full stops, brackets
    r"\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\ufeff",  # full-width punctuation, byte-order mark
)
DEFAULT_TOKEN_PATTERN = "[" + "".join(_TOKEN_SEPARATORS) + "]+"


class TextSource(_FileTableSource):
    """CSV / JSON Lines rows with a text column (tokenized, indexed by a train-only vocabulary) and a label."""

    kind: Literal["text"]
    format: Literal["csv", "json"] = "csv"
    text_column: str
    label: str | None = None  # the class column
    token_pattern: str = DEFAULT_TOKEN_PATTERN  # RegexTokenizer: the pattern between tokens
    lowercase: bool = True
    max_length: PositiveInt = 64  # token ids per row: longer texts are cut, shorter ones padded with PAD (0)
    vocab_size: int = Field(20_000, ge=3)  # including PAD (0) and OOV (1)
    min_count: PositiveInt = 1  # a token needs this many occurrences in the train split to get an id
    min_token_length: PositiveInt = 1  # RegexTokenizer: shorter tokens are dropped (length in UTF-16 units)

    @property
    def file_format(self) -> str:
        return self.format

    @model_validator(mode="after")
    def _roles_are_declared(self) -> "TextSource":
        self._check_declared(self.key, self.label, self.text_column)
        if self.column(self.text_column).type != "string":
            raise ValueError(f"source.text_column '{self.text_column}' must be declared as a string")
        return self


Source = Annotated[Union[ImageFolderSource, TableSource, TimeSeriesSource, TextSource], Field(discriminator="kind")]
FileSource = TableSource | TimeSeriesSource | TextSource  # the sources read from files with declared columns


class SplitConf(_Strict):
    seed: int = 42
    train: float = Field(0.70, gt=0.0, lt=1.0)
    val: float = Field(0.15, gt=0.0, lt=1.0)
    test: float = Field(0.15, gt=0.0, lt=1.0)
    # ranked: rows ordered by a seeded hash of the key, cut at exact counts (per label when `stratify`);
    # hash: each row's own hash bucket (no shuffle, stable when rows are added); time: train < val < test in time
    method: Literal["ranked", "hash", "time"] = "ranked"
    stratify: bool = True
    time_column: str | None = None  # method time: the date/timestamp column the split cuts

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> "SplitConf":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios train+val+test must sum to 1, got {total:g}")
        if (self.method == "time") != (self.time_column is not None):
            raise ValueError("split.time_column is required with split.method time, and only then")
        return self


class NormalizeConf(_Strict):
    # robust: (x - median) / IQR; log1p: z-score of sign(x) * log1p(|x|); minmax: onto `minmax_range`
    method: Literal["zscore", "minmax", "robust", "log1p"] = "zscore"
    per: Literal["channel", "feature"] = "channel"
    minmax_range: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _range_is_increasing(self) -> "NormalizeConf":
        if self.minmax_range[0] >= self.minmax_range[1]:
            raise ValueError(f"normalize.minmax_range must be increasing, got {list(self.minmax_range)}")
        return self


class OutputConf(_Strict):
    files_per_split: PositiveInt = 4
    keep_raw: bool = True
    # Parquet row-group target (parquet.block.size, in bytes of buffered rows): 64 MiB reads fast with Arrow
    # while leaving several row groups per file on large data (ranks shard by row group)
    row_group_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class CnnConf(_Strict):
    kind: Literal["cnn"]
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    kernel_size: PositiveInt = 3
    batch_norm: bool = True
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    hidden: PositiveInt = 128
    task_kind: ClassVar[str] = "classification"  # what it is trained for (dl/tasks.py `task_type`)


class MlpConf(_Strict):
    """Feed-forward network on tabular vectors: one logit per class (classification) or `outputs` values (regression)."""

    kind: Literal["mlp"]
    task: Literal["classification", "regression"] = "classification"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    outputs: PositiveInt = 1  # regression: values per row (the width of the dataset's `target` column)

    @property
    def task_kind(self) -> str:
        return self.task


class AutoencoderConf(_Strict):
    """Dense autoencoder for anomaly detection: the anomaly score is a row's reconstruction error (MSE over features)."""

    kind: Literal["autoencoder"]
    encoder: list[PositiveInt] = Field(default_factory=lambda: [16])  # hidden sizes; the decoder mirrors them
    bottleneck: PositiveInt = 8
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    task_kind: ClassVar[str] = "anomaly"


class RnnConf(_Strict):
    """Recurrent network (LSTM / GRU / vanilla RNN) over sequences, read from its last hidden state.

    Numeric windows ([L, F] feature_shape) forecast (`task: regression`, `outputs` = horizon H) or classify;
    token ids (a text dataset) go through an embedding of `embedding_dim` and are packed by length.
    """

    kind: Literal["rnn"]
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    hidden: PositiveInt = 64
    layers: PositiveInt = 1  # stacked recurrent layers
    bidirectional: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # between stacked layers and before the output layer
    task: Literal["classification", "regression"] = "classification"
    outputs: PositiveInt = 1  # regression: values per row (the forecast horizon H)
    embedding_dim: PositiveInt = 64  # token inputs only

    @property
    def task_kind(self) -> str:
        return self.task


class LstmAutoencoderConf(_Strict):
    """Sequence autoencoder for anomaly detection: an LSTM encodes the [L, F] window into its last hidden state, an
    LSTM decoder rebuilds the window from it; the anomaly score is the reconstruction MSE over the window."""

    kind: Literal["lstm_autoencoder"]
    hidden: PositiveInt = 32
    layers: PositiveInt = 1
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # between stacked layers
    task_kind: ClassVar[str] = "anomaly"


class DecPretrainConf(_Strict):
    """DEC phase 1: the autoencoder learns to reconstruct the train split (train.loss, best val loss kept)."""

    epochs: PositiveInt = 200


class DecRefineConf(_Strict):
    """DEC phase 3: encoder and centroids fit KL(P || Q) against the sharpened target P of the whole train split."""

    epochs: PositiveInt = 100  # at most this many epochs
    update_interval: PositiveInt = 1  # recompute P over the whole train split every this many epochs
    tolerance: float = Field(0.001, ge=0.0, lt=1.0)  # stop once fewer train rows than this share change cluster
    reconstruction: float = Field(0.0, ge=0.0)  # weight of a reconstruction term added to KL (IDEC); 0: decoder frozen


class DecConf(_Strict):
    """Deep embedded clustering: a dense autoencoder pre-trained on reconstruction, k-means centroids in its
    embedding, then refinement of encoder and centroids on Student-t soft assignments (`dl/dec.py`)."""

    kind: Literal["dec"]
    clusters: int = Field(10, ge=2)
    encoder: list[PositiveInt] = Field(default_factory=lambda: [128, 128, 256])  # hidden sizes; decoder mirrors them
    embedding: PositiveInt = 10  # the embedding (bottleneck) the clusters live in
    activation: Literal["relu", "tanh", "gelu"] = "gelu"
    alpha: float = Field(1.0, gt=0.0)  # Student-t degrees of freedom of the soft assignment
    kmeans_init: PositiveInt = 20  # k-means restarts (n_init) on the train embeddings; the lowest inertia wins
    pretrain: DecPretrainConf = Field(default_factory=DecPretrainConf)
    refine: DecRefineConf = Field(default_factory=DecRefineConf)
    task_kind: ClassVar[str] = "clustering"

    @property
    def autoencoder(self) -> "AutoencoderConf":
        """The dense autoencoder these settings describe."""
        return AutoencoderConf(kind="autoencoder", encoder=self.encoder, bottleneck=self.embedding,
                               activation=self.activation)


Model = Annotated[Union[CnnConf, MlpConf, AutoencoderConf, RnnConf, LstmAutoencoderConf, DecConf],
                  Field(discriminator="kind")]
MODEL_CONF = TypeAdapter(Model)  # a `model` section (as a dict) -> its config object


class OptimizerConf(_Strict):
    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    amsgrad: bool = False  # adam/adamw: the AMSGrad variant

    @model_validator(mode="after")
    def _options_apply(self) -> "OptimizerConf":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optimizer.nesterov needs name 'sgd' and momentum > 0")
        if self.amsgrad and self.name not in ("adam", "adamw"):
            raise ValueError("optimizer.amsgrad applies to 'adam' and 'adamw' only")
        return self


class SchedulerConf(_Strict):
    """Learning-rate schedule, stepped once per epoch; `plateau` watches the early-stopping metric."""

    name: Literal["none", "step", "cosine", "plateau"] = "none"
    step_epochs: PositiveInt = 10  # step: multiply the LR by gamma every step_epochs epochs
    gamma: float = Field(0.1, gt=0.0, lt=1.0)  # step, plateau: the LR multiplier
    warmup_epochs: int = Field(0, ge=0)  # cosine: linear warm-up over these epochs, then cosine decay
    min_lr: float = Field(0.0, ge=0.0)  # cosine, plateau: the floor
    patience: int = Field(3, ge=0)  # plateau: epochs without improvement before the LR drops


class LossConf(_Strict):
    # in a pipeline config the default is the model's: cross_entropy for a classifier, mse for the others
    name: Literal["cross_entropy", "bce", "focal", "mse", "mae", "huber"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # cross_entropy
    class_weights: list[Annotated[float, Field(gt=0.0)]] | None = None  # cross_entropy, focal: one per class
    focal_gamma: float = Field(2.0, ge=0.0)  # focal: how much easy examples are down-weighted
    huber_delta: float = Field(1.0, gt=0.0)  # huber: where the loss turns from quadratic to linear
    l1: float = Field(0.0, ge=0.0)  # + l1 * sum|w| over weight matrices and kernels (not biases, norms)
    l2: float = Field(0.0, ge=0.0)  # + l2 * sum(w^2) over the same weights

    @model_validator(mode="after")
    def _options_apply(self) -> "LossConf":
        if self.label_smoothing and self.name != "cross_entropy":
            raise ValueError("loss.label_smoothing applies to 'cross_entropy' only")
        if self.class_weights and self.name not in ("cross_entropy", "focal"):
            raise ValueError("loss.class_weights applies to 'cross_entropy' and 'focal' only")
        return self


class EarlyStoppingConf(_Strict):
    # a validation metric of the model's task (val_accuracy, val_loss, val_mae, val_auroc, ...); default: the task's
    metric: str | None = Field(None, pattern=r"^val_[a-z0-9_]+$")
    mode: Literal["max", "min"] | None = None  # default: the task's direction for `metric`
    patience: PositiveInt = 5
    min_delta: float = Field(0.0, ge=0.0)


class AnomalyConf(_Strict):
    """Anomaly detection: which class is normal, which rows fit the model, how the threshold is calibrated on val."""

    normal_label: str | None = None  # class name of the normal rows (the others are anomalies); None: every row normal
    fit_on: Literal["normal", "all"] = "all"  # rows the loss sees; val/test metrics always use every row
    threshold: Literal["quantile", "best_f1"] = "quantile"  # quantile of normal val scores, or best F1 on val labels
    quantile: float = Field(0.95, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _labels_where_needed(self) -> "AnomalyConf":
        if self.normal_label is None and (self.fit_on == "normal" or self.threshold == "best_f1"):
            raise ValueError("train.anomaly.fit_on 'normal' and threshold 'best_f1' need train.anomaly.normal_label")
        return self


class AugmentConf(_Strict):
    """Image augmentation of the training split (dl/augment.py); all off by default."""

    flip: bool = False  # random horizontal mirror (wrong for data where handedness matters, e.g. digits)
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0)  # uniform in [-r, r]
    crop_padding: int = Field(0, ge=0)  # random crop of the image padded by this many pixels: a shift of up to that

    @property
    def enabled(self) -> bool:
        return self.flip or self.rotate_degrees > 0 or self.crop_padding > 0


class TrainConf(_Strict):
    world_size: PositiveInt = 2
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    seed: int = 0
    loader: Literal["arrow", "petastorm"] = "arrow"  # arrow: equal steps on every rank; petastorm: uneven, joined
    amp: Literal["off", "bf16", "fp16"] = "off"  # mixed precision on CUDA (fp16 with loss scaling); off on CPU
    grad_clip_norm: float | None = Field(None, gt=0.0)
    optimizer: OptimizerConf = Field(default_factory=OptimizerConf)
    scheduler: SchedulerConf = Field(default_factory=SchedulerConf)
    loss: LossConf = Field(default_factory=LossConf)
    early_stopping: EarlyStoppingConf = Field(default_factory=EarlyStoppingConf)
    anomaly: AnomalyConf = Field(default_factory=AnomalyConf)  # model.kind autoencoder
    augment: AugmentConf = Field(default_factory=AugmentConf)  # image sources only
    checkpoint_every_steps: PositiveInt | None = None  # also at every epoch end; mid-epoch needs loader arrow
    resume: bool = False  # continue from <run_dir>/checkpoints/last.pt (torchrun restarts always do)
    max_restarts: int = Field(0, ge=0)  # torchrun --max-restarts: relaunch all ranks after a rank dies

    @model_validator(mode="after")
    def _mid_epoch_checkpoints_need_arrow(self) -> "TrainConf":
        if self.checkpoint_every_steps and self.loader != "arrow":
            raise ValueError("train.checkpoint_every_steps needs train.loader 'arrow' (petastorm cannot skip to a step)")
        return self


class MlflowConf(_Strict):
    tracking_uri: str | None = None  # default: sqlite file inside run_dir
    experiment: str | None = None  # default: the pipeline name
    registered_model: str | None = None  # default: the pipeline name
    outage_budget_s: float = Field(300.0, gt=0.0)  # training waits this long for an unreachable server, then fails


class DriftConf(_Strict):
    """Drift check before scoring: PSI of each input feature against the training split's distribution."""

    action: Literal["warn", "fail", "off"] = "warn"
    threshold: float = Field(0.25, gt=0.0)  # PSI above 0.25 is the usual "major shift" line
    sample_rows: PositiveInt = 100_000  # the check bins a random sample of about this many input rows


class ScoreConf(_Strict):
    model_uri: str | None = None  # default: models:/<registered_model>@champion
    input: Path | None = None  # default: the test split of this pipeline's dataset
    output: Path | None = None  # default: <run_dir>/predictions
    batch_size: PositiveInt = 1024
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA on executors that have it, else CPU
    drift: DriftConf = Field(default_factory=DriftConf)


class PromoteConf(_Strict):
    """The promotion gate: the challenger becomes `champion` only if it beats it on `metric`."""

    # a metric logged on the model version's training run; default: the model's task's (test_accuracy for a
    # classifier, test_mae for regression, test_loss for anomaly detection, test_silhouette for clustering)
    metric: str | None = None
    mode: Literal["max", "min"] | None = None  # default: the metric's direction, when the task knows it
    min_delta: float = Field(0.0, ge=0.0)
    smoke_rows: PositiveInt = 64  # rows of the test split scored by the real Spark scorer before promotion


class PipelineConfig(_Strict):
    """A whole pipeline: where its data comes from and how every stage treats it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    run_dir: Path
    source: Source
    spark: SparkConf = Field(default_factory=SparkConf)
    split: SplitConf = Field(default_factory=SplitConf)
    normalize: NormalizeConf = Field(default_factory=NormalizeConf)
    output: OutputConf = Field(default_factory=OutputConf)
    model: Model | None = None  # only the train stage needs one: an ETL-only pipeline leaves it out
    train: TrainConf = Field(default_factory=TrainConf)
    mlflow: MlflowConf = Field(default_factory=MlflowConf)
    score: ScoreConf = Field(default_factory=ScoreConf)
    promote: PromoteConf = Field(default_factory=PromoteConf)
    # when set, every path above must lie inside one of these folders (after `..` and symlinks are resolved)
    roots: list[Path] | None = Field(None, min_length=1)
    _from_environment: dict[tuple, str] = PrivateAttr(default_factory=dict)  # key path -> "${NAME}" as written

    @model_validator(mode="before")
    @classmethod
    def _loss_of_the_model(cls, data: Any) -> Any:
        """Without train.loss.name, the loss the model's task takes: cross_entropy for a classifier (a CNN, an MLP or
        RNN with task classification), mse for regression and for the reconstruction of autoencoders and DEC."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        train = data.get("train") or {}
        loss = (train.get("loss") or {}) if isinstance(train, dict) else None
        if not isinstance(loss, dict) or "name" in loss:
            return data
        try:
            model = MODEL_CONF.validate_python(data["model"])
        except ValidationError:
            return data  # the whole config's validation names what is wrong with the model
        name = "cross_entropy" if model.task_kind == "classification" else "mse"
        return {**data, "train": {**train, "loss": {**loss, "name": name}}}

    @model_validator(mode="after")
    def _augment_images_only(self) -> "PipelineConfig":
        if self.train.augment.enabled and self.source.kind != "image_folder":
            raise ValueError(f"'train.augment': image augmentation needs source.kind image_folder, "
                             f"not {self.source.kind}")
        if self.train.augment.enabled and self.model is not None and self.model.kind == "dec":
            raise ValueError("'train.augment': not supported with model.kind dec")
        return self

    @model_validator(mode="after")
    def _source_apart_from_outputs(self) -> "PipelineConfig":
        source, run_dir = self.source.path.resolve(), self.run_dir.resolve()
        if run_dir.is_relative_to(source):  # the ETL reads every visible file below source.path
            inside = run_dir.relative_to(source).parts
            if not any(part.startswith((".", "_")) for part in inside):
                raise ValueError(f"'source.path': {source} holds run_dir {run_dir}: the ETL would read the "
                                 f"pipeline's own outputs as input (a run_dir named .* or _* is skipped)")
        for what, output in (("dataset", self.dataset_dir), ("quarantine", self.quarantine_dir)):
            if source.is_relative_to(output.resolve()):
                raise ValueError(f"'source.path': {source} lies inside the {what} {output.resolve()}, which the "
                                 f"ETL replaces")
        return self

    @model_validator(mode="after")
    def _paths_inside_roots(self) -> "PipelineConfig":
        if self.roots is None:
            return self
        roots = [root.resolve() for root in self.roots]
        labels = getattr(self.source, "labels", None)
        paths = {"run_dir": self.run_dir, "source.path": self.source.path, "score.input": self.score.input,
                 "score.output": self.score.output, "source.labels.path": labels and labels.path}
        for key, path in paths.items():
            if path is not None and not any(path.resolve().is_relative_to(root) for root in roots):
                raise ValueError(f"'{key}': {path} resolves to {path.resolve()}, outside the declared roots "
                                 f"{[str(root) for root in roots]}")
        return self

    def require_model(self, needed_by: str) -> Model:
        """The `model` section; ConfigError naming `needed_by` when the config has none (an ETL-only pipeline)."""
        if self.model is None:
            raise ConfigError(f"'model': {needed_by} needs a model section (model.kind: one of "
                              f"{', '.join(sorted(_union_tags(Model)))}); this config has none")
        return self.model

    @property
    def dataset_dir(self) -> Path:
        return self.run_dir / "dataset"

    @property
    def quarantine_dir(self) -> Path:
        return self.run_dir / "quarantine"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_location(self) -> str:
        return (self.run_dir / "mlartifacts").resolve().as_uri()

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.mlflow.registered_model or self.name

    @property
    def score_model_uri(self) -> str:
        return self.score.model_uri or f"models:/{self.registered_model_name}@champion"

    @property
    def score_input(self) -> Path:
        return self.score.input or self.dataset_dir / "split=test"

    @property
    def score_output(self) -> Path:
        return self.score.output or self.run_dir / "predictions"

    def loggable(self) -> dict:
        """The resolved config as plain data with secret-looking values masked and values read from the environment
        shown as written (`${NAME}`, not what NAME holds): what MLflow and logs see."""
        data = self.model_dump(mode="json")
        for keys, template in self._from_environment.items():
            node = data
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = template
        return mask_secrets(data)

    def as_params(self) -> dict[str, Any]:
        """The loggable config flattened to MLflow params: {"train.optimizer.lr": 0.002, ...}."""
        return _flatten(self.loggable())

    def to_yaml(self) -> str:
        """The resolved config as YAML, secrets masked (what `dlpipe validate` prints and MLflow records)."""
        return yaml.safe_dump(self.loggable(), sort_keys=False)


# `token` only as a key's last word (`session.token`, `auth_token`): `token_pattern` and `min_token_length` are text
# settings, which lineage needs to see
_SECRET_NAME = re.compile(r"password|passwd|secret|(?:^|[_.-])token$|api[_.-]?key|access[_.-]?key|credential",
                          re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
MASK = "***"


def mask_secrets(data: Any) -> Any:
    """A copy with values under secret-looking keys, and credentials inside URIs, replaced by `***`."""
    if isinstance(data, dict):
        return {key: MASK if _SECRET_NAME.search(str(key)) else mask_secrets(value) for key, value in data.items()}
    if isinstance(data, list):
        return [mask_secrets(value) for value in data]
    if isinstance(data, str):
        return _URI_USERINFO.sub(f"{MASK}@", data)
    return data


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _YamlLoader(yaml.SafeLoader):
    """YAML with the 1.2 booleans only (true/false): 1.1's on/off/yes/no stay strings, so `amp: off` means "off"."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def read_yaml(text: str) -> Any:
    """Parse config YAML (see `_YamlLoader` for booleans)."""
    return yaml.load(text, Loader=_YamlLoader)


_SETTING_MAPS = (("spark", "conf"),)  # sections whose keys hold dots of their own (spark.sql.shuffle.partitions)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `key.sub=value` into (["key", "sub"], value); the value is read as YAML. Below a settings map the rest
    of the key is one key: `spark.conf.spark.eventLog.enabled=true` sets `spark.eventLog.enabled`."""
    key, sep, raw = text.partition("=")
    keys = key.split(".")
    if not sep or not key or any(not part for part in keys):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    for section in _SETTING_MAPS:
        if tuple(keys[:len(section)]) == section and len(keys) > len(section) + 1:
            keys = [*section, ".".join(keys[len(section):])]
    try:
        return keys, read_yaml(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc.problem})") from None


def _apply_override(data: dict, keys: list[str], value: Any, text: str) -> None:
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: '{'.'.join(keys[: depth + 1])}' is not a section")
        node = child
    node[keys[-1]] = value


def _union_tags(*unions: Any) -> frozenset[str]:
    """The `kind` values of discriminated unions (pydantic puts them in error locations)."""
    members = [m for union in unions for m in (get_args(get_args(union)[0]) or [get_args(union)[0]])]
    return frozenset(tag for m in members for tag in get_args(m.model_fields["kind"].annotation))


_TAGS = _union_tags(Source, Model)


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"] if p not in _TAGS)
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing required key '{key}'"
    if error["type"] == "union_tag_invalid":
        return f"'{key}': {error['msg']}"
    where = f"'{key}'" if key else "config"
    if error["type"] == "value_error":
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"


def validate_config(data: Any, origin: str) -> PipelineConfig:
    """Validate a raw mapping into a PipelineConfig; errors name `origin` and each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{origin}: {problems}") from None


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_environment(data: Any, origin: str, keys: tuple = ()) -> tuple[Any, dict[tuple, str]]:
    """`${NAME}` inside string values -> environment variable NAME (how secrets reach a config without being
    written in it); returns the data and {key path: the string as written} for each value that used one."""
    if isinstance(data, dict):
        pairs = [(key, *resolve_environment(value, origin, (*keys, key))) for key, value in data.items()]
        return {key: value for key, value, _ in pairs}, {k: v for _, _, found in pairs for k, v in found.items()}
    if isinstance(data, list):
        items = [resolve_environment(value, origin, (*keys, index)) for index, value in enumerate(data)]
        return [value for value, _ in items], {k: v for _, found in items for k, v in found.items()}
    if not isinstance(data, str) or not _ENV_REFERENCE.search(data):
        return data, {}

    def variable(match: re.Match) -> str:
        if match[1] not in os.environ:
            where = ".".join(str(key) for key in keys)
            raise ConfigError(f"{origin}: '{where}' reads environment variable {match[1]}, which is not set")
        return os.environ[match[1]]

    return _ENV_REFERENCE.sub(variable, data), {keys: data}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a pipeline YAML, apply `key.sub=value` overrides, fill in `${NAME}` environment references, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, text)
    origin = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    data, from_environment = resolve_environment(data, origin)
    cfg = validate_config(data, origin)
    cfg._from_environment = from_environment
    return cfg
