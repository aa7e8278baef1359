"""Many UDP datagrams per system call: recvmmsg(2) and sendmmsg(2), called through libc.

In: a bound, non-blocking UDP socket, and two callables that answer a datagram. Out: the
replies, sent for a whole batch in one call. A reply is written into the buffer its datagram
came in, so a reply that only needs the datagram's ID in front (``ready``) is one copy, and
nothing refers to the caller's bytes once it is queued. Source addresses are given as Python's
socket module reports them (host without an IPv6 zone). It never blocks, and it holds only the
buffers it allocates at start (``size`` slots of 64 KiB each, most of them never touched).
Linux only, like the rest of the gateway.

The message headers are written through flat views of 64-bit words; on the LP64 ABIs Linux runs
on (x86_64, aarch64, ...) ``struct mmsghdr`` is eight words: msg_name, msg_namelen, msg_iov,
msg_iovlen, msg_control, msg_controllen, msg_flags, msg_len.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from collections.abc import Callable

Peer = tuple[str, int] | tuple[str, int, int, int]
Ready = Callable[[str, bytes], bytes | None]
Full = Callable[[bytes, str, Peer], bytes | None]

SLOT = 65536  # bytes per datagram buffer: any UDP payload fits
NAME = 128  # bytes per address buffer (sizeof struct sockaddr_storage)
WORDS = 8  # 64-bit words per struct mmsghdr
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)

_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
assert ctypes.sizeof(ctypes.c_void_p) == 8, "struct mmsghdr is laid out for LP64 here"


def _words(count: int) -> tuple[ctypes.Array[ctypes.c_uint64], memoryview, int]:
    array = (ctypes.c_uint64 * count)()
    return array, memoryview(array).cast("B").cast("Q"), ctypes.addressof(array)


def peer_of(raw: bytes) -> tuple[str, Peer]:
    """(host, address tuple) of a ``struct sockaddr_in``/``sockaddr_in6``."""
    family = int.from_bytes(raw[:2], "little")
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        return host, (host, port)
    if family == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        flowinfo = int.from_bytes(raw[4:8], "big")
        scope = int.from_bytes(raw[24:28], "little")
        return host, (host, port, flowinfo, scope)
    raise OSError(errno.EAFNOSUPPORT, f"datagram from address family {family}")


class Batches:
    """Receive up to ``size`` datagrams at a time on ``sock`` and answer them in one call."""

    def __init__(self, sock: socket.socket, size: int = 64) -> None:
        self.sock, self.size, self.fd = sock, size, sock.fileno()
        self._data = (ctypes.c_char * (size * SLOT))()
        self._data_base = ctypes.addressof(self._data)
        self._payload = memoryview(self._data).cast("B")
        self._names = (ctypes.c_char * (size * NAME))()
        self._names_base = ctypes.addressof(self._names)
        self._name_bytes = memoryview(self._names).cast("B")
        self._riov, riov, riov_base = _words(2 * size)
        self._rmsg, self._rq, self._rmsg_base = _words(WORDS * size)
        self._siov, self._sv, self._siov_base = _words(2 * size)
        self._smsg, self._sq, self._smsg_base = _words(WORDS * size)
        for i in range(size):
            riov[2 * i], riov[2 * i + 1] = self._data_base + i * SLOT, SLOT
            self._rq[WORDS * i] = self._names_base + i * NAME
            self._rq[WORDS * i + 2], self._rq[WORDS * i + 3] = riov_base + 16 * i, 1
            self._sq[WORDS * i + 2], self._sq[WORDS * i + 3] = self._siov_base + 16 * i, 1
        # per datagram slot: (payload offset, address offset, word of the address length, word
        # of the payload length, address buffer, payload buffer); per reply: the header's two
        # words and the iovec's two words to fill in
        self._slots = [
            (i * SLOT, i * NAME, WORDS * i + 1, WORDS * i + 7, self._names_base + i * NAME,
             self._data_base + i * SLOT)
            for i in range(size)
        ]  # fmt: skip
        self._replies = [(WORDS * j, WORDS * j + 1, 2 * j, 2 * j + 1) for j in range(size)]
        self._received = size  # address lengths to reset before the next receive
        self._queued = 0
        self._senders: list[tuple[str, Peer]] = []  # (host, peer) per datagram of the batch
        self._peers: dict[bytes, tuple[str, Peer]] = {}

    def receive(self) -> int:
        """Take the datagrams waiting on the socket, at most ``size``; how many (0: none).

        Replies queued for the previous batch must have been sent: this reuses its buffers."""
        rq, senders = self._rq, self._senders
        senders.clear()
        for slot in self._slots[: self._received]:
            rq[slot[2]] = NAME  # the kernel wrote the address lengths of these
        count = int(_recvmmsg(self.fd, self._rmsg_base, self.size, socket.MSG_DONTWAIT, None))
        if count < 0:
            self._received = 0
            code = ctypes.get_errno()
            if code in _AGAIN:
                return 0
            raise OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")
        self._received = count
        names, peers = self._name_bytes, self._peers
        for _, start, name_length, *_ in self._slots[:count]:
            raw = names[start : start + rq[name_length]].tobytes()
            known = peers.get(raw)
            if known is None:
                if len(peers) >= 4096:
                    peers.clear()
                known = peers[raw] = peer_of(raw)
            senders.append(known)
        return count

    def answer(self, ready: Ready, full: Full) -> None:
        """Queue a reply to each datagram of the batch.

        ``ready(host, datagram after its 2-byte ID)`` is asked first: the reply after its ID
        (sent with the datagram's own ID), empty for no reply, or None. On None,
        ``full(datagram, host, peer)`` gives the whole reply, or None for no reply now."""
        payload, rq, sq, sv = self._payload, self._rq, self._sq, self._sv
        replies, queued = self._replies, self._queued
        for (host, peer), (start, _, name_length, length_word, name, data) in zip(
            self._senders, self._slots, strict=False
        ):
            end = start + rq[length_word]
            tail = ready(host, payload[start + 2 : end].tobytes())
            if tail is None:
                response = full(payload[start:end].tobytes(), host, peer)
                if response is None:
                    continue
                length = len(response)
                if length > SLOT:
                    continue  # cannot be sent over UDP; the answer path truncates long before
                payload[start : start + length] = response
            elif tail:
                length = len(tail) + 2
                if length > SLOT:
                    continue
                payload[start + 2 : start + length] = tail
            else:
                continue
            name_word, name_length_word, base_word, length_word = replies[queued]
            sq[name_word], sq[name_length_word] = name, rq[name_length]
            sv[base_word], sv[length_word] = data, length
            queued += 1
        self._queued = queued

    def send(self) -> tuple[int, list[OSError]]:
        """Send the queued replies: (how many did not fit in the socket buffer, other errors).

        A reply the kernel refuses (say, a route that is gone) is skipped and the rest still go."""
        queued, self._queued = self._queued, 0
        done, dropped, errors = 0, 0, []
        while done < queued:
            sent = int(_sendmmsg(self.fd, self._smsg_base + 8 * WORDS * done, queued - done, 0))
            if sent > 0:
                done += sent
                continue
            code = ctypes.get_errno()
            if code in _AGAIN:
                dropped += queued - done  # the socket buffer is full: the clients retry
                break
            errors.append(OSError(code, f"sendmmsg: {errno.errorcode.get(code, code)}"))
            done += 1
        return dropped, errors
