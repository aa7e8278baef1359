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
closed after ``idle_s`` of silence. A query the interceptor drops (the rate limit) ends its
connection once the queries before it are answered. Each of these limits is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial

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


def _udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER_BYTES)
        except OSError:  # without CAP_NET_ADMIN: as much as net.core.rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Tcp:
    """One DNS-over-TCP connection: the reading loop, the queries it has in flight, and the
    write deadline (see the module docstring)."""

    def __init__(
        self,
        server: DnsServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source: str,
    ) -> None:
        self.interceptor = server.interceptor
        self.idle_s, self.write_timeout_s = server.idle_s, server.write_timeout_s
        self.in_flight = max(1, server.tcp_in_flight)
        self.reader, self.writer, self.source = reader, writer, source
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False  # a dropped query: read no more
        self.reading: asyncio.Timeout | None = None  # the idle timeout of the read under way
        self.aborted = False
        # replies wait in the transport's buffer only while the kernel's is full, and then
        # every writer waits for all of it to leave: that wait is what the deadline bounds
        writer.transport.set_write_buffer_limits(high=0)

    async def serve(self) -> None:
        try:
            # the client may close (or break) its side: what it asked is still answered
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
                await self._read()
            if self.tasks:  # each ends within the upstream timeouts and the write deadline
                await asyncio.wait(set(self.tasks))
        finally:
            for task in self.tasks:
                task.cancel()
            await self._close()

    async def _read(self) -> None:
        reader, tasks = self.reader, self.tasks
        while not self.stopping:
            if len(tasks) >= self.in_flight:
                TCP_PIPELINE_FULL.inc()
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                header = await self._within_idle(reader.readexactly(2))
            except TimeoutError:
                if self.stopping:
                    return
                if tasks:
                    continue  # not idle while it waits for answers, which come in bounded time
                TCP_CLOSED_IDLE.inc()
                return
            (length,) = struct.unpack("!H", header)
            try:
                query = await self._within_idle(reader.readexactly(length))
            except TimeoutError:
                if not self.stopping:
                    TCP_CLOSED_IDLE.inc()
                return
            result = self.interceptor.answer_now(query, self.source, False)
            if isinstance(result, Deferred):
                task = asyncio.get_running_loop().create_task(self._resolve(result))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif result is None:
                return
            else:
                await self._send(result)

    async def _within_idle(self, read: Awaitable[bytes]) -> bytes:
        async with asyncio.timeout(self.idle_s) as self.reading:
            try:
                return await read
            finally:
                self.reading = None

    async def _resolve(self, deferred: Deferred) -> None:
        response = await self.interceptor.resolve(deferred)
        if response is None:  # dropped: the connection ends once the others are answered
            self.stopping = True
            if self.reading is not None:  # the reading loop waits for a query: stop it now
                self.reading.reschedule(asyncio.get_running_loop().time())
            return
        await self._send(response)

    async def _send(self, response: bytes) -> None:
        writer = self.writer
        if writer.is_closing():
            return
        writer.write(struct.pack("!H", len(response)) + response)
        if not writer.transport.get_write_buffer_size():
            return  # all of it is in the kernel's buffer
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
        except TimeoutError:
            self._abort()
        except ConnectionError:
            pass

    def _abort(self) -> None:
        """The client did not take a reply within the write deadline: close at once, dropping
        what it did not take (a graceful close would wait for it to read)."""
        if not self.aborted:
            self.aborted = True
            TCP_CLOSED_WRITE_TIMEOUT.inc()
        self.writer.transport.abort()

    async def _close(self) -> None:
        writer = self.writer
        writer.close()
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await writer.wait_closed()
        except TimeoutError:
            self._abort()
        except (ConnectionError, OSError):
            pass

    def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.writer.transport.abort()


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
    _connections: dict[_Tcp, asyncio.Task[object] | None] = field(default_factory=dict)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            udp = _Udp(self.interceptor, _udp_socket(host, port))
            loop.add_reader(udp.sock.fileno(), udp.readable)
            self._udp.append(udp)
            self._tcp.append(await asyncio.start_server(self._serve_tcp, host, port))
            log.info("dns: listening on %s port %d (UDP and TCP)", host, port)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if peer is None:  # gone before it was accepted
            writer.transport.abort()
            return
        source = _source(peer)
        count = self._sources.get(source, 0)
        if count >= self.tcp_per_source:
            TCP_CLOSED_SOURCE_LIMIT.inc()
            writer.transport.abort()
            return
        self._sources[source] = count + 1
        TCP_CONNECTIONS.inc()
        connection = _Tcp(self, reader, writer, source)
        self._connections[connection] = asyncio.current_task()
        try:
            await connection.serve()
        finally:
            _untie(writer.transport)
            del self._connections[connection]
            TCP_CONNECTIONS.dec()
            left = self._sources[source] - 1
            if left:
                self._sources[source] = left
            else:
                del self._sources[source]

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for udp in self._udp:
            loop.remove_reader(udp.sock.fileno())
            udp.sock.close()
        for server in self._tcp:
            server.close()
            await server.wait_closed()
        tasks = {task for task in self._connections.values() if task is not None}
        for connection in list(self._connections):
            connection.abort()
        if tasks:  # an aborted connection ends at its next turn of the loop
            await asyncio.wait(tasks, timeout=1.0)
