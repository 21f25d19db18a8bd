"""ETL recipe: source -> checked rows + quarantine -> deterministic split -> preprocessing fitted on train -> Parquet.

One recipe per source family (image folders, tables); they share the quarantine bookkeeping and the writer.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.config import PipelineConfig
from jobs.stage import stage
from pipelines import images, tables
from pipelines.dataset import (
    build_manifest,
    check_counts,
    class_balance,
    class_names,
    content_hash,
    dataset_columns,
    encode_labels,
    file_content_hash,
    quarantine_reasons,
    split_counts,
    write_dataset,
    write_quarantine,
)
from pipelines.quarantine import count_rows, quarantine_rows
from pipelines.scaling import fit_scaler
from pipelines.spark import spark_session
from pipelines.split import SPLITS, split_rows
from pipelines.vocabulary import fit_vocabulary

UNKNOWN_CATEGORY = "<unknown>"  # id 0 of every categorical vocabulary: values not seen in train


def run_etl(cfg: PipelineConfig) -> dict:
    """Run the ETL stage for `cfg` and return the manifest it wrote next to the dataset."""
    spark = spark_session(cfg.spark, f"{cfg.name}-etl")
    recipe = _image_etl if cfg.source.kind == "image_folder" else _table_etl
    with stage("etl") as summary:
        manifest = recipe(spark, cfg)
        summary.update({key: manifest["counts"][key] for key in ("rows_in", "rows_clean", "rows_quarantined", *SPLITS)})
    return manifest


def _image_etl(spark: SparkSession, cfg: PipelineConfig) -> dict:
    channels, height, width = images.feature_shape(cfg.source)
    decoded = images.ingest_image_folder(spark, cfg.source).persist()  # images are decoded once, then reused
    try:
        counts, reasons = _quarantine(decoded, images.is_clean(), cfg)
        clean = images.clean_rows(decoded)
        classes = class_names(clean, "label")
        rows = split_rows(encode_labels(clean, "label", classes), "id", "label", cfg.split)
        scaler = fit_scaler(_train(rows), "raw_features", cfg.normalize, group_size=height * width)
        dataset = dataset_columns(scaler.transform(rows, "raw_features", "features"), cfg.output.keep_raw)
        preprocessing = {"image_size": list(cfg.source.image_size), "channels": channels, "scaler": scaler.to_dict()}
        return _write(
            cfg, dataset, rows, counts, reasons, classes,
            input_hash=content_hash(decoded, "id", "content_sha256"),
            input_files=counts["rows_in"],
            feature_shape=(channels, height, width),
            preprocessing=preprocessing,
        )
    finally:
        decoded.unpersist()


def _table_etl(spark: SparkSession, cfg: PipelineConfig) -> dict:
    source = cfg.source
    files = tables.source_files(source.path)
    checked = tables.ingest_table(spark, source, files).persist()  # the input is read once, then reused
    try:
        counts, reasons = _quarantine(checked, tables.is_clean(), cfg)
        tables.check_duplicates(reasons, source)
        numeric, categorical = tables.feature_columns(source)
        clean = tables.with_raw_features(checked.where(tables.is_clean()), numeric)
        classes: list[str] = []
        if source.label:
            clean = clean.withColumn("label", F.col(source.label).cast("string"))
            classes = class_names(clean, "label")
            clean = encode_labels(clean, "label", classes)
        rows = split_rows(clean, "id", "label" if classes else None, cfg.split)
        train = _train(rows)
        scaler = fit_scaler(train, "raw_features", cfg.normalize, group_size=1)
        vocabularies = {name: fit_vocabulary(train, name, (UNKNOWN_CATEGORY,), oov_id=0) for name in categorical}
        indexed = rows.select("*", *[v.index(F.col(n)).alias(f"{n}_index") for n, v in vocabularies.items()])
        dataset = dataset_columns(
            scaler.transform(indexed, "raw_features", "features"),
            cfg.output.keep_raw,
            labelled=bool(classes),
            extra=tuple(f"{name}_index" for name in categorical),
        )
        preprocessing = {
            "numeric_columns": numeric,
            "scaler": scaler.to_dict(),
            "categorical": {name: v.to_dict() for name, v in vocabularies.items()},
        }
        root = source.path.resolve() if source.path.is_dir() else source.path.resolve().parent
        return _write(
            cfg, dataset, rows, counts, reasons, classes,
            input_hash=file_content_hash(files, root),
            input_files=len(files),
            feature_shape=(len(numeric),),
            preprocessing=preprocessing,
        )
    finally:
        checked.unpersist()


def _quarantine(checked: DataFrame, is_clean: Column, cfg: PipelineConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Write the quarantine, reconcile the counts and enforce `max_bad_fraction`: (counts, reason -> rows)."""
    quarantined = quarantine_rows(checked)
    write_quarantine(quarantined, cfg.quarantine_dir)
    counts = count_rows(checked, is_clean)
    check_counts(counts, cfg.source.max_bad_fraction, cfg.quarantine_dir)
    return counts, quarantine_reasons(quarantined)


def _train(rows: DataFrame) -> DataFrame:
    """The train split: the only rows any preprocessing is fitted on."""
    return rows.where(F.col("split") == "train")


def _write(cfg, dataset, rows, counts, reasons, classes, **manifest_fields) -> dict:
    """Count the splits, build the manifest and write the dataset with it; returns the manifest."""
    balance = class_balance(rows, classes)
    counts = counts | split_counts(balance, counts["rows_clean"])
    manifest = build_manifest(
        cfg, dataset=dataset, classes=classes, counts=counts, balance=balance, quarantine_reasons=reasons,
        **manifest_fields,
    )
    write_dataset(dataset, cfg.dataset_dir, manifest, cfg.output.files_per_split, cfg.train.world_size)
    return manifest
