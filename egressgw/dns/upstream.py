"""Forwarding queries to upstream resolvers.

In: a client's query bytes and its parsed question. Out: the upstream's response bytes with the
client's ID, or ``UpstreamError`` once every upstream has failed or timed out. The query is
forwarded as it came (EDNS0 options included) under a fresh random ID; upstreams are tried in
order, each for ``timeout_s``; a truncated UDP answer is fetched again over TCP from the same
upstream. One connected UDP socket per upstream carries all queries.

A failed try always moves that query on to the next upstream, but an upstream is demoted (asked
after the others for ``demote_s``, so a dead one does not cost every query a timeout) only on
evidence that it is down for everyone, never on one client's odd query (a zone transfer, a type
the upstream ignores, a name whose own servers are dead). ``Health`` holds the rule:

- a query that timed out although the upstream answered something after it was sent tells
  nothing about the upstream: the failure is the query's own;
- otherwise the upstream is *suspect*: asked after the healthy ones while one probe (``. NS``,
  which every resolver answers, even with REFUSED) is in flight. An answer clears it; no answer
  within ``timeout_s`` demotes it;
- timeouts of ``distinct`` different names within ``window_s`` with no answer in between demote
  it without waiting for the probe;
- ICMP port, host or network unreachable demotes it at once: that is about the address, not
  about any query, and a client cannot cause it by what it asks. A refused TCP retry is not
  (the truncated answer before it showed the upstream up, and an upstream may serve UDP only);
- any answer lifts a demotion.

When no upstream is healthy only one is asked (a suspect one first, else the one whose demotion
ends first), so SERVFAIL comes within one timeout.

Two ways in: ``await resolve(...)``, and ``ask(..., done)`` for the UDP server's hot path,
where the first upstream's answer reaches ``done`` straight from the callback that reads it (no
task, no future, no timer per query: one timer follows the oldest query in flight). Anything
else (a timeout, an error, a truncated answer) continues as ``resolve`` would, in a task.
"""

from __future__ import annotations

import array
import asyncio
import enum
import errno
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from egressgw import metrics
from egressgw.dns.wire import HEADER, RD, TC, Question, WireError, parse_question, read_name

if TYPE_CHECKING:
    from egressgw.contracts import Done

log = logging.getLogger(__name__)
Address = tuple[str, int]
DEMOTE_S = 5.0  # how long a demoted upstream is asked only after the others
DISTINCT_FAILURES = 3  # names that time out, with no answer in between, to demote
FAILURE_WINDOW_S = 5.0  # ... within this long
# errors about the upstream's address itself (an ICMP error), whatever the query
UNREACHABLE = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)
# the health probe: ". IN NS" with RD, as CoreDNS's forward plugin asks; any answer will do
PROBE_QUERY = HEADER.pack(0, RD, 1, 0, 0, 0) + b"\x00" + struct.pack("!HH", 2, 1)
PROBE_QUESTION = parse_question(PROBE_QUERY)
DEMOTION_REASONS = ("unreachable", "timeouts", "probe")
PROBE_RESULTS = ("answered", "failed")


class UpstreamError(Exception):
    pass


class Unreachable(UpstreamError):
    """The upstream's address refused or could not be reached (an ICMP error): true for every
    query, so it is evidence against the upstream at once."""


def _error(label: str, exc: OSError) -> UpstreamError:
    kind = Unreachable if exc.errno in UNREACHABLE else UpstreamError
    return kind(f"{label}: {exc}")


class State(enum.Enum):
    UP = "up"
    SUSPECT = "suspect"  # asked after the healthy ones until a probe settles it
    DOWN = "down"  # demoted: asked only when no other is up


class Evidence(enum.Enum):
    """What a failed query says about its upstream."""

    OWN = "own"  # nothing: the upstream answered others meanwhile, or is already demoted
    SUSPECT = "suspect"  # maybe down: probe it
    DEMOTED = "demoted"  # down for everyone: this failure demoted it


