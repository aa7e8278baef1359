"""DNS over UDP and TCP on the listen addresses, feeding the interceptor.

In: datagrams and TCP streams from workloads. Out: the interceptor's answers. Cache hits and
local answers are sent from the datagram callback itself; only queries that need the upstream
become tasks. A TCP connection may carry many queries; it is closed after ``idle_s`` of silence.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field
from typing import cast

from egressgw.dns.interceptor import Deferred, Interceptor

log = logging.getLogger(__name__)
Address = tuple[str, int]


def _source(peer: tuple[object, ...]) -> str:
    return str(peer[0])


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, interceptor: Interceptor) -> None:
        self.interceptor = interceptor
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        result = self.interceptor.answer_now(data, _source(addr), udp=True)
        if isinstance(result, Deferred):
            task = asyncio.ensure_future(self._later(result, addr))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif result is not None and self.transport is not None:
            self.transport.sendto(result, addr)

    async def _later(self, deferred: Deferred, addr: tuple[object, ...]) -> None:
        response = await self.interceptor.resolve(deferred)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)


@dataclass
class DnsServer:
    interceptor: Interceptor
    listen: list[Address]
    idle_s: float = 10.0
    _udp: list[asyncio.DatagramTransport] = field(default_factory=list)
    _tcp: list[asyncio.Server] = field(default_factory=list)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self.interceptor), local_addr=(host, port), reuse_port=True
            )
            self._udp.append(transport)
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
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
            await server.wait_closed()
