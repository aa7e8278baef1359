"""DNS over UDP and TCP on the listen addresses, feeding the interceptor.

In: datagrams and TCP streams from workloads. Out: the interceptor's answers. Cache hits and
local answers are sent from the read callback itself; a UDP query that needs the upstream is
answered from the callback that reads the upstream's answer (``Interceptor.resolve_soon``), TCP
queries from a task per connection. A TCP connection may carry many queries; it is closed after
``idle_s`` of silence.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from functools import partial

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


@dataclass
class DnsServer:
    interceptor: Interceptor
    listen: list[Address]
    idle_s: float = 10.0
    _udp: list[_Udp] = field(default_factory=list)
    _tcp: list[asyncio.Server] = field(default_factory=list)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            udp = _Udp(self.interceptor, _udp_socket(host, port))
            loop.add_reader(udp.sock.fileno(), udp.readable)
            self._udp.append(udp)
            self._tcp.append(await asyncio.start_server(self._serve_tcp, host, port))
            log.info("dns: listening on %s port %d (UDP and TCP)", host, port)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            source = _source(writer.get_extra_info("peername"))
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), self.idle_s)
                (length,) = struct.unpack("!H", header)
                query = await asyncio.wait_for(reader.readexactly(length), self.idle_s)
                response = await self.interceptor.handle(query, source, udp=False)
                if response is None:
                    break
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for udp in self._udp:
            loop.remove_reader(udp.sock.fileno())
            udp.sock.close()
        for server in self._tcp:
            server.close()
            await server.wait_closed()
