"""Training over a dataset larger than the trainer's memory streams it: a real 1-rank torchrun training epoch
over 4 GiB of decoded features peaks below a third of that in resident memory."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.scaling import FittedScaler
from peak_memory import run_measured

WIDTH = 256
GROUP_ROWS = 32 * 1024  # rows per Parquet row group: 32 MiB decoded, the size class the ETL writes
FILE_ROWS = 2 * GROUP_ROWS
TRAIN_ROWS = 64 * FILE_ROWS  # 4 Mi rows x 256 float32 = 4 GiB of decoded features
EVAL_ROWS = FILE_ROWS
CLASSES = ["a", "b"]


def _write_split(folder: Path, files: int, seed: int) -> None:
    """`files` Parquet files of FILE_ROWS rows: one written, the rest byte copies of it (the content does not
    matter here, the decoded size does). Features are small integers, dictionary-encoded, so the files stay
    small while every value still decodes to a float32; the label follows the first feature."""
    folder.mkdir(parents=True)
    values = np.random.default_rng(seed).integers(0, 16, (FILE_ROWS, WIDTH)).astype(np.float32)
    offsets = pa.array(np.arange(0, FILE_ROWS * WIDTH + 1, WIDTH, dtype=np.int32))
    table = pa.table({
        "id": pa.array(np.char.add("r", np.arange(FILE_ROWS).astype(str)), pa.string()),
        "label": pa.array((values[:, 0] >= 8).astype(np.int32)),
        "features": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
    })
    first = folder / "part-00000.parquet"
    pq.write_table(table, first, row_group_size=GROUP_ROWS, use_dictionary=True)
    for index in range(1, files):
        shutil.copyfile(first, folder / f"part-{index:05d}.parquet")


def _manifest(rows: dict[str, int]) -> dict:
    """The manifest fields training and the registered model read (dataset contract), for the synthetic table."""
    scaler = FittedScaler("zscore", "feature", 1, (7.5,) * WIDTH, (4.6,) * WIDTH)
    return {
        "pipeline": "large-training",
        "source": {"kind": "parquet", "path": "synthetic", "files": 3, "content_hash": "0" * 64},
        "columns": {"id": "string", "label": "int", "features": "array<float>"},
        "feature_shape": [WIDTH],
        "classes": CLASSES,
        "counts": {"rows_in": sum(rows.values()), "rows_clean": sum(rows.values()), "rows_quarantined": 0, **rows},
        "preprocessing": {"numeric_columns": [f"x{i}" for i in range(WIDTH)], "scaler": scaler.to_dict(),
                          "categorical": {}},
    }


@pytest.fixture(scope="module")
def large_dataset(tmp_path_factory) -> Path:
    """<root>/run/dataset: 4 Mi train rows x 256 features, small val and test splits, manifest.json."""
    root = tmp_path_factory.mktemp("large-training")
    dataset = root / "run" / "dataset"
    rows = {"train": TRAIN_ROWS, "val": EVAL_ROWS, "test": EVAL_ROWS}
    for seed, (split, count) in enumerate(rows.items()):
        _write_split(dataset / f"split={split}", count // FILE_ROWS, seed)
    (dataset / "manifest.json").write_text(json.dumps(_manifest(rows)))
    return root


@pytest.mark.slow
@pytest.mark.load
def test_a_training_epoch_over_a_dataset_larger_than_its_memory_streams_it(large_dataset):
    root = large_dataset
    decoded_mib = TRAIN_ROWS * WIDTH * 4 / 2**20
    on_disk_mib = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
    config = root / "large.yaml"
    config.write_text(yaml.safe_dump({
        "name": "large-training",
        "run_dir": str(root / "run"),
        "source": {"kind": "parquet", "path": str(root / "synthetic"), "key": "id", "label": "label",
                   "columns": [{"name": "id", "type": "string"}, {"name": "label", "type": "string"}]},
        "model": {"kind": "mlp", "hidden": [8]},
        "train": {"world_size": 1, "epochs": 1, "batch_size": 8192, "loader": "arrow",
                  "early_stopping": {"patience": 1}},
    }))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    measured = run_measured([torchrun, "--nproc-per-node", "1", "-m", "jobs.train", str(config)], cwd=root,
                            timeout_s=540)
    assert measured.returncode == 0, measured.stderr[-4000:]
    result = json.loads((root / "run" / "train_result.json").read_text())
    assert result["model_version"] == 1 and 0.0 <= result["test_metrics"]["accuracy"] <= 1.0
    trained = [line for line in measured.stderr.splitlines() if "epoch 1/1" in line]
    assert trained, measured.stderr[-3000:]
    peak_mib, command = measured.peak(lambda cmd: "jobs.train" in cmd and not any("torchrun" in c for c in cmd))
    print(f"\ntraining rank peak RSS {peak_mib:.0f} MiB over {decoded_mib:.0f} MiB of decoded train features "
          f"({on_disk_mib:.0f} MiB on disk); {measured.seconds:.0f} s; {trained[0].strip()}")
    # The rank trained on every train row once (the epoch's sample count) yet never held a third of them:
    # its memory is the interpreter, torch and MLflow plus a few row groups in flight, whatever the dataset's size.
    history = MlflowClient(f"sqlite:///{root / 'run' / 'mlflow.db'}").get_metric_history(result["run_id"],
                                                                                       "train_samples")
    assert [int(m.value) for m in history] == [TRAIN_ROWS]
    assert peak_mib < decoded_mib / 3, f"{command} peaked at {peak_mib:.0f} MiB (decoded data {decoded_mib:.0f} MiB)"
