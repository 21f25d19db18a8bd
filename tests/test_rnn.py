"""The RNN family (LSTM / GRU / vanilla, stacked, bidirectional) on numeric windows and token ids, and the LSTM
autoencoder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from dl.checkpoint import load_checkpoint
from dl.losses import build_loss
from dl.models import StandardizedOutput, build_model
from dl.tasks import AnomalyTask, ClassificationTask, RegressionTask, build_task
from jobs.config import AnomalyConf, LossConf, LstmAutoencoderConf, MlpConf, RnnConf, load_config
from jobs.run import run_stages
from jobs.sample import write_seattle_weather
from pipelines.dataset import read_manifest
from pipelines.scaling import FittedScaler
from pipelines.scoring import score_parquet
from registry_helpers import tracking

CELLS = ("lstm", "gru", "rnn")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_numeric_windows_give_one_value_per_horizon_step(cell, bidirectional):
    conf = RnnConf(kind="rnn", cell=cell, hidden=6, layers=2, bidirectional=bidirectional, dropout=0.1,
                   task="regression", outputs=3)
    net = build_model(conf, (5, 4), 3)  # windows of L=5 steps x F=4 inputs, stored flat
    sequence = net.network  # inside the regression StandardizedOutput
    assert sequence.rnn.mode == {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN_TANH"}[cell]
    assert sequence.rnn.bidirectional == bidirectional and sequence.rnn.num_layers == 2
    assert sequence.head[-1].in_features == (12 if bidirectional else 6)
    out = net(torch.randn(7, 20))
    assert out.shape == (7, 3)
    net.eval()
    flat = torch.randn(2, 20)
    # time-major flat layout: the same windows given as [N, L, F] or flat give the same output
    assert torch.equal(net(flat), net(flat.reshape(2, 5, 4)))


def test_numeric_rnn_rejects_inputs_that_are_not_windows():
    with pytest.raises(ValueError, match=r"feature_shape \[L, F\]\), got feature_shape \[30\]"):
        build_model(RnnConf(kind="rnn"), (30,), 2)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_change_token_logits(cell, bidirectional):
    torch.manual_seed(0)
    conf = RnnConf(kind="rnn", cell=cell, hidden=8, layers=2, bidirectional=bidirectional, embedding_dim=5)
    net = build_model(conf, (12,), 3, vocab_size=30).eval()
    sentences = [[5, 9, 2, 17], [3, 1, 28, 4, 4, 11, 7], [6]]  # 1 = OOV is an ordinary token

    def padded(width: int, dtype) -> torch.Tensor:
        return torch.tensor([s + [0] * (width - len(s)) for s in sentences], dtype=dtype)

    tight = net(padded(7, torch.int32))
    assert tight.shape == (3, 3)
    for width, dtype in [(12, torch.int64), (40, torch.int16)]:
        torch.testing.assert_close(net(padded(width, dtype)), tight, rtol=0, atol=1e-6)
    # each sentence alone (no padding at all) gives its row of the batch
    for row, sentence in enumerate(sentences):
        torch.testing.assert_close(net(torch.tensor([sentence])), tight[row:row + 1], rtol=0, atol=1e-6)
    # the tokens do matter: a different last token changes that row's logits
    changed = padded(7, torch.int64)
    changed[0, 3] = 21
    assert not torch.allclose(net(changed)[0], tight[0])


def test_all_pad_row_is_read_as_one_step_and_vocab_needs_rnn():
    net = build_model(RnnConf(kind="rnn", embedding_dim=4, hidden=4), (6,), 2, vocab_size=10).eval()
    assert torch.isfinite(net(torch.zeros(2, 6, dtype=torch.int64))).all()
    with pytest.raises(ValueError, match="token inputs .* need model.kind rnn, not 'mlp'"):
        build_model(MlpConf(kind="mlp"), (6,), 2, vocab_size=10)


# --- regression networks predict standardized targets ---

def test_regression_output_is_destandardized_and_saved_with_the_weights():
    torch.manual_seed(0)
    conf = RnnConf(kind="rnn", cell="gru", hidden=4, task="regression", outputs=2)
    net = build_model(conf, (3, 2), 2, target_statistics=(np.array([10.0, -5.0]), np.array([2.0, 0.5]))).eval()
    flat = torch.randn(4, 6)
    inner = net.network(flat)
    torch.testing.assert_close(net(flat), inner * torch.tensor([2.0, 0.5]) + torch.tensor([10.0, -5.0]))
    # serving builds the network without statistics, then loads the state dict: the same outputs
    served = build_model(conf, (3, 2), 2)
    served.load_state_dict(net.state_dict())
    torch.testing.assert_close(served.eval()(flat), net(flat), rtol=0, atol=0)
    assert not isinstance(build_model(RnnConf(kind="rnn"), (3, 2), 4), StandardizedOutput)  # classifiers: logits


def test_target_statistics_are_per_horizon_step_of_the_train_split(tmp_path):
    train = tmp_path / "split=train"
    train.mkdir()
    targets = [[10.0, 1.0], [14.0, 1.0], [18.0, 1.0]]  # step 1: mean 14, std sqrt(32/3); step 2 constant: std 1
    pq.write_table(pa.table({"target": pa.array(targets, pa.list_(pa.float32()))}), train / "part-0.parquet")
    mean, std = RegressionTask(2).target_statistics(train)
    assert mean == pytest.approx([14.0, 1.0]) and std == pytest.approx([np.sqrt(32 / 3), 1.0])
    with pytest.raises(ValueError, match=r"split=train: column 'target' holds 2 values per row, the model predicts 3"):
        RegressionTask(3).target_statistics(train)
    assert ClassificationTask(2).target_statistics(train) is None


# --- LSTM autoencoder: sine windows vs windows with a spike ---

STEPS = 16


def sine_windows(rng: np.random.Generator, rows: int, spikes: bool) -> torch.Tensor:
    """Noisy sine windows [rows, STEPS] (one input per step) of random frequency and phase; `spikes` adds one
    spike of 1.5 to 2.5 (either sign) at a random step of each window."""
    steps = np.arange(STEPS)
    values = np.sin(rng.uniform(0.3, 0.6, (rows, 1)) * steps + rng.uniform(0, 2 * np.pi, (rows, 1)))
    values += rng.normal(0, 0.05, (rows, STEPS))
    if spikes:
        values[np.arange(rows), rng.integers(0, STEPS, rows)] += rng.choice([-1, 1], rows) * rng.uniform(1.5, 2.5, rows)
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture
def one_thread():
    """One intra-op thread while the test trains (two threads on a shared 2-core machine slow LSTMs by 10x+)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lstm_autoencoder_learns_to_score_spiked_windows_above_normal_ones(one_thread):
    rng, _ = np.random.default_rng(0), torch.manual_seed(0)
    conf = LstmAutoencoderConf(kind="lstm_autoencoder", hidden=32)
    net = build_model(conf, (STEPS, 1), 0)
    task = build_task(conf, [], AnomalyConf(threshold="quantile", quantile=0.95))
    assert isinstance(task, AnomalyTask)
    train = sine_windows(rng, 256, spikes=False)
    val, normal, spiked = sine_windows(rng, 100, False), sine_windows(rng, 100, False), sine_windows(rng, 100, True)
    truth = np.r_[np.zeros(100, bool), np.ones(100, bool)]

    def test_scores() -> np.ndarray:
        net.eval()
        with torch.no_grad():
            return torch.cat([task.scores(net(x), x) for x in (normal, spiked)]).numpy()

    untrained = test_scores()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(40):
        for batch in train.split(64):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(*task.loss_inputs(net(batch), {"features": batch})).backward()
            optimizer.step()
    scores = test_scores()
    # a spike raises a window's MSE even against an untrained (near-constant) reconstruction: AUROC 0.88 here;
    # learning the sines is what takes it to 1.000 (measured; 1.000 with seeds 1 and 2 too, 0.98-0.99 at 20 epochs)
    assert roc_auc_score(truth, untrained) < 0.9
    assert roc_auc_score(truth, scores) >= 0.97
    assert scores[~truth].mean() < 0.1 * untrained[~truth].mean()  # normal windows are reconstructed
    with torch.no_grad():
        val_scores = task.scores(net(val), val).numpy()
        state = task.calibrate({"scores": val_scores, "anomalous": None})
        called = np.concatenate([task.serve(net(x), x, state)["is_anomaly"] for x in (normal, spiked)])
    assert state["threshold"] == pytest.approx(np.quantile(val_scores, 0.95))
    assert called[truth].mean() >= 0.9 and called[~truth].mean() <= 0.15  # at the val-calibrated threshold


