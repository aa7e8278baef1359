"""DNS over TCP (RFC 7766) against the real server on loopback: the per-source connection cap,
the write deadline, and pipelined queries answered concurrently, out of order.

The upstream is a small resolver in the same event loop that delays its answer to names that
start with ``slow``; the datapath is the fake. Sources are 127.0.0.1 and 127.0.0.2 (both on
loopback), each a pod of the one policy, which allows ``*.test.example``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import cast

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from prometheus_client import REGISTRY

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
from tests.unit.test_reference_cycles import cyclic_garbage

FIRST, SECOND = "127.0.0.1", "127.0.0.2"


class _Resolver(asyncio.DatagramProtocol):
    """Answers every A query with 203.0.113.N (60 of them for names starting with ``big``);
    names starting with ``slow`` after ``delay_s``.
    Keeps the most queries it ever had waiting at once."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.waiting = 0
        self.most_waiting = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).rstrip(".")
        reply = request.reply()
        for n in range(60 if name.startswith("big") else 1):  # big: a reply of about 1 KB
            reply.add_answer(
                RR(name, QTYPE.A, rdata=A(f"203.0.113.{(len(name) + n) % 250}"), ttl=60)
            )
        if not name.startswith("slow"):
            self._send(bytes(reply.pack()), addr)
            return
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        asyncio.get_running_loop().call_later(self.delay_s, self._late, bytes(reply.pack()), addr)

    def _late(self, packet: bytes, addr: tuple[str, int]) -> None:
        self.waiting -= 1
        self._send(packet, addr)

    def _send(self, packet: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(packet, addr)


# a rate limit far above what these tests send: they test the TCP limits, not that one
UNLIMITED = DnsSettings(rate_per_source_qps=1e6, burst_per_source=1e6)


def _interceptor(upstream: Upstream, settings: DnsSettings = UNLIMITED) -> Interceptor:
    selector = LabelSelector(match_labels=(("app", "api"),))
    rule = EgressRule(
        to=(Peer(fqdn_pattern="*.test.example"),), ports=(PortSpec(Protocol.TCP, 443),)
    )
    pods = tuple(
        Pod("payments", f"api-{i}", {"app": "api"}, (ipaddress.ip_address(address),))
        for i, address in enumerate((FIRST, SECOND))
    )
    snapshot = Snapshot(
        namespaces={"payments": Namespace("payments", {"project": "payments"})},
        pods=pods,
        gateways=(
            EgressGateway(
                "payments",
                LabelSelector(match_labels=(("project", "payments"),)),
                egress_ips=(ipaddress.ip_address("198.51.100.10"),),
            ),
        ),
        policies=(EgressPolicy("payments", "api", selector, egress=(rule,)),),
    )
    plan = build(snapshot, IdentityRegistry())
    result = Interceptor(settings, upstream, FakeDatapath())
    result.update(PolicyView(plan.workloads, NamePolicy(plan.selections)))
    return result


@asynccontextmanager
async def _gateway(
    delay_s: float = 0.5,
    settings: DnsSettings = UNLIMITED,
    idle_s: float = 10.0,
    write_timeout_s: float = 10.0,
    tcp_in_flight: int = 16,
    tcp_per_source: int = 16,
) -> AsyncIterator[tuple[DnsServer, _Resolver, int]]:
    """The DNS server on a free loopback port (TCP), its upstream resolver, and the port."""
    loop = asyncio.get_running_loop()
    transport, resolver = await loop.create_datagram_endpoint(
        lambda: _Resolver(delay_s), local_addr=(FIRST, 0)
    )
    upstream = Upstream([transport.get_extra_info("sockname")], timeout_s=2.0)
    await upstream.start()
    server = DnsServer(
        _interceptor(upstream, settings),
        [(FIRST, 0)],
        idle_s=idle_s,
        write_timeout_s=write_timeout_s,
        tcp_in_flight=tcp_in_flight,
        tcp_per_source=tcp_per_source,
    )
    await server.start()
    port = server._tcp[0].sockets[0].getsockname()[1]
    try:
        yield server, resolver, port
    finally:
        await server.close()
        upstream.close()
        transport.close()


def _frame(name: str, ident: int) -> bytes:
    record = DNSRecord.question(name, "A")
    record.header.id = ident
    query = bytes(record.pack())
    return struct.pack("!H", len(query)) + query


async def _reply(reader: asyncio.StreamReader) -> DNSRecord:
    (length,) = struct.unpack("!H", await reader.readexactly(2))
    return DNSRecord.parse(await reader.readexactly(length))


async def _connect(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(FIRST, port, local_addr=(source, 0))


async def _closed_without_answer(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes (or resets) this connection rather than answering."""
    try:
        data = await asyncio.wait_for(reader.read(512), 2)
    except ConnectionResetError:
        return True
    return data == b""


def _closed(reason: str) -> float:
    value = REGISTRY.get_sample_value("egressgw_dns_tcp_closed_total", {"reason": reason})
    assert value is not None  # the series exists from the start
    return value


def _open_connections() -> float:
    value = REGISTRY.get_sample_value("egressgw_dns_tcp_connections")
    assert value is not None
    return value


def _pipeline_full() -> float:
    value = REGISTRY.get_sample_value("egressgw_dns_tcp_pipeline_full_total")
    assert value is not None
    return value


async def _until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_one_source_gets_at_most_16_connections_and_others_are_still_served() -> None:
    async def scenario() -> None:
        refused = _closed("source limit")
        before = _open_connections()
        async with _gateway() as (_server, _resolver, port):
            held = []
            for index in range(16):
                reader, writer = await _connect(FIRST, port)
                writer.write(_frame("db.test.example", index))
                assert (await _reply(reader)).header.id == index  # served, and counted open
                held.append((reader, writer))
            # the 17th from the same source is closed at once, unanswered
            reader, writer = await _connect(FIRST, port)
            writer.write(_frame("db.test.example", 17))
            assert await _closed_without_answer(reader)
            writer.close()
            assert _closed("source limit") == refused + 1
            # another source is served as usual
            reader, writer = await _connect(SECOND, port)
            writer.write(_frame("db.test.example", 18))
            reply = await _reply(reader)
            assert reply.header.id == 18 and reply.header.rcode == RCODE.NOERROR
            writer.close()
            # the cap is on connections open at once: one closed, one more is served
            await _until(lambda: _open_connections() == before + 16)
            held[0][1].close()
            await _until(lambda: _open_connections() == before + 15)
            reader, writer = await _connect(FIRST, port)
            writer.write(_frame("db.test.example", 19))
            assert (await _reply(reader)).header.id == 19
            writer.close()
            for _, held_writer in held[1:]:
                held_writer.close()

    asyncio.run(scenario())


def test_a_client_that_never_reads_is_disconnected_after_the_write_deadline() -> None:
    async def scenario() -> None:
        timeouts = _closed("write timeout")
        idle = _closed("idle")
        async with _gateway(idle_s=30.0, write_timeout_s=0.3) as (_server, _resolver, port):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            client.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(client, (FIRST, port))
            # denied names, answered by the gateway itself: it keeps answering until the
            # replies fill the buffers on the way, then waits for a client that never reads
            batch = _frame("big.test.example", 1) * 100  # each answered with about 1 KB
            pending, sent, started = bytearray(), 0, time.monotonic()
            while _closed("write timeout") == timeouts and sent < 1_000_000:
                assert time.monotonic() - started < 10, f"still open after {sent} queries"
                if not pending:
                    pending += batch
                    sent += 1000
                try:
                    del pending[: client.send(pending)]
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    break
                await asyncio.sleep(0.01)
            await _until(lambda: _closed("write timeout") == timeouts + 1, timeout_s=3.0)
            closed_after = time.monotonic() - started
            # the server reset it: the client's next sends fail
            reset = False
            for _ in range(200):
                try:
                    client.send(batch)
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    reset = True
                    break
                await asyncio.sleep(0.01)
            client.close()
            assert reset
            assert closed_after < 10  # the idle timeout (30 s) did not do it
            assert _closed("idle") == idle

    asyncio.run(scenario())


def test_pipelined_queries_are_answered_as_each_is_ready_not_in_order() -> None:
    async def scenario() -> None:
        async with _gateway(delay_s=0.5) as (_server, _resolver, port):
            reader, writer = await _connect(FIRST, port)
            started = time.monotonic()
            # three queries in one write: the first one's answer is slow upstream
            names = {1: "slow.test.example", 2: "db.test.example", 3: "api.test.example"}
            writer.write(b"".join(_frame(name, ident) for ident, name in names.items()))
            arrived = []
            for _ in names:
                reply = await _reply(reader)
                arrived.append((reply.header.id, time.monotonic() - started))
                assert str(reply.q.qname).rstrip(".") == names[reply.header.id]
                assert [str(rr.rdata) for rr in reply.rr] == [
                    f"203.0.113.{len(names[reply.header.id])}"
                ]
            writer.close()
            order = [ident for ident, _ in arrived]
            assert sorted(order[:2]) == [2, 3] and order[2] == 1, arrived
            assert max(seconds for _, seconds in arrived[:2]) < 0.25, arrived  # not held up
            assert arrived[2][1] >= 0.5, arrived

    asyncio.run(scenario())


def test_one_connection_has_at_most_its_limit_of_queries_in_flight() -> None:
    async def scenario() -> None:
        full = _pipeline_full()
        async with _gateway(delay_s=0.2, tcp_in_flight=4) as (_server, resolver, port):
            reader, writer = await _connect(FIRST, port)
            started = time.monotonic()
            writer.write(b"".join(_frame(f"slow{i}.test.example", i) for i in range(12)))
            answered = {(await _reply(reader)).header.id for _ in range(12)}
            elapsed = time.monotonic() - started
            writer.close()
            assert answered == set(range(12))
            # four at a time upstream, so three rounds of the upstream's delay
            assert resolver.most_waiting == 4
            assert 0.6 <= elapsed < 1.5, elapsed
            assert _pipeline_full() > full

    asyncio.run(scenario())


def test_a_silent_connection_is_closed_when_idle_but_not_while_it_waits_for_an_answer() -> None:
    async def scenario() -> None:
        idle = _closed("idle")
        async with _gateway(delay_s=0.5, idle_s=0.2) as (_server, _resolver, port):
            waiting_reader, waiting_writer = await _connect(FIRST, port)
            silent_reader, silent_writer = await _connect(FIRST, port)
            started = time.monotonic()
            waiting_writer.write(_frame("slow.test.example", 5))
            # the answer takes longer than the idle timeout: it still comes on this connection
            reply = await _reply(waiting_reader)
            assert reply.header.id == 5 and time.monotonic() - started >= 0.5
            # the connection that asked nothing was closed meanwhile
            assert await _closed_without_answer(silent_reader)
            assert _closed("idle") >= idle + 1
            waiting_writer.close()
            silent_writer.close()

    asyncio.run(scenario())


def test_a_query_dripped_a_byte_at_a_time_does_not_keep_its_connection_open() -> None:
    async def scenario() -> None:
        idle = _closed("idle")
        async with _gateway(idle_s=0.3) as (_server, _resolver, port):
            reader, writer = await _connect(FIRST, port)
            frame = _frame("drip.test.example", 9)
            closed = False
            for byte in frame[:-1]:  # bounded: the frame's length, 50 ms apart
                writer.write(bytes([byte]))
                try:
                    data = await asyncio.wait_for(reader.read(512), 0.05)
                except TimeoutError:
                    continue
                closed = data == b""
                break
            assert closed, "the gateway kept a dripping connection open"
            assert _closed("idle") == idle + 1
            writer.close()

    asyncio.run(scenario())


def test_a_dropped_query_ends_its_connection_after_the_queries_before_it_are_answered() -> None:
    async def scenario() -> None:
        limited = DnsSettings(rate_per_source_qps=0.001, burst_per_source=2)
        async with _gateway(delay_s=0.3, settings=limited) as (_server, _resolver, port):
            reader, writer = await _connect(FIRST, port)
            # two queries within the burst, the third over the rate limit: dropped
            names = ("slow.test.example", "db.test.example", "api.test.example")
            writer.write(b"".join(_frame(name, ident) for ident, name in enumerate(names)))
            answered = [(await _reply(reader)).header.id for _ in range(2)]
            assert answered == [1, 0]  # the slow one too, though the connection was ending
            assert await _closed_without_answer(reader)
            writer.close()

    asyncio.run(scenario())


def test_tcp_connections_leave_no_cyclic_garbage() -> None:
    """The daemon freezes the collector's generations every second, so an object in a cycle
    that is alive at a freeze is never freed: a TCP connection, which lives for seconds, must
    be freed by refcounting alone when it ends, whichever way it ends."""
    loop = asyncio.new_event_loop()
    gateway = _gateway(idle_s=0.2)
    server, _resolver, port = loop.run_until_complete(gateway.__aenter__())

    async def exchange(
        payload: bytes, *, answers: int, close: bool = True, reset: bool = False
    ) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (FIRST, port))
            await loop.sock_sendall(sock, payload)
            if reset:  # closed with an RST while the server still waits for the rest
                await asyncio.sleep(0.01)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            for _ in range(answers):
                (length,) = struct.unpack("!H", await loop.sock_recv(sock, 2))
                while length:
                    length -= len(await loop.sock_recv(sock, length))
            if not close:  # the server closes it once idle
                assert await loop.sock_recv(sock, 512) == b""
        finally:
            sock.close()

    runs = itertools.count()

    async def connections() -> None:
        run = next(runs)  # names not cached yet: each run asks the upstream
        for i in range(4):
            await exchange(_frame(f"n{i}.test.example", i), answers=1)
            await exchange(
                _frame(f"m{i}.test.example", i) + _frame("x.other.example", 1), answers=2
            )
            await exchange(b"\x00\x40junk", answers=0)  # a prefix promising more than comes
            await exchange(_frame(f"k{i}.test.example", i), answers=1, close=False)
            await exchange(_frame(f"r{i}.test.example", i)[:9], answers=0, reset=True)
            await exchange(b"\x00\x00", answers=0)  # an empty message
            await exchange(b"\xff\xff" + bytes(65535), answers=0)  # the largest, all junk
            await exchange(_frame(f"slow{run}-{i}.test.example", i), answers=0, reset=True)
        await _until(lambda: not server._connections)

    try:
        loop.run_until_complete(connections())  # first use: what is made once per daemon
        found = cyclic_garbage(lambda: loop.run_until_complete(connections()))
    finally:
        loop.run_until_complete(gateway.__aexit__(None, None, None))
        loop.close()
    assert not found, "\n".join(found)


def test_tcp_connections_cut_short_by_the_limits_leave_no_cyclic_garbage() -> None:
    """As above, for connections that meet the limits: the per-source cap, the pipeline,
    the write deadline, a dropped query, a half-close with queries in flight."""
    loop = asyncio.new_event_loop()
    gateway = _gateway(
        delay_s=0.1, idle_s=0.2, write_timeout_s=0.2, tcp_in_flight=2, tcp_per_source=2
    )
    server, _resolver, port = loop.run_until_complete(gateway.__aenter__())

    async def connect() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (FIRST, port))
        return sock

    async def answers(sock: socket.socket, count: int) -> None:
        for _ in range(count):
            (length,) = struct.unpack("!H", await loop.sock_recv(sock, 2))
            while length:
                length -= len(await loop.sock_recv(sock, length))

    async def closed(sock: socket.socket) -> bool:
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 512), 2) == b""
        except ConnectionResetError:
            return True

    async def pipelined(i: str) -> None:
        with await connect() as sock:
            queries = b"".join(_frame(f"slow{i}-{n}.test.example", n) for n in range(5))
            await loop.sock_sendall(sock, queries)
            await answers(sock, 5)

    async def half_closed(i: str) -> None:
        with await connect() as sock:
            names = (f"slow{i}.test.example", f"h{i}.test.example", "x.other.example")
            await loop.sock_sendall(sock, b"".join(_frame(name, n) for n, name in enumerate(names)))
            sock.shutdown(socket.SHUT_WR)
            await answers(sock, 3)
            assert await closed(sock)

    async def dropped_after_one_in_flight(i: str) -> None:
        with await connect() as sock:
            await loop.sock_sendall(sock, _frame(f"slow{i}.test.example", 1) + b"\x00\x00")
            await answers(sock, 1)
            assert await closed(sock)

    async def reset_while_the_pipeline_is_full(i: str) -> None:
        with await connect() as sock:
            queries = b"".join(_frame(f"slow{i}-{n}.test.example", n) for n in range(4))
            await loop.sock_sendall(sock, queries)
            await asyncio.sleep(0.01)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def over_the_cap() -> None:
        held = [await connect() for _ in range(2)]
        try:
            for n, sock in enumerate(held):
                await loop.sock_sendall(sock, _frame(f"c{n}.test.example", n))
                await answers(sock, 1)
            with await connect() as sock:
                assert await closed(sock)
        finally:
            for sock in held:
                sock.close()

    async def never_reading() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        with sock:
            await loop.sock_connect(sock, (FIRST, port))
            batch = _frame("big.test.example", 1) * 100  # each answered with about 1 KB
            for _ in range(500):
                try:
                    sock.send(batch)
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("never disconnected")

    runs = itertools.count()

    async def connections() -> None:
        run = next(runs)  # names not cached yet: each run asks the upstream
        for i in range(3):
            await pipelined(f"{run}-{i}")
            await half_closed(f"{run}-{i}")
            await dropped_after_one_in_flight(f"{run}-{i}")
            await reset_while_the_pipeline_is_full(f"{run}-{i}")
            await over_the_cap()
        await never_reading()
        await _until(lambda: not server._connections)

    try:
        loop.run_until_complete(connections())  # first use: what is made once per daemon
        found = cyclic_garbage(lambda: loop.run_until_complete(connections()))
    finally:
        loop.run_until_complete(gateway.__aexit__(None, None, None))
        loop.close()
    assert not found, "\n".join(found)
