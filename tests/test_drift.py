"""Drift: the PSI formula by hand, and reference/input binning on real Spark DataFrames."""
import math

import numpy as np
import pytest

from pipelines.drift import fit_reference, population_stability, psi


def test_psi_matches_the_hand_computed_value():
    # (0.25 - 0.5) ln(0.25/0.5) + (0.75 - 0.5) ln(0.75/0.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0


def features(spark, values: np.ndarray):
    return spark.createDataFrame([(row.tolist(),) for row in values.astype(np.float32)], "raw_features array<float>")


def test_reference_deciles_and_a_shift_in_one_feature(spark):
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.uniform(0, 100, 4000), rng.normal(0, 1, 4000), np.full(4000, 7.0)])
    reference = fit_reference(features(spark, train), "raw_features")
    assert reference["column"] == "raw_features"
    assert len(reference["edges"][0]) == 9 and np.allclose(reference["edges"][0], np.arange(10, 100, 10), atol=3)
    assert np.allclose(reference["shares"][0], 0.1, atol=0.01)
    assert reference["edges"][2] == [7.0] and reference["shares"][2] == [1.0, 0.0]  # a constant feature

    same = np.column_stack([rng.uniform(0, 100, 2000), rng.normal(0, 1, 2000), np.full(2000, 7.0)])
    shifted = same.copy()
    shifted[:, 1] += 1.5
    stable = population_stability(features(spark, same), reference)
    drifted = population_stability(features(spark, shifted), reference)
    assert max(stable) < 0.05
    assert drifted[1] > 1.0 and drifted[0] == pytest.approx(stable[0]) and drifted[2] == 0.0
