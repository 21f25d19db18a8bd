"""Scoring benchmark: a registered model over Parquet, dlpipe's Spark scorer against its two limits and MLflow's UDF.

Side by side in one run, rows/s over the same N rows of 64 raw features (the digits CNN's input):
  - in-memory torch: the registered model's `predict_arrays` over one NumPy matrix (the compute limit);
  - Spark pass-through: the same columns through an identity `mapInArrow`, written to Parquet (Spark's I/O limit);
  - dlpipe `score_parquet` (`mapInArrow`, model loaded once per Python worker);
  - `mlflow.pyfunc.spark_udf` on the same registered version (what users reach for today).
The model is the shipped digits CNN architecture (conf/digits_cnn.yaml) with random weights: scoring cost does
not depend on the weights' values. Driver peak RSS (JVM + Python) is sampled for every Spark path.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from bench.loader import machine
from dl.models import build_model
from dl.serving import load_scoring_model, log_and_register
from jobs.config import load_config
from jobs.tracking import use_experiment
from pipelines.scaling import FittedScaler
from pipelines.scoring import score_parquet
from pipelines.spark import spark_session

CONF = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"
SHAPE = (1, 8, 8)
WIDTH = 64


def write_input(path: Path, rows: int, files: int = 4) -> Path:
    """`rows` raw digit-like rows (id, label, raw_features 0..255) in `files` Parquet files, written once."""
    if path.is_dir() and pq.ParquetDataset(path).files and sum(
        pq.ParquetFile(f).metadata.num_rows for f in pq.ParquetDataset(path).files
    ) == rows:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, chunk in enumerate(np.array_split(np.arange(rows), files)):
        values = rng.integers(0, 256, size=(len(chunk), WIDTH)).astype(np.float32)
        table = pa.table({
            "id": pa.array([f"row-{i}" for i in chunk]),
            "label": pa.array(rng.integers(0, 10, len(chunk)).astype(np.int32)),
            "raw_features": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), WIDTH).cast(
                pa.list_(pa.float32())
            ),
        })
        pq.write_table(table, path / f"part-{index:02d}.parquet", row_group_size=65536)
    return path


def register_model(root: Path) -> tuple[str, object]:
    """Register the digits CNN (random weights) in a sqlite store under `root`; return (model URI, config)."""
    cfg = load_config(CONF, [f"run_dir={root / 'run'}", "spark.master=local[*]", "spark.driver_memory=2g"])
    use_experiment(cfg)
    scaler = FittedScaler("zscore", "channel", WIDTH, (80.0,), (100.0,))
    manifest = {
        "source": {"content_hash": "bench"},
        "feature_shape": list(SHAPE),
        "classes": [str(i) for i in range(10)],
        "preprocessing": {"scaler": scaler.to_dict()},
    }
    with mlflow.start_run(run_name="bench-scoring"):
        version = log_and_register(build_model(cfg.model, SHAPE, 10), cfg, manifest)
    return f"models:/{version.name}/{version.version}", cfg


class PeakRss:
    """Samples the RSS of this process and its children (the Spark driver JVM) every 50 ms; keeps the peak."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me, *me.children(recursive=False)]  # python + the driver JVM (not the Python workers)
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(run: Callable[[], int]) -> tuple[float, int, int]:
    """(seconds, rows, driver peak RSS bytes) of one run."""
    with PeakRss() as rss:
        started = time.perf_counter()
        rows = run()
        seconds = time.perf_counter() - started
    return seconds, rows, rss.peak


def run(rows: int, repeats: int, data_dir: Path) -> dict:
    """Every path `repeats` times, round-robin; medians of rows/s and ratios to the lower of the two limits."""
    inputs = write_input(data_dir / f"scoring-input-{rows}", rows)
    work = Path(tempfile.mkdtemp(prefix="dlpipe-bench-scoring-"))
    try:
        model_uri, cfg = register_model(work)
        spark = spark_session(cfg.spark, "dlpipe-bench-scoring")
        model, *_ = load_scoring_model(model_uri)
        matrix = pq.read_table(inputs, columns=["raw_features"]).column(0).combine_chunks().flatten()
        matrix = matrix.to_numpy().reshape(rows, WIDTH)
        udf = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local")
        source = spark.read.parquet(str(inputs))

        def in_memory() -> int:
            prediction, _ = model.predict_arrays(matrix, batch_size=cfg.score.batch_size)
            return len(prediction)

        def pass_through() -> int:
            out = work / "passthrough"
            shutil.rmtree(out, ignore_errors=True)
            source.mapInArrow(lambda batches: batches, source.schema).write.parquet(str(out))
            return rows

        def dlpipe_scorer() -> int:
            return score_parquet(spark, model_uri, inputs, work / "dlpipe", batch_size=cfg.score.batch_size)["rows_out"]

        def mlflow_spark_udf() -> int:
            out = work / "spark_udf"
            shutil.rmtree(out, ignore_errors=True)
            scored = source.withColumn("scored", udf(F.struct(F.col("raw_features").alias("features"))))
            scored.select("id", "scored.*").write.parquet(str(out))
            return rows

        paths = {
            "in-memory torch (`predict_arrays`, the compute limit)": in_memory,
            "Spark pass-through (identity `mapInArrow`, the I/O limit)": pass_through,
            "dlpipe `score_parquet` (`mapInArrow`)": dlpipe_scorer,
            "`mlflow.pyfunc.spark_udf`": mlflow_spark_udf,
        }
        samples: dict[str, list[tuple[float, int, int]]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, path in paths.items():
                samples[name].append(timed(path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {}
    for name, runs in samples.items():
        rates = [count / seconds for seconds, count, _ in runs]
        results[name] = {"rows_per_s": statistics.median(rates), "peak_rss_mb": max(r[2] for r in runs) / 2**20,
                         "runs": runs}
    names = list(paths)
    limit = min(results[names[0]]["rows_per_s"], results[names[1]]["rows_per_s"])
    for name in names:
        results[name]["vs_lower_limit"] = results[name]["rows_per_s"] / limit
    dlpipe_rate, udf_rate = results[names[2]]["rows_per_s"], results[names[3]]["rows_per_s"]
    return {"rows": rows, "repeats": repeats, "machine": machine(), "results": results,
            "dlpipe_vs_spark_udf": dlpipe_rate / udf_rate}


def markdown_table(report: dict) -> str:
    lines = [
        f"{report['rows']:,} rows x 64 raw features, digits CNN; medians of {report['repeats']} runs",
        "",
        "| path | rows/s | vs lower limit | driver peak RSS |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in report["results"].items():
        lines.append(f"| {name} | {result['rows_per_s']:,.0f} | {result['vs_lower_limit']:.2f} | "
                     f"{result['peak_rss_mb']:,.0f} MB |")
    lines.append("")
    lines.append(f"dlpipe vs `spark_udf`: {report['dlpipe_vs_spark_udf']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("runs/bench"), help="where generated inputs are cached")
    parser.add_argument("--json", type=Path, help="also write the full report as JSON here")
    args = parser.parse_args(argv)
    report = run(args.rows, args.repeats, args.data_dir)
    print(markdown_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
