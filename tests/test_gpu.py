"""CUDA checks, skipped on machines without a GPU: the real trainer with nccl and AMP (bf16, fp16) on real digits,
resume from a checkpoint written on the GPU, and weights trained on CUDA serving on the CPU.

Run on a GPU machine with `pytest tests/test_gpu.py --noconftest` (the shared conftest imports pyspark, which
this file does not use); it needs torch, pyarrow, scikit-learn, pydantic and PyYAML. With DLPIPE_GPU_ARTIFACTS=DIR, the CUDA-trained CNN's state dict and its GPU logits on
fixed inputs are written there: `tests/data/cuda_digits_cnn.*` are such files (from an H100), which
`tests/test_cuda_weights.py` scores on CPU-only machines.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dl.checkpoint import load_checkpoint
from dl.distributed import distributed
from dl.models import build_model
from dl.trainer import LAST, fit
from jobs.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONF = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits_dataset(tmp_path_factory) -> Path:
    """sklearn digits, z-scored with train statistics, as the ETL's split layout (2 files per split)."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = load_digits(return_X_y=True)
    rest_x, test_x, rest_y, test_y = train_test_split(images, labels, test_size=0.15, stratify=labels, random_state=0)
    train_x, val_x, train_y, val_y = train_test_split(rest_x, rest_y, test_size=0.18, stratify=rest_y, random_state=0)
    mean, std = train_x.mean(), train_x.std()
    for split, (x, y) in {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}.items():
        (root / f"split={split}").mkdir()
        scaled = ((x - mean) / std).astype(np.float32)
        for part, rows in enumerate(np.array_split(np.arange(len(x)), 2)):
            features = pa.FixedSizeListArray.from_arrays(pa.array(scaled[rows].reshape(-1)), 64)
            table = pa.table({"features": features.cast(pa.list_(pa.float32())), "label": pa.array(y[rows], pa.int32())})
            pq.write_table(table, root / f"split={split}" / f"part-{part}.parquet")
    return root


def _config(*overrides: str):
    return load_config(CONF, ["train.backend=nccl", "train.epochs=12", "train.early_stopping.patience=12", *overrides])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_with_nccl_reaches_the_cpu_accuracy_and_resumes(digits_dataset, tmp_path, amp):
    cfg = _config(f"train.amp={amp}")
    with distributed("nccl", seed=0) as ctx:
        assert (ctx.backend, ctx.device.type) == ("nccl", "cuda")
        network = build_model(cfg.model, SHAPE, 10)
        result = fit(network, cfg.train, digits_dataset, 10, ctx, tmp_path / "checkpoints")
        assert all(np.isfinite(row["train_loss"]) for row in result.history)
        assert result.test_metrics["accuracy"] >= 0.95
        checkpoint = load_checkpoint(tmp_path / "checkpoints" / LAST)  # written from the GPU, mapped to CPU
        assert checkpoint["epoch"] == cfg.train.epochs + 1 and checkpoint["world_size"] == 1  # the epoch to run next
        scaler_state = checkpoint["scaler"]
        assert bool(scaler_state) == (amp == "fp16")  # the fp16 loss scale is saved and restored; bf16 needs none

        more = _config(f"train.amp={amp}", "train.resume=true", f"train.epochs={cfg.train.epochs + 2}").train
        resumed = fit(build_model(cfg.model, SHAPE, 10), more, digits_dataset, 10, ctx, tmp_path / "checkpoints")
        assert [row["epoch"] for row in resumed.history] == list(range(1, cfg.train.epochs + 3))
        assert resumed.history[: cfg.train.epochs] == result.history


def test_weights_trained_on_cuda_give_the_same_predictions_on_cpu(digits_dataset, tmp_path):
    cfg = _config("train.amp=off", "train.epochs=8")
    with distributed("nccl", seed=0) as ctx:
        network = build_model(cfg.model, SHAPE, 10)
        fit(network, cfg.train, digits_dataset, 10, ctx, tmp_path / "checkpoints")
    inputs = torch.from_numpy(np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32))
    torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    with torch.no_grad():
        gpu_logits = network.eval()(inputs.cuda()).cpu()
    torch.save(network.state_dict(), tmp_path / "state_dict.pt")  # CUDA tensors, as a careless trainer saves them
    on_cpu = build_model(cfg.model, SHAPE, 10)
    on_cpu.load_state_dict(torch.load(tmp_path / "state_dict.pt", map_location="cpu", weights_only=True))
    with torch.no_grad():
        cpu_logits = on_cpu.eval()(inputs)
    assert torch.equal(cpu_logits.argmax(1), gpu_logits.argmax(1))
    assert torch.allclose(cpu_logits, gpu_logits, atol=1e-4, rtol=1e-4)
    artifacts = os.environ.get("DLPIPE_GPU_ARTIFACTS")
    if artifacts:
        torch.save(network.state_dict(), Path(artifacts) / "cuda_digits_cnn.pt")
        Path(artifacts, "cuda_digits_cnn.json").write_text(json.dumps({
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "seed": 0,
            "inputs": "np.random.default_rng(0).normal(size=(32, 64)) as float32",
            "logits": gpu_logits.tolist(),
        }))
