"""Scoring benchmark: a registered model over Parquet, dlpipe's Spark scorer against its two limits and MLflow's UDF.

    python -m bench.scoring [--cnn-rows N ...] [--autoencoder-rows N ...] [--udf-rows N] [--repeats 3]

Side by side in one run, rows/s over the same N rows of raw features (the model's input):
  - in-memory torch: the registered model's `predict_columns` over one NumPy matrix (the compute limit);
  - Spark pass-through: the same columns through an identity `mapInArrow`, written to Parquet (Spark's I/O limit);
  - dlpipe `score_parquet` (`mapInArrow`, model loaded once per Python worker);
  - `mlflow.pyfunc.spark_udf` on the same registered version (what users reach for today).
The models are shipped architectures with random weights (scoring cost does not depend on their values): the
digits CNN (conf/digits_cnn.yaml, 64 features: compute-bound) and the tabular autoencoder of
conf/breast_cancer_anomaly.yaml on 32 features (I/O-bound). Driver peak RSS (JVM + Python) is sampled for every
Spark path; several `--rows` sizes show whether it stays flat as the input grows.
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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
- **Data and models**: N rows of raw features (`raw_features: list<float>`, 0..255) in 4 Parquet files, for
  two shipped architectures with random weights (scoring cost does not depend on their values), registered in
  a sqlite MLflow store through `log_and_register`: the digits CNN of `conf/digits_cnn.yaml` (64 features,
  compute-bound) and the tabular autoencoder of `conf/breast_cancer_anomaly.yaml` on 32 features (anomaly
  score + flag; I/O-bound).
- **Paths, side by side, medians of the repeats** (the Spark paths round-robin): in-memory torch
  (`predict_columns` over one NumPy matrix in a process of its own, batches of `score.batch_size`: the compute
  reference); Spark pass-through (the same columns through an identity `mapInArrow`, written to Parquet:
  Spark's I/O limit); dlpipe's `score_parquet` (`mapInArrow`, model loaded once per Python worker, Arrow's
  flat list values reshaped to [N, D] with no per-row Python); `mlflow.pyfunc.spark_udf` on the same
  registered version (`env_manager="local"`), only up to `--udf-rows` rows (at its speed millions of rows take
  most of an hour).
  Spark: `local[*]`, `spark.driver.memory=2g`.
- **Driver peak RSS**: this process plus the driver JVM, sampled every 50 ms, at each input size (it should
  stay flat as the input grows). The in-memory reference runs first, in a process of its own (its row reports
  that process), so the whole-input matrix never sits in the driver the Spark paths are measured in."""
NOTES = """\
Goals (issue 7): each model >= 0.8x the lower of its two limits, and >= 2x `spark_udf`; driver memory flat as
the input grows. The record above is at the issue's full sizes (2,000,000 rows for the CNN, 10,000,000 for the
32-feature autoencoder) plus a smaller size each, with no other jobs on the machine (though every rate in it
is 20-30% below a run an hour earlier: the shared host was slower).

- **Autoencoder (I/O-bound): both goals met.** At 10M rows dlpipe scores 543k rows/s, 1.45x Spark's own
  pass-through (it writes a few output columns where the pass-through writes the 32 input values back), and
  at 1M rows 12.5x `spark_udf`. `spark_udf` pays for pandas: each batch's array column becomes a Series of
  per-row arrays that the model stacks row by row, where `mapInArrow` reshapes Arrow's flat values once per
  batch.
- **CNN (compute-bound): both goals met at 2M rows, the first by a margin the reference's noise can erase.**
  dlpipe scores 40.3k rows/s: 0.94x in-memory torch (43.0k) and 2.3x `spark_udf` (17.4k). Two earlier runs
  the same evening gave 1.09x (reference 50k) and 0.74x (reference 80k): dlpipe's own rate moves less than
  the in-memory reference, which depends on how torch's intra-op threads get the two cores. On 2 cores the
  Spark paths also share the CPU with the JVM reading and writing Parquet: adding the measured costs per row
  of the 0.74x run (1/252k s of I/O at the pass-through's rate, 1/80k s of compute) bounds a scorer on these
  cores at ~61k rows/s, and dlpipe's 59k then was 97% of it. At 200k rows dlpipe is 0.65x and 1.76x
  `spark_udf`: Spark's job start and one model load per Python worker weigh more there.
- **Driver peak RSS** (Python driver + JVM; the in-memory reference runs in a process of its own, so the
  driver never holds the input): autoencoder 2,310 MB at 1M rows and 2,349 MB at 10M (+2% for 10x the rows);
  CNN 1,652 MB at 200k and 2,290 MB at 2M, the first sizes of the run, while the JVM heap grows toward its 2 GB
  limit. No path collects rows to the driver.

Earlier runs on the loaded machine (load average 5-20) swung the in-memory reference up to 18x between
rounds; compare ratios within one quiet record."""


CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class BenchModel:
    """A shipped architecture to register with random weights, and the raw inputs it scores."""

    conf: str
    feature_shape: tuple[int, ...]
    classes: tuple[str, ...]
    scaler: FittedScaler
    task_state: dict | None = None

    @property
    def width(self) -> int:
        return int(np.prod(self.feature_shape))


MODELS = {
    "cnn": BenchModel("digits_cnn.yaml", (1, 8, 8), tuple(str(i) for i in range(10)),
                      FittedScaler("zscore", "channel", 64, (80.0,), (100.0,))),
    "autoencoder": BenchModel("breast_cancer_anomaly.yaml", (32,), ("benign", "malignant"),
                              FittedScaler("zscore", "feature", 1, (128.0,) * 32, (74.0,) * 32), {"threshold": 1.0}),
}


def write_input(path: Path, rows: int, width: int, files: int = 4) -> Path:
    """`rows` raw rows (id, label, raw_features: `width` values 0..255) in `files` Parquet files, written once."""
    if path.is_dir() and pq.ParquetDataset(path).files and sum(
        pq.ParquetFile(f).metadata.num_rows for f in pq.ParquetDataset(path).files
    ) == rows:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, chunk in enumerate(np.array_split(np.arange(rows), files)):
        values = rng.integers(0, 256, size=(len(chunk), width)).astype(np.float32)
        table = pa.table({
            "id": pa.array([f"row-{i}" for i in chunk]),
            "label": pa.array(rng.integers(0, 10, len(chunk)).astype(np.int32)),
            "raw_features": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width).cast(
                pa.list_(pa.float32())
            ),
        })
        pq.write_table(table, path / f"part-{index:02d}.parquet", row_group_size=65536)
    return path


def register_model(root: Path, bench: BenchModel) -> tuple[str, object]:
    """Register `bench`'s architecture (random weights) in a sqlite store under `root`; return (model URI, config)."""
    cfg = load_config(CONF / bench.conf, [f"run_dir={root / 'run'}", "spark.master=local[*]", "spark.driver_memory=2g"])
    use_experiment(cfg)
    manifest = {
        "source": {"kind": "bench", "content_hash": "bench"},
        "feature_shape": list(bench.feature_shape),
        "classes": list(bench.classes),
        "preprocessing": {"scaler": bench.scaler.to_dict()},
    }
    outputs = 0 if bench.task_state else len(bench.classes)  # an autoencoder's outputs are its inputs
    with mlflow.start_run(run_name="bench-scoring"):
        version = log_and_register(build_model(cfg.model, bench.feature_shape, outputs), cfg, manifest,
                                   bench.task_state)
    return f"models:/{version.name}/{version.version}", cfg


def timed(run: Callable[[], int]) -> tuple[float, int, int]:
    """(seconds, rows, driver peak RSS bytes) of one run."""
    with PeakRss(recursive=False) as rss:  # python + the driver JVM (not the Python workers)
        started = time.perf_counter()
        rows = run()
        seconds = time.perf_counter() - started
    return seconds, rows, rss.peak


PATHS = (
    "in-memory torch (`predict_columns`, the compute limit)",
    "Spark pass-through (identity `mapInArrow`, the I/O limit)",
    "dlpipe `score_parquet` (`mapInArrow`)",
    "`mlflow.pyfunc.spark_udf`",
)


