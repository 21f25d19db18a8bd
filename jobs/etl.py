"""ETL recipe: image folder -> quarantine + deterministic split -> scaler fitted on train -> Parquet dataset."""
from __future__ import annotations

from pyspark.sql import functions as F

from jobs.config import PipelineConfig
from jobs.stage import stage
from pipelines.dataset import (
    build_manifest,
    check_counts,
    class_balance,
    class_names,
    content_hash,
    dataset_columns,
    encode_labels,
    quarantine_reasons,
    split_counts,
    write_dataset,
    write_quarantine,
)
from pipelines.images import clean_rows, count_rows, feature_shape, ingest_image_folder, quarantine_rows
from pipelines.scaling import fit_scaler
from pipelines.spark import spark_session
from pipelines.split import SPLITS, assign_split


def run_etl(cfg: PipelineConfig) -> dict:
    """Run the ETL stage for `cfg` and return the manifest it wrote next to the dataset."""
    spark = spark_session(cfg.spark, f"{cfg.name}-etl")
    channels, height, width = feature_shape(cfg.source)
    with stage("etl") as summary:
        decoded = ingest_image_folder(spark, cfg.source).persist()  # images are decoded once, then reused
        try:
            clean, quarantined = clean_rows(decoded), quarantine_rows(decoded)
            write_quarantine(quarantined, cfg.quarantine_dir)
            counts = count_rows(decoded)
            check_counts(counts, cfg.source.max_bad_fraction, cfg.quarantine_dir)

            classes = class_names(clean, "label")
            rows = assign_split(encode_labels(clean, "label", classes), "id", "label", cfg.split)
            train = rows.where(F.col("split") == "train")
            scaler = fit_scaler(train, "raw_features", cfg.normalize, group_size=height * width)
            dataset = dataset_columns(scaler.transform(rows, "raw_features", "features"), cfg.output.keep_raw)

            balance = class_balance(rows, classes)
            counts |= split_counts(balance, counts["rows_clean"])
            manifest = build_manifest(
                cfg,
                dataset=dataset,
                input_hash=content_hash(decoded, "id", "content_sha256"),
                feature_shape=(channels, height, width),
                classes=classes,
                counts=counts,
                balance=balance,
                scaler=scaler,
                quarantine_reasons=quarantine_reasons(quarantined),
            )
            write_dataset(dataset, cfg.dataset_dir, manifest, cfg.output.files_per_split, cfg.train.world_size)
        finally:
            decoded.unpersist()
        summary.update({key: counts[key] for key in ("rows_in", "rows_clean", "rows_quarantined", *SPLITS)})
    return manifest