# --- the per-task figures hook ---

def _details(task, batch: dict, outputs: torch.Tensor, state: dict | None = None):
    """The task's evaluation details of one batch, as the trainer's `evaluate` gets them."""
    loss = "cross_entropy" if task.kind == "classification" else "mse"
    meter = task.meter(torch.device("cpu"))
    task.update(meter, outputs, batch, build_loss(LossConf(name=loss), reduction="sum"))
    return task.compute(meter, state)[1]


def test_each_task_logs_its_test_figure_as_a_png(tmp_path):
    features = torch.randn(6, 4)
    classes = ["a", "b", "c"]
    cases = {
        "confusion_matrix": (ClassificationTask(3), {"features": features, "label": torch.tensor([0, 1, 2, 0, 1, 2])},
                             torch.randn(6, 3), None),
        "forecast": (RegressionTask(1), {"features": features, "target": torch.randn(6, 1),
                                         "id": [f"2015-01-0{d}" for d in (3, 1, 2, 6, 5, 4)]}, torch.randn(6, 1), None),
        "anomaly_scores": (AnomalyTask(0, AnomalyConf(normal_label="a"), classes),
                           {"features": features, "label": torch.tensor([0, 0, 0, 1, 2, 0])}, torch.randn(6, 4),
                           {"threshold": 1.5}),
    }
    with tracking(f"sqlite:///{tmp_path / 'mlflow.db'}"), mlflow.start_run() as run:
        for name, (task, batch, outputs, state) in cases.items():
            figures = task.figures(_details(task, batch, outputs, state), classes)
            assert list(figures) == [name]
            for figure_name, figure in figures.items():
                mlflow.log_figure(figure, f"plots/{figure_name}.png")
        logged = MlflowClient().list_artifacts(run.info.run_id, "plots")
    assert {a.path for a in logged} == {f"plots/{name}.png" for name in cases}
    assert all(a.file_size > 1000 for a in logged)


