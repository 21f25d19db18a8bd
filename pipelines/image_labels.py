"""Image labels from a CSV instead of folder names (`source.labels`).

Each image file stays one record, labelled by the one CSV row that names its path below the source folder (a
leading `./` and surrounding spaces ignored). An image no row names, or several rows name, or whose row has an
empty label is quarantined with that reason, its path as the record (an undecodable image keeps its own reason).
A CSV row that names no image file is a record of its own, quarantined with the row as its record, so
`rows_in` = image files + rows naming no image, and nothing is dropped silently.
"""
from __future__ import annotations

from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.config import ImageLabels
from pipelines.errors import DataError

NO_ROW = "labels CSV: no row names this image"
SEVERAL_ROWS = "labels CSV: %d rows name this image"
EMPTY_LABEL = "labels CSV: empty label"
NO_IMAGE = "labels CSV: no image file below the source folder has this path"
NO_PATH = "labels CSV: a row without a path"


def read_labels(spark: SparkSession, labels: ImageLabels) -> DataFrame:
    """One row per CSV row: `_path` (null when blank), `_label` (null when blank), `_record` (the row's two values
    as text) and `_file`; DataError naming the CSV when it or one of its two columns is missing."""
    path = Path(labels.path).resolve()
    if not path.is_file():
        raise DataError(f"labels CSV {path} does not exist (source.labels.path: {labels.path})")
    rows = spark.read.csv(str(path), header=True, escape='"')  # every column as text; quotes doubled (RFC 4180)
    missing = [name for name in (labels.path_column, labels.label_column) if name not in rows.columns]
    if missing:
        raise DataError(f"labels CSV {path} has no column {', '.join(map(repr, missing))} (its columns: "
                        f"{', '.join(rows.columns)}; see source.labels.path_column and label_column)")
    names = (labels.path_column, labels.label_column)
    given_path, given_label = (F.col(f"`{name.replace('`', '``')}`") for name in names)
    record = "=%s, ".join(name.replace("%", "%%") for name in names) + "=%s"  # "path=%s, label=%s"
    return rows.select(
        F.nullif(F.regexp_replace(F.trim(given_path), r"^(\./)+", ""), F.lit("")).alias("_path"),
        F.nullif(F.trim(given_label), F.lit("")).alias("_label"),
        F.format_string(record, given_path, given_label).alias("_record"),
        F.input_file_name().alias("_file"),
    )


def labelled_by_csv(decoded: DataFrame, rows: DataFrame) -> DataFrame:
    """`decoded` (the image rows, `DECODED_SCHEMA`) with each image's label from the labels CSV `rows`
    (`read_labels`), and a quarantined row for every CSV row that names no image; same columns, same order."""
    per_image = rows.where(F.col("_path").isNotNull()).groupBy("_path").agg(
        F.count(F.lit(1)).alias("_rows"), F.min("_label").alias("_label"))
    images = decoded.join(per_image, decoded["id"] == per_image["_path"], "left")
    label_problem = (F.when(F.col("_rows").isNull(), F.lit(NO_ROW))
                     .when(F.col("_rows") > 1, F.format_string(SEVERAL_ROWS, F.col("_rows")))
                     .when(F.col("_label").isNull(), F.lit(EMPTY_LABEL)))
    labelled = (
        images.withColumn("label", F.col("_label"))
        .withColumn("record", F.coalesce(F.col("record"), F.when(label_problem.isNotNull(), F.col("id"))))
        .withColumn("reason", F.coalesce(F.col("reason"), label_problem))  # an undecodable image keeps its own
        .select(*decoded.columns)
    )
    no_image = rows.join(decoded.select(F.col("id").alias("_path")), "_path", "left_anti")  # null paths too
    orphans = no_image.select(
        F.col("_file").alias("source_file"),
        F.coalesce(F.col("_path"), F.lit("")).alias("id"),
        F.col("_label").alias("label"),
        F.lit(None).cast(decoded.schema["raw_features"].dataType).alias("raw_features"),
        F.col("_record").alias("record"),
        F.when(F.col("_path").isNull(), F.lit(NO_PATH)).otherwise(F.lit(NO_IMAGE)).alias("reason"),
        F.lit(None).cast("string").alias("content_sha256"),
    )
    return labelled.unionByName(orphans.select(*decoded.columns))
