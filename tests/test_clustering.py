"""DEC clustering: the math by hand, metrics over 2 gloo ranks equal to one sklearn process, k-means centroids that
every rank shares, a refinement that resumes from its checkpoint, and `dlpipe run` of conf/digits_dec.yaml."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from sklearn import metrics as skm
from sklearn.cluster import KMeans

from dl.arrow_loader import ArrowLoader
from dl.clustering import DecLoss, DecNetwork, soft_assignment, target_distribution
from dl.dec import fit_dec, kmeans_centroids
from dl.distributed import distributed
from dl.losses import build_loss
from dl.metrics import ClusteringMeter, contingency_metrics
from dl.models import build_model
from dl.tasks import ClusteringTask, build_task
from jobs.config import DecConf, LossConf, TrainConf
from jobs.sample import write_digits
from pipelines.evaluation import clustering_report
from pipelines.shards import split_dir
from test_cli import dlpipe
from test_tasks import CLASSES, WIDTH, write_tables
from test_training import _set_rank_env, run_ranks

DEC_CONF = Path(__file__).resolve().parents[1] / "conf" / "digits_dec.yaml"
TINY = DecConf(kind="dec", clusters=2, encoder=[16], embedding=2, kmeans_init=3, pretrain={"epochs": 3},
               refine={"epochs": 2, "tolerance": 0.0})


# --- the math, by hand ---

def test_soft_assignment_rows_sum_to_one_with_alpha():
    embeddings, centroids = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    q = soft_assignment(embeddings, centroids, alpha=2.0)
    # alpha 2: kernel (1 + d^2 / 2)^-1.5; row 0: d^2 = [0, 4] -> [1, 3^-1.5]; row 1: d^2 = [4, 8] -> [3^-1.5, 5^-1.5]
    row0, row1 = np.array([1.0, 3 ** -1.5]), np.array([3 ** -1.5, 5 ** -1.5])
    torch.testing.assert_close(q, torch.tensor(np.stack([row0 / row0.sum(), row1 / row1.sum()]), dtype=torch.float32))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2))


def test_target_distribution_with_the_train_split_frequencies_by_hand():
    q = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    p = target_distribution(q, frequencies=torch.tensor([2.0, 1.0]))
    # row 0: [0.64 / 2, 0.04 / 1] = [0.32, 0.04] -> [8/9, 1/9]; row 1: [0.125, 0.25] -> [1/3, 2/3]
    torch.testing.assert_close(p, torch.tensor([[8 / 9, 1 / 9], [1 / 3, 2 / 3]]))
    assert p[0, 0] > q[0, 0]  # the confident row gets sharper
    torch.testing.assert_close(target_distribution(q), target_distribution(q, q.sum(dim=0)))


def test_dec_loss_is_kl_plus_weighted_reconstruction_per_row():
    q, p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([[0.8, 0.2], [0.9, 0.1]])
    outputs, inputs = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    kl_row0 = 0.8 * np.log(0.8 / 0.5) + 0.2 * np.log(0.2 / 0.5)  # row 1 has P == Q: no KL
    reconstruction = [(0 + 4) / 2, (0 + 1) / 2]  # per-row MSE
    summed = build_loss(LossConf(name="mse"), reduction="sum")
    assert float(DecLoss(summed, 0.0)(q, p, outputs, inputs)) == pytest.approx(kl_row0 / 2, rel=1e-6)
    expected = kl_row0 + 0.5 * sum(reconstruction)
    assert float(DecLoss(summed, 0.5, "sum")(q, p, outputs, inputs)) == pytest.approx(expected, rel=1e-6)
    assert float(DecLoss(summed, 0.5)(q, p, outputs, inputs)) == pytest.approx(expected / 2, rel=1e-6)
    assert float(DecLoss(summed, 1.0)(p, p, inputs, inputs)) == pytest.approx(0.0, abs=1e-7)  # P == Q, exact rebuild


def test_network_assigns_the_nearest_centroid_and_serves_it_with_its_distance():
    torch.manual_seed(0)
    network = build_model(TINY, (WIDTH,), 2)
    assert isinstance(network, DecNetwork) and "centroids" in network.state_dict()
    network.centroids.data = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    features = torch.randn(6, WIDTH)
    out = network(features)
    torch.testing.assert_close(out.distance, torch.cdist(out.embedding, network.centroids))
    torch.testing.assert_close(out.q, soft_assignment(out.embedding, network.centroids))
    served = ClusteringTask(TINY, CLASSES).serve(out, features, {})
    assert np.array_equal(served["cluster"], out.q.argmax(dim=1).numpy())
    np.testing.assert_allclose(served["distance"], out.distance.min(dim=1).values.detach().numpy())


@pytest.mark.parametrize("case", ["random", "same", "renamed", "one cluster", "one row", "every row its own"])
def test_nmi_and_ari_from_the_counts_equal_sklearn_on_the_rows(case):
    rng = np.random.default_rng(len(case))
    labels = rng.integers(0, 4, 200)
    clusters = {"random": rng.integers(0, 5, 200), "same": labels, "renamed": (labels + 1) % 4 * 10,
                "one cluster": np.zeros(200, np.int64), "one row": labels[:1],
                "every row its own": np.arange(200)}[case]
    labels = labels[:len(clusters)]
    got = contingency_metrics(skm.cluster.contingency_matrix(labels, clusters))
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(labels, clusters), abs=1e-12)


def test_clustering_report_counts_label_and_cluster_pairs_in_spark(spark):
    rng = np.random.default_rng(3)
    labels, clusters, distances = rng.integers(0, 3, 500), rng.integers(0, 4, 500), rng.random(500)
    clusters[:300] = labels[:300]  # partly right, so both scores are far from 0 and 1
    rows = list(zip(labels.tolist(), clusters.tolist(), distances.tolist()))
    predictions = spark.createDataFrame(rows, "label long, cluster int, distance double").repartition(3)
    got = clustering_report(predictions)
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(labels, clusters), abs=1e-12)
    assert 0.1 < got["ari"] < 0.9 and got["distance_mean"] == pytest.approx(distances.mean(), abs=1e-12)
    assert clustering_report(predictions.drop("label")).keys() == {"distance_mean"}


def test_dec_settings_are_checked():
    task = build_task(TINY, [])
    assert task.columns == ("features",) and task.output_columns == {"cluster": "int", "distance": "float"}
    with pytest.raises(ValueError, match="train.epochs does not apply to model.kind dec"):
        task.check(TrainConf(epochs=7, loss={"name": "mse"}))
    with pytest.raises(ValueError, match="val_nmi needs a labelled dataset"):
        task.check(TrainConf(loss={"name": "mse"}, early_stopping={"metric": "val_nmi"}))
    with pytest.raises(ValueError, match="does not fit the clustering task"):
        task.check(TrainConf())  # cross-entropy: the reconstruction needs mse, mae or huber
    stopping = build_task(TINY, CLASSES).check(TrainConf(loss={"name": "mse"}))
    assert (stopping.metric, stopping.mode) == ("val_silhouette", "max")


# --- 2 gloo ranks ---

BLOBS = (np.random.default_rng(3).normal(0, 0.3, (101, 2))
         + np.repeat([[0, 0], [3, 0], [0, 3]], [40, 40, 21], axis=0)).astype(np.float32)  # embeddings are float32
BLOB_LABELS = np.repeat([0, 1, 2], [40, 40, 21])
BLOB_CLUSTERS = np.where(np.random.default_rng(4).random(101) < 0.15, 1, BLOB_LABELS)  # some rows wrongly put in 1


def _ranks_worker(rank: int, world_size: int, port: int, root: Path, out: Path):
    _set_rank_env(rank, world_size, port)
    with distributed("gloo", seed=0) as ctx:
        meter = ClusteringMeter(ctx.device, labelled=True)
        rows = [range(0, 30), range(30, 60)] if rank == 0 else [range(60, 101)]  # uneven shards, two batches
        for part in rows:
            index = list(part)
            meter.update(torch.tensor(BLOBS[index]), torch.tensor(BLOB_CLUSTERS[index]),
                         torch.tensor(BLOB_LABELS[index]), torch.tensor(float(len(index))))
        metrics, details = meter.compute()

        torch.manual_seed(0)
        network = build_model(TINY, (WIDTH,), 2)
        loader = ArrowLoader(split_dir(root, "train"), ("features",), batch_size=16, rank=rank, world_size=2,
                             shuffle=False)
        centroids = kmeans_centroids(network, loader, ctx, restarts=3, seed=0)

        conf = TrainConf(batch_size=16, optimizer={"name": "adam", "lr": 0.01}, loss={"name": "mse"})
        first = fit_dec(network, conf, root, build_task(TINY, CLASSES), ctx, out / "checkpoints")
        longer = TINY.model_copy(update={"refine": TINY.refine.model_copy(update={"epochs": 4})})
        torch.manual_seed(1)  # other initial weights: only the checkpoints can make the runs agree
        resumed = fit_dec(build_model(longer, (WIDTH,), 2), conf.model_copy(update={"resume": True}), root,
                          build_task(longer, CLASSES), ctx, out / "checkpoints")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "metrics": metrics, "embeddings": details["embeddings"].tolist(), "centroids": centroids.tolist(),
        "first": {"history": first.history, "test": first.test_metrics},
        "resumed": {"history": resumed.history, "test": resumed.test_metrics},
    }))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clustering")
    write_tables(tmp / "data")
    run_ranks(_ranks_worker, tmp / "data", tmp)
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_rank_clustering_metrics_equal_single_process_sklearn(two_ranks):
    _, (first, second) = two_ranks
    assert first["metrics"] == second["metrics"]
    np.testing.assert_array_equal(first["embeddings"], BLOBS)  # every row, in rank order
    assert first["metrics"]["nmi"] == pytest.approx(skm.normalized_mutual_info_score(BLOB_LABELS, BLOB_CLUSTERS),
                                                    abs=1e-12)
    assert first["metrics"]["ari"] == pytest.approx(skm.adjusted_rand_score(BLOB_LABELS, BLOB_CLUSTERS), abs=1e-12)
    assert first["metrics"]["silhouette"] == pytest.approx(skm.silhouette_score(BLOBS, BLOB_CLUSTERS), abs=1e-9)
    assert first["metrics"]["loss"] == pytest.approx(1.0)  # each row added a loss of 1


def test_kmeans_centroids_are_the_same_on_every_rank_and_match_one_process(two_ranks):
    tmp, (first, second) = two_ranks
    assert first["centroids"] == second["centroids"]  # broadcast from rank 0: bitwise equal
    torch.manual_seed(0)
    network = build_model(TINY, (WIDTH,), 2).eval()
    shards = [ArrowLoader(split_dir(tmp / "data", "train"), ("features",), batch_size=16, rank=rank, world_size=2,
                          shuffle=False) for rank in range(2)]
    features = torch.cat([batch["features"] for shard in shards for batch in shard])  # gathered: rank 0's rows first
    with torch.no_grad():
        embeddings = network(features).embedding.numpy()
    expected = KMeans(2, n_init=3, random_state=0).fit(embeddings).cluster_centers_
    np.testing.assert_allclose(first["centroids"], expected, atol=1e-5)


def test_refinement_resumes_from_its_checkpoint_instead_of_starting_over(two_ranks):
    _, (first, _) = two_ranks
    before, after = first["first"], first["resumed"]
    assert [row["epoch"] for row in before["history"]] == [1, 2]
    assert [row["epoch"] for row in after["history"]] == [1, 2, 3, 4]
    assert after["history"][:2] == before["history"]  # restored from refine/last.pt, then two more epochs
    assert after["test"]["init_nmi"] == before["test"]["init_nmi"]  # k-means not rerun: its metrics kept
    assert {"nmi", "ari", "silhouette", "init_nmi", "init_ari"} <= set(before["test"])


# --- end to end ---

REFINED_NMI_BAR = 0.70  # measured with this budget (seed 0): 0.765 after refinement, 0.704 after k-means


def test_dlpipe_run_clusters_digits_and_scores_cluster_and_distance(tmp_path):
    """conf/digits_dec.yaml on the real digits, 2 torchrun ranks, a reduced budget: ETL, DEC, registry, promotion
    on test NMI, Spark scoring of cluster + distance."""
    raw, run_dir = tmp_path / "raw", tmp_path / "run"
    write_digits(raw)
    done = dlpipe("run", str(DEC_CONF), f"source.path={raw}", f"run_dir={run_dir}", "spark.master=local[2]",
                  "model.pretrain.epochs=40", "model.refine.epochs=15", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((run_dir / "train_result.json").read_text())
    metrics = result["test_metrics"]
    assert result["task"] == "clustering"
    assert metrics["nmi"] >= metrics["init_nmi"] - 0.02  # refinement does not undo the k-means start
    assert metrics["nmi"] >= REFINED_NMI_BAR

    predictions = pq.read_table(run_dir / "predictions").to_pandas()
    manifest = json.loads((run_dir / "dataset" / "manifest.json").read_text())
    assert len(predictions) == manifest["counts"]["test"]
    assert predictions["cluster"].between(0, 9).all()
    assert (np.isfinite(predictions["distance"]) & (predictions["distance"] >= 0)).all()
    scored_nmi = skm.normalized_mutual_info_score(predictions["label"], predictions["cluster"])
    assert scored_nmi == pytest.approx(metrics["nmi"], abs=1e-9)  # the registered model scores as training measured
    assert f"nmi                {scored_nmi:.4f}" in done.stdout

    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)  # (not a registry an earlier test left set)
    champion = client.get_model_version_by_alias("digits-dec", "champion")
    assert str(champion.version) == str(result["model_version"])
    plots = {a.path for a in client.list_artifacts(champion.run_id, "plots")}
    assert "plots/cluster_embeddings.png" in plots
    run = client.get_run(champion.run_id)
    assert run.data.metrics["test_nmi"] == pytest.approx(metrics["nmi"])
    assert "pretrain_val_loss" in run.data.metrics
