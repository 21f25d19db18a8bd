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
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from bench.common import PeakRss
from bench.report import publish
from dl.models import build_model
from dl.serving import load_scoring_model, log_and_register
from jobs.config import load_config
from jobs.tracking import use_experiment
from pipelines.scaling import FittedScaler
from pipelines.scoring import score_parquet
from pipelines.spark import spark_session

TITLE = "Scoring: a registered model over Parquet with Spark"
METHOD = """\
- **Data and model**: N rows of 64 raw features (`raw_features: list<float>` 0..255, the digits CNN's input) in
  4 Parquet files; the digits CNN architecture of `conf/digits_cnn.yaml` (random weights: scoring cost does not
  depend on their values), registered in a sqlite MLflow store through `log_and_register`.
- **Paths, side by side, round-robin, medians of the repeats**: in-memory torch (`predict_arrays` over one NumPy
  matrix in the driver process, batches of 1,024: the compute reference); Spark pass-through (the same columns
  through an identity `mapInArrow`, written to Parquet: Spark's I/O limit); dlpipe's `score_parquet`
  (`mapInArrow`, model loaded once per Python worker, Arrow's flat list values reshaped to [N, 64] with no
  per-row Python); `mlflow.pyfunc.spark_udf` on the same registered version (`env_manager="local"`). Spark:
  `local[*]`, `spark.driver.memory=2g`.
- **Driver peak RSS**: this process plus the driver JVM, sampled every 50 ms."""
NOTES = """\
The in-memory reference swings most with the load from other jobs (torch's intra-op threads suffer most on a
contended CPU; an earlier run saw it move 18x between rounds), so the "vs lower limit" ratio of a run on the
shared machine is not trustworthy: in the quietest round of that run dlpipe reached 0.25 of in-memory torch,
below the >= 0.8 goal, in the noisiest 3.2. What stayed consistent in every round is **dlpipe vs
`spark_udf`** (2.0x, 3.0x, 2.2x then; goal >= 2x). `spark_udf` pays for pandas: each batch's array column
becomes a Series of per-row arrays that the model stacks row by row, where `mapInArrow` reshapes Arrow's flat
values once per batch.

The record above (2026-11-23, 200,000 rows, load average ~5) repeats the pattern: in-memory torch swung 8x
between rounds (58,523 / 11,178 / 7,580 rows/s), so its ratio again says little, while dlpipe vs `spark_udf`
held at 1.58x, 1.73x, 1.36x per round (median 1.64x): consistently ahead, but **below the >= 2x goal in this
run**. A 20,000-row run at load ~20 just before came out level (1.02x): at that size Spark's job start-up and
the model load in each Python worker dominate both paths.

Still to do: a run on a quiet machine (the compute-limit ratio needs it); the issue's full sizes (2,000,000
rows for the CNN, 10,000,000 for a 32-feature autoencoder), and driver RSS at two input sizes to show it stays
flat."""
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
        "source": {"kind": "image_folder", "content_hash": "bench"},
        "feature_shape": list(SHAPE),
        "classes": [str(i) for i in range(10)],
        "preprocessing": {"scaler": scaler.to_dict()},
    }
    with mlflow.start_run(run_name="bench-scoring"):
        version = log_and_register(build_model(cfg.model, SHAPE, 10), cfg, manifest)
    return f"models:/{version.name}/{version.version}", cfg


def timed(run: Callable[[], int]) -> tuple[float, int, int]:
    """(seconds, rows, driver peak RSS bytes) of one run."""
    with PeakRss(recursive=False) as rss:  # python + the driver JVM (not the Python workers)
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
    return {"rows": rows, "repeats": repeats, "results": results,
            "dlpipe_vs_spark_udf": dlpipe_rate / udf_rate}


def markdown_table(report: dict) -> str:
    """Rows/s, ratio to the lower limit and driver peak RSS per path; dlpipe vs `spark_udf` and per-round rates."""
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
    lines.append(f"dlpipe vs `spark_udf`: {report['dlpipe_vs_spark_udf']:.2f}x. Per round (rows/s): " + "; ".join(
        f"{name.split(' (')[0]} " + " / ".join(f"{count / seconds:,.0f}" for seconds, count, _ in result["runs"])
        for name, result in report["results"].items()) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("runs/bench"), help="where generated inputs are cached")
    parser.add_argument("--json", type=Path, help="also write the full report as JSON here")
    args = parser.parse_args(argv)
    return publish("scoring", argv, lambda: run(args.rows, args.repeats, args.data_dir), markdown_table, args.json)


if __name__ == "__main__":
    main()
