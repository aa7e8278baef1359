"""Thin, bounded wrappers around ``ip`` for named network namespaces.

In: namespace names and argument lists. Out: completed processes, or ``LabError``.
Every command that changes network state is scoped to a named namespace (``ip -n NS`` or
``ip netns exec NS``); nothing here can address the root namespace, and every call has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
DEFAULT_TIMEOUT_S = 20.0


class LabError(RuntimeError):
    """Building, probing or removing the lab failed; the message says which step."""


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, bounded by ``timeout`` seconds, capturing text output."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:g}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise LabError(
            f"failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}".rstrip()
        )
    return proc


def exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    proc = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def add(ns: str) -> None:
    """Create a named namespace with loopback up; fails if it already exists."""
    if exists(ns):
        raise LabError(f"network namespace {ns} already exists (is a lab of that name up?)")
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Run ``ip`` commands (without the leading ``ip``) in one process, all inside ``ns``."""
    run(["ip", "-n", ns, "-batch", "-"], input_text="\n".join(commands) + "\n")


def sysctl(ns: str, settings: dict[str, str]) -> None:
    """Set sysctls inside ``ns`` (``/proc/sys/net`` is per network namespace)."""
    args = [f"{key}={value}" for key, value in settings.items()]
    run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *args])


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The argument list that runs ``argv`` inside ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``."""
    if not exists(ns):
        return []
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def delete(ns: str, *, kill_timeout_s: float = 5.0) -> None:
    """Stop every process left in ``ns`` (by pid), then delete it. Absent namespaces are fine."""
    if not exists(ns):
        return
    stop_pids(pids(ns), timeout_s=kill_timeout_s)
    run(["ip", "netns", "del", ns], check=False)
    if exists(ns):
        raise LabError(f"could not delete network namespace {ns}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_pids(
    pid_list: Sequence[int],
    *,
    timeout_s: float = 5.0,
    first_signal: signal.Signals = signal.SIGTERM,
) -> None:
    """Send ``first_signal`` (SIGTERM), wait up to ``timeout_s``, then SIGKILL whatever is left."""
    alive = [pid for pid in pid_list if pid_alive(pid)]
    for pid in alive:
        _signal(pid, first_signal)
    deadline = time.monotonic() + timeout_s
    while alive and time.monotonic() < deadline:
        _reap(alive)
        alive = [pid for pid in alive if pid_alive(pid)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while alive and time.monotonic() < deadline:
        _reap(alive)
        alive = [pid for pid in alive if pid_alive(pid)]
        if alive:
            time.sleep(0.02)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid_list: Sequence[int]) -> None:
    """Collect exit statuses of our own children so they do not linger as zombies."""
    for pid in pid_list:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
