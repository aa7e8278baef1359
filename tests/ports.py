"""Loopback ports for servers a test starts on the host's loopback.

A port the kernel hands out with ``bind(0)`` is in the ephemeral range, where any TCP client of
a test running alongside may take it as its source port before the server binds it (or while a
daemon restarts on it). These come from below that range instead, a block of their own for each
pytest-xdist worker, and each is checked free for both UDP and TCP.
"""

from __future__ import annotations

import itertools
import os
import socket

BLOCK = 400  # ports for each worker
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_TOP = _ephemeral_low() - 1 - _WORKER * BLOCK
_NEXT = itertools.count(_TOP - BLOCK + 1)


def _free(host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port of this worker's block that no socket uses, for UDP or TCP, on ``host``; never the
    same one twice in a run."""
    for port in _NEXT:
        if port > _TOP:
            break
        if _free(host, port):
            return port
    raise AssertionError(f"all {BLOCK} loopback ports of this test worker are used")
