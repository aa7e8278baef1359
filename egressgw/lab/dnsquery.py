"""Ask one DNS question from inside a pod and report exactly what came back.

In: a name, a query type, and optionally the server (default: the first ``nameserver`` of
``/etc/resolv.conf``, which ``ip netns exec`` replaces with the pod's own), UDP or TCP, an EDNS0
buffer size and a timeout. Out: one JSON line: ``rcode`` (``NOERROR``, ``NXDOMAIN``, ...,
or ``TIMEOUT`` / ``ERROR``), ``answers`` (name, type, ttl, data of each answer record), the
``addresses`` among them, whether the answer was ``truncated``, ``elapsed_ms`` and ``server``.
Unlike ``getent``, it tells NXDOMAIN, SERVFAIL, REFUSED and a timeout apart, and it can ask over
TCP. ``DnsResult.from_json`` reads the line back.

Run inside a pod: ``python -m egressgw.lab.dnsquery web.lab.example A --tcp``.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESOLV_CONF = Path("/etc/resolv.conf")
TIMEOUT = "TIMEOUT"
ERROR = "ERROR"


@dataclass(frozen=True)
class DnsResult:
    """What one query got: the response code and records, or TIMEOUT/ERROR with ``error``."""

    rcode: str
    answers: tuple[tuple[str, str, int, str], ...] = ()  # (name, type, ttl, data)
    truncated: bool = False
    elapsed_ms: float = 0.0
    server: str = ""
    error: str = ""
    addresses: tuple[str, ...] = field(default=())

    @classmethod
    def from_json(cls, text: str) -> DnsResult:
        raw = json.loads(text)
        return cls(
            rcode=str(raw["rcode"]),
            answers=tuple(
                (str(a["name"]), str(a["type"]), int(a["ttl"]), str(a["data"]))
                for a in raw["answers"]
            ),
            truncated=bool(raw["truncated"]),
            elapsed_ms=float(raw["elapsed_ms"]),
            server=str(raw["server"]),
            error=str(raw.get("error") or ""),
            addresses=tuple(str(a) for a in raw["addresses"]),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "rcode": self.rcode,
                "answers": [
                    {"name": n, "type": t, "ttl": ttl, "data": d} for n, t, ttl, d in self.answers
                ],
                "addresses": list(self.addresses),
                "truncated": self.truncated,
                "elapsed_ms": round(self.elapsed_ms, 3),
                "server": self.server,
                "error": self.error,
            }
        )

    def ttls(self, rtype: str) -> list[int]:
        return [ttl for _n, t, ttl, _d in self.answers if t == rtype]

    def summary(self) -> str:
        """``203.0.113.20`` / ``NXDOMAIN`` / ``NOERROR (no address)``: what a table shows."""
        if self.rcode == "NOERROR" and self.addresses:
            return ",".join(self.addresses)
        if self.rcode == "NOERROR":
            return "NOERROR (no address)"
        return self.rcode


def first_nameserver(resolv_conf: Path = RESOLV_CONF) -> str:
    """The first ``nameserver`` of a resolv.conf (the pod's, inside ``ip netns exec``)."""
    for line in resolv_conf.read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            return words[1]
    raise ValueError(f"no nameserver in {resolv_conf}")


def query(
    name: str,
    qtype: str = "A",
    *,
    server: str | None = None,
    port: int = 53,
    tcp: bool = False,
    timeout_s: float = 3.0,
    edns: int | None = None,
) -> DnsResult:
    """Send one query, wait at most ``timeout_s`` for the answer; network errors become results."""
    from dnslib import EDNS0, QTYPE, RCODE, DNSRecord  # imported here: only pods need dnslib

    server = server or first_nameserver()
    request = DNSRecord.question(name, qtype)
    if edns is not None:
        request.add_ar(EDNS0(udp_len=edns))
    started = time.monotonic()
    try:
        raw = _exchange(request.pack(), server, port, tcp, started + timeout_s)
    except TimeoutError:
        return DnsResult(TIMEOUT, elapsed_ms=_ms(started), server=server, error="no answer")
    except (OSError, ValueError) as exc:
        return DnsResult(ERROR, elapsed_ms=_ms(started), server=server, error=repr(exc))
    elapsed = _ms(started)
    try:
        reply = DNSRecord.parse(raw)
    except Exception as exc:  # dnslib raises several types on bad input
        return DnsResult(ERROR, elapsed_ms=elapsed, server=server, error=f"unparsable: {exc}")
    answers = tuple(
        (str(rr.rname).rstrip("."), QTYPE.get(rr.rtype), int(rr.ttl), str(rr.rdata).rstrip("."))
        for rr in reply.rr
    )
    return DnsResult(
        rcode=str(RCODE.get(reply.header.rcode)),
        answers=answers,
        truncated=bool(reply.header.tc),
        elapsed_ms=elapsed,
        server=server,
        addresses=tuple(data for _n, t, _ttl, data in answers if t in ("A", "AAAA")),
    )


def _exchange(packet: bytes, server: str, port: int, tcp: bool, deadline: float) -> bytes:
    """Send ``packet`` and return the response to it; TimeoutError at ``deadline``.

    The UDP socket is connected, so an ICMP port unreachable surfaces as ConnectionRefusedError
    at once (as it does for the interceptor's own upstream sockets) instead of a timeout.
    """
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect((server, port))
        if tcp:
            sock.sendall(struct.pack("!H", len(packet)) + packet)
            (length,) = struct.unpack("!H", _read_exactly(sock, 2, deadline))
            return _read_exactly(sock, length, deadline)
        sock.send(packet)
        while True:  # skip anything that is not the answer to this query's ID
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(65535)
            if data[:2] == packet[:2]:
                return data


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("the server closed the connection mid-answer")
        data += chunk
    return data


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egressgw.lab.dnsquery", description=__doc__)
    parser.add_argument("name")
    parser.add_argument("qtype", nargs="?", default="A")
    parser.add_argument("--server", help="default: the first nameserver of /etc/resolv.conf")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--edns", type=int, metavar="SIZE", help="add an EDNS0 OPT record")
    args: Any = parser.parse_args(argv)
    result = query(
        args.name,
        args.qtype,
        server=args.server,
        port=args.port,
        tcp=args.tcp,
        timeout_s=args.timeout_s,
        edns=args.edns,
    )
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
