"""Loader benchmark: Parquet -> torch batches of 1,024, every path as a ratio to the raw pyarrow scan.

    python -m bench.loader [--rows 1000000] [--repeats 3] [--data-dir runs/bench] [--json PATH]

Each timing runs from opening the reader to the last torch batch; the table reports medians of the repeats,
run round-robin so that a noisy machine slows every path alike. petastorm is imported here only to be measured.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from bench.report import publish
from dl.arrow_loader import ArrowLoader

BATCH_SIZE = 1024
NUM_FEATURES = 32
NUM_FILES = 4
PETASTORM_ROW_CAP = 200_000
TITLE = "Loader: Parquet -> torch batches"
METHOD = f"""\
- **Data**: N rows x {NUM_FEATURES} float32 features as one `features: list<float>` column + `label: int32`,
  {NUM_FILES} Parquet files (one row group each), snappy, written once with pyarrow and cached under `runs/bench`.
- **What is timed**: from opening the reader to the last torch batch of {BATCH_SIZE:,} rows (`features` float32
  [B, {NUM_FEATURES}], `label` as tensors), nothing done with the batches but counting rows. Every path runs the
  repeats round-robin (so a noisy machine slows every path alike), after one untimed scan warms the page cache;
  the table shows the median. petastorm uses its defaults (thread pool of 10 workers); its row-by-row
  `DataLoader` is stopped after the first {PETASTORM_ROW_CAP:,} rows and reported as rows/s over what it read."""
NOTES = """\
How `ArrowLoader` gets there: it reads whole row groups (`ParquetFile.read_row_group`, projected to the
requested columns) in `prefetch` background threads, whose decoding runs in parallel outside the GIL. It
turns the list column into a [N, D] matrix by reshaping Arrow's flat values, with no per-row Python work,
wraps each row group as tensors once, and hands out batches as tensor slices. The consumer thread does
almost nothing per batch. The cost left is the row shuffle: one gather of each row group by a seeded
permutation (about 15 ms per 250,000 x 32 floats on this machine, plus the freshly allocated output).
That is the gap between the "shuffled" and "shuffle off" rows.

Earlier runs of the same benchmark on the same machine under similar shared load (medians of 3-5) gave
`ArrowLoader` world 1 (shuffled) 0.74, 0.69, 0.90, 0.55 and rank 0 of world 2 0.65, 0.90, 0.89, 0.71 of the
raw scan; in the least loaded of them (raw scan 3.2 M rows/s) 0.55 shuffled and 1.02 with shuffle off. The
spec's target (>= 0.5 of the raw scan) was met in every run, but not by much in that least-loaded one.
petastorm `BatchedDataLoader` gave 0.26-0.57 and `DataLoader` 0.06-0.12: its absolute rate (0.5-0.85 M
rows/s) hardly moves with the load, while the CPU-parallel Arrow paths lose most of their speed to it, so on a
busy machine petastorm's ratios come out higher than the spec's quiet-machine 0.07 and 0.012. A run at a
load average of ~30 (2026-11-23 00:07 UTC) showed the extreme of that: every path at 0.16-0.57 M rows/s and
the ratios bunched together (petastorm `BatchedDataLoader` 0.82 of the raw scan, `ArrowLoader` 1.23). The
record above was taken minutes later in a quiet spell (load ~2): raw scan 4.9 M rows/s, `ArrowLoader` 0.84
shuffled and 1.08 with shuffle off, petastorm 0.15 and 0.035, closer to the spec's anchors."""


