"""The DNS server and upstream client over real sockets, against a real dnsmasq on loopback.

No namespaces are needed: everything listens on 127.0.0.1 ports chosen at random. The datapath
is the fake (programming is covered by the kernel and lab tests); what is tested here is the
wire: UDP and TCP service, forwarding, failover, truncation and the TCP retry upstream.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from egressgw.dns.interceptor import DnsSettings, Interceptor, PolicyView
from egressgw.dns.names import NamePolicy
from egressgw.dns.server import DnsServer
from egressgw.dns.upstream import Upstream
from egressgw.identity import IdentityRegistry
from egressgw.plan import build
from egressgw.policy.model import (
    EgressGateway,
    EgressPolicy,
    EgressRule,
    LabelSelector,
    Namespace,
    Peer,
    Pod,
    PortSpec,
    Protocol,
    Snapshot,
)
from egressgw.testing.datapath import FakeDatapath
from tests.conftest import require
from tests.ports import free_port

LOOPBACK = "127.0.0.1"


PROBE = "ready.probe.invalid"  # asked of dnsmasq until it answers; tests leave its lines out


@contextmanager
def dnsmasq_on_loopback(directory: Path, *records: str) -> Iterator[tuple[int, Path]]:
    """dnsmasq on a random loopback port with ``records`` (its options), logging every query;
    (port, log), once it answers."""
    require(shutil.which("dnsmasq") is not None, "needs dnsmasq (Debian package dnsmasq-base)")
    port = free_port()
    log = directory / "dnsmasq.log"
    argv = [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
        f"--listen-address={LOOPBACK}", f"--port={port}", "--user=root", "--group=root",
        "--log-queries", f"--log-facility={log}", *records,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        wait_until_answering(port)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def wait_until_answering(port: int, timeout_s: float = 5.0) -> None:
    """Until dnsmasq answers on ``port``: under load its log exists before it listens."""
    probe = bytes(DNSRecord.question(PROBE).pack())
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                sock.sendto(probe, (LOOPBACK, port))
                sock.recv(512)
                return
            except (ConnectionRefusedError, TimeoutError):
                time.sleep(0.05)
    raise AssertionError(f"dnsmasq did not answer on port {port} within {timeout_s} s")


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    hosts = tmp_path / "wide.hosts"
    hosts.write_text("".join(f"203.0.113.{i} wide.test.example\n" for i in range(1, 61)))
    with dnsmasq_on_loopback(
        tmp_path,
        f"--addn-hosts={hosts}",
        "--host-record=db.test.example,203.0.113.10,60",
        "--cname=alias.test.example,db.test.example",
    ) as running:
        yield running


def interceptor(upstreams: list[tuple[str, int]], timeout_s: float = 0.5) -> Interceptor:
    sel = LabelSelector(match_labels=(("app", "api"),))
    rule = EgressRule(
        to=(Peer(fqdn_pattern="*.test.example"),), ports=(PortSpec(Protocol.TCP, 443),)
    )
    snapshot = Snapshot(
        namespaces={"payments": Namespace("payments", {"project": "payments"})},
        pods=(Pod("payments", "api-0", {"app": "api"}, (ipaddress.ip_address(LOOPBACK),)),),
        gateways=(
            EgressGateway(
                "payments",
                LabelSelector(match_labels=(("project", "payments"),)),
                egress_ips=(ipaddress.ip_address("198.51.100.10"),),
            ),
        ),
        policies=(EgressPolicy("payments", "api", sel, egress=(rule,)),),
    )
    plan = build(snapshot, IdentityRegistry())
    result = Interceptor(DnsSettings(), Upstream(upstreams, timeout_s), FakeDatapath())
    result.update(PolicyView(plan.workloads, NamePolicy(plan.selections)))
    return result


async def serve(icpt: Interceptor) -> tuple[DnsServer, int]:
    port = free_port()
    await icpt.upstream.start()
    server = DnsServer(icpt, [(LOOPBACK, port)])
    await server.start()
    return server, port


async def ask(port: int, name: str, tcp: bool = False, qtype: str = "A") -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    raw = await asyncio.to_thread(query.send, LOOPBACK, port, tcp, 3)
    return DNSRecord.parse(raw)


def test_udp_and_tcp_queries_are_forwarded_and_programmed(dnsmasq: tuple[int, Path]) -> None:
    upstream_port, log = dnsmasq

    async def scenario() -> None:
        icpt = interceptor([(LOOPBACK, upstream_port)])
        server, port = await serve(icpt)
        try:
            udp = await ask(port, "db.test.example")
            assert [str(rr.rdata) for rr in udp.rr] == ["203.0.113.10"]
            tcp = await ask(port, "alias.test.example", tcp=True)
            assert [QTYPE[rr.rtype] for rr in tcp.rr] == ["CNAME", "A"]
            denied = await ask(port, "db.other.example")
            assert denied.header.rcode == RCODE.NXDOMAIN
            fake = icpt.datapath
            assert isinstance(fake, FakeDatapath)
            assert fake.allowed(1) == {"203.0.113.10"}
        finally:
            await server.close()
            icpt.upstream.close()

    asyncio.run(scenario())
    assert "db.other.example" not in log.read_text()  # denied names never leave
    assert "query[A] db.test.example" in log.read_text()


def test_a_truncated_upstream_answer_is_fetched_again_over_tcp(dnsmasq: tuple[int, Path]) -> None:
    upstream_port, _log = dnsmasq

    async def scenario() -> None:
        icpt = interceptor([(LOOPBACK, upstream_port)])
        server, port = await serve(icpt)
        try:
            udp = await ask(port, "wide.test.example")  # 60 A records: over 512 bytes
            assert udp.header.tc == 1 and udp.rr == []
            tcp = await ask(port, "wide.test.example", tcp=True)
            assert len(tcp.rr) == 60
        finally:
            await server.close()
            icpt.upstream.close()

    asyncio.run(scenario())


def test_dead_upstreams_fail_over_are_demoted_and_all_dead_is_servfail(
    dnsmasq: tuple[int, Path],
) -> None:
    upstream_port, _log = dnsmasq
    closed = free_port()  # nothing listens: ICMP port unreachable at once

    async def scenario() -> None:
        icpt = interceptor([(LOOPBACK, closed), (LOOPBACK, upstream_port)], timeout_s=0.5)
        server, port = await serve(icpt)
        try:
            started = time.monotonic()
            reply = await ask(port, "db.test.example")
            assert [str(rr.rdata) for rr in reply.rr] == ["203.0.113.10"]
            assert time.monotonic() - started < 0.5  # refused at once, not after the timeout
        finally:
            await server.close()
            icpt.upstream.close()

        # a blackhole (bound, never answers) first: the first query waits out its timeout, the
        # next ones go straight to the live upstream while the dead one is demoted
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
            hole.bind((LOOPBACK, 0))
            icpt = interceptor([hole.getsockname(), (LOOPBACK, upstream_port)], timeout_s=0.5)
            server, port = await serve(icpt)
            try:
                started = time.monotonic()
                await ask(port, "db.test.example")
                first = time.monotonic() - started
                started = time.monotonic()
                reply = await ask(port, "alias.test.example")
                second = time.monotonic() - started
                assert reply.header.rcode == RCODE.NOERROR
                assert first >= 0.5 and second < 0.25
            finally:
                await server.close()
                icpt.upstream.close()

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
            hole.bind((LOOPBACK, 0))
            icpt = interceptor([hole.getsockname(), (LOOPBACK, free_port())], timeout_s=0.5)
            server, port = await serve(icpt)
            try:
                started = time.monotonic()
                reply = await ask(port, "db.test.example")
                assert reply.header.rcode == RCODE.SERVFAIL
                # both failed: next time only one is probed, so SERVFAIL within one timeout
                started = time.monotonic()
                reply = await ask(port, "alias.test.example")
                assert reply.header.rcode == RCODE.SERVFAIL
                assert time.monotonic() - started < 0.5 + 0.25
            finally:
                await server.close()
                icpt.upstream.close()

    asyncio.run(scenario())


def test_a_server_not_yet_serving_keeps_queries_waiting_and_answers_them_once_it_serves(
    dnsmasq: tuple[int, Path],
) -> None:
    upstream_port, _log = dnsmasq

    async def scenario() -> None:
        icpt = interceptor([(LOOPBACK, upstream_port)])
        await icpt.upstream.start()
        port = free_port()
        server = DnsServer(icpt, [(LOOPBACK, port)])
        await server.start(serving=False)
        try:
            udp = asyncio.create_task(ask(port, "db.test.example"))
            tcp = asyncio.create_task(ask(port, "alias.test.example", tcp=True))
            done, _ = await asyncio.wait({udp, tcp}, timeout=0.5)
            assert done == set()  # bound: not refused, not answered
            await server.serve()
            udp_reply, tcp_reply = await asyncio.wait_for(asyncio.gather(udp, tcp), 3)
            assert [str(rr.rdata) for rr in udp_reply.rr] == ["203.0.113.10"]
            assert [QTYPE[rr.rtype] for rr in tcp_reply.rr] == ["CNAME", "A"]
        finally:
            await server.close()
            icpt.upstream.close()

    asyncio.run(scenario())


def test_a_port_taken_for_tcp_fails_the_start_and_leaves_udp_unbound() -> None:
    port = free_port()

    async def scenario() -> None:
        icpt = interceptor([(LOOPBACK, 9)])
        server = DnsServer(icpt, [(LOOPBACK, port)])
        with pytest.raises(OSError) as raised:
            await server.start()
        assert raised.value.errno == errno.EADDRINUSE
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, port))  # the half that was bound before the failure is closed

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, port))
        taken.listen()
        asyncio.run(scenario())


def test_queries_that_arrive_while_the_server_is_held_up_wait_instead_of_being_dropped() -> None:
    # 2,000 queries sent while nothing reads: the default buffer would drop all but ~250
    from egressgw.dns.server import udp_socket
    from tests.conftest import require_kernel

    require_kernel()  # raising the buffer past rmem_max needs CAP_NET_ADMIN
    server = udp_socket("127.0.0.1", 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        query = bytes(DNSRecord.question("db.lab.example").pack())
        for _ in range(2000):
            client.sendto(query, server.getsockname())
        received = 0
        while True:
            try:
                server.recv(512)
            except BlockingIOError:
                break
            received += 1
        assert received == 2000
    finally:
        client.close()
        server.close()
