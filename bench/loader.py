"""Loader benchmark: Parquet -> torch batches of 1,024, every path as a ratio to the raw pyarrow scan.

    python -m bench.loader [--rows 1000000] [--repeats 3] [--data-dir runs/bench] [--json PATH]

Each timing runs from opening the reader to the last torch batch; the table reports medians of the repeats,
run round-robin so that a noisy machine slows every path alike. petastorm is imported here only to be measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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

from dl.arrow_loader import ArrowLoader

BATCH_SIZE = 1024
NUM_FEATURES = 32
NUM_FILES = 4
PETASTORM_ROW_CAP = 200_000


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


def machine() -> str:
    """CPU model, usable cores, OS and library versions, in one line."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import petastorm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{model}, {cores} cores, {platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"pyarrow {pa.__version__}, torch {torch.__version__}, petastorm {petastorm.__version__}"
    )


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
            "repeats": repeats, "machine": machine(), "dataset": str(path), "results": results}


def markdown_table(report: dict) -> str:
    lines = ["| path to torch batches of 1,024 | rows read | rows/s | vs raw scan |", "| --- | --- | --- | --- |"]
    for result in report["results"]:
        rate = result["rows_per_s"]
        shown = f"{rate / 1e6:.2f} M" if rate >= 1e6 else f"{rate / 1e3:.0f} k"
        lines.append(f"| {result['path']} | {result['rows']:,} | {shown} | {result['vs_raw_scan']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default="runs/bench", help="where the generated dataset is cached")
    parser.add_argument("--json", help="also write the full report (every timing) as JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    report = run(args.rows, args.repeats, args.data_dir)
    print(f"{report['rows']:,} rows x {NUM_FEATURES} float32, {NUM_FILES} snappy files; "
          f"median of {args.repeats}; {report['machine']}")
    print(markdown_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
