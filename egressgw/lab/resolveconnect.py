"""Resolve a fresh name, then connect to its address at once; many times in a row, in one process.

This is the race the DNS interceptor must never lose: an application that gets an answer connects
immediately, so the answer's address must already be open in the gateway. In: a name format
(``r{}.race.lab.example``), the first index and how many names, the port, the address family,
a time budget and a per-step timeout. Each iteration resolves its own name through the system
resolver (``getaddrinfo``, which reads the pod's ``/etc/resolv.conf``, as any application would),
connects to the first address at once, sends one HTTP request over the connection and reads the
lab echo server's answer, which names the address connected to and the source the server saw.

Out: one JSON line (``Report``): iterations done, failures (up to ``MAX_DETAILED`` with the stage,
the error and, for a failed look-up, what a direct query to the resolver says right after), and
resolve/connect latency percentiles. It stops after ``--count`` names or ``--budget-s`` seconds,
whichever comes first.

Run inside a pod: ``python -m egressgw.lab.resolveconnect --format r{}.race.lab.example
--count 2000 --port 9000 --family 6``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_DETAILED = 20


@dataclass
class Failure:
    index: int
    name: str
    stage: str  # resolve, connect, exchange, check
    error: str
    address: str = ""
    elapsed_ms: float = 0.0
    diagnosis: str = ""  # for a failed look-up: a direct query's answer right after


@dataclass
class Report:
    requested: int
    iterations: int = 0
    succeeded: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    stopped_by_budget: bool = False
    failures: list[Failure] = field(default_factory=list)
    resolve_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max
    connect_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Report:
        raw: dict[str, Any] = json.loads(text)
        failures = [Failure(**f) for f in raw.pop("failures")]
        return cls(failures=failures, **raw)

    def describe(self) -> str:
        """One paragraph for a test failure or a log: counts, latencies, the first failures."""
        budget = " (stopped by the time budget)" if self.stopped_by_budget else ""
        lines = [
            f"{self.succeeded}/{self.requested} ok, {self.failed} failed, {self.iterations} tried"
            f" in {self.elapsed_s:.1f}s{budget}; resolve ms {self.resolve_ms},"
            f" connect ms {self.connect_ms}"
        ]
        lines += [
            f"  #{f.index} {f.name} {f.stage} failed after {f.elapsed_ms:.1f} ms: {f.error}"
            f"{' address=' + f.address if f.address else ''}"
            f"{' (then: ' + f.diagnosis + ')' if f.diagnosis else ''}"
            for f in self.failures
        ]
        return "\n".join(lines)


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 3)}


def _exchange(sock: socket.socket, path: str, deadline: float) -> dict[str, Any]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"unexpected answer {data[:80]!r}")
    answer: dict[str, Any] = json.loads(body)
    return answer


def _diagnose(name: str, family: int) -> str:
    try:
        from egressgw.lab.dnsquery import query
    except ImportError:  # pragma: no cover - the lab always has it
        return ""
    result = query(name, "AAAA" if family == 6 else "A", timeout_s=2.0)
    return f"{result.rcode} {result.summary()} in {result.elapsed_ms:.1f} ms from {result.server}"


def run(
    name_format: str,
    first: int,
    count: int,
    port: int,
    family: int,
    *,
    budget_s: float,
    step_timeout_s: float,
    expect_source: str | None = None,
) -> Report:
    report = Report(requested=count)
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    resolve_ms: list[float] = []
    connect_ms: list[float] = []
    started = time.monotonic()
    budget_end = started + budget_s

    def fail(failure: Failure) -> None:
        report.failed += 1
        if len(report.failures) < MAX_DETAILED:
            if failure.stage == "resolve":
                failure.diagnosis = _diagnose(failure.name, family)
            report.failures.append(failure)

    for index in range(first, first + count):
        if time.monotonic() > budget_end:
            report.stopped_by_budget = True
            break
        report.iterations += 1
        name = name_format.format(index)
        t0 = time.monotonic()
        try:
            infos = socket.getaddrinfo(name, port, af, socket.SOCK_STREAM)
            address = str(infos[0][4][0])
        except (OSError, IndexError) as exc:
            fail(Failure(index, name, "resolve", repr(exc), elapsed_ms=_ms(t0)))
            continue
        t1 = time.monotonic()
        resolve_ms.append((t1 - t0) * 1000)
        sock = socket.socket(af, socket.SOCK_STREAM)
        try:
            sock.settimeout(step_timeout_s)
            try:
                sock.connect((address, port))
            except OSError as exc:
                fail(Failure(index, name, "connect", repr(exc), address, _ms(t1)))
                continue
            connect_ms.append((time.monotonic() - t1) * 1000)
            try:
                answer = _exchange(sock, f"/resolveconnect/{index}", t1 + step_timeout_s)
            except (OSError, ValueError) as exc:
                fail(Failure(index, name, "exchange", repr(exc), address, _ms(t1)))
                continue
        finally:
            sock.close()
        local = str(answer.get("local", "")).rpartition(":")[0]
        problems = []
        if not _same_address(local, address):
            problems.append(f"server answered on {local or 'an unknown address'}")
        if expect_source and answer.get("source") != expect_source:
            problems.append(f"server saw source {answer.get('source')}, not {expect_source}")
        if problems:
            fail(Failure(index, name, "check", "; ".join(problems), address, _ms(t1)))
            continue
        report.succeeded += 1
    report.elapsed_s = round(time.monotonic() - started, 3)
    report.resolve_ms = _percentiles(resolve_ms)
    report.connect_ms = _percentiles(connect_ms)
    return report


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egressgw.lab.resolveconnect", description=__doc__)
    parser.add_argument("--format", required=True, help="name format with one {} for the index")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--family", type=int, choices=[4, 6], default=6)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--step-timeout-s", type=float, default=3.0)
    parser.add_argument("--expect-source", help="the source address the server must report")
    args = parser.parse_args(argv)
    report = run(
        args.format,
        args.first,
        args.count,
        args.port,
        args.family,
        budget_s=args.budget_s,
        step_timeout_s=args.step_timeout_s,
        expect_source=args.expect_source,
    )
    print(report.to_json(), flush=True)
    return 0 if report.failed == 0 and report.succeeded == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
