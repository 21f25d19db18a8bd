"""NaN loss: a real 2-rank torchrun training that meets a NaN batch stops on every rank with a clear error, and the
last good checkpoints stay as they were (no NaN weights are ever written)."""
from __future__ import annotations

import mlflow
import pytest
import torch

from dl.checkpoint import load_checkpoint, read_checkpoint
from dl.nonfinite import HINT, NonFiniteGuard, NonFiniteLoss
from test_training import _launch_faulty, _synthetic_run

# 4 x 60 training rows, batches of 16 per rank: 8 steps an epoch; a training checkpoint every 3 steps and at each
# epoch end. Rank 1's 12th step (epoch 2, step 4) trains on NaN features: its loss is NaN and the all-reduced
# gradient makes every rank's weights NaN. The check before the step-12 checkpoint stops the run, so `last.pt` is
# still the one of global step 9 (epoch 2, step 1) and `best.pt` the one of epoch 1.
POISONED_STEP = 12


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in state.values() if value.is_floating_point())


@pytest.mark.slow
def test_a_nan_batch_stops_every_rank_clearly_and_keeps_the_last_good_checkpoints(tmp_path):
    config = _synthetic_run(tmp_path, [[60]] * 4, checkpoint_every_steps=3, epochs=4, seed=1)
    failed = _launch_faulty(config, "nan", step=POISONED_STEP, max_restarts=0)

    assert failed.returncode != 0
    assert (tmp_path / "fault-nan").is_file(), "rank 1 never trained on the NaN batch"
    checkpoints = tmp_path / "run" / "checkpoints"
    message = (f"training failed: training loss is nan at epoch 2 step 4 (global step {POISONED_STEP}, rank 1); "
               f"kept the last good checkpoints {checkpoints / 'last.pt'}, {checkpoints / 'best.pt'}; {HINT}")
    # Both ranks stopped at the same check with the same one-line reason (none was left waiting in a collective).
    assert failed.stderr.count(message) == 2, failed.stderr[-4000:]
    assert "exitcode  : 4" in failed.stderr  # jobs.train's training code, reported by torchrun

    last = load_checkpoint(checkpoints / "last.pt")
    assert (last["epoch"], last["step"], last["global_step"]) == (2, 1, 9)
    assert _finite(last["model"]) and _finite(last["best_state"])
    assert read_checkpoint(checkpoints / "last.prev.pt")["global_step"] == 8
    best = load_checkpoint(checkpoints / "best.pt")
    assert best["epoch"] == 1 and _finite(best["state_dict"])
    assert not (tmp_path / "run" / "train_result.json").exists()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run_id = (checkpoints / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1]  # no NaN epoch was logged


def test_the_guard_names_the_first_non_finite_step_and_catches_weights_gone_bad():
    network = torch.nn.Linear(2, 1)
    guard = NonFiniteGuard(global_step=10, device=torch.device("cpu"))  # resumed after 10 steps; epoch 3 began at 8
    for loss in (0.5, float("inf"), float("nan"), 0.2):
        guard.observe(torch.tensor(loss))
    with pytest.raises(NonFiniteLoss, match=r"^training loss is inf at epoch 3 step 4 \(global step 12, rank 0\); "
                                            r"no checkpoint was written yet; lower train.optimizer.lr"):
        guard.check(network, epoch=3, epoch_start=8, kept="no checkpoint was written yet")

    clean = NonFiniteGuard(global_step=0, device=torch.device("cpu"))
    clean.observe(torch.tensor(0.3))
    clean.check(network, epoch=1, epoch_start=0, kept="-")  # every loss and weight finite: nothing raised
    with torch.no_grad():
        network.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"^the weights are not finite after epoch 1 step 1 \(global step 1\)"):
        clean.check(network, epoch=1, epoch_start=0, kept="-")
