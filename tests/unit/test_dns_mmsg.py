"""recvmmsg/sendmmsg batches on loopback sockets: every datagram answered once, to its sender."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from egressgw.dns.mmsg import Batches, Peer


def _bound(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    family, host = request.param
    server = _bound(family, host)
    clients = [_bound(family, host) for _ in range(3)]
    yield server, clients
    for sock in (server, *clients):
        sock.close()


def _received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            return out


def test_each_datagram_is_answered_once_to_its_own_sender(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = pair
    address = server.getsockname()
    for n, client in enumerate(clients):
        for k in range(4):
            client.sendto(bytes([n, k]) + b"query" * (k + 1), address)
    batches = Batches(server, size=16)
    seen: list[tuple[bytes, str, Peer]] = []

    def ready(host: str, rest: bytes) -> bytes | None:
        if rest == b"query":  # k == 0: the ready path, answered with the datagram's ID
            return b"fast"
        if rest == b"query" * 2:  # k == 1: dropped
            return b""
        return None

    def full(datagram: bytes, host: str, peer: Peer) -> bytes | None:
        seen.append((datagram, host, peer))
        return None if datagram[1] == 3 else b"full:" + datagram  # k == 3: no reply now

    assert batches.receive() == 12
    batches.answer(ready, full)
    assert batches.send() == (0, [])
    for n, client in enumerate(clients):
        assert _received(client) == [
            bytes([n, 0]) + b"fast",
            b"full:" + bytes([n, 2]) + b"query" * 3,
        ]
    # the slow path saw the source exactly as the socket module reports it
    expected = {(c.getsockname()[0], c.getsockname()[1]) for c in clients}
    assert {(host, peer[1]) for _datagram, host, peer in seen} == expected
    assert all(peer[0] == host for _d, host, peer in seen)
    if server.family == socket.AF_INET6:
        assert all(len(peer) == 4 for _d, _h, peer in seen)
    # a wake-up that finds nothing answers nothing: no reply is sent twice
    assert batches.receive() == 0
    batches.answer(ready, full)
    assert batches.send() == (0, [])
    assert all(_received(client) == [] for client in clients)


def test_more_datagrams_than_a_batch_take_several_batches(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, (client, *_rest) = pair
    for k in range(100):
        client.sendto(k.to_bytes(2, "big") + b"q", server.getsockname())
    batches = Batches(server, size=64)
    counts = []
    while count := batches.receive():
        counts.append(count)
        batches.answer(lambda host, rest: b"a" + rest, lambda *_: None)
        batches.send()
    assert counts == [64, 36]
    assert _received(client) == [k.to_bytes(2, "big") + b"aq" for k in range(100)]


def test_a_large_datagram_goes_both_ways_intact(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, (client, *_rest) = pair
    big = bytes(range(256)) * 234  # 59,904 bytes
    client.sendto(big, server.getsockname())
    batches = Batches(server, size=4)
    assert batches.receive() == 1
    batches.answer(lambda host, rest: None, lambda datagram, host, peer: datagram[::-1])
    batches.send()
    assert _received(client) == [big[::-1]]


def test_a_refused_reply_does_not_stop_the_others(
    pair: tuple[socket.socket, list[socket.socket]],
) -> None:
    server, clients = pair
    for n, client in enumerate(clients):
        client.sendto(bytes([0, n]) + b"q", server.getsockname())
    batches = Batches(server, size=4)
    assert batches.receive() == 3
    # the middle reply is longer than any UDP datagram: the kernel refuses it (EMSGSIZE)
    sizes = {0: 1, 1: 65534, 2: 1}
    batches.answer(lambda host, rest: None, lambda d, host, peer: d[:2] + b"r" * sizes[d[1]])
    dropped, errors = batches.send()
    assert dropped == 0 and [e.errno for e in errors] == [errno.EMSGSIZE]
    assert [_received(c) for c in clients] == [[b"\x00\x00r"], [], [b"\x00\x02r"]]
