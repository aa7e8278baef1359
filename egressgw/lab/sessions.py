"""Long-lived client sessions inside a pod: a psql session and an HTTP keep-alive connection.

In: a running client process (started in a pod's namespace) fed over stdin. Out: one answer per
request, read with a deadline. They exist to prove that an established flow survives something
(a daemon restart, a manifest change): neither client ever reconnects by itself, so an answer from
the same backend pid / local port means the same connection. ``close`` always ends the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import time
from typing import Any


class SessionError(RuntimeError):
    """The session's client process died, or did not answer in time."""


class _LineProcess:
    """A child process spoken to line by line, every read bounded by a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        if proc.stdin is None or proc.stdout is None:
            raise ValueError("the process needs stdin and stdout pipes")
        self.proc = proc
        self._buffer = b""
        self._stdout_fd = proc.stdout.fileno()
        os.set_blocking(self._stdout_fd, False)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise SessionError(f"client exited: {self._stderr()}") from exc

    def read_line(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout_fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SessionError(f"no answer within {timeout_s:g}s")
                if not selector.select(remaining):
                    continue
                chunk = os.read(self._stdout_fd, 65536)
                if not chunk:
                    raise SessionError(f"client exited: {self._stderr()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    def _stderr(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "(still running)"
        err = self.proc.stderr.read() if self.proc.stderr is not None else ""
        return f"exit {code}: {err.strip()}"

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=3)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> _LineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PsqlSession(_LineProcess):
    """``psql`` reading queries from stdin: one connection, one backend, until closed."""

    def query(self, sql: str, timeout_s: float = 5.0) -> str:
        """Run one single-row query; returns psql's unaligned row (columns joined by ``|``)."""
        self.send(sql.rstrip().rstrip(";") + ";")
        return self.read_line(timeout_s)

    def client_and_backend(self, timeout_s: float = 5.0) -> tuple[str, int]:
        """The source the server sees and the backend pid (the same pid means the same session)."""
        row = self.query("select inet_client_addr(), pg_backend_pid()", timeout_s)
        address, _, pid = row.partition("|")
        if not pid.isdigit():
            raise SessionError(f"unexpected psql row {row!r}")
        return address, int(pid)

    def __enter__(self) -> PsqlSession:
        return self


class HttpKeepAlive(_LineProcess):
    """``egressgw.lab.keepalive``: requests over one TCP connection; the first is sent at start."""

    def first(self, timeout_s: float = 5.0) -> dict[str, Any]:
        return self._answer(timeout_s)

    def again(self, timeout_s: float = 5.0) -> dict[str, Any]:
        self.send("again")
        return self._answer(timeout_s)

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        line = self.read_line(timeout_s)
        try:
            answer: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise SessionError(f"unexpected client output {line!r}") from exc
        return answer

    def __enter__(self) -> HttpKeepAlive:
        return self
