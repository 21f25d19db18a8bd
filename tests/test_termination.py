"""SIGTERM and SIGINT as an exception: raised at once in plain Python, never in the middle of a clean-up, handlers
restored."""
from __future__ import annotations

import os
import signal
import time

import pytest

from jobs import termination
from jobs.termination import Terminated, raise_on_stop_signals, reclaim_sigint, stop_exit_code, stop_requested


@pytest.fixture(autouse=True)
def _spark_left_running(monkeypatch):
    """A stop would stop this test process's Spark session, which later tests share (tests/test_scheduling.py stops
    a real job's)."""
    monkeypatch.setattr(termination, "_stop_spark", lambda: None)


def _sigterm_then_wait(seconds: float, number: int = signal.SIGTERM) -> None:
    os.kill(os.getpid(), number)
    time.sleep(seconds)


@pytest.mark.parametrize("number, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_raises_at_once_and_the_previous_handlers_come_back(number, code):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    started = time.monotonic()
    with pytest.raises(Terminated, match=f"stopped by {signal.Signals(number).name}"):
        with raise_on_stop_signals():
            _sigterm_then_wait(5, number)
    assert time.monotonic() - started < 2
    assert stop_requested() == f"stopped by {signal.Signals(number).name}" and stop_exit_code() == code
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigint_is_taken_back_from_a_handler_installed_inside_the_block_and_only_there():
    def pyspark_like(signum, frame):  # what SparkContext installs when it starts
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Terminated, match="stopped by SIGINT"):
        with raise_on_stop_signals():
            signal.signal(signal.SIGINT, pyspark_like)
            reclaim_sigint()
            _sigterm_then_wait(5, signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, pyspark_like)
    try:
        reclaim_sigint()  # outside the block: left alone
        assert signal.getsignal(signal.SIGINT) is pyspark_like
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_clean_up_under_way_is_finished_before_terminated_is_raised():
    done = []
    with pytest.raises(Terminated):
        with raise_on_stop_signals():
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
