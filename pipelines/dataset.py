"""The ETL output (docs/architecture.md, dataset contract): split Parquet files, manifest.json, quarantine.

Everything here collects only small summaries (counts, class names, one hash per input file), never rows.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from functools import reduce
from pathlib import Path
from typing import Callable

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.config import OutputConf, PipelineConfig
from pipelines.atomic import atomic_directory
from pipelines import sql_text as sql
from pipelines.errors import DataError
from pipelines.quality import QUALITY_NAME
from pipelines.shards import check_shardable, split_dir
from pipelines.spark import in_partitions
from pipelines.spark_progress import spark_step
from pipelines.split import SPLITS

MANIFEST_NAME = "manifest.json"
RANKED_ROWS_PER_FILE = 1000  # a split's rows per file under which its files are cut by rank (exact sizes), not by hash


def write_quarantine(rows: DataFrame, path: Path) -> None:
    """Replace the quarantine Parquet at `path` atomically; written even when empty, so it always shows this run."""
    with atomic_directory(path) as staging:
        rows.write.parquet(str(staging))


def quarantine_reasons(quarantine_dir: Path, spark: SparkSession) -> dict[str, int]:
    """Reason -> number of rows, from the quarantine as written (its reason column only: no pass over the input)."""
    counted = spark.read.parquet(str(quarantine_dir)).groupBy("reason").count().collect()
    return dict(sorted((row["reason"], row["count"]) for row in counted))


SHOWN_REASONS = 3  # how many of the most common quarantine reasons a failed ETL names


def check_counts(counts: dict[str, int], max_bad_fraction: float, quarantine_dir: Path,
                 reasons: dict[str, int]) -> None:
    """Raise unless clean + quarantined rows add up to the input rows, some are clean and few are bad; the error
    names the most common of the quarantine's `reasons` (reason -> rows)."""
    rows_in, clean, bad = counts["rows_in"], counts["rows_clean"], counts["rows_quarantined"]
    if rows_in != clean + bad:
        raise DataError(f"row counts do not reconcile: rows_in {rows_in} != clean {clean} + quarantined {bad}")
    top = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:SHOWN_REASONS]
    why = ", ".join(f'{rows} row{"s" * (rows != 1)} "{reason}"' for reason, rows in top)
    if clean == 0:
        raise DataError(f"no clean rows among {rows_in} input records (most common reasons: {why}); see the "
                        f"quarantine at {quarantine_dir}")
    if bad / rows_in > max_bad_fraction:
        raise DataError(
            f"quarantined fraction {bad / rows_in:.4f} ({bad} of {rows_in} rows) exceeds source.max_bad_fraction "
            f"{max_bad_fraction:g} (most common reasons: {why}); see the quarantine at {quarantine_dir}"
        )


@spark_step("input hash")
def content_hash(files: DataFrame, key_col: str, hash_col: str) -> tuple[str, int]:
    """sha256 over the sorted (relative path, file sha256) pairs of the rows that have a file hash, and how many
    files that is; the per-file hashes are computed by Spark."""
    hashed = files.where(F.col(hash_col).isNotNull()).select(key_col, hash_col)
    pairs = sorted((row[key_col], row[hash_col]) for row in hashed.collect())
    digest = hashlib.sha256()
    for key, file_hash in pairs:
        digest.update(f"{key}\t{file_hash}\n".encode())
    return digest.hexdigest(), len(pairs)


