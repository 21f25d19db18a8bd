"""DDP training on CPU: real 2-process gloo groups over tiny synthetic datasets that follow the dataset contract."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from sklearn import metrics as skm

from dl.distributed import distributed
from dl.metrics import classification_metrics, confusion_matrix
from dl.models import build_model
from dl.petastorm_reader import ShardingError, check_shardable, count_row_groups, iter_batches, split_dir
from dl.trainer import EarlyStopping, build_optimizer, evaluate, fit, load_checkpoint
from jobs.config import CnnConf, EarlyStoppingConf, OptimizerConf, TrainConf

CLASSES = ["horizontal", "vertical", "diagonal"]
SHAPE = (1, 8, 8)
MODEL = CnnConf(kind="cnn", channels=[8, 16], hidden=32, dropout=0.1)
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("label", pa.int32()),
    ("features", pa.list_(pa.float32())),
    ("raw_features", pa.list_(pa.float32())),
])
EVEN = {"train": [[30]] * 4, "val": [[12]] * 4, "test": [[12]] * 4}
# Row groups 50, 4, 50 | 2, 3 -> rank 0 gets 50 + 50 + 3 rows, rank 1 gets 4 + 2: 13 steps against 1.
UNEVEN = {"train": [[50, 4, 50], [2, 3]], "val": [[12]] * 2, "test": [[20], [3], [1]]}
RANK_TIMEOUT_S = 120


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy 8x8 line: a row (class 0), a column (class 1) or a diagonal (class 2)."""
    image = rng.normal(0.0, 0.3, (8, 8))
    where = int(rng.integers(1, 7))
    if label == 0:
        image[where, :] += 2.0
    elif label == 1:
        image[:, where] += 2.0
    else:
        image += 2.0 * np.eye(8, k=where - 4)
    return image.ravel().astype(np.float32)


def write_dataset(root: Path, layout: dict[str, list[list[int]]], seed: int = 0) -> dict[str, list[str]]:
    """Write `<root>/split=*/part-*.parquet` (one inner list of row-group sizes per file); return ids per split."""
    rng = np.random.default_rng(seed)
    ids: dict[str, list[str]] = {}
    for split, files in layout.items():
        path = split_dir(root, split)
        path.mkdir(parents=True)
        ids[split] = []
        for number, sizes in enumerate(files):
            with pq.ParquetWriter(path / f"part-{number:05d}.parquet", SCHEMA) as writer:
                for size in sizes:
                    labels = rng.integers(0, len(CLASSES), size)
                    features = [_image(int(label), rng) for label in labels]
                    row_ids = [f"{split}/{len(ids[split]) + i:04d}" for i in range(size)]
                    ids[split] += row_ids
                    writer.write_table(pa.table({
                        "id": row_ids,
                        "label": pa.array(labels, pa.int32()),
                        "features": pa.array(features, pa.list_(pa.float32())),
                        "raw_features": pa.array(features, pa.list_(pa.float32())),
                    }, schema=SCHEMA))
    return ids


def write_manifest(root: Path) -> None:
    """The manifest fields training and serving read; features are stored already scaled (identity scaler)."""
    scaler = {"method": "zscore", "per": "channel", "group_size": 64, "offset": [0.0], "scale": [1.0]}
    manifest = {
        "pipeline": "synthetic",
        "source": {"kind": "synthetic", "content_hash": "0" * 64},
        "feature_shape": list(SHAPE),
        "classes": CLASSES,
        "preprocessing": {"image_size": [8, 8], "channels": 1, "scaler": scaler},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker, *args, world_size: int = 2) -> None:
    """Run `worker(rank, world_size, port, *args)` in `world_size` spawned processes; fail on error or hang."""
    context = mp.start_processes(
        worker, args=(world_size, _free_port(), *args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {RANK_TIMEOUT_S}s: a collective is probably hanging")


def _set_rank_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _train_conf(**overrides) -> TrainConf:
    conf = {"epochs": 2, "batch_size": 8, "seed": 0, "optimizer": {"name": "adam", "lr": 0.01}}
    return TrainConf.model_validate({**conf, **overrides})


def _two_rank_worker(rank: int, world_size: int, port: int, even: Path, uneven: Path, weights: Path, out: Path):
    """Everything the 2-rank tests check, in one process group (spawning ranks costs seconds)."""
    _set_rank_env(rank, world_size, port)
    with distributed("gloo", seed=0) as ctx:
        seen = {
            name: [[row_id for batch in iter_batches(split_dir(root, "train"), 8, rank, world_size, seed=epoch)
                    for row_id in batch["id"].tolist()] for epoch in (1, 2)]
            for name, root in (("even", even), ("uneven", uneven))
        }
        network = build_model(MODEL, SHAPE, len(CLASSES))
        network.load_state_dict(torch.load(weights, weights_only=True))
        test_metrics, confusion = evaluate(network, split_dir(even, "test"), len(CLASSES), 5, ctx)
        result = fit(network, _train_conf(), uneven, len(CLASSES), ctx, out / "checkpoints" / "best.pt")
        checksum = sum(float(value.double().sum()) for value in network.state_dict().values())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "seen": seen, "test_metrics": test_metrics, "confusion": confusion.tolist(),
        "history": result.history, "fit_test_metrics": result.test_metrics, "checksum": checksum,
    }))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the 2-rank worker once; return the datasets, their ids, the fixed weights and each rank's report."""
    tmp = tmp_path_factory.mktemp("ddp")
    ids = {"even": write_dataset(tmp / "even", EVEN, seed=1), "uneven": write_dataset(tmp / "uneven", UNEVEN, seed=2)}
    torch.manual_seed(0)
    torch.save(build_model(MODEL, SHAPE, len(CLASSES)).state_dict(), tmp / "weights.pt")
    run_ranks(_two_rank_worker, tmp / "even", tmp / "uneven", tmp / "weights.pt", tmp)
    ranks = [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(2)]
    return {"tmp": tmp, "ids": ids, "ranks": ranks}


