"""ETL recipe: source -> checked rows + quarantine -> deterministic split -> preprocessing fitted on train -> Parquet.

One recipe per source family (image folders, tables, time series, text); they share the quarantine bookkeeping,
the split, the fitted preprocessing, the quality report and the writer.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Collection

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from jobs.config import FileSource, ImageLabels, PipelineConfig
from jobs.lineage import etl_run, record_dataset
from jobs.stage import stage
from jobs.tracking import use_experiment
from pipelines import images, sql_text as sql, tables, text
from pipelines.baselines import forecast_baselines
from pipelines.caching import cached
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
    split_sizes,
    write_dataset,
    write_quarantine,
)
from pipelines.errors import DataError
from pipelines.quality import quality_report, reported_balance
from pipelines.quarantine import quarantine_rows, row_counts
from pipelines.drift import fit_reference
from pipelines.scaling import fit_scaler
from pipelines.spark import spark_session
from pipelines.spark_progress import spark_step
from pipelines.split import SPLITS, check_split_sizes, split_rows
from pipelines.vocabulary import fit_vocabularies
from pipelines.windows import sliding_windows

UNKNOWN_CATEGORY = "<unknown>"  # id 0 of every categorical vocabulary: values not seen in train
log = logging.getLogger("dlpipe.etl")


def run_etl(cfg: PipelineConfig) -> dict:
    """Run the ETL stage for `cfg` as an MLflow run (`jobs.lineage`); return the manifest written next to the dataset."""
    with ThreadPoolExecutor(max_workers=1) as pool:  # a new tracking store's tables are made while the JVM starts
        tracking = pool.submit(use_experiment, cfg)
        spark = spark_session(cfg.spark, f"{cfg.name}-etl")
        tracking.result()
    recipes = {"image_folder": _image_etl, "timeseries": _timeseries_etl, "text": _text_etl}
    recipe = recipes.get(cfg.source.kind, _table_etl)
    with stage("etl") as summary, etl_run(cfg) as run:
        manifest = recipe(spark, cfg)
        record_dataset(cfg, manifest)
        summary.update({key: manifest["counts"][key] for key in ("rows_in", "rows_clean", "rows_quarantined", *SPLITS)},
                       run_id=run.info.run_id)
    return manifest


def _image_etl(spark: SparkSession, cfg: PipelineConfig) -> dict:
    channels, height, width = images.feature_shape(cfg.source)
    with cached(images.ingest_image_folder(spark, cfg.source)) as decoded:  # images are decoded once, then reused
        counts, reasons = _quarantine(decoded, images.is_clean(), cfg)
        clean = images.clean_rows(decoded)
        classes = class_names(clean, "label")
        rows, balance, quality = _split(encode_labels(clean, "label", classes), classes, cfg, counts["rows_clean"], [])
        scaler = fit_scaler(_train(rows), "raw_features", cfg.normalize, group_size=height * width)
        dataset = dataset_columns(scaler.transform(rows, "raw_features", "features"), cfg.output.keep_raw)
        preprocessing = {"image_size": list(cfg.source.image_size), "channels": channels, "scaler": scaler.to_dict()}
        return _write(
            cfg, dataset, counts, reasons, classes, balance,
            quality=quality,
            **_image_inputs(decoded, cfg.source.labels),
            feature_shape=(channels, height, width),
            preprocessing=preprocessing,
        )


def _image_inputs(decoded: DataFrame, labels: ImageLabels | None) -> dict:
    """`input_hash` and `input_files` of an image source: its image files, and its labels CSV when it has one
    (then `decoded` also holds the CSV's rows that name no image, which have no file hash)."""
    image_hash, image_files = content_hash(decoded, "id", "content_sha256")
    if labels is None:
        return {"input_hash": image_hash, "input_files": image_files}
    csv = Path(labels.path).resolve()
    both = f"{image_hash}\t{file_content_hash([csv], csv.parent)}"
    return {"input_hash": hashlib.sha256(both.encode()).hexdigest(), "input_files": image_files + 1}


def _table_etl(spark: SparkSession, cfg: PipelineConfig) -> dict:
    source = cfg.source
    files = tables.source_files(source.path)
    with tables.checked_table(spark, source, files, _scratch(cfg)) as checked:  # read and checked once
        counts, reasons = _quarantine(checked, tables.is_clean(), cfg)
        tables.check_duplicates(checked, reasons, source, cfg.quarantine_dir)
        numeric, categorical = tables.feature_columns(source)
        clean = tables.with_raw_features(checked.where(tables.is_clean()), numeric)
        clean, classes = _encoded_labels(clean, source.label)
        rows, balance, quality = _split(clean, classes, cfg, counts["rows_clean"], *_quality_columns(source))
        train = _train(rows)
        scaler = fit_scaler(train, tables.raw_feature_values(numeric), cfg.normalize, group_size=1, names=numeric)
        vocabularies = fit_vocabularies(train, categorical, (UNKNOWN_CATEGORY,), oov_id=0)
        indexed = rows.select("*", *[v.index(sql.column(n)).alias(f"{n}_index") for n, v in vocabularies.items()])
        dataset = dataset_columns(
            indexed.withColumn("features", scaler.column(tables.raw_feature_values(numeric))),
            cfg.output.keep_raw,
            labelled=bool(classes),
            extra=tuple(f"{name}_index" for name in categorical),
        )
        preprocessing = {
            "numeric_columns": numeric,
            "scaler": scaler.to_dict(),
            "categorical": {name: v.to_dict() for name, v in vocabularies.items()},
        }
        return _write(
            cfg, dataset, counts, reasons, classes, balance,
            quality=quality,
            input_hash=file_content_hash(files, _source_root(source)),
            input_files=len(files),
            feature_shape=(len(numeric),),
            preprocessing=preprocessing,
        )


def _timeseries_etl(spark: SparkSession, cfg: PipelineConfig) -> dict:
    source, window = cfg.source, cfg.source.window
    if cfg.split.method != "time" or cfg.split.time_column != source.time_column:
        raise DataError(f"a time series needs split.method time with split.time_column '{source.time_column}'")
    files = tables.source_files(source.path)
    with tables.checked_table(spark, source, files, _scratch(cfg)) as checked:
        counts, reasons = _quarantine(checked, tables.is_clean(), cfg)
        tables.check_duplicates(checked, reasons, source, cfg.quarantine_dir)
        inputs = source.input_columns
        clean = tables.with_raw_features(checked.where(tables.is_clean()), inputs)
        steps, _, quality = _split(clean, [], cfg, counts["rows_clean"], *_quality_columns(source))
        scaler = fit_scaler(_train(steps), tables.raw_feature_values(inputs), cfg.normalize, 1, names=inputs)
        scaled = steps.withColumn("features", scaler.column(tables.raw_feature_values(inputs)))
        windows = sliding_windows(scaled, window, source.time_column, source.series_key, source.target)
        dataset = dataset_columns(windows, cfg.output.keep_raw, labelled=False, extra=("target",))
        preprocessing = {
            "inputs": inputs,
            "target": source.target,
            "target_index": inputs.index(source.target),
            "time_column": source.time_column,
            "series_key": source.series_key,
            "window": window.model_dump(),
            "scaler": scaler.to_dict(),
        }
        baselines = lambda written: {  # noqa: E731
            "baselines": forecast_baselines(written, len(inputs), inputs.index(source.target), source.ridge_lags)
        }
        balance = class_balance(windows, [])  # the dataset rows are windows, not the clean steps
        check_split_sizes(split_sizes(balance), cfg.split)
        return _write(
            cfg, dataset, counts, reasons, [], balance,
            quality=quality,
            describe_written=baselines if cfg.output.keep_raw else None,
            input_hash=file_content_hash(files, _source_root(source)),
            input_files=len(files),
            feature_shape=(window.length, len(inputs)),
            preprocessing=preprocessing,
        )


def _text_etl(spark: SparkSession, cfg: PipelineConfig) -> dict:
    source = cfg.source
    files = tables.source_files(source.path)
    tokenized = partial(text.tokenize, source=source)
    with tables.checked_table(spark, source, files, _scratch(cfg), check=tokenized) as checked:
        counts, reasons = _quarantine(checked, tables.is_clean(), cfg)
        tables.check_duplicates(checked, reasons, source, cfg.quarantine_dir)
        clean, classes = _encoded_labels(checked.where(tables.is_clean()), source.label)
        clean = text.with_length(clean.withColumn("text", sql.column(source.text_column)), source.max_length)
        declared, never_null = _quality_columns(source)
        rows, balance, quality = _split(clean, classes, cfg, counts["rows_clean"], [*declared, "length"], never_null)
        vocabulary = text.fit_text_vocabulary(_train(rows), source)
        indexed = text.token_ids(rows, vocabulary, source.max_length)
        keep_raw = cfg.output.keep_raw
        dataset = dataset_columns(indexed, keep_raw, bool(classes), features=("features", "length"), raw="text")
        preprocessing = {
            "text_column": source.text_column,
            "token_pattern": source.token_pattern,
            "lowercase": source.lowercase,
            "min_token_length": source.min_token_length,
            "max_length": source.max_length,
            "pad_id": text.PAD_ID,
            "vocabulary": vocabulary.to_dict(),
        }
        return _write(
            cfg, dataset, counts, reasons, classes, balance,
            quality=quality,
            input_hash=file_content_hash(files, _source_root(source)),
            input_files=len(files),
            feature_shape=(source.max_length,),
            preprocessing=preprocessing,
        )


@spark_step("quarantine")
def _quarantine(checked: DataFrame, is_clean: Column, cfg: PipelineConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Write the quarantine, reconcile the counts and enforce `max_bad_fraction`: (counts, reason -> rows).

    The rows are counted by the pass that writes the quarantine (it reads every checked row anyway).
    """
    counted = Observation("rows")
    write_quarantine(quarantine_rows(checked.observe(counted, *row_counts(is_clean))), cfg.quarantine_dir)
    counts, reasons = counted.get, quarantine_reasons(cfg.quarantine_dir, checked.sparkSession)
    most = "; ".join(f"{reason} ({rows})" for reason, rows in sorted(reasons.items(), key=lambda r: -r[1])[:3])
    log.info("rows in %d: %d clean, %d quarantined%s", counts["rows_in"], counts["rows_clean"],
             counts["rows_quarantined"], f" (most: {most})" if most else "", extra={"fields": dict(counts)})
    check_counts(counts, cfg.source.max_bad_fraction, cfg.quarantine_dir, reasons)
    return counts, reasons


def _split(clean: DataFrame, classes: list[str], cfg: PipelineConfig, total: int, quality_columns: list[str],
           never_null: Collection[str] = ()) -> tuple[DataFrame, dict, dict]:
    """(the `total` clean rows with `split`, rows per split and class, their quality report over `quality_columns`):
    DataError, before anything is fitted, when the splits do not add up or one is empty. One pass computes both."""
    rows = split_rows(clean, "id", "label" if classes else None, cfg.split)
    quality = quality_report(rows, quality_columns, classes, never_null)
    balance = reported_balance(quality, classes)
    sizes = split_sizes(balance)
    log.info("split train/val/test = %s", "/".join(str(sizes[split]) for split in SPLITS), extra={"fields": sizes})
    check_split_sizes(sizes, cfg.split, total)
    return rows, balance, quality


def _encoded_labels(clean: DataFrame, label_col: str | None) -> tuple[DataFrame, list[str]]:
    """(rows with the int `label` of `label_col`, class names); unchanged rows and no classes without a label."""
    if not label_col:
        return clean, []
    clean = clean.withColumn("label", sql.column(label_col).cast("string"))
    classes = class_names(clean, "label")
    return encode_labels(clean, "label", classes), classes


def _train(rows: DataFrame) -> DataFrame:
    """The train split: the only rows any preprocessing is fitted on."""
    return rows.where(F.col("split") == "train")


def _quality_columns(source: FileSource) -> tuple[list[str], set[str]]:
    """(the declared columns the quality report describes: all but a single key column (it is `id`), those of them
    a clean row always has a value in)."""
    return [c.name for c in source.columns if c.name != source.key], tables.required_columns(source)


def _scratch(cfg: PipelineConfig) -> Path:
    """Where the checked rows are kept while the ETL runs (a folder next to this path, removed after)."""
    return cfg.run_dir / "checked"


def _source_root(source: FileSource) -> Path:
    """The folder input paths are hashed relative to: the source folder, or a single file's parent."""
    return source.path.resolve() if source.path.is_dir() else source.path.resolve().parent


def _write(cfg, dataset, counts, reasons, classes, balance, *, quality, describe_written=None,
           **manifest_fields) -> dict:
    """Build the manifest (the dataset rows per split and class: `balance`) and write the dataset with it;
    returns the manifest as written."""
    counts = counts | split_sizes(balance)
    manifest = build_manifest(
        cfg, dataset=dataset, classes=classes, counts=counts, balance=balance, quarantine_reasons=reasons,
        **manifest_fields,
    )
    if "raw_features" in dataset.columns:  # what the scorer sees: drift is checked against its train distribution
        manifest["reference_distribution"] = fit_reference(_train(dataset), "raw_features")
    world_size = cfg.train.world_size if cfg.model else 1  # an ETL-only pipeline has no ranks to shard for
    log.info("preprocessing fitted on the train split; writing the dataset to %s", cfg.dataset_dir)
    return write_dataset(dataset, cfg.dataset_dir, manifest, quality, cfg.output, world_size, describe_written)