def file_content_hash(files: list[Path], root: Path) -> str:
    """`content_hash` of files on the driver's file system, streamed (bounded memory, no second Spark read)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(chunk)
        name = path.relative_to(root).as_posix() if path != root else path.name
        digest.update(f"{name}\t{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


@spark_step("class names")
def class_names(rows: DataFrame, label_col: str) -> list[str]:
    """The sorted distinct labels: index i of this list is class i."""
    return sorted(row[label_col] for row in rows.select(label_col).distinct().collect())


def encode_labels(rows: DataFrame, label_col: str, classes: list[str]) -> DataFrame:
    """Replace the class names in `label_col` by their int index in `classes`."""
    index = F.create_map(*[F.lit(value) for i, name in enumerate(classes) for value in (name, i)])
    return rows.withColumn(label_col, index[F.col(label_col)].cast("int"))


@spark_step("rows per split")
def class_balance(rows: DataFrame, classes: list[str]) -> dict[str, dict[str, int]]:
    """Per split, class name -> row count (rows carry the int `label` and `split`); unlabelled rows count as ''."""
    labelled = bool(classes)
    balance: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for row in rows.groupBy("split", *(["label"] if labelled else [])).count().collect():
        balance[row["split"]][classes[row["label"]] if labelled else ""] = row["count"]
    return {split: dict(sorted(per_class.items())) for split, per_class in balance.items()}


def split_sizes(balance: dict[str, dict[str, int]]) -> dict[str, int]:
    """Rows per split, from a `class_balance`."""
    return {split: sum(per_class.values()) for split, per_class in balance.items()}


def dataset_columns(
    rows: DataFrame,
    keep_raw: bool,
    labelled: bool = True,
    extra: tuple[str, ...] = (),
    features: tuple[str, ...] = ("features",),
    raw: str = "raw_features",
) -> DataFrame:
    """The contract's columns in order: `id`, `label` when labelled, `features`, `raw` when kept, `extra` (names as
    written: a categorical index may hold a dot), `split`."""
    head = ["id", *(["label"] if labelled else []), *features, *([raw] if keep_raw else [])]
    return rows.select(*[sql.column(name) for name in (*head, *extra, "split")])


def build_manifest(
    cfg: PipelineConfig,
    *,
    dataset: DataFrame,
    input_hash: str,
    input_files: int,
    feature_shape: tuple[int, ...],
    classes: list[str],
    counts: dict[str, int],
    balance: dict[str, dict[str, int]],
    preprocessing: dict,
    quarantine_reasons: dict[str, int],
) -> dict:
    """The manifest.json content: lineage, schema, shapes, classes, counts and the fitted preprocessing."""
    return {
        "pipeline": cfg.name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "kind": cfg.source.kind,
            "path": str(cfg.source.path),
            "files": input_files,
            "content_hash": input_hash,
        },
        "columns": {field.name: field.dataType.simpleString() for field in dataset.schema if field.name != "split"},
        "feature_shape": list(feature_shape),
        "classes": classes,
        "counts": counts,
        "class_balance": balance,
        "preprocessing": preprocessing,
        "split": cfg.split.model_dump(),
        "quarantine_reasons": quarantine_reasons,
    }


def _in_files(dataset: DataFrame, files: int, split_rows: dict[str, int]) -> DataFrame:
    """`dataset` in `files` partitions, each of which becomes one file per split, its rows sorted by `id`.

    Which file holds a row, and where, depends on the keys alone, never on how the input was partitioned (which
    follows the cores a job runs on): the same dataset, so the same training, on a cluster as on one host, and files
    of near-equal size for the ranks that read them. A split under `RANKED_ROWS_PER_FILE` rows per file (by its
    `split_rows`) is placed by `_place_by_rank`, a larger one by a hash of `id` (about n / files rows in each file,
    and no ordering of the whole split in one task). With splits of both kinds the rows are read twice (a filter for
    each kind).
    """
    small = [split for split in SPLITS if split_rows.get(split, 0) < files * RANKED_ROWS_PER_FILE]
    larger = [split for split in SPLITS if split not in small]
    placed = []
    if small:
        ranked = _place_by_rank(files, small, split_rows)
        placed.append(dataset.where(F.col("split").isin(small)).withColumn(_FILE, ranked))
    if larger:
        hashed = F.pmod(F.xxhash64("id"), F.lit(files))
        placed.append(dataset.where(F.col("split").isin(larger)).withColumn(_FILE, hashed))
    return in_partitions(reduce(DataFrame.union, placed), _FILE, files).drop(_FILE).sortWithinPartitions("split", "id")


_FILE = "_file"  # which of its split's files a shuffled row goes to


def _place_by_rank(files: int, splits: list[str], split_rows: dict[str, int]) -> Column:
    """The file of a row of a small split (n rows): by its place k in the split ordered by a hash of `id`, file
    floor(k * files / n). Each file gets n // files or n // files + 1 rows, none empty while n >= files (by the hash
    alone, 3 rows in 4 files land in one file 1 time in 16). Each split is ordered in one task."""
    rows = F.create_map(*[F.lit(value) for split in splits for value in (split, split_rows[split])])[F.col("split")]
    order = Window.partitionBy("split").orderBy(F.xxhash64("id"), "id")
    return F.floor((F.row_number().over(order) - 1) * files / rows)


@spark_step("write dataset")
def write_dataset(
    dataset: DataFrame,
    out_dir: Path,
    manifest: dict,
    quality: dict,
    output: OutputConf,
    world_size: int,
    describe_written: Callable[[Path], dict] | None = None,
) -> dict:
    """Write `output.files_per_split` Parquet files per split (`_in_files`, by the manifest's `counts` per split),
    manifest.json and quality.json, replacing `out_dir` atomically; returns the manifest, with the fields
    `describe_written(written folder)` adds (e.g. baselines).

    Raises DataError (leaving any previous dataset in place) when a split has fewer row groups than `world_size`:
    petastorm shards row groups across ranks, and training reads every split so.
    """
    in_files = _in_files(dataset, output.files_per_split, manifest["counts"])
    writer = in_files.write.option("parquet.block.size", output.row_group_bytes)
    with atomic_directory(out_dir) as staging:
        writer.partitionBy("split").parquet(str(staging))  # sorted by split already: Spark adds no sort
        for split in SPLITS:
            check_shardable(split_dir(staging, split), world_size, shown_as=split_dir(out_dir, split))
        if describe_written:
            manifest = manifest | describe_written(staging)
        (staging / QUALITY_NAME).write_text(json.dumps(quality, indent=2) + "\n")
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(dataset_dir: Path) -> dict:
    """The manifest.json of an ETL output folder; DataError naming the path when there is none."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"no dataset manifest at {path}: run the etl stage first")
    return json.loads(path.read_text())
