"""Turning a client's exit status and messages into a verdict a person can read.

In: completed ``psql`` / ``curl`` processes (or a timeout) and how long they took. Out: an
``Outcome``: verdict, the source address the server saw (when it said), and the detail line the
verdict rests on. Pure: no I/O here.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
import subprocess
from dataclasses import dataclass


class Verdict(enum.StrEnum):
    CONNECTED = "connected"
    REFUSED_BY_SERVER = "refused by server"
    REJECTED_AT_GATEWAY = "rejected at gateway"
    CONNECTION_REFUSED = "connection refused (TCP reset)"
    TIMEOUT = "timeout"
    LEAKED = "left the gateway without SNAT"
    DNS_FAILED = "name did not resolve"
    ERROR = "error"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    source: str | None  # the client address the server reported, if it reported one
    detail: str  # the message the verdict rests on
    elapsed_s: float
    output: str = ""  # what the client printed (psql's rows, the HTTP body)

    def __str__(self) -> str:
        seen = f" source={self.source}" if self.source else ""
        return f"{self.verdict}{seen} after {self.elapsed_s:.2f}s: {self.detail}"


# The gateway rejects with ICMP administratively-prohibited: Linux reports EHOSTUNREACH for
# ICMPv4 code 13 and EACCES for ICMPv6 code 1.
_REJECTED = ("No route to host", "Permission denied", "Network is unreachable")
_RESET = "Connection refused"
_TIMED_OUT = ("timeout expired", "timed out", "Connection timed out")
_PG_HBA_RE = re.compile(r'no pg_hba\.conf entry for host "([^"]+)"')


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _network_verdict(message: str) -> Verdict | None:
    if any(word in message for word in _REJECTED):
        return Verdict.REJECTED_AT_GATEWAY
    if _RESET in message:
        return Verdict.CONNECTION_REFUSED
    if any(word in message for word in _TIMED_OUT):
        return Verdict.TIMEOUT
    return None


def classify_psql(proc: subprocess.CompletedProcess[str] | None, elapsed_s: float) -> Outcome:
    """``proc`` ran ``psql -A -t -c SQL``; None means it was killed.

    ``source`` is set when the server named the client: the query's single value when that is an
    address (``select inet_client_addr()``), or the host in pg_hba's refusal.
    """
    if proc is None:
        return Outcome(Verdict.TIMEOUT, None, "psql killed at the outer time limit", elapsed_s)
    if proc.returncode == 0:
        output = proc.stdout.strip()
        source = output if _is_address(output) else None
        return Outcome(Verdict.CONNECTED, source, "query ran", elapsed_s, output)
    message = proc.stderr.strip()
    hba = _PG_HBA_RE.search(message)
    if hba:
        return Outcome(Verdict.REFUSED_BY_SERVER, hba.group(1), _last_line(message), elapsed_s)
    if "FATAL" in message:
        return Outcome(Verdict.REFUSED_BY_SERVER, None, _last_line(message), elapsed_s)
    verdict = _network_verdict(message) or Verdict.ERROR
    return Outcome(verdict, None, _last_line(message) or f"exit {proc.returncode}", elapsed_s)


# curl exit codes: 7 could not connect, 28 operation timed out.
_CURL_COULD_NOT_CONNECT = 7
_CURL_TIMED_OUT = 28


def _curl_message(stderr: str) -> str:
    """The line that says why: curl 7.88 names the errno only in its verbose ``*`` lines."""
    lines = [line.strip() for line in stderr.splitlines()]
    for line in lines:
        if line.startswith("* connect to ") and " failed: " in line:
            return line[2:]
    errors = [line for line in lines if line.startswith("curl: (")]
    return errors[-1] if errors else _last_line(stderr)


def classify_curl(proc: subprocess.CompletedProcess[str] | None, elapsed_s: float) -> Outcome:
    """``proc`` ran ``curl -v -sS`` against the lab's echo server; None means it was killed."""
    if proc is None:
        return Outcome(Verdict.TIMEOUT, None, "curl killed at the outer time limit", elapsed_s)
    message = _curl_message(proc.stderr)
    if proc.returncode == 0:
        try:
            body = json.loads(proc.stdout)
            source = str(body["source"])
        except (ValueError, KeyError, TypeError):
            return Outcome(
                Verdict.ERROR, None, f"unexpected body: {proc.stdout[:200]!r}", elapsed_s
            )
        return Outcome(Verdict.CONNECTED, source, "HTTP 200", elapsed_s, proc.stdout)
    if proc.returncode == _CURL_TIMED_OUT:
        return Outcome(Verdict.TIMEOUT, None, message, elapsed_s)
    verdict = _network_verdict(message)
    if verdict is None and proc.returncode == _CURL_COULD_NOT_CONNECT:
        verdict = Verdict.ERROR
    return Outcome(verdict or Verdict.ERROR, None, message or f"exit {proc.returncode}", elapsed_s)
