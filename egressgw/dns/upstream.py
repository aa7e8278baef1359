"""Forwarding queries to upstream resolvers.

In: a client's query bytes and its parsed question. Out: the upstream's response bytes with the
client's ID, or ``UpstreamError`` once every upstream has failed or timed out. The query is
forwarded as it came (EDNS0 options included) under a fresh random ID; upstreams are tried in
order, each for ``timeout_s``; a truncated UDP answer is fetched again over TCP from the same
upstream. One connected UDP socket per upstream carries all queries. An upstream that failed is
asked after the others for a few seconds, so a dead one does not cost every query a timeout.

Two ways in: ``await resolve(...)``, and ``ask(..., done)`` for the UDP server's hot path,
where the first upstream's answer reaches ``done`` straight from the callback that reads it (no
task, no future, no timer per query: one timer follows the oldest query in flight). Anything
else (a timeout, an error, a truncated answer) continues as ``resolve`` would, in a task.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
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


Done = Callable[[bytes | Exception], None]


def settle(tasks: set[asyncio.Task[None]], work: Awaitable[bytes], done: Done) -> None:
    """Await ``work`` in a task, kept in ``tasks`` until it ends: ``done`` gets the bytes, or
    the exception it raised (``done`` decides what an error means for its client)."""

    async def run() -> None:
        try:
            response = await work
        except Exception as exc:
            done(exc)
            return
        done(response)

    task = asyncio.get_running_loop().create_task(run())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class _Ask:
    """A query in flight from ``Upstream.ask``."""

    __slots__ = ("deadline", "done", "ident", "query", "question", "rest", "server", "started")

    def __init__(
        self,
        question: Question,
        query: bytes,
        server: _Server,
        rest: list[_Server],
        ident: int,
        deadline: float,
        done: Done,
    ) -> None:
        self.question, self.query, self.server, self.rest = question, query, server, rest
        self.ident, self.deadline, self.done = ident, deadline, done
        self.started = time.perf_counter()

    @property
    def waiting(self) -> bool:
        """Neither answered nor failed yet."""
        return self.server.pending.get(self.ident) is self


_RECEIVE = bytearray(65536)  # one buffer for every upstream socket: they share the loop's thread
_RECEIVE_VIEW = memoryview(_RECEIVE)


@dataclass
class _Server:
    """One upstream: a connected, non-blocking UDP socket read from the loop, and the queries
    waiting for its answers. (asyncio's datagram transport reads with a 256 KiB buffer, which
    the allocator maps and unmaps again for every answer.)"""

    address: Address
    # an answer to an ``ask`` that is not simply released: (ask, the answer, or the error)
    on_ask_trouble: Callable[[_Ask, bytes | Exception], None]
    pending: dict[int, tuple[Question, asyncio.Future[bytes]] | _Ask] = field(default_factory=dict)
    sock: socket.socket | None = None
    down_until: float = 0.0  # after a failure, others are asked first until then

    def __post_init__(self) -> None:
        self.seconds = metrics.DNS_UPSTREAM_SECONDS.labels(self.label)  # looked up once
        self.errors = metrics.DNS_UPSTREAM_ERRORS.labels(self.label)  # and shows 0 from the start

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
        if isinstance(entry, _Ask):
            end = entry.question.end
            # the question as we sent it (the usual case), or else the same name, type and class
            if data[HEADER.size : end] != entry.query[HEADER.size : end] and not answers(
                entry.question, data
            ):
                return
            del self.pending[ident]
            if struct.unpack_from("!H", data, 2)[0] & TC:  # fetch it again over TCP
                self.on_ask_trouble(entry, data)
                return
            entry.done(self.succeeded(entry.question, data, entry.started))
            return
        question, future = entry
        if not answers(question, data):  # it must be to our question, not just carry our ID
            return
        if not future.done():
            future.set_result(data)

    def succeeded(self, question: Question, response: bytes, started: float) -> bytes:
        """``response`` under the client's ID, once this upstream answered in time: its answer
        time is observed and any demotion lifted."""
        self.seconds.observe(time.perf_counter() - started)
        self.down_until = 0.0
        return struct.pack("!H", question.id) + response[2:]

    def error_received(self, exc: Exception) -> None:
        error = UpstreamError(f"{self.label}: {exc}")
        for ident, entry in list(self.pending.items()):
            if isinstance(entry, _Ask):
                del self.pending[ident]
                self.on_ask_trouble(entry, error)
            elif not entry[1].done():
                entry[1].set_exception(error)

    @property
    def label(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _QueryIds:
    """Unpredictable 16-bit query IDs from the system's CSPRNG, drawn a few thousand at a time
    (one getrandom(2) call per query would cost more than the rest of the ID handling)."""

    def __init__(self, batch: int = 4096) -> None:
        self._batch = batch
        self._ids = array.array("H")

    def next(self) -> int:
        if not self._ids:
            self._ids = array.array("H", os.urandom(2 * self._batch))
        return self._ids.pop()


class Upstream:
    def __init__(self, servers: list[Address], timeout_s: float = 1.0) -> None:
        if not servers:
            raise ValueError("at least one upstream is needed")
        self.timeout_s = timeout_s
        self._servers = [_Server(address, self._trouble) for address in servers]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = _QueryIds()
        self._asks: deque[_Ask] = deque()  # in the order sent, so in the order of deadlines
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for server in self._servers:
            server.open(self._loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            for server in self._servers:
                server.close(self._loop)

    def _candidates(self, now: float) -> list[_Server]:
        """Upstreams in configured order, skipping those that failed recently; when all have,
        only the one that failed longest ago is probed, so SERVFAIL comes within one timeout."""
        healthy = [s for s in self._servers if s.down_until <= now]
        return healthy or [min(self._servers, key=lambda s: s.down_until)]

    async def resolve(self, question: Question, query: bytes) -> bytes:
        return await self._resolve(question, query, self._candidates(time.monotonic()), [])

    async def _resolve(
        self,
        question: Question,
        query: bytes,
        servers: list[_Server],
        errors: list[str],
        truncated: _Ask | None = None,
    ) -> bytes:
        """Ask ``servers`` in turn (after fetching ``truncated`` again over TCP, if given)."""
        if truncated is not None:
            server = truncated.server
            try:
                response = await self._tcp(server, question, query)
            except (TimeoutError, OSError, UpstreamError, WireError) as exc:
                self._failed(server, exc, errors)
            else:
                return server.succeeded(question, response, truncated.started)
        for server in servers:
            started = time.perf_counter()
            try:
                response = await self._udp(server, question, query)
                if struct.unpack_from("!H", response, 2)[0] & TC:
                    response = await self._tcp(server, question, query)
            except (TimeoutError, OSError, UpstreamError, WireError) as exc:
                self._failed(server, exc, errors)
                continue
            return server.succeeded(question, response, started)
        raise UpstreamError("every upstream failed: " + "; ".join(errors))

    @staticmethod
    def _failed(server: _Server, exc: Exception, errors: list[str]) -> None:
        server.down_until = time.monotonic() + DEMOTE_S
        server.errors.inc()
        errors.append(f"{server.label}: {exc or type(exc).__name__}")

    def ask(self, question: Question, query: bytes, done: Done) -> None:
        """``resolve`` from a callback: ``done`` gets the response bytes, or the exception
        ``resolve`` would raise (``UpstreamError`` once every upstream failed)."""
        loop = self._loop or asyncio.get_running_loop()
        servers = self._candidates(time.monotonic())
        server = servers[0]
        ident = self._fresh_ident(server)
        ask = _Ask(question, query, server, servers[1:], ident, loop.time() + self.timeout_s, done)
        server.pending[ident] = ask
        try:
            server.send(struct.pack("!H", ident) + query[2:])
        except UpstreamError as exc:
            del server.pending[ident]
            self._trouble(ask, exc)
            return
        asks = self._asks
        # answers come back about in the order asked: dropping the answered ones from the front
        # here keeps the queue about as long as the queries in flight, and ``_expire`` short
        while asks and not asks[0].waiting:
            asks.popleft()
        asks.append(ask)
        if self._timer is None:
            self._timer = loop.call_at(ask.deadline, self._expire)

    def _expire(self) -> None:
        """Time out the queries from ``ask`` whose deadline has passed; follow the next one."""
        self._timer = None
        loop = self._loop or asyncio.get_running_loop()
        asks, now = self._asks, loop.time()
        while asks:
            ask = asks[0]
            if not ask.waiting:
                asks.popleft()  # answered, or failed some other way
                continue
            if ask.deadline > now:
                self._timer = loop.call_at(ask.deadline, self._expire)
                return
            asks.popleft()
            del ask.server.pending[ask.ident]
            self._trouble(ask, UpstreamError("timed out"))

    def _trouble(self, ask: _Ask, outcome: bytes | Exception) -> None:
        """Go on with ``ask`` as ``resolve`` would: a truncated answer (``outcome`` is its
        bytes) is fetched again over TCP, a failure moves on to the next upstream."""
        errors: list[str] = []
        truncated = None
        if isinstance(outcome, Exception):
            self._failed(ask.server, outcome, errors)
        else:
            truncated = ask

        work = self._resolve(ask.question, ask.query, ask.rest, errors, truncated)
        settle(self._tasks, work, ask.done)

    def _fresh_ident(self, server: _Server) -> int:
        """A random query ID that no query in flight to ``server`` carries."""
        ident = self._ids.next()
        while ident in server.pending:
            ident = self._ids.next()
        return ident

    async def _udp(self, server: _Server, question: Question, query: bytes) -> bytes:
        ident = self._fresh_ident(server)
        loop = self._loop or asyncio.get_running_loop()
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
            # the future holds the exception it raised (a timeout, an ICMP error), whose
            # traceback holds this frame, which holds the future: a cycle, kept for good once
            # the daemon freezes it (runtime.Daemon._collect_young)
            del future

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