@pytest.mark.parametrize("layout", ["even", "uneven"])
def test_each_training_row_is_read_by_exactly_one_rank_per_epoch(two_ranks, layout):
    expected = sorted(two_ranks["ids"][layout]["train"])
    first, second = (rank["seen"][layout] for rank in two_ranks["ranks"])
    for epoch in range(2):
        assert not set(first[epoch]) & set(second[epoch])
        assert sorted(first[epoch] + second[epoch]) == expected
    assert first[0] != first[1], "the row order should change from one epoch to the next"


def test_uneven_shards_train_to_the_end_in_step_on_every_rank(two_ranks):
    first, second = two_ranks["ranks"]
    assert [len(rank["seen"]["uneven"][0]) for rank in (first, second)] == [103, 6]
    assert [row["train_samples"] for row in first["history"]] == [109, 109]
    metric_keys = [key for key in first["history"][0] if key.startswith(("train_loss", "val_"))]
    for mine, theirs in zip(first["history"], second["history"]):
        assert {k: mine[k] for k in metric_keys} == {k: theirs[k] for k in metric_keys}
    assert first["fit_test_metrics"] == second["fit_test_metrics"]
    assert first["checksum"] == second["checksum"], "ranks must end with identical weights and buffers"
    assert (two_ranks["tmp"] / "checkpoints" / "best.pt").is_file()


def test_all_reduced_metrics_equal_single_process_metrics(two_ranks):
    network = build_model(MODEL, SHAPE, len(CLASSES))
    network.load_state_dict(torch.load(two_ranks["tmp"] / "weights.pt", weights_only=True))
    with distributed("gloo") as ctx:
        single, confusion = evaluate(network, split_dir(two_ranks["tmp"] / "even", "test"), len(CLASSES), 7, ctx)
    for rank in two_ranks["ranks"]:
        assert rank["confusion"] == confusion.tolist()
        assert rank["confusion"] != [[0] * 3] * 3
        for name in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            assert rank["test_metrics"][name] == single[name]
        assert rank["test_metrics"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert confusion.sum() == len(two_ranks["ids"]["even"]["test"])


def test_metrics_match_scikit_learn_including_absent_classes():
    rng = np.random.default_rng(3)
    labels, predictions = rng.integers(0, 4, 200), rng.integers(0, 3, 200)  # class 3 is never predicted
    confusion = confusion_matrix(torch.from_numpy(labels), torch.from_numpy(predictions), 5)  # class 4 absent
    assert confusion.tolist() == skm.confusion_matrix(labels, predictions, labels=range(5)).tolist()
    got = classification_metrics(confusion, loss_sum=50.0)
    options = {"labels": range(5), "average": "macro", "zero_division": 0}
    assert got["loss"] == 0.25
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
    assert got["precision_macro"] == pytest.approx(skm.precision_score(labels, predictions, **options))
    assert got["recall_macro"] == pytest.approx(skm.recall_score(labels, predictions, **options))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(labels, predictions, **options))


def test_fewer_row_groups_than_ranks_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, {"train": [[20]], "val": [[5, 5], [5]]})
    assert count_row_groups(split_dir(tmp_path, "val")) == 3
    assert check_shardable(split_dir(tmp_path, "val"), 3) == 3
    with pytest.raises(ShardingError) as error:
        check_shardable(split_dir(tmp_path, "train"), 2)
    message = str(error.value)
    assert str(split_dir(tmp_path, "train")) in message
    assert "1 Parquet row group(s)" in message and "world size 2" in message


