"""10,000,000 rows through the real ETL and the real scorer, each a `dlpipe` process whose Spark driver JVM is
capped at 1 GiB of heap (`spark.driver.memory=1g`, checked on the JVM's command line).

In `local[2]` the executor's tasks run inside the driver JVM, so that one 1 GiB heap holds the driver and the
executor: stricter than the 1 GiB driver + 2 GiB executor of a cluster. Sorts, shuffles and the cache spill to
disk instead of running out of memory; the JVM's peak resident memory (heap plus metaspace, code, threads and
direct buffers) is recorded.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mlflow
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pyspark.sql import functions as F

from dl.models import build_model
from dl.serving import log_and_register
from jobs.config import load_config
from jobs.tracking import use_experiment
from peak_memory import run_measured
from pipelines.dataset import read_manifest
from registry_helpers import tracking

ROWS = 10_000_000
BAD_EVERY = 1_000_000  # every millionth row has a NaN feature: 10 quarantined rows
FEATURES = 4
DRIVER_HEAP = "1g"
JVM_RSS_LIMIT_MIB = 2048  # 1 GiB heap + non-heap: a JVM that kept rows on the heap would die, not grow past this
SAMPLE_ROWS = 20_000  # rows the tiny model trains on for its one epoch


def _config(root: Path, source: Path) -> Path:
    path = root / "load.yaml"
    path.write_text(yaml.safe_dump({
        "name": "load-10m",
        "run_dir": str(root / "run"),
        "source": {
            "kind": "parquet", "path": str(source), "key": "id", "label": "kind", "max_bad_fraction": 0.001,
            "columns": [{"name": "id", "type": "long", "nullable": False},
                        *[{"name": f"f{j}", "type": "double", "nullable": False} for j in range(FEATURES)],
                        {"name": "kind", "type": "string", "nullable": False, "allowed": ["a", "b"]}],
        },
        "spark": {"master": "local[2]", "driver_memory": DRIVER_HEAP, "shuffle_partitions": 8},
        "split": {"method": "hash", "seed": 1},  # no global sort: each row's own hash bucket
        "normalize": {"method": "zscore", "per": "feature"},
        "output": {"files_per_split": 2},
        "model": {"kind": "mlp", "hidden": [8]},
        "score": {"batch_size": 8192},
    }))
    return path


def _driver(measured) -> tuple[float, list[str]]:
    """(peak RSS MiB, command line) of the Spark driver JVM the dlpipe process started."""
    def is_driver(cmd: list[str]) -> bool:  # the JVM running SparkSubmit, not spark-class's launcher
        return bool(cmd) and cmd[0].endswith("java") and "org.apache.spark.deploy.SparkSubmit" in cmd \
            and "org.apache.spark.launcher.Main" not in cmd

    return measured.peak(is_driver)


def _dlpipe(root: Path, *args: str):
    measured = run_measured([sys.executable, "-m", "jobs.cli", *args], cwd=root, timeout_s=3000)
    assert measured.returncode == 0, measured.stderr[-4000:]
    peak_mib, command = _driver(measured)
    assert f"-Xmx{DRIVER_HEAP}" in command, command  # the cap is real: a fresh JVM started with it
    assert "OutOfMemoryError" not in measured.stderr
    assert peak_mib < JVM_RSS_LIMIT_MIB, f"driver JVM peaked at {peak_mib:.0f} MiB"
    return measured, peak_mib


def _parquet_rows(*paths: Path) -> int:
    return sum(ds.dataset(str(path), format="parquet").count_rows() for path in paths)


def _register_tiny_model(config: Path) -> str:
    """One epoch of the pipeline's MLP on a sample of the train split; registered with the dataset's manifest."""
    cfg = load_config(config)
    manifest = read_manifest(cfg.dataset_dir)
    train_split = ds.dataset(str(cfg.dataset_dir / "split=train"), format="parquet")
    sample = train_split.head(SAMPLE_ROWS, columns=["features", "label"])
    features = torch.from_numpy(pc.list_flatten(sample.column("features")).to_numpy().reshape(-1, FEATURES).copy())
    labels = torch.from_numpy(sample.column("label").to_numpy().astype("int64"))
    torch.manual_seed(0)
    network = build_model(cfg.model, tuple(manifest["feature_shape"]), len(manifest["classes"]))
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    for batch in torch.randperm(len(labels)).split(256):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(features[batch]), labels[batch]).backward()
        optimizer.step()
    with tracking(cfg.tracking_uri):
        use_experiment(cfg)
        with mlflow.start_run(run_name="load-tiny-mlp"):
            mlflow.log_dict(manifest, "manifest.json")  # the drift check's reference distribution
            version = log_and_register(network.eval(), cfg, manifest)
    return f"models:/{version.name}/{version.version}"


@pytest.fixture(scope="module")
def ten_million_rows(spark, tmp_path_factory) -> Path:
    """10M rows of id, 4 numeric features and a class, generated and written by Spark; 10 have a NaN."""
    root = tmp_path_factory.mktemp("load")
    bad = F.col("id") % BAD_EVERY == 7
    spark.range(ROWS, numPartitions=4).select(
        "id",
        F.when(bad, F.lit(float("nan"))).otherwise(F.randn(seed=0)).alias("f0"),
        *[F.randn(seed=j).alias(f"f{j}") for j in range(1, FEATURES)],
        F.when(F.rand(seed=9) < 0.3, "b").otherwise("a").alias("kind"),
    ).write.parquet(str(root / "source"))
    return root


@pytest.mark.slow
@pytest.mark.load
def test_etl_and_scoring_of_ten_million_rows_with_a_one_gigabyte_driver(ten_million_rows):
    root = ten_million_rows
    config = _config(root, root / "source")

    etl, etl_peak = _dlpipe(root, "etl", str(config))
    manifest = read_manifest(root / "run" / "dataset")
    counts = manifest["counts"]
    assert (counts["rows_in"], counts["rows_clean"], counts["rows_quarantined"]) == (ROWS, ROWS - 10, 10)
    assert counts["train"] + counts["val"] + counts["test"] == counts["rows_clean"]
    splits = [root / "run" / "dataset" / f"split={split}" for split in ("train", "val", "test")]
    assert _parquet_rows(*splits) == ROWS - 10
    quarantine = pq.read_table(root / "run" / "quarantine")
    assert quarantine.num_rows == 10
    assert set(quarantine.column("reason").to_pylist()) == {"column 'f0': NaN or infinite"}

    model_uri = _register_tiny_model(config)
    predictions = root / "predictions"
    score, score_peak = _dlpipe(root, "score", str(config), "--model", model_uri,
                                "--input", str(root / "run" / "dataset" / "split=*"), "--output", str(predictions))
    summary = re.search(r"score: done in ([\d.]+)s rows_in=(\d+) rows_out=(\d+)", score.stdout + score.stderr)
    assert summary, score.stderr[-3000:]
    assert int(summary[2]) == int(summary[3]) == counts["rows_clean"]
    assert _parquet_rows(predictions) == counts["rows_clean"] and (predictions / "_SUCCESS").is_file()
    classes = pq.read_table(predictions, columns=["prediction"]).column("prediction")
    assert set(pc.unique(classes).to_pylist()) <= {0, 1}
    print(f"\n10M rows: etl {etl.seconds:.0f} s, driver JVM peak RSS {etl_peak:.0f} MiB; "
          f"score {score.seconds:.0f} s, driver JVM peak RSS {score_peak:.0f} MiB "
          f"({json.dumps({k: counts[k] for k in ('train', 'val', 'test')})})")