def ensure_dataset(data_dir: str | Path, rows: int) -> Path:
    """The benchmark dataset (rows x 32 float32 as one list<float> column + int label, 4 snappy files), made once."""
    target = Path(data_dir) / f"loader_{rows}x{NUM_FEATURES}_{NUM_FILES}files"
    if (target / "_SUCCESS").exists():
        return target
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, rows, NUM_FILES + 1).astype(int)
    for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        count = int(stop - start)
        offsets = pa.array(np.arange(count + 1, dtype=np.int32) * NUM_FEATURES)
        values = pa.array(rng.standard_normal(count * NUM_FEATURES, dtype=np.float32))
        table = pa.table(
            {
                "features": pa.ListArray.from_arrays(offsets, values),
                "label": pa.array(rng.integers(0, 10, count, dtype=np.int32)),
            }
        )
        pq.write_table(table, staging / f"part-{part:05d}.parquet", compression="snappy")
    (staging / "_SUCCESS").touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _torch_batches(record_batches):
    """Slice Arrow record batches into torch batches of BATCH_SIZE (flat values reshaped, no per-row work)."""
    for record_batch in record_batches:
        features = record_batch.column("features")
        matrix = features.flatten().to_numpy().reshape(len(record_batch), -1)
        label = record_batch.column("label").to_numpy().astype(np.int64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            matrix, label = torch.from_numpy(matrix), torch.from_numpy(label)
        for start in range(0, len(record_batch), BATCH_SIZE):
            yield {"features": matrix[start : start + BATCH_SIZE], "label": label[start : start + BATCH_SIZE]}


def _count(batches, cap: int | None = None) -> int:
    rows = 0
    for batch in batches:
        rows += len(batch["label"])
        if cap is not None and rows >= cap:
            break
    return rows


def raw_scan(path: Path) -> int:
    table = pq.read_table(path, columns=["features", "label"])
    return _count(_torch_batches(table.to_batches()))


def arrow_dataset(path: Path) -> int:
    dataset = ds.dataset(path, format="parquet")
    return _count(_torch_batches(dataset.to_batches(columns=["features", "label"], batch_size=65_536)))


def _url(path: Path) -> str:
    return "file://" + str(path.resolve())  # not Path.as_uri(): petastorm does not unquote it


def petastorm_batched(path: Path) -> int:
    from petastorm import make_batch_reader
    from petastorm.pytorch import BatchedDataLoader

    with make_batch_reader(_url(path), schema_fields=["features", "label"], num_epochs=1) as reader:
        return _count(BatchedDataLoader(reader, batch_size=BATCH_SIZE))


def petastorm_rows(path: Path) -> int:
    from petastorm import make_batch_reader
    from petastorm.pytorch import DataLoader

    with make_batch_reader(_url(path), schema_fields=["features", "label"], num_epochs=1) as reader:
        return _count(DataLoader(reader, batch_size=BATCH_SIZE), cap=PETASTORM_ROW_CAP)


def dlpipe_loader(path: Path, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> int:
    return _count(ArrowLoader(path, batch_size=BATCH_SIZE, rank=rank, world_size=world_size, shuffle=shuffle))


PATHS = [
    ("`pyarrow.parquet.read_table` (the limit)", raw_scan),
    ("`pyarrow.dataset` batches of 65,536, sliced", arrow_dataset),
    ("petastorm `make_batch_reader` + `BatchedDataLoader`", petastorm_batched),
    (f"petastorm `make_batch_reader` + `DataLoader` (first {PETASTORM_ROW_CAP:,} rows)", petastorm_rows),
    ("dlpipe `ArrowLoader`, world 1 (shuffled)", dlpipe_loader),
    ("dlpipe `ArrowLoader`, rank 0 of world 2 (its half)", lambda path: dlpipe_loader(path, 0, 2)),
    ("dlpipe `ArrowLoader`, world 1, shuffle off (what the row shuffle costs)",
     lambda path: dlpipe_loader(path, shuffle=False)),
]


def run(rows: int, repeats: int, data_dir: str | Path) -> dict:
    """Time every path `repeats` times, round-robin; medians, rows/s and ratios to the raw scan."""
    path = ensure_dataset(data_dir, rows)
    raw_scan(path)  # warm the page cache so the first path timed is not the only one reading from disk
    seconds: dict[str, list[float]] = {name: [] for name, _ in PATHS}
    counted: dict[str, int] = {}
    for _ in range(repeats):
        for name, read in PATHS:
            started = time.perf_counter()
            counted[name] = read(path)
            seconds[name].append(time.perf_counter() - started)
    results = []
    for name, _ in PATHS:
        median = statistics.median(seconds[name])
        results.append({"path": name, "rows": counted[name], "seconds": seconds[name], "median_s": median,
                        "rows_per_s": counted[name] / median})
    limit = results[0]["rows_per_s"]
    for result in results:
        result["vs_raw_scan"] = result["rows_per_s"] / limit
    return {"rows": rows, "features": NUM_FEATURES, "files": NUM_FILES, "batch_size": BATCH_SIZE,
            "repeats": repeats, "dataset": str(path), "results": results}


def markdown_table(report: dict) -> str:
    """Rows/s per path and its ratio to the raw scan (medians of the repeats)."""
    lines = [f"{report['rows']:,} rows x {report['features']} float32, {report['files']} snappy files; "
             f"medians of {report['repeats']}.", "",
             "| path to torch batches of 1,024 | rows read | rows/s | vs raw scan |", "| --- | --- | --- | --- |"]
    for result in report["results"]:
        rate = result["rows_per_s"]
        shown = f"{rate / 1e6:.2f} M" if rate >= 1e6 else f"{rate / 1e3:.0f} k"
        lines.append(f"| {result['path']} | {result['rows']:,} | {shown} | {result['vs_raw_scan']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default="runs/bench", help="where the generated dataset is cached")
    parser.add_argument("--json", help="also write the full report (every timing) as JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    return publish("loader", argv, lambda: run(args.rows, args.repeats, args.data_dir), markdown_table, args.json)


if __name__ == "__main__":
    main()