def test_batches_keep_every_row_once_in_full_batches(tmp_path):
    ids = write_dataset(tmp_path, {"train": [[7, 5], [9]]})
    batches = list(iter_batches(split_dir(tmp_path, "train"), 4, seed=5))
    assert [len(batch["label"]) for batch in batches] == [4, 4, 4, 4, 4, 1]
    assert sorted(row_id for batch in batches for row_id in batch["id"].tolist()) == sorted(ids["train"])
    assert batches[0]["features"].shape == (4, 64) and batches[0]["features"].dtype == torch.float32
    assert batches[0]["label"].dtype == torch.int64


@pytest.mark.parametrize(
    ("mode", "values", "best_epoch", "stops_after"),
    [("max", [0.5, 0.6, 0.65, 0.64, 0.66], 3, 5), ("min", [1.0, 0.8, 0.85, 0.79, 0.9], 2, 4)],
)
def test_early_stopping_needs_more_than_min_delta(mode, values, best_epoch, stops_after):
    stopping = EarlyStopping(EarlyStoppingConf(metric="val_loss", mode=mode, patience=2, min_delta=0.02))
    for epoch, value in enumerate(values, start=1):
        stopping.update(value, epoch)
        if stopping.should_stop:
            break
    assert (stopping.best_epoch, epoch) == (best_epoch, stops_after)


def test_early_stopping_stops_and_restores_the_best_weights(tmp_path):
    write_dataset(tmp_path, EVEN)
    torch.manual_seed(0)
    network = build_model(MODEL, SHAPE, len(CLASSES))
    # No later epoch can beat the first by a min_delta above 1: epochs 2 and 3 exhaust patience 2.
    early = {"metric": "val_accuracy", "mode": "max", "patience": 2, "min_delta": 1.5}
    conf = _train_conf(epochs=10, early_stopping=early)
    with distributed("gloo", seed=0) as ctx:
        result = fit(network, conf, tmp_path, len(CLASSES), ctx, tmp_path / "checkpoints" / "best.pt")
        restored, _ = evaluate(network, split_dir(tmp_path, "val"), len(CLASSES), 8, ctx)
    assert (result.stopped_early, result.best_epoch, len(result.history)) == (True, 1, 3)
    first, last = result.history[0], result.history[-1]
    assert restored["accuracy"] == first["val_accuracy"]
    assert restored["loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    assert restored["loss"] != pytest.approx(last["val_loss"], rel=1e-6)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert checkpoint["epoch"] == 1
    for name, value in network.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"name": "sgd", "nesterov": True}, (torch.optim.SGD, "nesterov", True)),
        ({"name": "adam", "amsgrad": True}, (torch.optim.Adam, "amsgrad", True)),
        ({"name": "adamw", "weight_decay": 0.01}, (torch.optim.AdamW, "weight_decay", 0.01)),
        ({"name": "rmsprop", "momentum": 0.5}, (torch.optim.RMSprop, "momentum", 0.5)),
        ({"name": "adagrad", "lr": 0.1}, (torch.optim.Adagrad, "lr", 0.1)),
    ],
)
def test_build_optimizer_applies_the_configured_options(options, expected):
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), OptimizerConf.model_validate(options))
    kind, key, value = expected
    assert type(optimizer) is kind and optimizer.defaults[key] == value


def _write_config(tmp_path: Path, **train) -> Path:
    config = {
        "name": "synthetic",
        "run_dir": str(tmp_path / "run"),
        "source": {"kind": "image_folder", "path": str(tmp_path / "raw")},
        "model": MODEL.model_dump(mode="json"),
        "train": {"world_size": 2, "epochs": 6, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}, **train},
    }
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_launch_trains_two_ranks_registers_and_writes_the_result(tmp_path):
    from jobs.train import launch

    dataset = tmp_path / "run" / "dataset"
    write_dataset(dataset, {"train": [[60]] * 4, "val": [[15]] * 4, "test": [[15]] * 4})
    write_manifest(dataset)
    assert launch(_write_config(tmp_path), ["train.seed=1"], world_size=2) == 0
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert result["model_name"] == "synthetic"
    assert result["model_uri"] == f"models:/synthetic/{result['model_version']}"
    assert result["run_id"]
    assert result["test_metrics"]["accuracy"] >= 0.8  # chance is 1/3
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_launch_fails_promptly_when_a_rank_fails(tmp_path, capfd):
    from jobs.train import launch

    dataset = tmp_path / "run" / "dataset"
    write_dataset(dataset, {"train": [[40]], "val": [[5]] * 2, "test": [[5]] * 2})
    write_manifest(dataset)
    started = time.monotonic()
    assert launch(_write_config(tmp_path), [], world_size=2) != 0
    assert time.monotonic() - started < 90
    assert "1 Parquet row group(s) for world size 2" in capfd.readouterr().err
    assert not (tmp_path / "run" / "train_result.json").exists()
