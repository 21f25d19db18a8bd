"""torchrun as `jobs.train.launch` starts it: stopped by a signal, it exits 128 + the signal, without a traceback.

torchrun turns SIGTERM and SIGINT into a `SignalException`, stops its ranks, and lets the exception end the process
with a traceback: on Ctrl-C that traceback was the last thing a user saw, under dlpipe's own one-line message.
"""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun


def main(argv: list[str] | None = None) -> int:
    """torchrun with `argv` (default: the command line); its exit code, or 128 + the signal that stopped it."""
    try:
        torchrun(argv)
    except SignalException as stopped:  # the ranks are already stopped; torchrun has logged the signal
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
