"""A model trained on CUDA serves on a CPU-only machine: the state dict in tests/data was saved from CUDA tensors on
an H100 by tests/test_gpu.py (with DLPIPE_GPU_ARTIFACTS), with the GPU's logits for fixed inputs beside it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dl.serving import ServingModel
from jobs.config import load_config
from pipelines.scaling import FittedScaler

DATA = Path(__file__).resolve().parent / "data"
CONF = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"
IDENTITY = FittedScaler("zscore", "channel", 64, (0.0,), (1.0,)).to_dict()  # the GPU logits are of unscaled inputs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="shows the CPU-only case")


def _serving_model() -> ServingModel:
    model_conf = load_config(CONF).model.model_dump(mode="json")
    return ServingModel(model_conf, (1, 8, 8), [str(digit) for digit in range(10)], IDENTITY)


def test_the_saved_tensors_really_are_cuda_tensors():
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does on a CPU-only machine
        torch.load(DATA / "cuda_digits_cnn.pt", weights_only=True)


def test_cuda_trained_weights_score_on_cpu_like_on_the_gpu():
    recorded = json.loads((DATA / "cuda_digits_cnn.json").read_text())
    inputs = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    model = _serving_model()
    model.load_weights(DATA / "cuda_digits_cnn.pt", device="cpu")
    columns = model.predict_columns(inputs)
    expected = torch.softmax(torch.tensor(recorded["logits"]), dim=1).numpy()
    np.testing.assert_allclose(columns["probability"], expected, atol=1e-4)
    assert (columns["prediction"] == expected.argmax(axis=1)).all()
    with pytest.raises(ValueError, match="score.device is cuda but this process sees no CUDA device"):
        _serving_model().load_weights(DATA / "cuda_digits_cnn.pt", device="cuda")
