"""The interceptor in front of a real authoritative upstream: unbound on a loopback port serving
the zone ``test.example`` from its own data (``local-zone: static``), with NSID configured and a
sub-zone it drops without an answer (``local-zone: deny``), logging every query it receives.

What a workload sees, item by item: names are keyed as their labels, not as a joined string;
every answer has the asker's own shape whoever asked first, and nothing of the upstream's
exchange (NSID) or of another client's (its EDNS options) crosses; the zone's SOA and its
MINIMUM bound a cached NXDOMAIN; a query the upstream never answers fails alone and leaves the
upstream in use for everyone; pipelined TCP queries are answered as each is ready.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord, EDNSOption

from egressgw.dns.upstream import State, Upstream
from egressgw.dns.wire import EDNS_UDP_SIZE
from tests.conftest import require
from tests.kernel.test_dns_server import LOOPBACK, interceptor, serve
from tests.ports import free_port

WAIT_S = 3.0  # how long a client waits for an answer; also the bound of every polling loop
SOA_MINIMUM = 30
ZONE = [
    f"test.example. 3600 IN SOA ns.test.example. hostmaster.test.example. 7 3600 600 86400 "
    f"{SOA_MINIMUM}",
    "test.example. 3600 IN NS ns.test.example.",
    "ns.test.example. 3600 IN A 203.0.113.53",
    "db.test.example. 300 IN A 203.0.113.10",
    r"db\.test.example. 300 IN A 203.0.113.66",  # one label "db.test": another name entirely
]
NSID = EDNSOption(3, b"")  # a request for the server's NSID
SUBNET = EDNSOption(8, bytes.fromhex("00011800c63364"))  # client subnet 198.51.100.0/24


@contextmanager
def unbound_on_loopback(directory: Path) -> Iterator[tuple[int, Path]]:
    """unbound on a random loopback port, authoritative for test.example, logging every query
    it receives; (port, log) once it answers."""
    require(shutil.which("unbound") is not None, "needs unbound (Debian package unbound)")
    port = free_port()
    log = directory / "unbound.log"
    conf = directory / "unbound.conf"
    lines = [
        "server:",
        f"  interface: {LOOPBACK}",
        f"  port: {port}",
        "  do-daemonize: no",
        "  use-syslog: no",
        f'  logfile: "{log}"',
        '  chroot: ""',
        '  username: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        "  do-ip6: no",
        "  num-threads: 1",
        "  log-queries: yes",
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "iterator"',
        '  nsid: "ascii_unbound-upstream"',
        '  local-zone: "test.example." static',
        '  local-zone: "blackhole.test.example." deny',
        *(f"  local-data: '{record}'" for record in ZONE),
        "remote-control:",
        "  control-enable: no",
    ]
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT_S
        probe = DNSRecord.question("ns.test.example")
        while True:
            try:
                if DNSRecord.parse(probe.send(LOOPBACK, port, timeout=0.2)).rr:
                    break
            except (ConnectionRefusedError, TimeoutError, OSError):
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "unbound exited"
            assert time.monotonic() < deadline, "unbound did not answer in time"
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=5)


@pytest.fixture
def unbound(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with unbound_on_loopback(tmp_path) as running:
        yield running


def asked(log: Path, name: str) -> int:
    """How many queries for ``name`` (as unbound logs it) reached the upstream."""
    return sum(f" {name} " in line for line in log.read_text().splitlines())


def against_gateway(upstream_port: int, client: Callable[[int], None]) -> dict[str, State]:
    """``client(port)`` in a thread, against the real server forwarding to ``upstream_port``;
    the upstream's state afterwards."""

    async def scenario() -> dict[str, State]:
        icpt = interceptor([(LOOPBACK, upstream_port)], timeout_s=0.5)
        server, port = await serve(icpt)
        try:
            await asyncio.to_thread(client, port)
            assert isinstance(icpt.upstream, Upstream)
            return icpt.upstream.states()
        finally:
            await server.close()
            icpt.upstream.close()

    return asyncio.run(scenario())


def send(port: int, record: DNSRecord, tcp: bool = False) -> DNSRecord:
    return DNSRecord.parse(record.send(LOOPBACK, port, tcp=tcp, timeout=WAIT_S))


def opts(reply: DNSRecord) -> list[RR]:
    return [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]


def test_every_client_gets_its_own_shape_and_nothing_of_another_exchange(
    unbound: tuple[int, Path],
) -> None:
    upstream_port, log = unbound

    def client(port: int) -> None:
        first = DNSRecord.question("db.test.example")
        first.add_ar(EDNS0(udp_len=4096, opts=[NSID, SUBNET]))
        reply = send(port, first)
        assert [str(rr.rdata) for rr in reply.rr] == ["203.0.113.10"]
        (opt,) = opts(reply)
        assert opt.rclass == EDNS_UDP_SIZE and opt.rdata == []  # ours: no NSID, no subnet
        plain = send(port, DNSRecord.question("db.test.example"))  # from the cache
        assert [str(rr.rdata) for rr in plain.rr] == ["203.0.113.10"] and opts(plain) == []
        no_recursion = DNSRecord.question("db.test.example")
        no_recursion.header.rd = 0
        reply = send(port, no_recursion)
        assert reply.header.rd == 0 and reply.header.aa == 1 and reply.rr

    against_gateway(upstream_port, client)
    assert asked(log, "db.test.example.") == 1  # the other two were served from the cache


