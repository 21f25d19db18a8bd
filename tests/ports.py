"""Free TCP ports on 127.0.0.1 for the servers tests start (mlflow, Spark standalone, torch rendezvous stores)."""
from __future__ import annotations

import random
import socket
from pathlib import Path

HOST = "127.0.0.1"
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out as the local end of outgoing connections (Linux's default if unknown)."""
    try:
        low, high = map(int, _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port() -> int:
    """A port nothing listens on now, outside the kernel's ephemeral range.

    Not a port the OS picks (`bind(0)` picks from that range): a client that connects to such a port before its server
    listens can get that same port as its own end and connect to itself (TCP self-connect); it then holds the port
    the server needs and both wait (e.g. a torch rendezvous store, a worker joining a Spark master).
    """
    low, high = _ephemeral_range()
    ports = [p for p in range(10_000, 65_536) if not low <= p <= high]
    for port in random.sample(ports, 200):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {HOST} outside the ephemeral range {low}-{high} in 200 tries")
