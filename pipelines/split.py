"""Deterministic train/val/test splits: ranked (exact, stratified) or hash buckets by each row's key, or by time."""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StructField, StructType

from jobs.config import SplitConf
from pipelines import sql_text as sql
from pipelines.errors import DataError
from pipelines.spark_progress import spark_step

SPLITS = ("train", "val", "test")
HASH_BUCKETS = 1 << 20  # a row's hash bucket / HASH_BUCKETS is its uniform draw in [0, 1)
TIME_CUT_ACCURACY = 100_000  # percentile_approx accuracy of the time cuts
_GROUP, _RANK, _CUT_GROUP = "_split_group", "_split_rank", "_split_cut_group"
_CUTS = ("_split_first_val", "_split_first_test")  # the ranks the train and val splits end before


def _boundary(rows: Column, fraction: float) -> Column:
    """How many of `rows` fall before a cut at `fraction`, rounded half up (at most half a row off)."""
    return F.floor(rows * F.lit(fraction) + F.lit(0.5))


def _cut(draw: Column, conf: SplitConf) -> Column:
    """train / val / test by where `draw` (in [0, 1)) falls among the cuts at the configured fractions."""
    return F.when(draw < conf.train, "train").when(draw < conf.train + conf.val, "val").otherwise("test")


@spark_step("split")
def split_rows(df: DataFrame, key_col: str, label_col: str | None, conf: SplitConf) -> DataFrame:
    """Add `split` by `conf.method` (ranked, hash or time)."""
    if conf.method == "hash":
        return hash_split(df, key_col, conf)
    if conf.method == "time":
        return time_split(df, conf.time_column, conf)
    return assign_split(df, key_col, label_col, conf)


def check_split_sizes(counts: dict[str, int], conf: SplitConf, total: int | None = None) -> None:
    """DataError when the rows per split do not add up to the `total` rows split (when given), or when a split is
    empty (a tiny input): the message names every empty split, the rows split and the ratios."""
    rows = sum(counts.get(split, 0) for split in SPLITS)
    if total is not None and rows != total:
        raise DataError(f"split counts {counts} do not add up to the {total} rows split")
    empty = [split for split in SPLITS if not counts.get(split)]
    if empty:
        raise DataError(
            f"split {', '.join(repr(split) for split in empty)} {'is' if len(empty) == 1 else 'are'} empty: "
            f"{rows} clean rows with ratios {conf.train:g}/{conf.val:g}/{conf.test:g} "
            f"({', '.join(f'{split} {counts.get(split, 0)}' for split in SPLITS)}); "
            f"add rows or change split ratios"
        )


def hash_split(df: DataFrame, key_col: str, conf: SplitConf) -> DataFrame:
    """Add `split` from each row's own seeded hash bucket: no shuffle, and a row keeps its split when rows are added.

    Split sizes are the configured fractions in expectation (binomial), not exactly.
    """
    draw = F.pmod(F.xxhash64(F.lit(conf.seed), sql.column(key_col)), F.lit(HASH_BUCKETS)) / F.lit(HASH_BUCKETS)
    return df.withColumn("split", _cut(draw, conf))


def time_split(df: DataFrame, time_col: str, conf: SplitConf) -> DataFrame:
    """Add `split` by time: every train row is earlier than every val row, every val row earlier than every test row.

    The cuts are the train and train+val quantiles of `time_col` over all rows (one aggregation pass); rows
    sharing a timestamp share a split, so no series sees a later moment of another in its training data.
    """
    micros = F.unix_micros(sql.column(time_col).cast("timestamp"))
    quantiles = F.percentile_approx(micros, [conf.train, conf.train + conf.val], TIME_CUT_ACCURACY)
    val_from, test_from = df.agg(quantiles.alias("cuts")).first()["cuts"]
    return df.withColumn("split", F.when(micros < val_from, "train").when(micros < test_from, "val").otherwise("test"))


def assign_split(df: DataFrame, key_col: str, label_col: str | None, conf: SplitConf) -> DataFrame:
    """Add `split` (train/val/test): rows ordered by a seeded hash of the key, cut at the configured fractions.

    With `stratify` each label is cut on its own, so every class gets its proportions to within one row.
    The order depends only on (seed, key), never on input order or partitioning; keys must be unique.
    The rows are ordered once, by a job that finds each label's cut rows; `split` is then a comparison of a row's
    (hash, key) with its label's cuts (a broadcast table of at most two rows per label), so the passes that read
    it (quality report, fits, write) sort nothing.
    """
    group = sql.column(label_col) if conf.stratify and label_col else F.lit(0)
    key = sql.column(key_col)
    rank = F.struct(F.xxhash64(F.lit(conf.seed), key).alias("hash"), key.alias("key"))  # orders by hash, then key
    ranked = df.select("*", group.alias(_GROUP), rank.alias(_RANK))
    cuts = _cut_rows(ranked.select(_GROUP, _RANK), conf)
    joined = ranked.join(F.broadcast(cuts), ranked[_GROUP].eqNullSafe(cuts[_CUT_GROUP]), "left")
    before = {cut: F.col(cut).isNull() | (F.col(_RANK) < F.col(cut)) for cut in _CUTS}  # no cut row: all before it
    split = F.when(before[_CUTS[0]], "train").when(before[_CUTS[1]], "val").otherwise("test")
    return joined.withColumn("split", split).drop(_GROUP, _RANK, _CUT_GROUP, *_CUTS)


def _cut_rows(ranked: DataFrame, conf: SplitConf) -> DataFrame:
    """Per group: the ranks of its first val row and first test row (`_CUTS`), null where the group has no such row.
    One job orders the rows; the at most two rows per group it finds are the table returned."""
    ordered = Window.partitionBy(_GROUP).orderBy(_RANK)
    position, rows = F.row_number().over(ordered) - 1, F.count(F.lit(1)).over(Window.partitionBy(_GROUP))
    at = ranked.select("*", position.alias("position"), _boundary(rows, conf.train).alias("train"),
                       _boundary(rows, conf.train + conf.val).alias("val"))
    found: dict = {}
    for row in at.where((F.col("position") == F.col("train")) | (F.col("position") == F.col("val"))).collect():
        cuts = found.setdefault(row[_GROUP], {"train": None, "val": None})
        cuts |= {end: row[_RANK] for end in cuts if row["position"] == row[end]}
    rank_type = ranked.schema[_RANK].dataType
    schema = StructType([StructField(_CUT_GROUP, ranked.schema[_GROUP].dataType),
                         *[StructField(cut, rank_type) for cut in _CUTS]])
    return ranked.sparkSession.createDataFrame([(g, c["train"], c["val"]) for g, c in found.items()], schema)
