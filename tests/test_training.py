"""DDP training on CPU: real 2-process gloo groups over tiny synthetic datasets that follow the dataset contract."""
from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from sklearn import metrics as skm
from torch.nn.parallel import DistributedDataParallel

from dl.arrow_loader import ArrowLoader
from dl.checkpoint import load_checkpoint
from dl.distributed import distributed, wait_released
from dl.metrics import classification_metrics, confusion_matrix
from dl.models import build_model
from dl.optim import build_optimizer
from dl.petastorm_reader import iter_batches
from dl.trainer import STEP_S, WAIT_S, EarlyStopping, build_precision, evaluate, fit, timed, train_step
from jobs.config import CnnConf, ConfigError, EarlyStoppingConf, TrainConf, validate_config
from pipelines.shards import ShardingError, check_shardable, row_groups_and_rows, split_dir
from ports import free_port

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
SUM_CE = torch.nn.CrossEntropyLoss(reduction="sum")


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


def run_ranks(worker, *args, world_size: int = 2) -> None:
    """Run `worker(rank, world_size, port, *args)` in `world_size` spawned processes; fail on error or hang."""
    context = mp.start_processes(
        worker, args=(world_size, free_port(), *args), nprocs=world_size, join=False, start_method="spawn"
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


# DDP equivalence: a model without batch-norm or dropout, SGD with Nesterov momentum, clipping and an L2 penalty
# (all of which must commute with gradient averaging), STEPS steps of per-rank batch B against one rank with 2B.
EQUIVALENCE = _train_conf(batch_size=4, grad_clip_norm=1.0, optimizer={"name": "sgd", "lr": 0.1, "nesterov": True},
                          loss={"l2": 0.001})
EQUIVALENCE_STEPS = 5


def equivalence_training(ctx) -> dict[str, torch.Tensor]:
    """Train an MLP for EQUIVALENCE_STEPS steps; at step t the ranks together take rows [2B*t, 2B*(t+1))."""
    generator = torch.Generator().manual_seed(11)
    rows = 2 * EQUIVALENCE.batch_size
    features = torch.randn(EQUIVALENCE_STEPS * rows, 64, generator=generator)
    labels = torch.randint(0, len(CLASSES), (EQUIVALENCE_STEPS * rows,), generator=generator)
    torch.manual_seed(5)
    network = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, len(CLASSES)))
    model = DistributedDataParallel(network)
    optimizer = build_optimizer(network.parameters(), EQUIVALENCE.optimizer)
    precision = build_precision("off", ctx.device)
    per_rank = rows // ctx.world_size
    for step in range(EQUIVALENCE_STEPS):
        mine = slice(step * rows + ctx.rank * per_rank, step * rows + (ctx.rank + 1) * per_rank)
        batch = {"features": features[mine], "label": labels[mine]}
        train_step(model, batch, optimizer, torch.nn.CrossEntropyLoss(), EQUIVALENCE, precision, ctx.device)
    return {name: value.detach().clone() for name, value in network.state_dict().items()}


def release_report() -> dict:
    """What `wait_released` sees in a live gloo group: a tensor a pending work holds, then finished collectives."""
    held = torch.ones(1)
    work = torch.distributed.all_reduce(held, async_op=True)
    while_work_alive = wait_released(held, timeout_s=0.05)  # the Work object holds the tensor until it is dropped
    work.wait()
    del work
    after_work_dropped = wait_released(held)
    finished = []
    for _ in range(50):  # each may still be held by gloo's worker thread when all_reduce returns
        value = torch.ones(1)
        torch.distributed.all_reduce(value)
        finished.append([wait_released(value), value._use_count(), value.item()])
    return {"while_work_alive": while_work_alive, "after_work_dropped": after_work_dropped, "finished": finished}


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
        test_loader = ArrowLoader(split_dir(even, "test"), batch_size=5, rank=rank, world_size=world_size, shuffle=False)
        test_metrics, confusion = evaluate(network, test_loader, len(CLASSES), SUM_CE, ctx)
        report = {"seen": seen, "test_metrics": test_metrics, "confusion": confusion.tolist()}
        for loader in ("petastorm", "arrow"):
            result = fit(network, _train_conf(loader=loader), uneven, len(CLASSES), ctx, out / loader / "checkpoints")
            checksum = sum(float(value.double().sum()) for value in network.state_dict().values())
            report[loader] = {"history": result.history, "test_metrics": result.test_metrics, "checksum": checksum}
        torch.save(equivalence_training(ctx), out / f"equivalence-rank{rank}.pt")
        report["release"] = release_report()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


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


