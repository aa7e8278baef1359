"""Open kernel handles inside a named network namespace without moving the whole process.

``setns`` changes only the calling thread, so a short-lived thread enters the namespace, creates
the socket and exits; the socket stays bound to that namespace. Used by tests and the lab; the
daemon itself runs inside its namespace and passes ``netns=None``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {path}: {os.strerror(code)}")
    finally:
        os.close(fd)


def call_in(netns: str | None, factory: Callable[[], T]) -> T:
    """Run ``factory`` inside ``netns`` (None: right here) and return its result."""
    if netns is None:
        return factory()
    box: dict[str, T | BaseException] = {}

    def run() -> None:
        try:
            _setns(f"/run/netns/{netns}")
            box["value"] = factory()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def command(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` prefixed to run inside ``netns``."""
    return argv if netns is None else ["ip", "netns", "exec", netns, *argv]
