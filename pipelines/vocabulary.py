"""Vocabularies, Spark-ML style: `fit_vocabulary(train_df)` counts tokens, `Vocabulary` maps them to ids.

Used for categorical columns (one value per row) and text (an array of tokens per row). The fitted state is
plain data: the tokens in id order, reserved ids first.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType


@dataclass(frozen=True)
class Vocabulary:
    """Token -> id: id i is `tokens[i]`; a token not in the vocabulary (or null) gets `oov_id`."""

    tokens: tuple[str, ...]
    oov_id: int

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "oov_id": self.oov_id}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        return cls(tuple(data["tokens"]), int(data["oov_id"]))

    def index(self, token: Column) -> Column:
        """The int id of a string column (runs in the JVM, no Python UDF)."""
        ids = F.create_map(*[F.lit(v) for i, t in enumerate(self.tokens) for v in (t, i)])
        return F.coalesce(ids[token], F.lit(self.oov_id)).cast("int")

    def index_array(self, tokens: Column) -> Column:
        """The array<int> of ids of an array<string> column."""
        return F.transform(tokens, self.index)


def fit_vocabulary(
    train: DataFrame,
    column: str,
    reserved: tuple[str, ...],
    oov_id: int,
    max_size: int | None = None,
    min_count: int = 1,
) -> Vocabulary:
    """Fit on `train` only: tokens seen at least `min_count` times, most frequent first (ties by token), capped."""
    values = F.explode(column) if isinstance(train.schema[column].dataType, ArrayType) else F.col(column)
    counts = train.select(values.alias("token")).where(F.col("token").isNotNull()).groupBy("token").count()
    frequent = counts.where(F.col("count") >= min_count).orderBy(F.desc("count"), "token")
    if max_size is not None:
        frequent = frequent.limit(max(max_size - len(reserved), 0))
    return Vocabulary((*reserved, *[row["token"] for row in frequent.collect()]), oov_id)