@pytest.mark.parametrize(("loader", "steps"), [("petastorm", [[13, 13], [1, 1]]), ("arrow", [[7, 7], [7, 7]])])
def test_uneven_shards_train_to_the_end_in_step_on_every_rank(two_ranks, loader, steps):
    first, second = (rank[loader] for rank in two_ranks["ranks"])
    if loader == "petastorm":  # petastorm's own shards: 103 rows against 6, joined
        assert [len(rank["seen"]["uneven"][0]) for rank in two_ranks["ranks"]] == [103, 6]
    assert [[row["steps"] for row in rank["history"]] for rank in (first, second)] == steps
    assert [row["train_samples"] for row in first["history"]] == [109, 109]
    assert all(0.0 <= row["data_wait_fraction"] < 1.0 for row in first["history"])
    metric_keys = [key for key in first["history"][0] if key.startswith(("train_loss", "val_"))]
    for mine, theirs in zip(first["history"], second["history"]):
        assert {k: mine[k] for k in metric_keys} == {k: theirs[k] for k in metric_keys}
    assert first["test_metrics"] == second["test_metrics"]
    assert first["checksum"] == second["checksum"], "ranks must end with identical weights and buffers"
    assert (two_ranks["tmp"] / loader / "checkpoints" / "best.pt").is_file()
    assert (two_ranks["tmp"] / loader / "checkpoints" / "last.pt").is_file()


def test_two_ranks_with_batch_b_match_one_rank_with_batch_2b(two_ranks):
    """Gradient averaging over 2 ranks of B rows equals the mean over 2B rows, up to float32 summation order."""
    with distributed("gloo") as ctx:
        single = equivalence_training(ctx)
    ranks = [torch.load(two_ranks["tmp"] / f"equivalence-rank{rank}.pt", weights_only=True) for rank in range(2)]
    torch.manual_seed(5)
    assert not torch.allclose(single["0.weight"], torch.nn.Linear(64, 16).weight)  # it trained: not vacuous
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name])
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)