def test_a_label_with_a_dot_is_its_own_name_and_the_real_name_keeps_its_answer(
    unbound: tuple[int, Path],
) -> None:
    upstream_port, log = unbound
    dotted = b"\x07db.test\x07example\x00"  # the labels "db.test", "example"
    query = struct.pack("!HHHHHH", 0x5150, 0x0100, 1, 0, 0, 0) + dotted + struct.pack("!HH", 1, 1)

    def client(port: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(WAIT_S)
            sock.sendto(query, (LOOPBACK, port))
            denied = DNSRecord.parse(sock.recv(65535))
        assert denied.header.rcode == RCODE.NXDOMAIN and denied.rr == []
        real = send(port, DNSRecord.question("db.test.example"))
        assert [str(rr.rdata) for rr in real.rr] == ["203.0.113.10"]

    against_gateway(upstream_port, client)
    text = log.read_text()
    assert "db\\.test" not in text and asked(log, "db.test.example.") == 1


def test_an_nxdomain_keeps_the_zones_soa_and_is_cached_no_longer_than_its_minimum(
    unbound: tuple[int, Path],
) -> None:
    upstream_port, log = unbound

    def client(port: int) -> None:
        for _ in range(2):  # the second from the cache
            reply = send(port, DNSRecord.question("missing.test.example"))
            assert reply.header.rcode == RCODE.NXDOMAIN
            (soa,) = reply.auth
            assert (QTYPE[soa.rtype], str(soa.rname)) == ("SOA", "test.example.")
            assert 0 < soa.ttl <= SOA_MINIMUM

    against_gateway(upstream_port, client)
    assert asked(log, "missing.test.example.") == 1


def test_a_query_the_upstream_never_answers_fails_alone(unbound: tuple[int, Path]) -> None:
    upstream_port, log = unbound

    def client(port: int) -> None:
        lost = send(port, DNSRecord.question("blackhole.test.example"))
        assert lost.header.rcode == RCODE.SERVFAIL
        assert send(port, DNSRecord.question("db.test.example")).rr
        transfer = send(port, DNSRecord.question("test.example", "AXFR"), tcp=True)
        assert transfer.header.rcode == RCODE.REFUSED
        version_one = DNSRecord.question("db.test.example")
        version_one.add_ar(EDNS0(version=1))
        badvers = send(port, version_one)
        (opt,) = opts(badvers)
        assert opt.ttl >> 24 == 1  # BADVERS, answered here
        assert send(port, DNSRecord.question("db.test.example")).header.rcode == RCODE.NOERROR

    states = against_gateway(upstream_port, client)
    assert states == {f"{LOOPBACK}:{upstream_port}": State.UP}
    assert asked(log, "blackhole.test.example.") >= 1
    assert asked(log, "test.example.") == 0  # the AXFR never left
    assert asked(log, "db.test.example.") == 1


def test_pipelined_tcp_queries_are_answered_as_each_is_ready(unbound: tuple[int, Path]) -> None:
    upstream_port, _log = unbound

    def client(port: int) -> None:
        slow = DNSRecord.question("blackhole.test.example")  # the upstream drops it
        slow.header.id = 1
        fast = DNSRecord.question("db.test.example")
        fast.header.id = 2
        stream = b"".join(struct.pack("!H", len(m)) + m for m in (slow.pack(), fast.pack()))
        with socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as sock:
            sock.sendall(stream)
            ids = []
            for _ in range(2):
                (length,) = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))
                ids.append(DNSRecord.parse(sock.recv(length, socket.MSG_WAITALL)).header.id)
        assert ids == [2, 1]  # the fast answer did not wait for the slow one

    against_gateway(upstream_port, client)


def test_junk_gets_no_reply_and_local_answers_have_the_queries_shape(
    unbound: tuple[int, Path],
) -> None:
    upstream_port, log = unbound
    header = struct.Struct("!HHHHHH")
    name = b"\x02db\x04test\x07example\x00"
    response = header.pack(7, 0x8180, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)  # QR=1
    notify = header.pack(8, 0x2000, 1, 0, 0, 0) + name + struct.pack("!HH", 6, 1)  # opcode 4

    def client(port: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            for junk in (response, b"\x00\x01"):
                sock.sendto(junk, (LOOPBACK, port))
                with pytest.raises(TimeoutError):
                    sock.recv(65535)
            sock.settimeout(WAIT_S)
            sock.sendto(notify, (LOOPBACK, port))
            assert DNSRecord.parse(sock.recv(65535)).header.rcode == RCODE.NOTIMP
        denied = DNSRecord.question("db.other.example")
        denied.add_ar(EDNS0(udp_len=4096, flags="do"))
        reply = send(port, denied)
        assert reply.header.rcode == RCODE.NXDOMAIN
        (opt,) = opts(reply)
        assert opt.rclass == EDNS_UDP_SIZE and opt.ttl & 0x8000
        (soa,) = reply.auth
        assert (QTYPE[soa.rtype], str(soa.rname)) == ("SOA", "other.example.")

    against_gateway(upstream_port, client)
    assert asked(log, "db.other.example.") == 0 and asked(log, "db.test.example.") == 0
