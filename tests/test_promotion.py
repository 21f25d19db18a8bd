"""The promotion gate against a real sqlite MLflow registry, smoke-testing through the real Spark scorer."""
from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from dl.promotion import CHALLENGER, CHAMPION, PromotionError, beats
from jobs.config import PipelineConfig
from jobs.lineage import dataset_digest
from jobs.promote import run_promote
from pipelines.errors import DataError
from registry_helpers import (expected, manifest, network, pipeline_config, raw_rows, register, scaler, tracking,
                              write_dataset)

SMOKE_ROWS = 16
TEST_ROWS = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite registry and one test split (TEST_ROWS rows of 64 raw features) shared by every case."""
    root = tmp_path_factory.mktemp("promotion")
    cfg = pipeline_config(root, "promotion-test", "unused")
    write_dataset(cfg.dataset_dir / "split=test", raw_rows(TEST_ROWS, seed=4), files=2)
    (cfg.dataset_dir / "manifest.json").write_text(json.dumps(current_manifest()))
    with tracking(cfg.tracking_uri):
        experiment = mlflow.create_experiment("promotion-test", artifact_location=cfg.artifact_location)
        yield SimpleNamespace(root=root, experiment=experiment, client=MlflowClient())


def current_manifest() -> dict:
    """The manifest of the store's dataset: the registry helpers' classes, and its test split's rows."""
    return {**manifest(scaler()), "counts": {"test": TEST_ROWS}}


def _model(store, name: str, accuracies: list[float | None], champion: str | None = None, **promote) -> PipelineConfig:
    """Register one version of `name` per accuracy (None: its run logs no metric); optionally alias a champion."""
    cfg = pipeline_config(store.root, "promotion-test", name, promote={"smoke_rows": SMOKE_ROWS, **promote})
    fitted = scaler()
    for seed, accuracy in enumerate(accuracies):
        metrics = None if accuracy is None else {"test_accuracy": accuracy, "test_loss": 1.0 - accuracy}
        register(cfg, network(cfg, fitted, seed), fitted, store.experiment, metrics)
    if champion:
        store.client.set_registered_model_alias(name, CHAMPION, champion)
    return cfg


def _aliases(store, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in store.client.get_registered_model(name).aliases.items()}


def _tags(store, name: str, version: str) -> dict[str, str]:
    tags = store.client.get_model_version(name, version).tags
    return {key.removeprefix("promotion."): value for key, value in tags.items() if key.startswith("promotion.")}


@pytest.mark.parametrize(
    "candidate, champion, mode, min_delta, expected",
    [
        (0.95, 0.90, "max", 0.0, True),
        (0.90, 0.90, "max", 0.0, False),  # equal is not better
        (0.905, 0.90, "max", 0.01, False),  # better, but within min_delta
        (0.85, 0.90, "max", 0.0, False),
        (0.10, 0.20, "min", 0.05, True),
        (0.18, 0.20, "min", 0.05, False),
        (float("nan"), 0.90, "max", 0.0, False),
    ],
)
def test_beats_respects_mode_and_min_delta(candidate, champion, mode, min_delta, expected):
    assert beats(candidate, champion, mode, min_delta) is expected


def test_first_model_is_promoted_after_a_smoke_test(store):
    cfg = _model(store, "first", [0.90])
    result = run_promote(cfg)
    assert result["decision"] == "promoted" and result["promoted"]
    assert (result["candidate_version"], result["champion_version_before"], result["champion_version_after"]) == (
        "1", None, "1"
    )
    assert (result["smoke_test"], result["smoke_rows"]) == ("passed", SMOKE_ROWS)
    assert "first model" in result["reason"]
    assert _aliases(store, "first") == {CHAMPION: "1", CHALLENGER: "1"}
    tags = _tags(store, "first", "1")
    assert tags["decision"] == "promoted" and tags["metric"] == "test_accuracy"
    assert (tags["candidate_value"], tags["champion_value"], tags["champion_version_before"]) == ("0.9", "none", "none")
    # Running the gate again on the champion itself decides nothing and keeps the recorded decision.
    again = run_promote(cfg)
    assert again["decision"] == "already_champion" and _tags(store, "first", "1")["decided_at"] == tags["decided_at"]


def test_better_candidate_is_promoted_and_both_values_recorded(store):
    cfg = _model(store, "better", [0.90, 0.95], champion="1")
    result = run_promote(cfg)  # default candidate: the newest version
    assert (result["decision"], result["candidate_version"], result["smoke_test"]) == ("promoted", "2", "passed")
    assert (result["candidate_value"], result["champion_value"]) == (0.95, 0.90)
    assert (result["champion_version_before"], result["champion_version_after"]) == ("1", "2")
    assert _aliases(store, "better") == {CHAMPION: "2", CHALLENGER: "2"}
    tags = _tags(store, "better", "2")
    assert {key: tags[key] for key in ("decision", "candidate_value", "champion_value", "champion_version_before")} == {
        "decision": "promoted", "candidate_value": "0.95", "champion_value": "0.9", "champion_version_before": "1"
    }
    assert tags["reason"] == result["reason"] and "beats champion version 1" in tags["reason"]
    assert (tags["mode"], tags["min_delta"], tags["smoke_test"]) == ("max", "0.0", "passed")
    assert _tags(store, "better", "1") == {}  # the old champion was set up directly, never judged


