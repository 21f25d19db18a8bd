"""SIGTERM as an exception: raised at once in plain Python, never in the middle of a clean-up, handlers restored."""
from __future__ import annotations

import os
import signal
import time

import pytest

from jobs import termination
from jobs.termination import Terminated, raise_on_sigterm, stop_requested


@pytest.fixture(autouse=True)
def _spark_left_running(monkeypatch):
    """A stop would stop this test process's Spark session, which later tests share (tests/test_scheduling.py stops
    a real job's)."""
    monkeypatch.setattr(termination, "_stop_spark", lambda: None)


def _sigterm_then_wait(seconds: float) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(seconds)


def test_sigterm_raises_at_once_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(Terminated, match="stopped by SIGTERM"):
        with raise_on_sigterm():
            _sigterm_then_wait(5)
    assert time.monotonic() - started < 2
    assert stop_requested() == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_clean_up_under_way_is_finished_before_terminated_is_raised():
    done = []
    with pytest.raises(Terminated):
        with raise_on_sigterm():
            try:
                raise ValueError("a Spark job failed")
            except ValueError:
                try:
                    _sigterm_then_wait(0.5)  # the error is being handled: the stop waits
                    done.append("clean-up")
                finally:
                    done.append("finally")
            time.sleep(5)  # now it is raised (within 0.1 s)
    assert done == ["clean-up", "finally"]