class Health:
    """Whether one upstream is down for everyone, from its answers and failures (the rule is in
    the module docstring). Pure: every method takes the time."""

    def __init__(
        self,
        demote_s: float = DEMOTE_S,
        distinct: int = DISTINCT_FAILURES,
        window_s: float = FAILURE_WINDOW_S,
        suspect_s: float = 2.0,
    ) -> None:
        self.demote_s, self.distinct, self.window_s = demote_s, distinct, window_s
        self.suspect_s = suspect_s  # a bound in case no probe ever settles it
        self.down_until = 0.0
        self.suspect_until = 0.0
        self.answered_at = float("-inf")
        self._failed: dict[str, float] = {}  # name -> when it last timed out, since the last answer

    def state(self, now: float) -> State:
        if self.down_until > now:
            return State.DOWN
        if self.suspect_until > now:
            return State.SUSPECT
        return State.UP

    def answered(self, now: float) -> None:
        """It answered a query (any answer, even SERVFAIL): it is up."""
        self.answered_at = now
        self.down_until = self.suspect_until = 0.0
        if self._failed:
            self._failed.clear()

    def timed_out(self, name: str, sent_at: float, now: float) -> Evidence:
        """A query for ``name`` sent at ``sent_at`` got no answer (or a useless one) by ``now``."""
        if self.answered_at > sent_at or self.down_until > now:
            return Evidence.OWN
        failed = self._failed
        for old in [n for n, at in failed.items() if at <= now - self.window_s]:
            del failed[old]
        failed.pop(name, None)
        failed[name] = now
        if len(failed) >= self.distinct:
            self._demote(now)
            return Evidence.DEMOTED
        self.suspect_until = max(self.suspect_until, now + self.suspect_s)
        return Evidence.SUSPECT

    def unreachable(self, now: float) -> bool:
        """An ICMP error about its address: demoted at once. True if that is news."""
        if self.down_until > now:
            return False
        self._demote(now)
        return True

    def probe_failed(self, sent_at: float, now: float) -> bool:
        """The probe sent at ``sent_at`` got no answer: demoted. True if that is news."""
        if self.down_until > now or self.answered_at > sent_at:
            return False  # already down, or an answer to something else settled it
        self._demote(now)
        return True

    def _demote(self, now: float) -> None:
        self.down_until = now + self.demote_s
        self.suspect_until = 0.0
        self._failed.clear()


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

    __slots__ = (
        "deadline",
        "done",
        "ident",
        "query",
        "question",
        "rest",
        "sent",
        "server",
        "started",
    )

    def __init__(
        self,
        question: Question,
        query: bytes,
        server: _Server,
        rest: list[_Server],
        ident: int,
        deadline: float,
        done: Done,
        sent: float,
    ) -> None:
        self.question, self.query, self.server, self.rest = question, query, server, rest
        self.ident, self.deadline, self.done, self.sent = ident, deadline, done, sent
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
    health: Health = field(default_factory=Health)
    pending: dict[int, tuple[Question, asyncio.Future[bytes]] | _Ask] = field(default_factory=dict)
    sock: socket.socket | None = None
    probe: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        # looked up once, and each series shows 0 from the start
        self.seconds = metrics.DNS_UPSTREAM_SECONDS.labels(self.label)
        self.errors = metrics.DNS_UPSTREAM_ERRORS.labels(self.label)
        self.demotions = {
            reason: metrics.DNS_UPSTREAM_DEMOTIONS.labels(self.label, reason)
            for reason in DEMOTION_REASONS
        }
        self.probes = {
            result: metrics.DNS_UPSTREAM_PROBES.labels(self.label, result)
            for result in PROBE_RESULTS
        }

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
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None
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
            raise _error(self.label, exc) from None

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
            self.health.answered(time.monotonic())
            if struct.unpack_from("!H", data, 2)[0] & TC:  # fetch it again over TCP
                self.on_ask_trouble(entry, data)
                return
            entry.done(self.succeeded(entry.question, data, entry.started))
            return
        question, future = entry
        if not answers(question, data):  # it must be to our question, not just carry our ID
            return
        self.health.answered(time.monotonic())
        if not future.done():
            future.set_result(data)

    def succeeded(self, question: Question, response: bytes, started: float) -> bytes:
        """``response`` under the client's ID, once this upstream answered in time: its answer
        time is observed."""
        self.seconds.observe(time.perf_counter() - started)
        return struct.pack("!H", question.id) + response[2:]

    def error_received(self, exc: OSError) -> None:
        error = _error(self.label, exc)
        for ident, entry in list(self.pending.items()):
            if isinstance(entry, _Ask):
                del self.pending[ident]
                self.on_ask_trouble(entry, error)
            elif not entry[1].done():
                entry[1].set_exception(error)

    def demoted(self, reason: str, why: Exception) -> None:
        self.demotions[reason].inc()
        log.warning(
            "dns: upstream %s demoted for %.0f s (%s): %s",
            self.label,
            self.health.demote_s,
            reason,
            why,
        )

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
    def __init__(
        self,
        servers: list[Address],
        timeout_s: float = 1.0,
        demote_s: float = DEMOTE_S,
        distinct_failures: int = DISTINCT_FAILURES,
        failure_window_s: float = FAILURE_WINDOW_S,
    ) -> None:
        if not servers:
            raise ValueError("at least one upstream is needed")
        self.timeout_s = timeout_s

        def health() -> Health:
            # a suspect is settled by its probe within one timeout; twice that bounds it anyway
            return Health(demote_s, distinct_failures, failure_window_s, 2 * timeout_s)

        self._servers = [_Server(address, self._trouble, health()) for address in servers]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = _QueryIds()
        self._asks: deque[_Ask] = deque()  # in the order sent, so in the order of deadlines
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open every upstream's socket. One that cannot be opened (a UDP socket cannot even
        be connected to an address with no route) is demoted at once, as an ICMP error would
        demote it at run time, and the others start as usual; ``reopen`` tries it again."""
        self._loop = asyncio.get_running_loop()
        self.reopen(announce=True)

    def reopen(self, announce: bool = False) -> list[str]:
        """Open the socket of every upstream that has none; the labels of those still
        without one. ``announce``: demote (and log) each that fails."""
        if self._loop is None:
            return []
        closed: list[str] = []
        for server in self._servers:
            if server.sock is not None:
                continue
            try:
                server.open(self._loop)
            except OSError as exc:
                closed.append(server.label)
                error = Unreachable(f"{server.label}: {exc.strerror or exc}")
                if server.health.unreachable(time.monotonic()) and announce:
                    server.demoted("unreachable", error)
                continue
            if not announce:
                log.info("dns: upstream %s can be reached now", server.label)
        return closed

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            for server in self._servers:
                server.close(self._loop)

    def states(self, now: float | None = None) -> dict[str, State]:
        """Each upstream's state, by its label (``host:port``)."""
        at = time.monotonic() if now is None else now
        return {server.label: server.health.state(at) for server in self._servers}

    def _candidates(self, now: float) -> list[_Server]:
        """Upstreams in configured order, suspect ones after the healthy ones, demoted ones
        left out; when none is healthy only one is asked (the first suspect, else the one whose
        demotion ends first), so SERVFAIL comes within one timeout."""
        servers = self._servers
        # ``Health.state`` inlined: this runs for every query
        up = [s for s in servers if s.health.down_until <= now and s.health.suspect_until <= now]
        if len(up) == len(servers):
            return up
        suspect = [s for s in servers if s.health.state(now) is State.SUSPECT]
        if up:
            return up + suspect
        return suspect[:1] or [min(servers, key=lambda s: s.health.down_until)]

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
                self._failed(server, question, truncated.sent, exc, errors)
            else:
                server.health.answered(time.monotonic())
                return server.succeeded(question, response, truncated.started)
        for server in servers:
            started, sent = time.perf_counter(), time.monotonic()
            try:
                response = await self._udp(server, question, query)
                if struct.unpack_from("!H", response, 2)[0] & TC:
                    response = await self._tcp(server, question, query)
            except (TimeoutError, OSError, UpstreamError, WireError) as exc:
                self._failed(server, question, sent, exc, errors)
                continue
            return server.succeeded(question, response, started)
        raise UpstreamError("every upstream failed: " + "; ".join(errors))

    def _failed(
        self, server: _Server, question: Question, sent: float, exc: Exception, errors: list[str]
    ) -> None:
        """A try of ``question`` on ``server``, sent at ``sent``, failed with ``exc``: counted,
        noted in ``errors``, and weighed as evidence against ``server`` (see ``Health``)."""
        server.errors.inc()
        errors.append(f"{server.label}: {exc or type(exc).__name__}")
        now = time.monotonic()
        if isinstance(exc, Unreachable):
            if server.health.unreachable(now):
                server.demoted("unreachable", exc)
            return
        evidence = server.health.timed_out(question.name, sent, now)
        if evidence is Evidence.DEMOTED:
            server.demoted("timeouts", exc)
        elif evidence is Evidence.SUSPECT and server.probe is None:
            server.probe = asyncio.get_running_loop().create_task(self._probe(server))

    async def _probe(self, server: _Server) -> None:
        """Whether a suspect ``server`` answers at all: an answer clears it (``_udp`` reading
        it is enough), no answer within the timeout demotes it."""
        sent = time.monotonic()
        try:
            await self._udp(server, PROBE_QUESTION, PROBE_QUERY)
        except UpstreamError as exc:
            server.probes["failed"].inc()
            now = time.monotonic()
            if isinstance(exc, Unreachable):
                if server.health.unreachable(now):
                    server.demoted("unreachable", exc)
            elif server.health.probe_failed(sent, now):
                server.demoted("probe", exc)
        else:
            server.probes["answered"].inc()
        finally:
            server.probe = None

    def ask(self, question: Question, query: bytes, done: Done) -> None:
        """``resolve`` from a callback: ``done`` gets the response bytes, or the exception
        ``resolve`` would raise (``UpstreamError`` once every upstream failed)."""
        loop = self._loop or asyncio.get_running_loop()
        now = time.monotonic()
        servers = self._candidates(now)
        server = servers[0]
        ident = self._fresh_ident(server)
        deadline = loop.time() + self.timeout_s
        ask = _Ask(question, query, server, servers[1:], ident, deadline, done, now)
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
        for server in self._servers:  # nothing in flight: what a burst had in flight goes back
            if not server.pending:
                server.pending.clear()  # (emptied, a dict keeps its room until cleared)

    def _trouble(self, ask: _Ask, outcome: bytes | Exception) -> None:
        """Go on with ``ask`` as ``resolve`` would: a truncated answer (``outcome`` is its
        bytes) is fetched again over TCP, a failure moves on to the next upstream."""
        errors: list[str] = []
        truncated = None
        if isinstance(outcome, Exception):
            self._failed(ask.server, ask.question, ask.sent, outcome, errors)
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
