"""Pipeline configuration: one YAML per pipeline, loaded into typed, validated, frozen objects.

`load_config(path, overrides)` is the only way stages get their settings; the resolved config it
returns is what every stage runs with and what MLflow records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConf(_Strict):
    master: str = "local[*]"
    driver_memory: str = "2g"
    shuffle_partitions: PositiveInt = 8
    conf: dict[str, str] = Field(default_factory=dict)


class ImageFolderSource(_Strict):
    """A folder of images, one sub-folder per class (the folder name is the label)."""

    kind: Literal["image_folder"]
    path: Path
    sample: str | None = None  # the `dlpipe sample` data set that writes this folder (used by `dlpipe demo`)
    image_size: tuple[PositiveInt, PositiveInt] = (8, 8)
    channels: Literal[1, 3] = 1
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)


Source = Annotated[Union[ImageFolderSource], Field(discriminator="kind")]


class SplitConf(_Strict):
    seed: int = 42
    train: float = Field(0.70, gt=0.0, lt=1.0)
    val: float = Field(0.15, gt=0.0, lt=1.0)
    test: float = Field(0.15, gt=0.0, lt=1.0)
    stratify: bool = True

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> "SplitConf":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios train+val+test must sum to 1, got {total:g}")
        return self


class NormalizeConf(_Strict):
    method: Literal["zscore", "minmax"] = "zscore"
    per: Literal["channel", "feature"] = "channel"


class OutputConf(_Strict):
    files_per_split: PositiveInt = 4
    keep_raw: bool = True


class CnnConf(_Strict):
    kind: Literal["cnn"]
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    kernel_size: PositiveInt = 3
    batch_norm: bool = True
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    hidden: PositiveInt = 128


Model = Annotated[Union[CnnConf], Field(discriminator="kind")]


class OptimizerConf(_Strict):
    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    amsgrad: bool = False


class LossConf(_Strict):
    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class EarlyStoppingConf(_Strict):
    metric: Literal["val_accuracy", "val_loss", "val_f1_macro"] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    patience: PositiveInt = 5
    min_delta: float = Field(0.0, ge=0.0)


class TrainConf(_Strict):
    world_size: PositiveInt = 2
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    seed: int = 0
    grad_clip_norm: float | None = Field(None, gt=0.0)
    optimizer: OptimizerConf = Field(default_factory=OptimizerConf)
    loss: LossConf = Field(default_factory=LossConf)
    early_stopping: EarlyStoppingConf = Field(default_factory=EarlyStoppingConf)


class MlflowConf(_Strict):
    tracking_uri: str | None = None  # default: sqlite file inside run_dir
    experiment: str | None = None  # default: the pipeline name
    registered_model: str | None = None  # default: the pipeline name


class ScoreConf(_Strict):
    model_uri: str | None = None  # default: models:/<registered_model>@champion
    input: Path | None = None  # default: the test split of this pipeline's dataset
    output: Path | None = None  # default: <run_dir>/predictions
    batch_size: PositiveInt = 1024


class PromoteConf(_Strict):
    """The promotion gate: the challenger becomes `champion` only if it beats it on `metric`."""

    metric: str = "test_accuracy"  # a metric logged on the model version's training run
    mode: Literal["max", "min"] = "max"
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
    model: Model
    train: TrainConf = Field(default_factory=TrainConf)
    mlflow: MlflowConf = Field(default_factory=MlflowConf)
    score: ScoreConf = Field(default_factory=ScoreConf)
    promote: PromoteConf = Field(default_factory=PromoteConf)

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

    def to_yaml(self) -> str:
        """The resolved config as YAML (what stages run with and MLflow records)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `key.sub=value` into (["key", "sub"], value); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    return key.split("."), yaml.safe_load(raw) if raw else ""


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


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a pipeline YAML, apply `key.sub=value` overrides, and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, text)
    origin = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return validate_config(data, origin)
