"""`jobs.train` for torchrun that pauses after epoch 1's metrics are logged, so a test can act at that point.

Rank 0 touches DLPIPE_PAUSED_MARKER once epoch 1's metrics went to `log_metrics`, then waits (every rank waits with
it, at the next collective) until DLPIPE_RESUME_MARKER exists. Nothing else of training is changed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jobs.train

_real_fit = jobs.train.fit


def _pausing_fit(*args, log_metrics=None, **kwargs):
    def log_then_pause(metrics: dict, epoch: int) -> None:
        log_metrics(metrics, epoch)
        if epoch == 1:
            Path(os.environ["DLPIPE_PAUSED_MARKER"]).touch()
            while not Path(os.environ["DLPIPE_RESUME_MARKER"]).exists():
                time.sleep(0.1)

    return _real_fit(*args, log_metrics=log_then_pause if log_metrics else None, **kwargs)


if __name__ == "__main__":
    jobs.train.fit = _pausing_fit
    sys.exit(jobs.train.main())