def test_all_reduced_metrics_equal_single_process_metrics(two_ranks):
    network = build_model(MODEL, SHAPE, len(CLASSES))
    network.load_state_dict(torch.load(two_ranks["tmp"] / "weights.pt", weights_only=True))
    with distributed("gloo") as ctx:
        loader = ArrowLoader(split_dir(two_ranks["tmp"] / "even", "test"), batch_size=7, shuffle=False)
        single, confusion = evaluate(network, loader, len(CLASSES), SUM_CE, ctx)
    for rank in two_ranks["ranks"]:
        assert rank["confusion"] == confusion.tolist()
        assert rank["confusion"] != [[0] * 3] * 3
        for name in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            assert rank["test_metrics"][name] == single[name]
        assert rank["test_metrics"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert confusion.sum() == len(two_ranks["ids"]["even"]["test"])


def test_a_collective_counts_as_released_only_once_the_backend_holds_none_of_its_tensors(two_ranks):
    for report in two_ranks["ranks"]:
        release = report["release"]
        assert release["while_work_alive"] is False and release["after_work_dropped"] is True
        assert release["finished"] == [[True, 1, 2.0]] * 50  # released, held by us alone, summed over both ranks


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


def test_fewer_row_groups_than_ranks_is_a_clear_error_naming_the_fix(tmp_path):
    write_dataset(tmp_path, {"train": [[20]], "val": [[5, 5], [5]], "test": [[1]]})
    assert row_groups_and_rows(split_dir(tmp_path, "val")) == (3, 15)
    assert check_shardable(split_dir(tmp_path, "val"), 3) == 3
    with pytest.raises(ShardingError) as error:
        check_shardable(split_dir(tmp_path, "train"), 2)
    assert str(error.value) == (f"{split_dir(tmp_path, 'train')}: 1 Parquet row group(s) for train.world_size 2 (each "
                                "rank reads whole row groups): write at least 2 files (output.files_per_split) or train "
                                "on fewer ranks")
    with pytest.raises(ShardingError, match=r"split=test: 1 Parquet row group\(s\) for train\.world_size 2 \(each rank "
                                            r"reads whole row groups\): it has only 1 row\(s\): add data or raise "
                                            r"split\.test$"):
        check_shardable(split_dir(tmp_path, "test"), 2)


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
        result = fit(network, conf, tmp_path, len(CLASSES), ctx, tmp_path / "checkpoints")
        loader = ArrowLoader(split_dir(tmp_path, "val"), batch_size=8, shuffle=False)
        restored, _ = evaluate(network, loader, len(CLASSES), SUM_CE, ctx)
    assert (result.stopped_early, result.best_epoch, len(result.history)) == (True, 1, 3)
    first, last = result.history[0], result.history[-1]
    assert restored["accuracy"] == first["val_accuracy"]
    assert restored["loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    assert restored["loss"] != pytest.approx(last["val_loss"], rel=1e-6)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert checkpoint["epoch"] == 1
    for name, value in network.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # weights_only: RNG states are tensors too
    assert (state["epoch"], state["step"], state["global_step"]) == (4, 0, 3 * 15)
    assert state["early_stopping"] == {"best": first["val_accuracy"], "best_epoch": 1, "bad_epochs": 2}


def test_resume_continues_a_finished_run_for_more_epochs(tmp_path):
    write_dataset(tmp_path, EVEN)
    with distributed("gloo", seed=0) as ctx:
        torch.manual_seed(0)
        first = fit(build_model(MODEL, SHAPE, len(CLASSES)), _train_conf(epochs=1), tmp_path, len(CLASSES), ctx,
                    tmp_path / "checkpoints")
        torch.manual_seed(1)  # different initial weights: the checkpoint must replace them
        more = fit(build_model(MODEL, SHAPE, len(CLASSES)), _train_conf(epochs=2, resume=True), tmp_path,
                   len(CLASSES), ctx, tmp_path / "checkpoints")
    assert [row["epoch"] for row in more.history] == [1, 2]
    assert more.history[0] == first.history[0]
    assert more.history[1]["train_loss"] < first.history[0]["train_loss"]


def test_timed_splits_waiting_for_data_from_whole_steps():
    def slow_batches():
        for _ in range(3):
            time.sleep(0.05)
            yield {}

    tally = torch.zeros(5, dtype=torch.float64)
    for _ in timed(slow_batches(), tally):
        time.sleep(0.1)  # the training step
    wait, step = float(tally[WAIT_S]), float(tally[STEP_S])
    assert 0.15 <= wait < 0.3 and 0.45 <= step < 0.9 and 0.2 < wait / step < 0.5


def test_mid_epoch_checkpoints_need_the_arrow_loader():
    base = {"name": "x", "run_dir": "r", "source": {"kind": "image_folder", "path": "p"}, "model": {"kind": "cnn"}}
    with pytest.raises(ConfigError, match="checkpoint_every_steps needs train.loader 'arrow'"):
        validate_config({**base, "train": {"loader": "petastorm", "checkpoint_every_steps": 10}}, "conf.yaml")


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


def _launch_faulty(config: Path, fault: str, step: int, max_restarts: int) -> subprocess.CompletedProcess:
    """torchrun 2 ranks of tests/faulty_train.py: rank 1 meets its `fault` (raise, kill, nan, abort) at its `step`-th
    step, first attempt only."""
    from jobs.train import rank_environment

    root = Path(__file__).resolve().parents[1]
    env = {**rank_environment(2), "PYTHONPATH": str(root), "DLPIPE_FAULT": fault, "DLPIPE_FAULT_RANK": "1",
           "DLPIPE_FAULT_STEP": str(step), "DLPIPE_FAULT_MARKER": str(config.parent / f"fault-{fault}")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--max-restarts={max_restarts}", str(root / "tests" / "faulty_train.py"), str(config)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=RANK_TIMEOUT_S, check=False)


def _synthetic_run(tmp_path: Path, train_rows: list[list[int]], **train) -> Path:
    dataset = tmp_path / "run" / "dataset"
    write_dataset(dataset, {"train": train_rows, "val": [[15]] * 4, "test": [[15]] * 4})
    write_manifest(dataset)
    return _write_config(tmp_path, **train)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The same 2-rank training launched twice: uninterrupted, and with rank 1 SIGKILLed mid-epoch then restarted.

    4 x 60 training rows in batches of 16 per rank: 8 steps an epoch; checkpoints every 3 steps. Rank 1 dies at
    its 14th step (epoch 2, step 6), so the restart resumes at epoch 2, step 4 (after global step 12).
    """
    from jobs.train import launch

    train = {"seed": 1, "checkpoint_every_steps": 3}
    reference, killed = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("killed")
    started = time.monotonic()
    code = launch(_synthetic_run(reference, [[60]] * 4, **train), [], world_size=2)
    reference_seconds = time.monotonic() - started
    restarted = _launch_faulty(_synthetic_run(killed, [[60]] * 4, **train), "kill", step=14, max_restarts=1)
    return {"reference": reference, "code": code, "seconds": reference_seconds, "killed": killed, "restarted": restarted}


@pytest.mark.slow
def test_launch_trains_two_ranks_registers_and_writes_the_result(launched):
    run = launched["reference"] / "run"
    assert launched["code"] == 0
    result = json.loads((run / "train_result.json").read_text())
    assert result["model_name"] == "synthetic"
    assert result["model_uri"] == f"models:/synthetic/{result['model_version']}"
    assert result["run_id"]
    assert result["test_metrics"]["accuracy"] >= 0.8  # chance is 1/3
    assert (run / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_resumes_to_the_same_weights(launched):
    restarted, run = launched["restarted"], launched["killed"] / "run"
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert (launched["killed"] / "fault-kill").is_file(), "rank 1 was never killed"
    assert "resuming from" in restarted.stderr and "at epoch 2 step 4" in restarted.stderr
    expected = load_checkpoint(launched["reference"] / "run" / "checkpoints" / "last.pt")
    got = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"])
    for part in ("model", "best_state"):
        assert got[part].keys() == expected[part].keys()
        for name, value in expected[part].items():
            assert torch.equal(got[part][name], value), f"{part}.{name} differs after the resume"
    for slot, state in expected["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][slot][key], value) for key, value in state.items())
    assert [row["val_loss"] for row in got["history"]] == [row["val_loss"] for row in expected["history"]]
    result = json.loads((run / "train_result.json").read_text())
    assert result["run_id"] == (run / "checkpoints" / "mlflow_run_id").read_text()  # one MLflow run throughout
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    epochs = sorted(m.step for m in client.get_metric_history(result["run_id"], "data_wait_fraction"))
    assert epochs == list(range(1, len(expected["history"]) + 1))


@pytest.mark.slow
def test_two_nodes_joined_by_rendezvous_train_to_the_single_host_weights(launched, tmp_path):
    """Multi-node as a cluster runs it: one torchrun per node, joined through a c10d rendezvous endpoint (both
    "nodes" on 127.0.0.1 here). Same world size and seed as the single-host reference: the same weights."""
    from jobs.train import rank_environment

    config = _synthetic_run(tmp_path, [[60]] * 4, seed=1, checkpoint_every_steps=3)
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=dlpipe-test",
            "-m", "jobs.train", str(config)]
    env = rank_environment(2)  # each node's rank gets the threads each of the reference's 2 local ranks had
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = []
    for log in logs:
        with log.open("w") as out:
            nodes.append(subprocess.Popen(node, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while any(process.poll() is None for process in nodes) and time.monotonic() < deadline:
        time.sleep(0.5)
    hung = [i for i, process in enumerate(nodes) if process.poll() is None]
    for i in hung:  # the node and its rank (torchrun starts ranks in sessions of their own)
        agent = psutil.Process(nodes[i].pid)
        for process in [*agent.children(recursive=True), agent]:
            process.kill()
    tails = "".join(f"--- node {i} ---\n{log.read_text(errors='replace')[-2000:]}" for i, log in enumerate(logs))
    assert not hung, f"node(s) {hung} still running after {RANK_TIMEOUT_S}s:\n{tails}"
    assert [process.wait() for process in nodes] == [0, 0], tails
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert result["test_metrics"] == json.loads((launched["reference"] / "run" / "train_result.json").read_text())["test_metrics"]
    expected = load_checkpoint(launched["reference"] / "run" / "checkpoints" / "last.pt")["model"]
    got = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(got[name], value) for name, value in expected.items())


@pytest.mark.slow
def test_an_exception_on_one_rank_fails_the_launch_promptly_with_its_message(tmp_path):
    config = _synthetic_run(tmp_path, [[30]] * 4)
    started = time.monotonic()
    failed = _launch_faulty(config, "raise", step=3, max_restarts=0)
    assert failed.returncode != 0
    assert time.monotonic() - started < 60
    assert "RuntimeError: injected failure on rank 1 at step 3" in failed.stderr
    assert not (tmp_path / "run" / "train_result.json").exists()


@pytest.mark.slow
def test_a_rank_that_crashes_natively_prints_the_python_stack_of_every_thread(tmp_path):
    failed = _launch_faulty(_synthetic_run(tmp_path, [[30]] * 4), "abort", step=3, max_restarts=0)
    assert failed.returncode != 0
    assert "Fatal Python error: Aborted" in failed.stderr, failed.stderr[-3000:]
    crash = failed.stderr[failed.stderr.index("Fatal Python error: Aborted"):]
    assert re.search(r'File ".*faulty_train\.py", line \d+ in _faulty_train_step', crash), crash[:3000]
    assert "\nThread 0x" in crash, crash[:3000]  # the other threads' stacks too (the loader's prefetch threads)
    assert "exitcode  : -6" in failed.stderr  # faulthandler re-raises: torchrun still sees the SIGABRT


def test_launch_fails_promptly_when_a_rank_fails(tmp_path, capfd, monkeypatch):
    from jobs.train import launch

    temp = tmp_path / "temp"  # torchrun's own temp folder: it would leave a torchelastic_* folder per launch
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    dataset = tmp_path / "run" / "dataset"
    write_dataset(dataset, {"train": [[20]] * 2, "val": [[5]] * 2, "test": [[5]] * 2})
    write_manifest(dataset)
    manifest = json.loads((dataset / "manifest.json").read_text())  # 2 classes, while the rows hold labels 0-9:
    (dataset / "manifest.json").write_text(json.dumps({**manifest, "classes": CLASSES[:2]}))  # the ranks find out
    started = time.monotonic()
    assert launch(_write_config(tmp_path), [], world_size=2) != 0
    assert time.monotonic() - started < 90
    assert "IndexError: Target" in capfd.readouterr().err  # cross-entropy on a label beyond the model's 2 outputs
    assert not (tmp_path / "run" / "train_result.json").exists()
    left = {path.name for path in temp.iterdir()}
    assert left <= {f"torchinductor_{getpass.getuser()}"}, left  # no torchelastic_* folder (torch's cache may be)


def test_fewer_row_groups_than_ranks_fail_the_launch_before_any_rank_starts(tmp_path, monkeypatch):
    from jobs import train as training

    dataset = tmp_path / "run" / "dataset"
    write_dataset(dataset, {"train": [[40]], "val": [[5]] * 2, "test": [[5]] * 2})  # e.g. world_size raised since
    write_manifest(dataset)
    monkeypatch.setattr(training.subprocess, "Popen", lambda *args, **kwargs: pytest.fail("torchrun was started"))
    with pytest.raises(ShardingError, match=r"split=train: 1 Parquet row group\(s\) for train\.world_size 2 \(each "
                                            r"rank reads whole row groups\): write at least 2 files"):
        training.launch(_write_config(tmp_path), [], world_size=2)


@pytest.mark.parametrize("feature_shape, train, message", [
    ([64], {}, r"model\.kind cnn needs image features \(feature_shape \[C, H, W\]\), got feature_shape \[64\]: "
               r"use mlp, autoencoder or dec for a table"),
    (list(SHAPE), {"early_stopping": {"metric": "val_mae"}},
     r"train\.early_stopping\.metric 'val_mae' is not a metric of the classification task; use one of val_loss, "),
], ids=["cnn-on-a-table", "regression-metric-for-classes"])
def test_a_config_that_cannot_train_on_the_dataset_fails_before_any_rank_starts(tmp_path, monkeypatch, feature_shape,
                                                                              train, message):
    from jobs import train as training

    dataset = tmp_path / "run" / "dataset"
    write_dataset(dataset, {"train": [[8]] * 2, "val": [[4]], "test": [[4]]})
    write_manifest(dataset)
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps({**manifest, "feature_shape": feature_shape}))
    monkeypatch.setattr(training.subprocess, "Popen", lambda *args, **kwargs: pytest.fail("torchrun was started"))
    with pytest.raises(ConfigError, match=message):  # the CLI's exit 2, not a training failure (4) after 2 ranks
        training.launch(_write_config(tmp_path, **train), [], world_size=2)


# A torchrun that ignores SIGTERM, with a "rank" in a session of its own (as torchrun starts them); prints its pid.
STUBBORN_LAUNCHER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(120)
"""


def test_each_local_rank_gets_its_share_of_the_cores_as_threads_unless_the_environment_sets_them(monkeypatch):
    from jobs.train import THREADS_VARIABLE, rank_environment

    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [rank_environment(n).get(THREADS_VARIABLE) for n in (1, 2, 3, 16, 32)] == [None, "8", "5", "1", "1"]
    assert rank_environment(2)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # TORCHRUN_ENV
    monkeypatch.setenv(THREADS_VARIABLE, "3")  # the user's choice stands
    assert rank_environment(2)[THREADS_VARIABLE] == "3"


def test_a_launcher_that_ignores_sigterm_is_killed_with_its_ranks_after_the_grace_period():
    from jobs.train import _stop

    launcher = subprocess.Popen([sys.executable, "-c", STUBBORN_LAUNCHER], stdout=subprocess.PIPE, text=True)
    rank = psutil.Process(int(launcher.stdout.readline()))
    _stop(launcher, grace_s=0.5)
    assert launcher.returncode == -9  # SIGTERM ignored, then killed and reaped
    rank.wait(timeout=10)  # killed too, though not a child torchrun's signal would reach
    assert not rank.is_running()
    launcher.stdout.close()