def test_regression_details_hold_every_row_and_the_forecast_plots_them_in_id_order():
    task = RegressionTask(1)
    ids = ["2015-01-03", "2015-01-01", "2015-01-02"]
    details = _details(task, {"features": torch.zeros(3, 2), "target": torch.tensor([[3.0], [1.0], [2.0]]), "id": ids},
                       torch.tensor([[30.0], [10.0], [20.0]]))
    assert details["ids"] == ids and details["predictions"].ravel().tolist() == [30.0, 10.0, 20.0]
    axes = task.figures(details, [])["forecast"].axes[0]
    actual, forecast = (line.get_ydata().tolist() for line in axes.lines)
    assert actual == [1.0, 2.0, 3.0] and forecast == [10.0, 20.0, 30.0]
    assert "MAE 18.000" in axes.get_title()


def test_anomaly_histogram_draws_the_threshold():
    figure = AnomalyTask(0, AnomalyConf(), []).figures(
        {"scores": np.array([0.1, 0.2, 0.9]), "anomalous": None, "threshold": 0.5}, [])["anomaly_scores"]
    assert [line.get_xdata()[0] for line in figure.axes[0].lines] == [0.5]


# --- the Seattle forecaster end to end: real ETL output, 2 torchrun ranks through the CLI, Spark scoring ---

ROOT = Path(__file__).resolve().parents[1]
SEATTLE = ROOT / "conf" / "seattle_weather_rnn.yaml"


@pytest.fixture(scope="module")
def seattle(spark, tmp_path_factory):
    """The Seattle pipeline's ETL (in this process's Spark session), then `dlpipe train`: 2 gloo ranks, 25 epochs."""
    tmp = tmp_path_factory.mktemp("seattle")
    assert write_seattle_weather(tmp / "raw") == 1461
    overrides = [f"source.path={tmp / 'raw'}", f"run_dir={tmp / 'run'}", "spark.master=local[2]",
                 "spark.shuffle_partitions=4", "train.epochs=25"]
    cfg = load_config(SEATTLE, overrides)
    with tracking(cfg.tracking_uri):
        run_stages(SEATTLE, overrides, only="etl")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "train", str(SEATTLE), *overrides], cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, read_manifest(cfg.dataset_dir), json.loads((cfg.run_dir / "train_result.json").read_text())


def test_two_rank_lstm_forecast_beats_the_persistence_baseline(seattle):
    cfg, manifest, result = seattle
    assert result["task"] == "regression" and manifest["feature_shape"] == [14, 4]
    # 25 epochs: measured test MAE 2.053 at epoch 24 vs persistence 2.213 (the full config, 60 epochs with early
    # stopping: 2.029; 10 epochs gave 2.194, too close to assert)
    assert result["test_metrics"]["mae"] < manifest["baselines"]["persistence_mae"]
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    plots = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert plots == {"plots/learning_curves.png", "plots/forecast.png"}


def test_registered_forecaster_scores_each_window_as_the_trained_network_does(seattle, spark, tmp_path):
    cfg, manifest, result = seattle
    with tracking(cfg.tracking_uri):
        counts = score_parquet(spark, result["model_uri"], cfg.dataset_dir / "split=test", tmp_path / "predictions")
    predictions = pq.read_table(tmp_path / "predictions").to_pandas().sort_values("id")
    test = pq.read_table(cfg.dataset_dir / "split=test").to_pandas().sort_values("id")
    assert counts["rows_out"] == len(predictions) == manifest["counts"]["test"]
    assert predictions["id"].tolist() == test["id"].tolist()
    # the trained network in this process: the best epoch's weights on the ETL's normalized features
    network = build_model(cfg.model, tuple(manifest["feature_shape"]), 1)
    network.load_state_dict(load_checkpoint(cfg.checkpoint_dir / "best.pt")["state_dict"])
    with torch.no_grad():
        expected = network.eval()(torch.tensor(np.stack(test["features"]))).numpy()[:, 0]
    np.testing.assert_allclose(predictions["prediction"].to_numpy(), expected, rtol=0, atol=1e-4)
    targets = np.stack(test["target"])[:, 0]
    assert np.abs(expected - targets).mean() == pytest.approx(result["test_metrics"]["mae"], abs=1e-5)


def test_scaler_applies_per_input_column_at_every_step_of_a_window():
    scaler = FittedScaler("zscore", "feature", 1, (10.0, 100.0), (2.0, 50.0))  # two inputs
    windows = np.array([[12.0, 150.0, 8.0, 0.0, 10.0, 200.0]])  # 3 steps x 2 inputs, time-major
    np.testing.assert_allclose(scaler.apply(windows), [[1.0, 1.0, -1.0, -2.0, 0.0, 2.0]])
