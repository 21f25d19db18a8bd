"""Tasks beyond classification: MLP regression, autoencoder anomaly detection (threshold calibration, normal-only
fitting, exact all-gathered AUROC), their serving columns through MLflow and the Spark scorer, and the report."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from sklearn import metrics as skm

import dl.tasks
from dl.arrow_loader import ArrowLoader
from dl.distributed import distributed
from dl.losses import build_loss
from dl.metrics import RegressionMeter, calibrate_threshold, ranking_metrics, threshold_metrics
from dl.models import build_model
from dl.serving import ServingModel
from dl.tasks import AnomalyTask, RegressionTask, build_task, task_type
from dl.trainer import evaluate, fit
from jobs.config import (AnomalyConf, AutoencoderConf, CnnConf, ConfigError, DecConf, LossConf, MlpConf, PromoteConf,
                         RnnConf, TrainConf)
from pipelines.evaluation import anomaly_report, regression_report
from pipelines.scaling import FittedScaler
from pipelines.scoring import score_parquet
from pipelines.shards import split_dir
from registry_helpers import pipeline_config, tracking
from test_training import run_ranks, _set_rank_env

WIDTH = 8
CLASSES = ["anomaly", "normal"]  # sorted, as the ETL orders class names: "normal" is class 1
NORMAL = AnomalyConf(normal_label="normal", fit_on="normal", threshold="quantile", quantile=0.9)
AUTOENCODER = AutoencoderConf(kind="autoencoder", encoder=[16], bottleneck=2)
MLP = MlpConf(kind="mlp", task="regression", hidden=[16], outputs=1)
LAYOUT = {"train": [[40, 30], [50]], "val": [[20], [17]], "test": [[25], [14]]}


# --- hand-checked threshold calibration and metrics ---

def test_quantile_threshold_is_the_interpolated_quantile_of_normal_scores():
    scores = np.array([5.0, 1.0, 9.0, 3.0, 2.0, 4.0, 7.0])
    anomalous = np.array([False, False, True, False, False, False, True])
    # normal scores sorted: 1 2 3 4 5; q=0.75 -> position 3.0 -> 4; q=0.9 -> position 3.6 -> 4 + 0.6 * (5 - 4)
    assert calibrate_threshold(scores, anomalous, "quantile", 0.75) == pytest.approx(4.0)
    assert calibrate_threshold(scores, anomalous, "quantile", 0.9) == pytest.approx(4.6)
    assert calibrate_threshold(scores, None, "quantile", 0.5) == pytest.approx(4.0)  # unlabelled: every row


def test_best_f1_threshold_by_hand():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    anomalous = np.array([False, False, True, False, True])
    # anomaly when score > t. t=0.25: calls 0.3 0.4 0.5 -> TP 2 FP 1 FN 0 -> F1 0.8 (the best);
    # t=0.15: F1 2/3; t=0.35: 0.5; t=0.45: 2/3; below all: 4/7.
    assert calibrate_threshold(scores, anomalous, "best_f1") == pytest.approx(0.25)
    assert threshold_metrics(scores, anomalous, 0.25) == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert threshold_metrics(scores, anomalous, 0.45) == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    # ties in F1 go to the higher threshold (fewer alarms): 0.1 0.9 | 0.2 0.8 separable -> midpoint 0.5
    assert calibrate_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool), "best_f1") == 0.5


def test_auroc_by_hand():
    # anomalies 0.35 and 0.8 against normals 0.1 and 0.4: 3 of 4 pairs ranked right
    got = ranking_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    assert got["auroc"] == 0.75
    assert got["auprc"] == pytest.approx((1.0 + 2 / 3) / 2)  # hits at ranks 1 and 3
    assert np.isnan(ranking_metrics(np.array([0.1, 0.2]), np.array([False, False]))["auroc"])


def test_anomaly_settings_need_a_normal_label():
    with pytest.raises(ValidationError, match="need train.anomaly.normal_label"):
        AnomalyConf(threshold="best_f1")
    with pytest.raises(ValueError, match="not a class of the dataset"):
        AnomalyTask(0, AnomalyConf(normal_label="benign"), CLASSES)
    task = build_task(AUTOENCODER, CLASSES, NORMAL)
    with pytest.raises(ValueError, match="does not fit the anomaly task"):
        task.check(TrainConf())  # cross-entropy on a reconstruction
    stopping = task.check(TrainConf(loss={"name": "mse"}))
    assert (stopping.metric, stopping.mode) == ("val_loss", "min")
    with pytest.raises(ValueError, match="not a metric of the regression task"):
        RegressionTask(1).check(TrainConf(loss={"name": "mse"}, early_stopping={"metric": "val_accuracy"}))


def test_training_batches_keep_normal_rows_only_or_a_zero_weight_step():
    task = build_task(AUTOENCODER, CLASSES, NORMAL)
    batch = {"features": torch.arange(8.0).reshape(4, 2), "label": torch.tensor([1, 0, 1, 1]), "id": list("abcd")}
    kept = task.training_batch(batch)
    assert kept["label"].tolist() == [1, 1, 1] and kept["features"][:, 0].tolist() == [0.0, 4.0, 6.0]
    assert task.rows(kept) == 3
    assert task.rows(task.training_batch({**batch, "label": torch.tensor([0, 0, 1, 0])})) == 1
    none = task.training_batch({**batch, "label": torch.tensor([0, 0, 0, 0])})
    assert none["ignore"] and task.rows(none) == 0 and len(none["features"]) == 4  # zero weight, still in step
    normed = build_task(AUTOENCODER.model_copy(update={"batch_norm": True}), CLASSES, NORMAL)
    assert normed.training_batch({**batch, "label": torch.tensor([0, 0, 1, 0])})["ignore"]  # batch-norm needs 2


def test_models_by_kind():
    mlp = build_model(MlpConf(kind="mlp", hidden=[8, 4], batch_norm=True, dropout=0.1), (WIDTH,), 3)
    assert mlp(torch.randn(5, WIDTH)).shape == (5, 3)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in mlp.modules()) == 2
    autoencoder = build_model(AUTOENCODER, (WIDTH,), 0)
    assert autoencoder(torch.randn(5, WIDTH)).shape == (5, WIDTH)
    assert autoencoder.embed(torch.randn(5, WIDTH)).shape == (5, 2)


# --- real 2-rank training and all-gathered metrics ---

def _rows(rng: np.random.Generator, size: int, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal rows (label 1) lie near a 2-d plane; anomalies (label 0, a third) are isotropic noise."""
    labels = (rng.random(size) > 1 / 3).astype(np.int32)
    normal = rng.normal(0, 1, (size, 2)) @ basis + rng.normal(0, 0.05, (size, WIDTH))
    features = np.where(labels[:, None] == 1, normal, rng.normal(0, 1.2, (size, WIDTH))).astype(np.float32)
    target = (features @ np.linspace(-1, 1, WIDTH) + 0.5).astype(np.float32)
    return labels, features, target


