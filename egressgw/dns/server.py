"""DNS over UDP and TCP on the listen addresses, feeding the interceptor.

In: datagrams and TCP streams from workloads. Out: the interceptor's answers. Cache hits and
local answers are sent from the read callback itself; a UDP query that needs the upstream is
answered from the callback that reads the upstream's answer (``Interceptor.resolve_soon``).

TCP (RFC 7766) is bounded per client, so one workload cannot hold what all need: at most
``tcp_per_source`` connections from one address at once (one more is closed at once); on each,
queries are read as they come and answered concurrently, each as soon as its answer is ready
(out of order; every reply carries its query's ID), at most ``tcp_in_flight`` at a time (then
the next query is read only once one is answered, so a client that floods pushes back on its
own connection). A reply that the client does not take within ``write_timeout_s`` (it waits in
the gateway only while the kernel's buffer for that connection is full) closes the connection,
so a client that never reads holds nothing for long. A connection with nothing in flight is
closed once ``idle_s`` pass without a whole query (a query dripped in a byte at a time does
not keep it open). A query the interceptor drops (the rate limit) ends its
connection once the queries before it are answered. Each of these limits is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import cast

from egressgw import metrics
from egressgw.dns.interceptor import Deferred, Interceptor
from egressgw.dns.mmsg import Batches, Peer
from egressgw.metrics import DNS_DROPPED_REPLIES as DROPPED_REPLIES

log = logging.getLogger(__name__)
Address = tuple[str, int]


def _source(peer: tuple[object, ...]) -> str:
    return str(peer[0])


class _Udp:
    """One UDP listener read straight from its non-blocking socket, many datagrams per call.

    asyncio's datagram transport wakes the loop and makes two system calls per datagram; under
    load that cost several times what answering from the cache does. Here each wake-up takes up
    batches of up to ``BATCH`` datagrams with recvmmsg(2), and sends the answers of a batch with
    one sendmmsg(2). It keeps taking batches while datagrams keep coming, for at most
    ``BUDGET_S`` (then TCP, timers and upstream answers get their turn): under load one wake-up
    of the event loop serves a millisecond of queries, whether they are repeated ones (about a
    hundred) or ones that need the upstream (one batch).
    """

    BATCH = 64
    BUDGET_S = 0.001

    def __init__(self, interceptor: Interceptor, sock: socket.socket) -> None:
        self.interceptor = interceptor
        self.sock = sock
        self.batches = Batches(sock, self.BATCH)

    def readable(self) -> None:
        deadline = time.perf_counter() + self.BUDGET_S
        try:
            while self._batch() and time.perf_counter() < deadline:
                pass
        finally:
            self.interceptor.flush_counts()

    def _batch(self) -> int:
        batches = self.batches
        try:
            count = batches.receive()
        except OSError as exc:  # e.g. a pending ICMP error on the socket: nothing to answer
            log.debug("dns: receiving failed: %s", exc)
            return 0
        if not count:
            return 0
        batches.answer(self.interceptor.ready, self._full)
        dropped, errors = batches.send()
        if dropped:
            DROPPED_REPLIES.inc(dropped)
        for error in errors:
            log.debug("dns: a reply failed: %s", error)
        return count

    def _full(self, query: bytes, host: str, peer: Peer) -> bytes | None:
        result = self.interceptor.answer_now(query, host, True)
        if isinstance(result, Deferred):
            self.interceptor.resolve_soon(result, partial(self._reply, peer))
            return None
        return result

    def _send(self, response: bytes, addr: Peer) -> None:
        try:
            self.sock.sendto(response, addr)
        except (BlockingIOError, InterruptedError):
            DROPPED_REPLIES.inc()  # the socket buffer is full: the client retries, as over UDP
        except OSError as exc:
            log.debug("dns: reply to %s failed: %s", addr[0], exc)

    def _reply(self, addr: Peer, response: bytes | None) -> None:
        if response is not None:
            self._send(response, addr)


# Queries that arrive while the loop is held up (a full collection, the kernel busy with a big
# change) wait here instead of being dropped: the default buffer holds about 250 of them.
UDP_RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
SO_RCVBUFFORCE = 33  # Linux; needs CAP_NET_ADMIN, which the gateway has


def _bound(
    host: str,
    port: int,
    kind: int,
    prepare: Callable[[socket.socket], None] | None = None,
    backlog: int | None = None,
) -> socket.socket:
    """A non-blocking socket of ``kind`` bound to ``host``:``port`` (IPv6 only for an IPv6
    host, the address reusable): ``prepare`` runs on it before the bind, and with a
    ``backlog`` it listens; closed if any of it fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if prepare is not None:
            prepare(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_socket(host: str, port: int) -> socket.socket:
    def prepare(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER_BYTES)
        except OSError:  # without CAP_NET_ADMIN: as much as net.core.rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    return _bound(host, port, socket.SOCK_DGRAM, prepare)


TCP_BACKLOG = 128  # connections the kernel completes while the server does not accept yet


def tcp_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket: connections queue in its backlog even before they are accepted."""
    return _bound(host, port, socket.SOCK_STREAM, backlog=TCP_BACKLOG)


class _Tcp(asyncio.Protocol):
    """One DNS-over-TCP connection: its framing, the queries it has in flight, its idle timer
    and its write deadline (see the module docstring).

    A plain protocol rather than asyncio's streams: streams keep the exception a connection
    ends with (a reset, say) in futures the transport reaches, which makes a reference cycle
    that only the cyclic collector would free. Here nothing keeps an exception, and once the
    connection is lost and its queries are done the protocol lets go of the transport, its
    timers and its tasks, so refcounting frees all of it."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.interceptor = server.interceptor
        self.loop = asyncio.get_running_loop()
        self.idle_s, self.write_timeout_s = server.idle_s, server.write_timeout_s
        self.in_flight = max(1, server.tcp_in_flight)
        self.transport: asyncio.Transport | None = None  # None once the connection is lost
        self.source = ""
        self.admitted = False  # counted in the server's connections, until it ends
        self.buffer = bytearray()  # what arrived and is not yet a whole query
        self.tasks: set[asyncio.Task[None]] = set()  # the queries waiting for the upstream
        self.eof = False  # the client closed its side: it sends nothing more
        self.ending = False  # read no more; close once the queries in flight are answered
        self.writing_paused = False  # the kernel's buffer is full: replies wait here
        self.last_active = 0.0  # when the last whole query arrived or the last one ended
        self.idle: asyncio.TimerHandle | None = None
        self.deadline: asyncio.TimerHandle | None = None  # the write deadline, while paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer is None:  # gone before it was accepted
            self.ending = True
            self.transport.abort()
            return
        self.source = _source(peer)
        if not self.server._admit(self):
            self.ending = True
            TCP_CLOSED_SOURCE_LIMIT.inc()
            self.transport.abort()
            return
        self.admitted = True
        # replies wait in the transport's buffer only while the kernel's is full, and that
        # wait is what the write deadline bounds
        self.transport.set_write_buffer_limits(high=0)
        self.last_active = self.loop.time()
        self.idle = self.loop.call_at(self.last_active + self.idle_s, self._idle_check)

    def data_received(self, data: bytes) -> None:
        if self.ending:
            return
        self.buffer += data
        self._parse()

    def eof_received(self) -> bool:
        self.eof = True
        self._parse()  # what it already sent is still answered, then the connection closes
        return True  # keep the connection open for the answers

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()
        if self.deadline is None:
            self.deadline = self.loop.call_later(self.write_timeout_s, self._write_timeout)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if not self.ending:
            self.last_active = self.loop.time()
            self._parse()

    def connection_lost(self, exc: BaseException | None) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            _untie(transport)
        self.ending = True
        self.buffer = bytearray()
        for timer in (self.idle, self.deadline):
            if timer is not None:
                timer.cancel()
        self.idle = self.deadline = None
        if not self.tasks:  # else the last one to end ends the connection
            self._end()

    def _parse(self) -> None:
        """Take the whole queries that arrived, as long as the connection may take more."""
        buffer = self.buffer
        while not self.ending and not self.writing_paused and len(self.tasks) < self.in_flight:
            if len(buffer) >= 2:
                end = 2 + int.from_bytes(buffer[:2], "big")
                if len(buffer) >= end:
                    query = bytes(buffer[2:end])
                    del buffer[:end]
                    self.last_active = self.loop.time()  # only a whole query counts
                    self._query(query)
                    continue
            if self.eof:  # the rest of a query will never come
                self._stop()
            break
        self._update_reading()

    def _query(self, query: bytes) -> None:
        result = self.interceptor.answer_now(query, self.source, False)
        if isinstance(result, Deferred):
            task = self.loop.create_task(self._resolve(result))
            self.tasks.add(task)
            task.add_done_callback(self._done)
            if len(self.tasks) >= self.in_flight:
                TCP_PIPELINE_FULL.inc()
        elif result is None:
            self._stop()
        else:
            self._send(result)

    async def _resolve(self, deferred: Deferred) -> None:
        response = await self.interceptor.resolve(deferred)
        if response is None:  # dropped: the connection ends once the others are answered
            self._stop()
        else:
            self._send(response)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("dns: answering a query over TCP failed", exc_info=error)
        if self.transport is None:
            if not self.tasks:
                self._end()
        elif self.ending:
            if not self.tasks:
                self.transport.close()
        else:
            if not self.tasks:
                self.last_active = self.loop.time()
            self._parse()

    def _send(self, response: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(struct.pack("!H", len(response)) + response)

    def _update_reading(self) -> None:
        """Read while the connection may take more queries: not while as many as it may have
        are in flight, nor while its replies wait for the client to take them."""
        transport = self.transport
        if transport is None or self.eof:  # after EOF the transport reads no more
            return
        wanted = not self.ending and not self.writing_paused and len(self.tasks) < self.in_flight
        if wanted != transport.is_reading():
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _stop(self) -> None:
        """Read no more queries; close once the ones in flight are answered."""
        self.ending = True
        self.buffer.clear()
        self._update_reading()
        if self.transport is not None and not self.tasks:
            self.transport.close()  # after what waits in its buffer, within the deadline

    def _idle_check(self) -> None:
        self.idle = None
        if self.transport is None or self.ending:
            return
        now = self.loop.time()
        if self.tasks or self.writing_paused:  # not idle while it waits for answers
            self.idle = self.loop.call_at(now + self.idle_s, self._idle_check)
        elif now < self.last_active + self.idle_s:
            self.idle = self.loop.call_at(self.last_active + self.idle_s, self._idle_check)
        else:
            TCP_CLOSED_IDLE.inc()
            self._stop()

    def _write_timeout(self) -> None:
        """The client did not take a reply within the write deadline: close at once, dropping
        what it did not take (a graceful close would wait for it to read)."""
        self.deadline = None
        if self.transport is not None:  # also while a graceful close waits for the client
            TCP_CLOSED_WRITE_TIMEOUT.inc()
            self._cut()

    def _end(self) -> None:
        if self.admitted:
            self.admitted = False
            self.server._release(self)

    def _cut(self) -> None:
        """Close at once, dropping what waits in the transport's buffer; the queries in flight
        end as usual, their replies unsent."""
        self.ending = True
        self.buffer.clear()
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """Close at once and cancel the queries in flight (the server is closing)."""
        self._cut()
        for task in self.tasks:
            task.cancel()


def _untie(transport: asyncio.BaseTransport) -> None:
    """Break the cycle a socket transport makes with itself (it keeps its own bound method as
    its read callback), once the connection is over. Left to the cyclic collector, a transport
    that was alive at one of the daemon's freezes of the collector would never be freed."""
    if hasattr(transport, "_read_ready_cb"):
        transport._read_ready_cb = None


TCP_PER_SOURCE = 16  # connections from one address at once (RFC 7766 leaves the number open)
TCP_IN_FLIGHT = 16  # queries answered at once on one connection
TCP_CONNECTIONS = metrics.DNS_TCP_CONNECTIONS
TCP_CLOSED_SOURCE_LIMIT = metrics.DNS_TCP_CLOSED.labels("source limit")
TCP_CLOSED_WRITE_TIMEOUT = metrics.DNS_TCP_CLOSED.labels("write timeout")
TCP_CLOSED_IDLE = metrics.DNS_TCP_CLOSED.labels("idle")
TCP_PIPELINE_FULL = metrics.DNS_TCP_PIPELINE_FULL


@dataclass
class DnsServer:
    interceptor: Interceptor
    listen: list[Address]
    idle_s: float = 10.0
    tcp_per_source: int = TCP_PER_SOURCE
    tcp_in_flight: int = TCP_IN_FLIGHT
    write_timeout_s: float = 10.0
    _udp: list[_Udp] = field(default_factory=list)
    _tcp: list[asyncio.Server] = field(default_factory=list)
    _sources: dict[str, int] = field(default_factory=dict)  # address -> its open connections
    _connections: set[_Tcp] = field(default_factory=set)
    _serving: bool = False

    async def start(self, serving: bool = True) -> None:
        """Listen on every address, UDP and TCP, or on none: a port that cannot be bound
        closes what was opened before it raises. Not ``serving``, queries and connections
        wait in the sockets' queues until ``serve``."""
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.listen:
                self._udp.append(_Udp(self.interceptor, udp_socket(host, port)))
                factory = partial(_Tcp, self)
                sock = tcp_socket(host, port)
                try:
                    server = await loop.create_server(factory, sock=sock, start_serving=False)
                except BaseException:
                    sock.close()
                    raise
                self._tcp.append(server)
                log.info("dns: listening on %s port %d (UDP and TCP)", host, port)
        except BaseException:
            await self.close()
            raise
        if serving:
            await self.serve()

    async def serve(self) -> None:
        """Answer from now on, starting with what waits in the sockets' queues."""
        if self._serving:
            return
        self._serving = True
        loop = asyncio.get_running_loop()
        for udp in self._udp:
            loop.add_reader(udp.sock.fileno(), udp.readable)  # at once if queries wait
        for server in self._tcp:
            await server.start_serving()

    def _admit(self, connection: _Tcp) -> bool:
        """Count a new connection from its source, unless that source has all it may have."""
        count = self._sources.get(connection.source, 0)
        if count >= self.tcp_per_source:
            return False
        self._sources[connection.source] = count + 1
        self._connections.add(connection)
        TCP_CONNECTIONS.inc()
        return True

    def _release(self, connection: _Tcp) -> None:
        """A connection ended: closed, and all its queries done."""
        self._connections.discard(connection)
        TCP_CONNECTIONS.dec()
        left = self._sources[connection.source] - 1
        if left:
            self._sources[connection.source] = left
        else:
            del self._sources[connection.source]
        if not self._connections:  # the last one: what a burst of connections held goes back
            self._connections.clear()  # (emptied, a set or dict keeps its room until cleared)
            self._sources.clear()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for udp in self._udp:
            loop.remove_reader(udp.sock.fileno())
            udp.sock.close()
        for server in self._tcp:
            server.close()
        tasks = {task for connection in self._connections for task in connection.tasks}
        for connection in list(self._connections):
            connection.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        await asyncio.sleep(0)  # an aborted connection is lost at the next turn of the loop
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                for server in self._tcp:
                    await server.wait_closed()