def _accuracy_on_the_test_split(cfg: PipelineConfig, seed: int) -> float:
    """What version `seed + 1` of `_model` classifies right of the store's test split, straight from torch."""
    fitted = scaler()
    predicted, _ = expected(network(cfg, fitted, seed), fitted, raw_rows(TEST_ROWS, seed=4))
    return float((predicted == np.arange(TEST_ROWS) % 10).mean())


def _tag_datasets(store, name: str, digests: dict[str, str]) -> None:
    for version, digest in digests.items():
        store.client.set_tag(store.client.get_model_version(name, version).run_id, "dataset.digest", digest)


def test_versions_tested_on_different_datasets_are_compared_on_the_current_test_split(store):
    """New input files make a new dataset, so the two runs' test metrics come from different test rows: the gate
    scores both versions on the current test split (the real Spark scorer) and compares those. Here the logged
    values say the candidate is worse (0.90 against 0.95), the same rows say it is better."""
    cfg = _model(store, "new-data", [0.95, 0.90, 0.97], champion="1")
    _tag_datasets(store, "new-data", {"1": "a" * 16, "2": "b" * 16, "3": "b" * 16})
    champion, candidate = _accuracy_on_the_test_split(cfg, 0), _accuracy_on_the_test_split(cfg, 1)
    assert (champion, candidate) == (0.1, 0.125)  # 4 and 5 of the 40 rows
    result = run_promote(cfg, version="2")
    dataset = f"test split of dataset {dataset_digest(current_manifest())} ({TEST_ROWS} rows)"
    assert (result["decision"], result["candidate_value"], result["champion_value"]) == ("promoted", candidate, champion)
    assert result["measured_on"] == dataset
    assert result["reason"] == (f"candidate test_accuracy 0.125 beats champion version 1's 0.1 (mode max, min_delta 0) "
                                f"(both measured on the {dataset}; their training runs were tested on different "
                                f"datasets: champion's aaaaaaaaaaaa, the candidate's bbbbbbbbbbbb)")
    tags = _tags(store, "new-data", "2")
    assert (tags["candidate_value"], tags["champion_value"], tags["measured_on"]) == ("0.125", "0.1", dataset)
    assert not list(cfg.run_dir.glob(".promote-measure-*"))  # the predictions were temporary
    same = run_promote(cfg, version="3")  # the same dataset as the champion's run: the runs' own values
    assert (same["measured_on"], same["candidate_value"], same["champion_value"]) == ("training runs", 0.97, 0.90)
    assert same["reason"] == "candidate test_accuracy 0.97 beats champion version 2's 0.9 (mode max, min_delta 0)"


def test_a_metric_predictions_cannot_give_or_a_champion_that_cannot_score_the_current_split(store):
    """test_loss is not in the predictions' report: the runs' values stay, and the reason says so. A champion
    trained on 4x4 images cannot score today's 8x8 test split: the gate cannot compare, names it, moves nothing."""
    cfg = _model(store, "new-data-loss", [0.90, 0.80], champion="1", metric="test_loss", mode="min")
    _tag_datasets(store, "new-data-loss", {"1": "a" * 16, "2": "b" * 16})
    result = run_promote(cfg)
    assert (result["decision"], result["measured_on"]) == ("rejected", "training runs")
    assert result["reason"].endswith("(measured on different datasets: champion's aaaaaaaaaaaa, the candidate's "
                                     "bbbbbbbbbbbb; test_loss cannot be measured from predictions)")

    cfg = _model(store, "old-shape", [], champion=None)
    small = scaler(width=16)
    register(cfg, network(cfg, small, seed=7, shape=(1, 4, 4)), small, store.experiment, {"test_accuracy": 0.5},
             shape=(1, 4, 4))
    fitted = scaler()
    register(cfg, network(cfg, fitted, seed=1), fitted, store.experiment, {"test_accuracy": 0.4})
    store.client.set_registered_model_alias("old-shape", CHAMPION, "1")
    _tag_datasets(store, "old-shape", {"1": "a" * 16, "2": "b" * 16})
    manifest_path = cfg.dataset_dir / "manifest.json"
    manifest_path.rename(cfg.run_dir / "manifest.json.away")
    try:
        with pytest.raises(DataError, match=r"^no dataset manifest at .*: run the etl stage first$"):
            run_promote(cfg)
    finally:
        (cfg.run_dir / "manifest.json.away").rename(manifest_path)
    with pytest.raises(PromotionError, match=r"^version 1 of 'old-shape' cannot be measured on the test split of "
                                             r"dataset \w+ \(40 rows\): BadFeatureRow: .*'raw_features' has 64 "
                                             r"values, expected 16"):
        run_promote(cfg)
    assert _aliases(store, "old-shape") == {CHAMPION: "1"} and _tags(store, "old-shape", "2") == {}
    forced = run_promote(cfg, force=True)  # replacing such a champion is the owner's call
    assert (forced["decision"], forced["measured_on"], _aliases(store, "old-shape")[CHAMPION]) == (
        "forced", "training runs", "2")