def run_model(name: str, sizes: list[int], repeats: int, data_dir: Path, udf_rows: int) -> dict:
    """One model at every size: each path `repeats` times, round-robin; `spark_udf` only up to `udf_rows` rows."""
    bench = MODELS[name]
    work = Path(tempfile.mkdtemp(prefix=f"dlpipe-bench-scoring-{name}-"))
    try:
        model_uri, cfg = register_model(work, bench)
        spark = spark_session(cfg.spark, "dlpipe-bench-scoring")
        udf = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local")
        return {"model": name, "width": bench.width, "repeats": repeats, "sizes": [
            _run_size(spark, model_uri, udf, cfg, write_input(data_dir / f"scoring-{name}-{rows}", rows,
                                                              bench.width), rows, repeats, work, udf_rows)
            for rows in sizes
        ]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _in_memory_runs(model_uri: str, tracking_uri: str, registry_uri: str, inputs: Path, rows: int,
                    batch_size: int, repeats: int) -> list[tuple[float, int, int]]:
    """The in-memory reference, `repeats` timed runs of `predict_columns` over the whole input as one matrix.

    It runs in a process of its own: the matrix (and the allocator's hold on it after it is freed) never sits in
    the driver whose RSS the Spark paths report."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    model, *_ = load_scoring_model(model_uri)
    matrix = pq.read_table(inputs, columns=["raw_features"]).column(0).combine_chunks().flatten()
    matrix = matrix.to_numpy().reshape(rows, -1)

    def in_memory() -> int:
        columns = model.predict_columns(matrix, batch_size=batch_size)
        return len(next(iter(columns.values())))

    return [timed(in_memory) for _ in range(repeats)]


def _run_size(spark, model_uri, udf, cfg, inputs: Path, rows: int, repeats: int, work: Path, udf_rows: int) -> dict:
    source = spark.read.parquet(str(inputs))

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

    spark_paths = dict(zip(PATHS[1:], (pass_through, dlpipe_scorer, mlflow_spark_udf)))
    if rows > udf_rows:  # at ~10-20k rows/s, spark_udf over millions of rows would take most of an hour
        del spark_paths[PATHS[3]]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        reference = child.submit(_in_memory_runs, model_uri, mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
                                 inputs, rows, cfg.score.batch_size, repeats)
        samples = {PATHS[0]: reference.result()}
    samples |= {name: [] for name in spark_paths}  # the Spark paths run round-robin
    for _ in range(repeats):
        for name, path in spark_paths.items():
            samples[name].append(timed(path))
    results = {}
    for name, runs in samples.items():
        rates = [count / seconds for seconds, count, _ in runs]
        results[name] = {"rows_per_s": statistics.median(rates), "peak_rss_mb": max(r[2] for r in runs) / 2**20,
                         "runs": runs}
    limit = min(results[PATHS[0]]["rows_per_s"], results[PATHS[1]]["rows_per_s"])
    for result in results.values():
        result["vs_lower_limit"] = result["rows_per_s"] / limit
    report = {"rows": rows, "results": results}
    if PATHS[3] in results:
        report["dlpipe_vs_spark_udf"] = results[PATHS[2]]["rows_per_s"] / results[PATHS[3]]["rows_per_s"]
    return report


def run(cnn_rows: list[int], autoencoder_rows: list[int], repeats: int, data_dir: Path, udf_rows: int) -> dict:
    """Both models at their sizes (see `run_model`)."""
    return {"models": [run_model(name, sizes, repeats, data_dir, udf_rows)
                       for name, sizes in (("cnn", cnn_rows), ("autoencoder", autoencoder_rows)) if sizes],
            "udf_rows": udf_rows}


def markdown_table(report: dict) -> str:
    """Per model and size: rows/s, ratio to the lower limit and driver peak RSS per path; dlpipe vs `spark_udf`."""
    lines = []
    for model in report["models"]:
        lines += [f"**{model['model']}** ({model['width']} raw features per row); medians of {model['repeats']} runs",
                  "", "| rows | path | rows/s | vs lower limit | driver peak RSS | rows/s per round |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for size in model["sizes"]:
            for name, result in size["results"].items():
                rounds = " / ".join(f"{count / seconds:,.0f}" for seconds, count, _ in result["runs"])
                lines.append(f"| {size['rows']:,} | {name} | {result['rows_per_s']:,.0f} | "
                             f"{result['vs_lower_limit']:.2f} | {result['peak_rss_mb']:,.0f} MB | {rounds} |")
        versus = [f"{size['dlpipe_vs_spark_udf']:.2f}x at {size['rows']:,} rows" for size in model["sizes"]
                  if "dlpipe_vs_spark_udf" in size]
        lines += ["", f"dlpipe vs `spark_udf`: {', '.join(versus) or 'not measured'} "
                      f"(`spark_udf` runs up to {report['udf_rows']:,} rows).", ""]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--cnn-rows", type=int, nargs="*", default=[200_000], help="sizes for the digits CNN")
    parser.add_argument("--autoencoder-rows", type=int, nargs="*", default=[1_000_000],
                        help="sizes for the 32-feature autoencoder")
    parser.add_argument("--udf-rows", type=int, default=200_000, help="largest size spark_udf runs at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("runs/bench"), help="where generated inputs are cached")
    parser.add_argument("--json", type=Path, help="also write the full report as JSON here")
    args = parser.parse_args(argv)
    return publish("scoring", argv, lambda: run(args.cnn_rows, args.autoencoder_rows, args.repeats, args.data_dir,
                                                 args.udf_rows), markdown_table, args.json)


if __name__ == "__main__":
    main()
