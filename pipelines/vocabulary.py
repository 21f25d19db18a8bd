"""Vocabularies, Spark-ML style: `fit_vocabulary(train_df)` counts tokens, `Vocabulary` maps them to ids.

Used for categorical columns (one value per row) and text (an array of tokens per row). The fitted state is
plain data: the tokens in id order, reserved ids first.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType

from pipelines import sql_text as sql
from pipelines.spark_progress import spark_step


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
    return fit_vocabularies(train, [column], reserved, oov_id, max_size, min_count)[column]


@spark_step("fit vocabularies")
def fit_vocabularies(
    train: DataFrame,
    columns: list[str],
    reserved: tuple[str, ...],
    oov_id: int,
    max_size: int | None = None,
    min_count: int = 1,
) -> dict[str, Vocabulary]:
    """`fit_vocabulary` of each of `columns` (strings, or arrays of strings), all counted in one pass over `train`."""
    if not columns:
        return {}
    tagged = [_tagged_tokens(train, column) for column in columns]
    tokens = train.select(F.explode(F.concat(*tagged)).alias("t")).select("t.column", "t.token")
    counts = tokens.where(F.col("token").isNotNull()).groupBy("column", "token").count()
    frequent = counts.where(F.col("count") >= min_count)
    if max_size is not None:
        rank = F.row_number().over(Window.partitionBy("column").orderBy(F.desc("count"), "token"))
        frequent = frequent.withColumn("rank", rank).where(F.col("rank") <= max(max_size - len(reserved), 0))
    found: dict[str, list[tuple[int, str]]] = {column: [] for column in columns}
    for row in frequent.collect():
        found[row["column"]].append((-row["count"], row["token"]))
    return {column: Vocabulary((*reserved, *[token for _, token in sorted(pairs)]), oov_id)
            for column, pairs in found.items()}


def _tagged_tokens(train: DataFrame, column: str) -> Column:
    """The row's tokens of `column` as an array of (column, token) structs."""
    tag = lambda token: F.struct(F.lit(column).alias("column"), token.alias("token"))  # noqa: E731
    if isinstance(train.schema[column].dataType, ArrayType):
        return F.transform(sql.column(column), tag)
    return F.array(tag(sql.column(column)))
