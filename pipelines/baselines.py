"""Forecasting baselines a model has to beat, from the written windows: persistence and ridge on the target's lags.

They run on the driver over the train and test windows (meant for series of thousands of windows, not billions).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import Ridge

RIDGE_ALPHA = 1.0


def _target_history(split_dir: Path, n_inputs: int, target_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(past target values [N, L], next target values [N, H]) of the windows in one split folder."""
    table = pq.read_table(split_dir, columns=["raw_features", "target"])
    raw = np.asarray(table.column("raw_features").combine_chunks().flatten(), dtype=np.float64)
    past = raw.reshape(table.num_rows, -1, n_inputs)[:, :, target_index]
    future = np.asarray(table.column("target").combine_chunks().flatten(), dtype=np.float64)
    return past, future.reshape(table.num_rows, -1)


def forecast_baselines(dataset_dir: Path, n_inputs: int, target_index: int, lags: int) -> dict:
    """Test-split MAE (over every horizon step) of repeating the last value, and of ridge on the last `lags` values."""
    train_past, train_future = _target_history(dataset_dir / "split=train", n_inputs, target_index)
    test_past, test_future = _target_history(dataset_dir / "split=test", n_inputs, target_index)
    persistence = np.repeat(test_past[:, -1:], test_future.shape[1], axis=1)
    ridge = Ridge(alpha=RIDGE_ALPHA).fit(train_past[:, -lags:], train_future)
    predicted = ridge.predict(test_past[:, -lags:]).reshape(test_future.shape)
    return {
        "split": "test",
        "windows": int(test_future.shape[0]),
        "persistence_mae": float(np.abs(persistence - test_future).mean()),
        "ridge_mae": float(np.abs(predicted - test_future).mean()),
        "ridge": {"lags": lags, "alpha": RIDGE_ALPHA, "train_windows": int(train_future.shape[0])},
    }
