"""Feature scaling, Spark-ML style: `fit_scaler(train_df)` learns statistics, `FittedScaler` applies them.

The fitted state is plain data (it goes into manifest.json and travels with the model), and the same
object applies it to a Spark column at ETL time and to a NumPy batch at scoring time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.config import NormalizeConf


@dataclass(frozen=True)
class FittedScaler:
    """`(x - offset[g]) / scale[g]` where g is the statistic group of each array element."""

    method: str
    per: str
    group_size: int  # consecutive array elements sharing one statistic (H*W per channel, 1 per feature)
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "offset": list(self.offset), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, data: dict) -> "FittedScaler":
        return cls(data["method"], data["per"], int(data["group_size"]), tuple(data["offset"]), tuple(data["scale"]))

    def column(self, values: Column) -> Column:
        """The scaled array<float> as a Spark column expression (runs in the JVM, no Python UDF)."""
        offset = F.array(*[F.lit(v) for v in self.offset])
        scale = F.array(*[F.lit(v) for v in self.scale])
        group = lambda i: F.floor(i / F.lit(self.group_size)).cast("int")  # noqa: E731
        return F.transform(values, lambda x, i: ((x - offset[group(i)]) / scale[group(i)]).cast("float"))

    def transform(self, df: DataFrame, input_col: str, output_col: str) -> DataFrame:
        """Add `output_col` = scaled `input_col` to a Spark DataFrame."""
        return df.withColumn(output_col, self.column(F.col(input_col)))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Scale a [N, D] NumPy batch exactly as `transform` does (float64 arithmetic, float32 result)."""
        values = np.asarray(values, dtype=np.float64)
        groups = values.reshape(values.shape[0], len(self.offset), self.group_size)
        offset = np.asarray(self.offset)[None, :, None]
        scale = np.asarray(self.scale)[None, :, None]
        return ((groups - offset) / scale).reshape(values.shape).astype(np.float32)


def fit_scaler(train: DataFrame, column: str, conf: NormalizeConf, group_size: int) -> FittedScaler:
    """Fit scaling statistics on `train` only (callers pass the train split, never val/test)."""
    group_size = 1 if conf.per == "feature" else group_size
    exploded = train.select(F.posexplode(column).alias("pos", "value"))
    by_group = exploded.groupBy(F.floor(F.col("pos") / group_size).cast("int").alias("group"))
    if conf.method == "zscore":
        stats = by_group.agg(F.mean("value").alias("offset"), F.stddev_pop("value").alias("spread"))
    else:
        stats = by_group.agg(F.min("value").alias("offset"), (F.max("value") - F.min("value")).alias("spread"))
    rows = sorted(stats.collect(), key=lambda r: r["group"])  # one row per statistic group: tiny
    if not rows:
        raise ValueError(f"cannot fit a scaler on column '{column}': the train split is empty")
    # A constant group (zero spread) would divide by zero: scale it by 1 so it maps to 0, not NaN/Inf.
    scale = tuple(float(r["spread"]) if r["spread"] and r["spread"] > 0 else 1.0 for r in rows)
    return FittedScaler(conf.method, conf.per, group_size, tuple(float(r["offset"]) for r in rows), scale)