def write_tables(root: Path, layout=LAYOUT, seed: int = 0) -> None:
    """A labelled anomaly / regression table dataset (identity scaling: features == raw_features)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(0, 1, (2, WIDTH))
    for split, files in layout.items():
        split_dir(root, split).mkdir(parents=True)
        for number, sizes in enumerate(files):
            tables = []
            for size in sizes:
                labels, features, target = _rows(rng, size, basis)
                tables.append(pa.table({
                    "id": [f"{split}-{number}-{len(tables)}-{i}" for i in range(size)],
                    "label": pa.array(labels, pa.int32()), "target": pa.array(target, pa.float32()),
                    "features": pa.array(list(features), pa.list_(pa.float32())),
                    "raw_features": pa.array(list(features), pa.list_(pa.float32())),
                }))
            pq.write_table(pa.concat_tables(tables), split_dir(root, split) / f"part-{number}.parquet",
                           row_group_size=max(sizes))


def _conf(**overrides) -> TrainConf:
    base = {"epochs": 25, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "loss": {"name": "mse"},
            "anomaly": NORMAL.model_dump()}
    return TrainConf.model_validate({**base, **overrides})


def _tasks_worker(rank: int, world_size: int, port: int, root: Path, weights: Path, out: Path):
    _set_rank_env(rank, world_size, port)
    report = {}
    with distributed("gloo", seed=0) as ctx:
        for name, model_conf, task in (("anomaly", AUTOENCODER, build_task(AUTOENCODER, CLASSES, NORMAL)),
                                       ("regression", MLP, build_task(MLP, CLASSES))):
            network = build_model(model_conf, (WIDTH,), task.num_outputs)
            network.load_state_dict(torch.load(weights / f"{name}.pt", weights_only=True))
            loader = ArrowLoader(split_dir(root, "test"), task.columns, batch_size=5, rank=rank, world_size=2,
                                 shuffle=False)
            fixed, _ = evaluate(network, loader, task, build_loss(LossConf(name="mse"), reduction="sum"), ctx,
                                {"threshold": 0.5})
            result = fit(network, _conf(), root, task, ctx, out / name)
            checksum = sum(float(value.double().sum()) for value in network.state_dict().values())
            report[name] = {"fixed": fixed, "test": result.test_metrics, "state": result.serving_state,
                            "train_samples": [row["train_samples"] for row in result.history], "checksum": checksum}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def test_regression_training_keeps_rows_for_the_test_details_only(tmp_path, monkeypatch):
    """An epoch's validation reports summed errors only: its meter keeps (and gathers from every rank) no rows. The
    test evaluation keeps every row, for the forecast plot; the validation metrics are what the rows give."""
    write_tables(tmp_path / "data")
    kept: list[bool] = []

    class Recording(RegressionMeter):
        def __init__(self, device, keep_rows=True):
            kept.append(keep_rows)
            super().__init__(device, keep_rows)

    monkeypatch.setattr(dl.tasks, "RegressionMeter", Recording)
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process: an in-memory process group
    task, mse_sum = build_task(MLP, CLASSES), build_loss(LossConf(name="mse"), reduction="sum")
    def val_rows() -> ArrowLoader:
        return ArrowLoader(split_dir(tmp_path / "data", "val"), task.columns, 5, rank=0, world_size=1, shuffle=False)

    with distributed("gloo", seed=0) as ctx:
        network = build_model(MLP, (WIDTH,), task.num_outputs)
        result = fit(network, _conf(epochs=3), tmp_path / "data", task, ctx, tmp_path / "out")
        val, rows = evaluate(network, val_rows(), task, mse_sum, ctx)
        same, none = evaluate(network, val_rows(), task, mse_sum, ctx, details=False)
    assert kept == [False] * len(result.history) + [True, True, False]
    assert len(result.test_details["ids"]) == sum(map(sum, LAYOUT["test"]))
    assert none is None and same == val
    errors = rows["predictions"].astype(np.float64) - rows["targets"]
    assert val["mae"] == pytest.approx(np.abs(errors).mean()) and val["mse"] == pytest.approx((errors ** 2).mean())


@pytest.fixture(scope="module")
def two_rank_tasks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    write_tables(tmp / "data")
    (tmp / "weights").mkdir()
    torch.manual_seed(0)
    torch.save(build_model(AUTOENCODER, (WIDTH,), 0).state_dict(), tmp / "weights" / "anomaly.pt")
    torch.save(build_model(MLP, (WIDTH,), 1).state_dict(), tmp / "weights" / "regression.pt")
    run_ranks(_tasks_worker, tmp / "data", tmp / "weights", tmp)
    return {"tmp": tmp, "ranks": [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]}


def _test_split(root: Path) -> pd.DataFrame:
    return pd.read_parquet(split_dir(root, "test")).sort_values("id")


def test_two_rank_anomaly_and_regression_metrics_equal_single_process(two_rank_tasks):
    """AUROC from all-gathered scores, and regression error sums, equal a NumPy computation over the whole split."""
    tmp, (first, second) = two_rank_tasks["tmp"], two_rank_tasks["ranks"]
    test = _test_split(tmp / "data")
    features = torch.from_numpy(np.stack(test["features"]))
    autoencoder = build_model(AUTOENCODER, (WIDTH,), 0)
    autoencoder.load_state_dict(torch.load(tmp / "weights" / "anomaly.pt", weights_only=True))
    mlp = build_model(MLP, (WIDTH,), 1)
    mlp.load_state_dict(torch.load(tmp / "weights" / "regression.pt", weights_only=True))
    with torch.no_grad():
        scores = ((autoencoder.eval()(features) - features) ** 2).mean(1).numpy()
        predictions = mlp.eval()(features)[:, 0].numpy()
    anomalous = test["label"].to_numpy() == 0
    got = first["anomaly"]["fixed"]
    assert got == second["anomaly"]["fixed"]
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(anomalous, scores), abs=1e-12)
    assert got["auprc"] == pytest.approx(skm.average_precision_score(anomalous, scores), abs=1e-12)
    assert got["recall"] == pytest.approx(np.mean(scores[anomalous] > 0.5))
    assert got["loss"] == pytest.approx(scores[~anomalous].mean(), rel=1e-5)  # the loss covers normal rows only
    errors = predictions - test["target"].to_numpy()
    got = first["regression"]["fixed"]
    assert got == second["regression"]["fixed"]
    assert got["mae"] == pytest.approx(np.abs(errors).mean(), rel=1e-5)
    assert got["rmse"] == pytest.approx(np.sqrt((errors ** 2).mean()), rel=1e-5)


def test_two_rank_training_fits_normal_rows_only_and_calibrates_the_threshold(two_rank_tasks):
    tmp, (first, second) = two_rank_tasks["tmp"], two_rank_tasks["ranks"]
    anomaly = first["anomaly"]
    assert anomaly["checksum"] == second["anomaly"]["checksum"] and anomaly["state"] == second["anomaly"]["state"]
    train = pd.read_parquet(split_dir(tmp / "data", "train"))
    assert set(anomaly["train_samples"]) == {int((train["label"] == 1).sum())}  # anomalies never fit the model
    assert first["regression"]["train_samples"][0] == len(train)
    assert anomaly["test"]["auroc"] > 0.95  # near-plane normals vs isotropic noise
    assert anomaly["test"]["threshold"] == anomaly["state"]["threshold"]
    # The threshold is the 0.9 quantile of the normal val rows' scores under the restored weights.
    network = build_model(AUTOENCODER, (WIDTH,), 0)
    network.load_state_dict(torch.load(tmp / "anomaly" / "best.pt", weights_only=True)["state_dict"])
    val = pd.read_parquet(split_dir(tmp / "data", "val"))
    features = torch.from_numpy(np.stack(val["features"]))
    with torch.no_grad():
        scores = ((network.eval()(features) - features) ** 2).mean(1).numpy()
    expected = np.quantile(scores[val["label"].to_numpy() == 1].astype(np.float64), 0.9)
    assert anomaly["state"]["threshold"] == pytest.approx(expected, rel=1e-5)
    assert first["regression"]["test"]["mae"] < 0.5 * np.abs(train["target"] - train["target"].mean()).mean()


# --- serving and scoring ---

def test_anomaly_model_serves_and_scores_with_its_threshold(two_rank_tasks, spark, tmp_path):
    """Registered through MLflow, scored by Spark: anomaly_score = the reconstruction MSE of the scaled row,
    is_anomaly = score above the threshold saved with the model, plus the lineage columns; then the report."""
    tmp = two_rank_tasks["tmp"]
    cfg = pipeline_config(tmp_path, "anomaly-test", "anomaly-test", model=AUTOENCODER.model_dump(),
                          train=_conf().model_dump())
    fitted = FittedScaler("zscore", "feature", 1, tuple([0.5] * WIDTH), tuple([2.0] * WIDTH))
    network = build_model(AUTOENCODER, (WIDTH,), 0)
    network.load_state_dict(torch.load(tmp / "anomaly" / "best.pt", weights_only=True)["state_dict"])
    threshold = two_rank_tasks["ranks"][0]["anomaly"]["state"]["threshold"]
    manifest = {"source": {"content_hash": "0" * 64}, "feature_shape": [WIDTH], "classes": CLASSES,
                "preprocessing": {"scaler": fitted.to_dict()}}
    from dl.serving import log_and_register

    with tracking(cfg.tracking_uri):
        mlflow.create_experiment("anomaly-test", artifact_location=cfg.artifact_location)
        mlflow.set_experiment("anomaly-test")
        with mlflow.start_run():
            version = log_and_register(network, cfg, manifest, {"threshold": threshold})
        model = mlflow.pyfunc.load_model(f"models:/anomaly-test/{version.version}")
        assert isinstance(model.unwrap_python_model(), ServingModel)
        test = _test_split(tmp / "data")
        raw = np.stack(test["raw_features"])
        out = model.predict(pd.DataFrame({"features": list(raw)}))
        scaled = torch.from_numpy(fitted.apply(raw))
        with torch.no_grad():
            expected = ((network.eval()(scaled) - scaled) ** 2).mean(1).numpy()
        np.testing.assert_allclose(out["anomaly_score"].to_numpy(), expected, rtol=1e-5)
        np.testing.assert_array_equal(out["is_anomaly"].to_numpy(), expected > threshold)
        assert list(out.columns) == ["anomaly_score", "is_anomaly"]

        result = score_parquet(spark, f"models:/anomaly-test/{version.version}", split_dir(tmp / "data", "test"),
                               tmp_path / "predictions", batch_size=16)
        scored = pd.read_parquet(tmp_path / "predictions").sort_values("id")
    assert result["rows_out"] == len(test)
    assert list(scored.columns) == ["id", "label", "target", "anomaly_score", "is_anomaly", "model_name",
                                    "model_version", "model_run_id"]
    np.testing.assert_allclose(scored["anomaly_score"].to_numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(scored["is_anomaly"].to_numpy(), expected > threshold)
    assert set(scored["model_run_id"]) == {version.run_id}

    report = anomaly_report(spark.read.parquet(str(tmp_path / "predictions")), CLASSES.index("normal"))
    anomalous = scored["label"].to_numpy() == 0
    assert report["auroc"] == pytest.approx(skm.roc_auc_score(anomalous, scored["anomaly_score"]))
    assert {k: report[k] for k in ("precision", "recall", "f1")} == pytest.approx(
        threshold_metrics(scored["anomaly_score"].to_numpy(), anomalous, threshold))


def test_regression_report_counts_errors_in_spark(spark):
    frame = spark.createDataFrame(pd.DataFrame({"prediction": [1.0, 2.0, 4.0], "target": [1.5, 2.0, 2.0]}))
    assert regression_report(frame) == pytest.approx({"mae": 2.5 / 3, "mse": 4.25 / 3, "rmse": np.sqrt(4.25 / 3)})


# --- DEC pieces, by hand ---

def test_dec_soft_assignment_and_target_distribution_by_hand():
    from dl.clustering import dec_loss, soft_assignment, target_distribution

    embeddings, centroids = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.0], [3.0]])
    q = soft_assignment(embeddings, centroids, alpha=1.0)
    # kernels 1/(1 + d^2): row 0 [1, 1/10], row 1 [1/2, 1/5], row 2 [1/10, 1] -> normalised per row
    expected_q = torch.tensor([[10 / 11, 1 / 11], [5 / 7, 2 / 7], [1 / 11, 10 / 11]])
    torch.testing.assert_close(q, expected_q)
    # f = column sums = [12/7, 9/7]; row 1: [(5/7)^2 / (12/7), (2/7)^2 / (9/7)] = [25/84, 4/63] -> [75/91, 16/91]
    p = target_distribution(q)
    torch.testing.assert_close(p[1], torch.tensor([75 / 91, 16 / 91]))
    torch.testing.assert_close(p.sum(dim=1), torch.ones(3))
    assert p[0, 0] > q[0, 0] and p[2, 1] > q[2, 1]  # confident assignments get sharper
    expected_kl = float((p * (p / q).log()).sum() / 3)
    assert float(dec_loss(q, p)) == pytest.approx(expected_kl, rel=1e-5)
    assert float(dec_loss(p, p)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("model, promoted_on, mode", [
    (CnnConf(kind="cnn"), "test_accuracy", "max"),
    (RnnConf(kind="rnn", task="regression"), "test_mae", "min"),
    (AUTOENCODER, "test_loss", "min"),
    (DecConf(kind="dec"), "test_silhouette", "max"),
])
def test_the_promotion_gate_defaults_to_the_task_s_metric_in_its_direction(model, promoted_on, mode):
    gate = task_type(model).promotion(PromoteConf())
    assert (gate.metric, gate.mode) == (promoted_on, mode)


def test_a_promotion_metric_is_judged_in_its_own_direction_unless_told():
    """promote.metric test_mae alone must not promote the higher error (mode used to default to max)."""
    regression = task_type(RnnConf(kind="rnn", task="regression"))
    assert regression.promotion(PromoteConf(metric="test_rmse")).mode == "min"
    assert regression.promotion(PromoteConf(metric="test_rmse", mode="max")).mode == "max"  # as written
    assert task_type(AUTOENCODER).promotion(PromoteConf(metric="test_auroc")).mode == "max"
    with pytest.raises(ConfigError, match=r"'promote.mode': which way is better for promote.metric 'test_f1' is not "
                                          r"known for the anomaly task \(it knows test_loss, test_score_mean, "
                                          r"test_auroc, test_auprc\); set promote.mode to max or min"):
        task_type(AUTOENCODER).promotion(PromoteConf(metric="test_f1"))
    assert task_type(AUTOENCODER).promotion(PromoteConf(metric="test_f1", mode="max")).metric == "test_f1"
