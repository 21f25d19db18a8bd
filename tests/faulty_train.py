"""`jobs.train` for torchrun with a fault injected on the first attempt: one rank raises, is SIGKILLed, or trains on
a batch of NaN features (`nan`) at one step, or aborts as a native crash would (`abort`: SIGABRT).

Set DLPIPE_FAULT to `raise`, `kill`, `nan` or `abort`, DLPIPE_FAULT_RANK and DLPIPE_FAULT_STEP (1-based train
steps of this process).
Before killing itself the rank touches DLPIPE_FAULT_MARKER, so a test can tell that the fault really happened.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import dl.trainer
from dl.distributed import restart_count
from jobs.train import main

_real_train_step = dl.trainer.train_step
_steps = 0


def _faulty_train_step(model, batch, *args, **kwargs):
    global _steps
    _steps += 1
    here = int(os.environ["RANK"]) == int(os.environ["DLPIPE_FAULT_RANK"])
    if here and _steps == int(os.environ["DLPIPE_FAULT_STEP"]) and restart_count() == 0:
        Path(os.environ["DLPIPE_FAULT_MARKER"]).touch()
        if os.environ["DLPIPE_FAULT"] == "nan":
            return _real_train_step(model, {**batch, "features": batch["features"] * float("nan")}, *args, **kwargs)
        if os.environ["DLPIPE_FAULT"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ["DLPIPE_FAULT"] == "abort":
            os.abort()
        raise RuntimeError(f"injected failure on rank {os.environ['RANK']} at step {_steps}")
    return _real_train_step(model, batch, *args, **kwargs)


if __name__ == "__main__":
    dl.trainer.train_step = _faulty_train_step
    sys.exit(main())