def test_worse_or_equal_within_min_delta_is_rejected_and_champion_stays(store):
    cfg = _model(store, "worse", [0.90, 0.80, 0.905], champion="1", min_delta=0.01)
    worse = run_promote(cfg, version="2")
    assert (worse["decision"], worse["promoted"], worse["smoke_test"]) == ("rejected", False, "skipped")
    assert _aliases(store, "worse") == {CHAMPION: "1", CHALLENGER: "2"}
    within = run_promote(cfg)  # version 3: better by 0.005, inside min_delta 0.01
    assert (within["decision"], within["champion_version_after"]) == ("rejected", "1")
    assert "does not beat champion version 1" in within["reason"]
    assert _aliases(store, "worse") == {CHAMPION: "1", CHALLENGER: "3"}
    for version, value in (("2", "0.8"), ("3", "0.905")):
        tags = _tags(store, "worse", version)
        assert (tags["decision"], tags["candidate_value"], tags["champion_value"]) == ("rejected", value, "0.9")
        assert tags["champion_version_before"] == "1" and tags["smoke_test"] == "skipped"


def test_min_mode_promotes_the_lower_value(store):
    cfg = _model(store, "by-loss", [0.90, 0.80], champion="1", metric="test_loss", mode="min")
    result = run_promote(cfg)  # loss 0.2 (version 2) is worse than 0.1 (version 1)
    assert (result["decision"], result["metric"]) == ("rejected", "test_loss")
    assert result["candidate_value"] == pytest.approx(0.2) and result["champion_value"] == pytest.approx(0.1)


def test_forced_promotion_ignores_the_metric_but_is_smoke_tested_and_recorded(store):
    cfg = _model(store, "forced", [0.90, 0.50], champion="1")
    result = run_promote(cfg, force=True)
    assert (result["decision"], result["promoted"], result["smoke_test"]) == ("forced", True, "passed")
    assert result["reason"].startswith("forced; ") and "does not beat" in result["reason"]
    assert _aliases(store, "forced") == {CHAMPION: "2", CHALLENGER: "2"}
    tags = _tags(store, "forced", "2")
    assert (tags["decision"], tags["candidate_value"], tags["champion_value"]) == ("forced", "0.5", "0.9")


def test_candidate_failing_the_spark_smoke_test_is_not_promoted(store):
    """A better-scoring version trained on 4x4 images cannot score the 8x8 test split: never champion."""
    cfg = _model(store, "smoke", [0.90], champion="1")
    small = scaler(width=16)
    register(cfg, network(cfg, small, seed=7, shape=(1, 4, 4)), small, store.experiment, {"test_accuracy": 0.99},
             shape=(1, 4, 4))
    result = run_promote(cfg)
    assert (result["decision"], result["smoke_test"], result["champion_version_after"]) == ("rejected", "failed", "1")
    assert result["reason"].startswith("smoke test failed: BadFeatureRow")
    assert "'raw_features' has 64 values, expected 16" in result["reason"]
    assert _aliases(store, "smoke") == {CHAMPION: "1", CHALLENGER: "2"}
    tags = _tags(store, "smoke", "2")
    assert (tags["decision"], tags["smoke_test"], tags["candidate_value"], tags["champion_value"]) == (
        "rejected", "failed", "0.99", "0.9"
    )
    forced = run_promote(cfg, force=True)  # forcing does not skip the smoke test
    assert (forced["decision"], forced["smoke_test"]) == ("rejected", "failed")
    assert forced["reason"].endswith("(promotion was forced)")
    assert _aliases(store, "smoke")[CHAMPION] == "1"
    assert not list(cfg.run_dir.glob(".promote-smoke-*"))  # temporary sample and predictions are gone


def test_missing_metric_is_an_error_naming_metric_and_run_and_moves_nothing(store):
    cfg = _model(store, "no-metric", [None])
    run_id = store.client.get_model_version("no-metric", "1").run_id
    with pytest.raises(PromotionError, match=f"metric 'test_accuracy' is not logged on run {run_id}"):
        run_promote(cfg)
    assert _aliases(store, "no-metric") == {} and _tags(store, "no-metric", "1") == {}
    with pytest.raises(PromotionError, match="the registry has no model named 'nothing-here'"):
        run_promote(pipeline_config(store.root, "promotion-test", "nothing-here"))
    with pytest.raises(PromotionError, match="model 'no-metric' has no version 7; its versions: 1"):
        run_promote(cfg, version="7")
