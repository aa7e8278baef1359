"""Forwarding queries to upstream resolvers.

In: a client's query bytes and its parsed question. Out: the upstream's response bytes with the
client's ID, or ``UpstreamError`` once every upstream has failed or timed out. The query is
forwarded as it came (EDNS0 options included) under a fresh random ID; upstreams are tried in
order, each for ``timeout_s``; a truncated UDP answer is fetched again over TCP from the same
upstream. One connected UDP socket per upstream carries all queries. An upstream that failed is
asked after the others for a few seconds, so a dead one does not cost every query a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

from egressgw import metrics
from egressgw.dns.wire import HEADER, TC, Question, WireError, read_name

log = logging.getLogger(__name__)
Address = tuple[str, int]
DEMOTE_S = 5.0  # how long a failed upstream is asked only after the others


class UpstreamError(Exception):
    pass


def answers(question: Question, response: bytes) -> bool:
    """Whether ``response`` carries ``question`` (same name, type and class)."""
    try:
        name, end = read_name(response, HEADER.size)
        qtype, qclass = struct.unpack_from("!HH", response, end)
    except (WireError, struct.error):
        return False
    return (name, qtype, qclass) == (question.name, question.qtype, question.qclass)


def _time_out(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(UpstreamError("timed out"))


_RECEIVE = bytearray(65536)  # one buffer for every upstream socket: they share the loop's thread
_RECEIVE_VIEW = memoryview(_RECEIVE)


@dataclass
class _Server:
    """One upstream: a connected, non-blocking UDP socket read from the loop, and the queries
    waiting for its answers. (asyncio's datagram transport reads with a 256 KiB buffer, which
    the allocator maps and unmaps again for every answer.)"""

    address: Address
    pending: dict[int, tuple[Question, asyncio.Future[bytes]]] = field(default_factory=dict)
    sock: socket.socket | None = None
    down_until: float = 0.0  # after a failure, others are asked first until then

    def __post_init__(self) -> None:
        self.seconds = metrics.DNS_UPSTREAM_SECONDS.labels(self.label)  # looked up once

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self.address)
            loop.add_reader(sock.fileno(), self.readable)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def send(self, datagram: bytes) -> None:
        if self.sock is None:
            raise UpstreamError(f"{self.label}: not connected")
        try:
            self.sock.send(datagram)
        except OSError as exc:  # a full socket buffer, or an ICMP error from an earlier query
            raise UpstreamError(f"{self.label}: {exc}") from None

    def readable(self) -> None:
        for _ in range(64):  # bounded: the loop's other work gets its turn
            if self.sock is None:
                return
            try:
                size = self.sock.recv_into(_RECEIVE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP port unreachable and friends
                self.error_received(exc)
                continue
            self.datagram_received(_RECEIVE_VIEW[:size].tobytes())

    def datagram_received(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            return
        (ident,) = struct.unpack_from("!H", data)
        entry = self.pending.get(ident)
        if entry is None:
            return
        question, future = entry
        if not answers(question, data):  # it must be to our question, not just carry our ID
            return
        if not future.done():
            future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        for _question, future in self.pending.values():
            if not future.done():
                future.set_exception(UpstreamError(f"{self.label}: {exc}"))

    @property
    def label(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Upstream:
    def __init__(self, servers: list[Address], timeout_s: float = 1.0) -> None:
        if not servers:
            raise ValueError("at least one upstream is needed")
        self.timeout_s = timeout_s
        self._servers = [_Server(address) for address in servers]
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for server in self._servers:
            server.open(self._loop)

    def close(self) -> None:
        if self._loop is not None:
            for server in self._servers:
                server.close(self._loop)

    def _candidates(self, now: float) -> list[_Server]:
        """Upstreams in configured order, skipping those that failed recently; when all have,
        only the one that failed longest ago is probed, so SERVFAIL comes within one timeout."""
        healthy = [s for s in self._servers if s.down_until <= now]
        return healthy or [min(self._servers, key=lambda s: s.down_until)]

    async def resolve(self, question: Question, query: bytes) -> bytes:
        errors: list[str] = []
        for server in self._candidates(time.monotonic()):
            started = time.perf_counter()
            try:
                response = await self._udp(server, question, query)
                if struct.unpack_from("!H", response, 2)[0] & TC:
                    response = await self._tcp(server, question, query)
            except (TimeoutError, OSError, UpstreamError, WireError) as exc:
                server.down_until = time.monotonic() + DEMOTE_S
                metrics.DNS_UPSTREAM_ERRORS.labels(server.label).inc()
                errors.append(f"{server.label}: {exc or type(exc).__name__}")
                continue
            server.seconds.observe(time.perf_counter() - started)
            server.down_until = 0.0
            return struct.pack("!H", question.id) + response[2:]
        raise UpstreamError("every upstream failed: " + "; ".join(errors))

    async def _udp(self, server: _Server, question: Question, query: bytes) -> bytes:
        ident = secrets.randbits(16)
        while ident in server.pending:
            ident = secrets.randbits(16)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        server.pending[ident] = (question, future)
        # a plain timer on the future: wait_for would wrap every query in a task of its own
        timer = loop.call_later(self.timeout_s, _time_out, future)
        try:
            server.send(struct.pack("!H", ident) + query[2:])
            return await future
        finally:
            timer.cancel()
            server.pending.pop(ident, None)

    async def _tcp(self, server: _Server, question: Question, query: bytes) -> bytes:
        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(length)
            finally:
                writer.close()

        try:
            response = await asyncio.wait_for(exchange(), self.timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(
                f"{server.label}: TCP retry failed ({type(exc).__name__})"
            ) from None
        if not answers(question, response):
            raise UpstreamError(f"{server.label}: TCP answer to another question")
        return response
