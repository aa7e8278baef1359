"""Local answers over real sockets: the real DnsServer on loopback, forwarding to a real dnsmasq
whose query log shows what left the gateway. What a client (dig, a stub resolver, another
server) sees: names with a dot inside a label are denied and never forwarded, a response sent to
the server gets no reply, and a denied EDNS query gets an OPT and an SOA caches can use.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from egressgw.dns.wire import EDNS_UDP_SIZE
from tests.kernel.test_dns_server import (
    LOOPBACK,
    PROBE,
    dnsmasq_on_loopback,
    interceptor,
    serve,
)

WAIT_S = 3.0  # how long a client waits for an answer; also the bound of every polling loop


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dnsmasq on a random loopback port, logging every query it receives."""
    with dnsmasq_on_loopback(tmp_path, "--host-record=db.test.example,203.0.113.10,60") as running:
        yield running


def dotted_query(ident: int) -> bytes:
    """A query for the two labels ``db.test`` and ``example``: joined with a dot, the allowed
    name db.test.example."""
    name = b"\x07db.test\x07example\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)


def exchange(port: int, datagram: bytes, timeout: float = WAIT_S) -> bytes | None:
    """Send one datagram from a fresh socket; its reply, or None if none came in ``timeout``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(datagram, (LOOPBACK, port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def logged_queries(log: Path, expect: str) -> list[str]:
    """dnsmasq's query lines, once ``expect`` is among them (it logs as it goes)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        lines = [
            line for line in log.read_text().splitlines() if "query[" in line and PROBE not in line
        ]
        if any(expect in line for line in lines) or time.monotonic() > deadline:
            return lines


def run_against_server(upstream_port: int, client: Callable[[int], None]) -> None:
    """``client(port)`` in a thread, against the real server forwarding to ``upstream_port``."""

    async def scenario() -> None:
        icpt = interceptor([(LOOPBACK, upstream_port)])
        server, port = await serve(icpt)
        try:
            await asyncio.to_thread(client, port)
        finally:
            await server.close()
            icpt.upstream.close()

    asyncio.run(scenario())


def test_a_label_with_a_dot_is_nxdomain_and_never_reaches_the_upstream(
    upstream: tuple[int, Path],
) -> None:
    upstream_port, log = upstream

    def client(port: int) -> None:
        raw = exchange(port, dotted_query(0x5151))
        assert raw is not None
        reply = DNSRecord.parse(raw)
        assert reply.header.id == 0x5151 and reply.header.rcode == RCODE.NXDOMAIN
        assert reply.rr == [] and [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]
        # the name it spells is allowed and resolves: only that one reaches dnsmasq
        real = DNSRecord.parse(DNSRecord.question("db.test.example").send(LOOPBACK, port))
        assert [str(rr.rdata) for rr in real.rr] == ["203.0.113.10"]
        again = DNSRecord.parse(exchange(port, dotted_query(0x5152)) or b"")
        assert again.header.rcode == RCODE.NXDOMAIN and again.rr == []  # not the cached answer

    run_against_server(upstream_port, client)
    lines = logged_queries(log, "query[A] db.test.example")
    assert len(lines) == 1 and "query[A] db.test.example from" in lines[0], lines


def test_a_response_or_a_scrap_sent_to_the_server_gets_no_reply(
    upstream: tuple[int, Path],
) -> None:
    upstream_port, log = upstream

    def client(port: int) -> None:
        response = DNSRecord.question("db.test.example").reply()
        response.header.rcode = RCODE.FORMERR
        assert exchange(port, bytes(response.pack()), timeout=0.5) is None
        assert exchange(port, b"\x12\x34", timeout=0.5) is None
        # the silence is the server's choice, not a dead server: a query still gets its answer
        live = exchange(port, bytes(DNSRecord.question("db.test.example").pack()))
        assert live is not None and DNSRecord.parse(live).header.rcode == RCODE.NOERROR

    run_against_server(upstream_port, client)
    assert len(logged_queries(log, "query[A] db.test.example")) == 1  # only the live query


def test_a_denied_edns_query_gets_an_opt_and_an_soa_and_a_zone_transfer_is_refused(
    upstream: tuple[int, Path],
) -> None:
    upstream_port, log = upstream

    def client(port: int) -> None:
        query = DNSRecord.question("blocked.other.example")
        query.add_ar(EDNS0(udp_len=4096, flags="do"))
        reply = DNSRecord.parse(query.send(LOOPBACK, port, timeout=WAIT_S))
        assert reply.header.rcode == RCODE.NXDOMAIN
        (opt,) = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
        assert opt.rclass == EDNS_UDP_SIZE and opt.ttl & 0x8000  # our size, DO echoed
        (soa,) = reply.auth
        assert (QTYPE[soa.rtype], str(soa.rname), soa.ttl) == ("SOA", "other.example.", 60)
        plain = DNSRecord.parse(DNSRecord.question("blocked.other.example").send(LOOPBACK, port))
        assert plain.header.rcode == RCODE.NXDOMAIN and plain.ar == []
        axfr = DNSRecord.question("db.test.example", "AXFR")
        refused = DNSRecord.parse(axfr.send(LOOPBACK, port, tcp=True, timeout=WAIT_S))
        assert refused.header.rcode == RCODE.REFUSED

    run_against_server(upstream_port, client)
    # nothing was forwarded: the log holds no query line at all (a marker query proves it is
    # being written)
    marker = DNSRecord.question("db.test.example").send(LOOPBACK, upstream_port, timeout=WAIT_S)
    assert DNSRecord.parse(marker).rr
    lines = logged_queries(log, "query[A] db.test.example")
    assert len(lines) == 1 and "db.test.example" in lines[0], lines
