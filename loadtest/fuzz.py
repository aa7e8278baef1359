"""Junk against the running DNS interceptor: mutated and random UDP datagrams, junk TCP streams.

Namespaces ``egd-<8 hex>-{c,g,u}`` (``common.dns_net``); egressgw with ``--rate-limit
10000000`` (every datagram reaches the parser) and ``--max-ttl`` (what it caches expires within
seconds). Phases, each bounded in count and seconds:

1. UDP: ``--datagrams`` at ``--rate`` from ``--senders`` processes, one socket per class of
   junk (``KINDS``), 3% from an address that is no pod's; ``--rounds`` repeats it.
2. TCP: ``--tcp-streams`` junk, pipelined, reset and slowloris streams, and a burst of 24
   connections from one address against the per-source limit.
3. Settle: ``--settle`` seconds without traffic, so the caches expire.

After each phase: the daemon alive with /healthz 200, valid queries answered within 10 ms, the
RSS (target after the settle: within 10% of the start); replies per class and rcode. Run as
root: ``python -m loadtest.fuzz [--json PATH]`` (about two minutes); see loadtest/README.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dnslib import DNSRecord

from egressgw.datapath.netns import call_in
from egressgw.dns.interceptor import DnsSettings
from loadtest.common import (
    CACHED_SOURCE,
    DOMAIN,
    EGRESSGW,
    GC_LINE,
    UNIQUE_SOURCES,
    UPSTREAM,
    Daemon,
    Net,
    Proc,
    addresses,
    bench_manifests,
    cached_names,
    commits_measured,
    dns_net,
    dnsmasq_argv,
    finish,
    git_state,
    http_get,
    in_ns,
    median,
    notes_section,
    parser,
    preflight,
    process_cpu_s,
    progress,
    synth_args,
    table,
    udp_counters,
    verdict,
    workspace,
)

UNKNOWN_SOURCE = "192.0.2.250"  # in the client's subnet, no pod's address
HEADER = struct.Struct("!HHHHHH")
TYPE_CLASS = struct.Struct("!HH")
RR_FIXED = struct.Struct("!HHIH")
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
KINDS = ("valid", "bitflip", "truncate", "label", "pointer", "counts", "qr", "odd", "edns",
         "random", "splice")  # fmt: skip
WEIGHTS = (8, 12, 9, 10, 10, 8, 8, 10, 12, 9, 4)
UNKNOWN_KIND, UNKNOWN_SHARE, TCP_UNKNOWN_SHARE = "unknown-source", 0.03, 0.03
TYPES = (1, 28, 1, 28, 1, 28, 16, 15, 33, 12, 6, 2, 5, 255)
ODD_TYPES = (0, 41, 250, 249, 251, 252, 253, 254, 255, 65535, 32768, 666, 99, 65280)
ODD_CLASSES = (0, 2, 3, 4, 254, 255, 65535, 32769)
EDNS_CODES = (0, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20292, 65001, 65535)
TCP_FAST_KINDS = ("random", "short-prefix", "lying-prefix", "zero-length", "valid-then-garbage",
                  "pipelined", "mutated", "big", "reset")  # fmt: skip
TCP_FAST_WEIGHTS = (20, 8, 10, 5, 15, 10, 20, 2, 5)
TCP_SLOW_KINDS = ("slowloris-silent", "slowloris-prefix", "slowloris-partial", "slowloris-drip")
# a chain of 100 compression pointers from the question on, each to the next, then the root
POINTER_CHAIN = b"".join(struct.pack("!H", 0xC000 | (14 + 2 * i)) for i in range(100)) + b"\0"
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
LIMIT_BURST = 24  # connections at once from one address, against the gateway's 16
LATENCY_TARGET_MS = 10.0
RSS_TARGET = 1.10
GC_STAMPED = re.compile(r"^(\d\d:\d\d:\d\d) loadtest\.dns: gc generation (\d) took ([0-9.]+) ms",
                        re.M)  # fmt: skip


# -- junk ----------------------------------------------------------------------------------------
def encode(name: str) -> bytes:
    return b"".join(bytes([len(raw)]) + raw for raw in map(str.encode, name.split("."))) + b"\0"


class Junk:
    """Valid queries and their mutations, one method per class; fresh names are AAAA names in
    2001:db8:b:<segment>::/64, so that processes with their own segments do not share them."""

    def __init__(self, rng: random.Random, segment: int) -> None:
        self.rng, self.segment, self.fresh = rng, segment, 0
        self.cached = [(encode(n), 1 if t == "A" else 28) for n, t in cached_names()]

    def make(self, kind: str) -> bytes:
        return bytes(getattr(self, kind)())

    def any(self) -> bytes:
        return self.make(self.rng.choices(KINDS, WEIGHTS)[0])

    def question(self) -> tuple[bytes, int]:
        r = self.rng
        roll = r.random()
        if roll < 0.75:
            qname, qtype = r.choice(self.cached)
        elif roll < 0.9:
            qname, qtype = encode(f"n{r.getrandbits(24)}.denied.example"), r.choice(TYPES)
        else:
            self.fresh += 1
            hi, lo = divmod(self.fresh, 0x10000)
            qname, qtype = encode(f"u-2001-db8-b-{self.segment:x}-0-0-{hi:x}-{lo:x}.{DOMAIN}"), 28
        return qname, r.choice(TYPES) if r.random() < 0.1 else qtype

    def valid(self, *, edns: bool | None = None) -> bytes:
        r = self.rng
        qname, qtype = self.question()
        edns = r.random() < 0.5 if edns is None else edns
        flags = 0x0100 if r.random() < 0.9 else 0
        body = qname + TYPE_CLASS.pack(qtype, 1)
        if edns:  # an OPT record, DO set on some
            do = 0x8000 if r.random() < 0.3 else 0
            body += b"\0" + RR_FIXED.pack(41, r.choice((512, 1232, 4096)), do, 0)
        return HEADER.pack(r.getrandbits(16), flags, 1, 0, 0, int(edns)) + body

    def bare(self) -> tuple[bytes, bytes, int]:
        """(header, qname, qtype) of a valid query without EDNS."""
        qname, qtype = self.question()
        return HEADER.pack(self.rng.getrandbits(16), 0x0100, 1, 0, 0, 0), qname, qtype

    def bitflip(self) -> bytes:
        data = bytearray(self.valid())
        for _ in range(self.rng.randint(1, 8)):
            bit = self.rng.randrange(len(data) * 8)
            data[bit >> 3] ^= 1 << (bit & 7)
        return bytes(data)

    def truncate(self) -> bytes:
        data = self.valid()
        return data[: self.rng.randrange(len(data))]

    def label(self) -> bytes:
        r = self.rng
        header, qname, qtype = self.bare()
        tail, roll = TYPE_CLASS.pack(qtype, 1), r.random()
        if roll < 0.15:  # over 255 octets
            qname = b"".join(b"\x3f" + b"a" * 63 for _ in range(r.randint(4, 8))) + b"\x00"
        elif roll < 0.3:  # a label over 63 octets (its length byte has a reserved type)
            size = r.randint(64, 200)
            qname = bytes([size]) + b"b" * size + b"\x00"
        elif roll < 0.4:  # no terminating zero
            qname, tail = qname[:-1], b""
        else:
            data, starts, at = bytearray(qname), [], 0
            while at < len(data) and data[at]:
                starts.append(at)
                at += 1 + data[at]
            data[r.choice(starts) if starts else 0] = r.choice(
                (0x3F, 0x40, 0x41, 0x7F, 0x80, 0xBF, 0xFF, 0, len(data), r.getrandbits(8))
            )
            qname = bytes(data)
        return header + qname + tail

    def pointer(self) -> bytes:
        r = self.rng
        header, qname, qtype = self.bare()
        tail, variant = TYPE_CLASS.pack(qtype, 1), r.randrange(10)
        if variant == 8:  # the OPT's owner name is a pointer to the question
            header = HEADER.pack(r.getrandbits(16), 0x0100, 1, 0, 0, 1)
            return header + qname + tail + b"\xc0\x0c" + RR_FIXED.pack(41, 1232, 0, 0)
        if variant == 9:  # a pointer loop in the owner of an additional record
            header = HEADER.pack(r.getrandbits(16), 0x0100, 1, 0, 0, 1)
            loop = struct.pack("!H", 0xC000 | (12 + len(qname) + len(tail)))
            return header + qname + tail + loop + RR_FIXED.pack(1, 1, 0, 4) + bytes(4)
        if variant == 6:  # forward, to a name after the question
            return header + b"\xc0\x12" + tail + b"\x03www\x00"
        name = (
            b"\xc0\x0c",  # points at itself
            b"\xc0\x0e\xc0\x0c",  # two pointers at each other
            b"\x03abc\xc0\x0c",  # a label, then back to it
            bytes([0xC0 | r.getrandbits(6), r.getrandbits(8)]),  # anywhere, mostly past the end
            bytes([0xC0, r.randrange(12)]),  # into the header
            POINTER_CHAIN,
            b"",
            bytes([r.choice((0x40, 0x41, 0x80, 0xBF))]) + r.randbytes(4) + b"\x00",  # 0x40, 0x80
        )[variant]
        return header + name + tail

    def counts(self) -> bytes:
        r = self.rng
        data = bytearray(self.valid())
        for _ in range(r.randint(1, 4)):
            value = r.choice((0, 2, 3, 0xFFFF, 0x8000, r.getrandbits(16)))
            struct.pack_into("!H", data, 4 + 2 * r.randrange(4), value)
        return bytes(data)

    def qr(self) -> bytes:
        r = self.rng
        data = bytearray(self.valid(edns=False))
        data[2] |= 0x80
        if r.random() < 0.5:
            data[3] = (data[3] & 0xF0) | r.getrandbits(4)
        if r.random() < 0.5:  # a whole answer, as if injected
            struct.pack_into("!H", data, 6, 1)
            data += b"\xc0\x0c" + RR_FIXED.pack(1, 1, 300, 4) + bytes((203, 0, 113, 99))
        return bytes(data)

    def odd(self) -> bytes:
        r = self.rng
        header, qname, qtype = self.bare()
        data = bytearray(header + qname + TYPE_CLASS.pack(qtype, 1))
        variant = r.randrange(4)
        if variant == 0:
            data[2] = (data[2] & 0x87) | (r.randint(1, 15) << 3)
        elif variant == 1:
            struct.pack_into("!H", data, len(data) - 2, r.choice(ODD_CLASSES))
        elif variant == 2:
            struct.pack_into("!H", data, len(data) - 4, r.choice(ODD_TYPES))
        else:  # AA, TC, Z, AD, CD and RA: flags a query does not carry
            data[2] |= r.choice((0x04, 0x02, 0x06))
            data[3] |= r.choice((0x40, 0x20, 0x10, 0x80, 0xF0))
        return bytes(data)

    def edns(self) -> bytes:
        r = self.rng
        _header, qname, qtype = self.bare()
        rrs: list[bytes] = []
        for _ in range(1 if r.random() < 0.8 else r.randint(2, 4)):
            options = bytearray()
            for _ in range(r.choice((0, 1, 2, 3, 8, 40))):
                code = r.choice(EDNS_CODES)
                if code == 8 and r.random() < 0.7:  # client subnet, often malformed
                    family, bits = r.choice((0, 1, 2, 3, 0xFFFF)), r.getrandbits(8)
                    value = struct.pack("!HBB", family, bits, r.getrandbits(8))
                    value += r.randbytes(r.randrange(20))
                elif code == 10:  # cookie of any length
                    value = r.randbytes(r.choice((0, 1, 7, 8, 16, 24, 40, 41)))
                else:
                    value = r.randbytes(r.randrange(24))
                length = len(value)
                if r.random() < 0.15:
                    length = r.choice((length + 1, length + 100, 0xFFFF, max(0, length - 1)))
                options += struct.pack("!HH", code, length) + value
            rdlength = len(options)
            if r.random() < 0.15:
                rdlength = r.choice((rdlength + 1, rdlength + 300, 0xFFFF, max(0, rdlength - 3)))
            owner = r.choice((b"\x00", b"\x00", b"\x00", b"\x03abc\x00", b"\xc0\x0c"))
            size = r.choice((0, 1, 511, 512, 1232, 4096, 65535))
            rcode_bits = r.getrandbits(8) << 24 if r.random() < 0.2 else 0
            flags = r.getrandbits(16) if r.random() < 0.3 else r.choice((0, 0x8000))
            ttl = rcode_bits | (r.choice((0, 0, 1, 2, 255)) << 16) | flags
            rrs.append(owner + RR_FIXED.pack(41, size, ttl, rdlength) + bytes(options))
        if r.random() < 0.1:  # a TSIG after the OPT
            rrs.append(b"\x00" + RR_FIXED.pack(250, 255, 0, 16) + r.randbytes(16))
        arcount = len(rrs) if r.random() < 0.85 else r.choice((0, 1, len(rrs) + 3))
        header = HEADER.pack(r.getrandbits(16), 0x0100, 1, 0, 0, arcount)
        return header + qname + TYPE_CLASS.pack(qtype, 1) + b"".join(rrs)

    def random(self) -> bytes:
        r = self.rng
        roll = r.random()
        low, high = (0, 12) if roll < 0.2 else (12, 64) if roll < 0.6 else (
            (64, 512) if roll < 0.95 else (512, 4097))  # fmt: skip
        return r.randbytes(r.randrange(low, high))

    def splice(self) -> bytes:
        r = self.rng
        one, two = self.valid(), self.valid()
        roll = r.random()
        if roll < 0.4:
            return one + two
        if roll < 0.7:
            return one + r.randbytes(r.randrange(1, 200))
        cut = r.randrange(min(len(one), len(two)))
        return one[:cut] + two[cut:]


def reply_key(reply: bytes) -> str:
    if len(reply) < 4:
        return "short reply"
    if not reply[2] & 0x80:
        return "not a response"
    return RCODES.get(reply[3] & 0x0F, f"RCODE{reply[3] & 0x0F}")


# -- the senders (processes in the client namespace) ---------------------------------------------
def udp_sender(cfg: dict[str, Any]) -> dict[str, Any]:
    """Send ``count`` datagrams at ``rate`` per second for at most ``seconds``; count replies."""
    rng = random.Random(cfg["seed"])
    junk = Junk(rng, cfg["segment"])
    socks: dict[str, socket.socket] = {}
    for kind in (*KINDS, UNKNOWN_KIND):
        sock = socks[kind] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock.bind((cfg["unknown_source"] if kind == UNKNOWN_KIND else cfg["source"], 0))
        sock.connect((cfg["server"], 53))
        sock.setblocking(False)
    tally: dict[str, Counter[str]] = {k: Counter() for k in ("sent", "sent_bytes", "reply_bytes",
                                                             "errors")}  # fmt: skip
    replies: dict[str, Counter[str]] = {kind: Counter() for kind in socks}

    def drain() -> None:
        for kind, sock in socks.items():
            while True:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ECONNREFUSED: nobody listens any more
                    tally["errors"][f"receive: {exc.strerror}"] += 1
                    break
                replies[kind][reply_key(reply)] += 1
                tally["reply_bytes"][kind] += len(reply)

    count, rate = cfg["count"], cfg["rate"]
    started = time.monotonic()
    deadline, total = started + cfg["seconds"], 0
    while total < count and (now := time.monotonic()) < deadline:
        due = min(count, int((now - started) * rate) + 1)
        while total < due:
            kind = rng.choices(KINDS, WEIGHTS)[0]
            data = junk.make(kind)
            kind = UNKNOWN_KIND if rng.random() < UNKNOWN_SHARE else kind
            try:
                socks[kind].send(data)
            except BlockingIOError:
                tally["errors"]["send: would block"] += 1
            except OSError as exc:
                tally["errors"][f"send: {exc.strerror}"] += 1
            tally["sent"][kind] += 1
            tally["sent_bytes"][kind] += len(data)
            total += 1
        drain()
        time.sleep(0.002)
    sending_s = time.monotonic() - started
    quiet_until = time.monotonic() + 1.5  # late replies
    while time.monotonic() < quiet_until:
        if select.select(list(socks.values()), [], [], 0.1)[0]:
            drain()
    for sock in socks.values():
        sock.close()
    return {**{k: dict(v) for k, v in tally.items()}, "seconds": round(sending_s, 2),
            "replies": {k: dict(v) for k, v in replies.items()}}  # fmt: skip


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


class TcpFuzz:
    """Junk TCP streams from several addresses at once, bounded in count and time."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg["seed"])
        self.junk = Junk(self.rng, cfg["segment"])
        self.tally: dict[str, Counter[str]] = {}
        self.closed_after: dict[str, list[float]] = {}
        self.deadline = 0.0

    def count(self, kind: str, key: str) -> None:
        self.tally.setdefault(kind, Counter())[key] += 1

    async def connect(self, kind: str, source: str) -> Stream | None:
        self.count(kind, "streams")
        try:
            async with asyncio.timeout(3.0):
                return await asyncio.open_connection(self.cfg["server"], 53,
                                                     local_addr=(source, 0))  # fmt: skip
        except (OSError, TimeoutError) as exc:
            self.count(kind, f"connect failed: {getattr(exc, 'strerror', None) or 'timeout'}")
            return None

    async def replies(self, kind: str, reader: asyncio.StreamReader, expect: int | None) -> None:
        """Read framed replies until ``expect`` of them, the gateway's close, or 3 s."""
        got = 0
        try:
            async with asyncio.timeout(3.0):
                while expect is None or got < expect:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    self.count(kind, f"reply {reply_key(await reader.readexactly(length))}")
                    got += 1
            self.count(kind, "all expected replies")
        except asyncio.IncompleteReadError as exc:
            self.count(kind, "closed mid-reply" if exc.partial else "closed by the gateway")
        except TimeoutError:
            self.count(kind, "still open when we gave up")
        except ConnectionResetError:
            self.count(kind, "reset by the gateway")
        except OSError as exc:
            self.count(kind, f"read error: {exc.strerror}")

    async def send(self, kind: str, writer: asyncio.StreamWriter, data: bytes) -> bool:
        try:
            writer.write(data)
            async with asyncio.timeout(3.0):
                await writer.drain()
            return True
        except (OSError, TimeoutError) as exc:
            self.count(kind, f"write failed: {getattr(exc, 'strerror', None) or 'timeout'}")
            return False

    def fast_data(self, kind: str) -> tuple[bytes, int | None]:
        """What a fast stream sends, and how many replies it waits for (None: until closed)."""
        r, junk = self.rng, self.junk
        if kind == "random":
            return r.randbytes(r.randrange(1, 2049)), None
        if kind == "short-prefix":
            return bytes([r.getrandbits(8)]), None
        if kind == "lying-prefix":
            query = junk.valid()
            return struct.pack("!H", len(query) + r.randint(1, 500)) + query, None
        if kind == "zero-length":
            return b"\x00\x00" + (framed(junk.valid()) if r.random() < 0.5 else b""), None
        if kind == "valid-then-garbage":
            return framed(junk.valid()) + r.randbytes(r.randrange(1, 300)), None
        if kind == "pipelined":
            return b"".join(framed(junk.valid()) for _ in range(10)), 10
        if kind == "mutated":
            return b"".join(framed(junk.any()) for _ in range(r.randint(1, 5))), None
        if kind == UNKNOWN_KIND:
            return b"".join(framed(junk.valid()) for _ in range(3)), 3
        return b"\xff\xff" + r.randbytes(65535), None  # big

    async def fast(self, kind: str, source: str) -> None:
        opened = await self.connect(kind, source)
        if opened is None:
            return
        reader, writer = opened
        try:
            if kind == "reset":
                if self.rng.random() < 0.5:
                    writer.write(framed(self.junk.valid())[: self.rng.randrange(1, 20)])
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.count(kind, "reset by us")
                return
            data, expect = self.fast_data(kind)
            if not await self.send(kind, writer, data):
                return
            if expect is None and writer.can_write_eof():
                try:
                    writer.write_eof()  # all sent: the gateway sees the end of the stream
                except OSError:  # the gateway closed it first
                    self.count(kind, "reset by the gateway")
                    return
            await self.replies(kind, reader, expect)
        finally:
            writer.transport.abort()

    async def slow(self, kind: str, source: str) -> None:
        opened = await self.connect(kind, source)
        if opened is None:
            return
        reader, writer = opened
        started = time.monotonic()
        query = framed(self.junk.valid())
        try:
            if kind == "slowloris-prefix":
                writer.write(query[:1])
            elif kind == "slowloris-partial":
                writer.write(query[: len(query) // 2])
            drip = list(query) if kind == "slowloris-drip" else []
            end = min(started + self.cfg["slowloris_hold"], self.deadline)
            while (left := end - time.monotonic()) > 0:
                if drip:
                    writer.write(bytes([drip.pop(0)]))
                try:
                    async with asyncio.timeout(min(1.0, left) if drip else left):
                        data = await reader.read(65535)
                except TimeoutError:
                    continue
                if not data:
                    self.count(kind, "closed by the gateway")
                    self.closed_after.setdefault(kind, []).append(time.monotonic() - started)
                    return
                self.count(kind, "got bytes")
            self.count(kind, "still open when we gave up")
        except ConnectionResetError:
            self.count(kind, "reset by the gateway")
            self.closed_after.setdefault(kind, []).append(time.monotonic() - started)
        except OSError as exc:
            self.count(kind, f"error: {exc.strerror}")
        finally:
            writer.transport.abort()

    async def limit_burst(self, source: str) -> None:
        """LIMIT_BURST connections from one address at once, each with one valid query."""
        kind = f"burst of {LIMIT_BURST} from one address"

        async def one() -> None:
            opened = await self.connect(kind, source)
            if opened is not None:
                reader, writer = opened
                try:
                    if await self.send(kind, writer, framed(self.junk.valid(edns=False))):
                        await self.replies(kind, reader, 1)
                finally:
                    writer.transport.abort()

        await asyncio.gather(*(one() for _ in range(LIMIT_BURST)))

    async def run(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.rng
        started = time.monotonic()
        self.deadline = started + cfg["seconds"]
        await self.limit_burst(cfg["burst_source"])
        total = cfg["count"] - LIMIT_BURST
        slow_n, unknown_n = int(total * cfg["slowloris_share"]), int(total * TCP_UNKNOWN_SHARE)
        fast = r.choices(TCP_FAST_KINDS, TCP_FAST_WEIGHTS, k=max(0, total - slow_n - unknown_n))
        plans: list[tuple[list[str], list[str], Callable[[str, str], Any]]] = [
            ([TCP_SLOW_KINDS[i % len(TCP_SLOW_KINDS)] for i in range(slow_n)],
             cfg["slow_sources"], self.slow),
            ([UNKNOWN_KIND] * unknown_n, [cfg["unknown_source"]], self.fast),
            (fast, cfg["fast_sources"], self.fast),
        ]  # fmt: skip
        queues = [(list(reversed(kinds)), sources, handler) for kinds, sources, handler in plans]

        async def worker(queue: list[str], source: str, handler: Callable[[str, str], Any]) -> None:
            while queue and time.monotonic() < self.deadline:
                await handler(queue.pop(), source)

        try:
            async with asyncio.timeout(cfg["seconds"] + 20):
                await asyncio.gather(*(worker(queue, source, handler)
                                       for queue, sources, handler in queues for source in sources
                                       for _ in range(cfg["per_source"])))  # fmt: skip
        except TimeoutError:
            self.count("all", "stopped at the time bound")
        return {"tally": {k: dict(v) for k, v in self.tally.items()},
                "closed_after": {k: sorted(v) for k, v in self.closed_after.items()},
                "not_started": sum(len(queue) for queue, _, _ in queues),
                "seconds": round(time.monotonic() - started, 2)}  # fmt: skip


def worker_main(role: str, cfg_text: str) -> int:
    cfg = json.loads(cfg_text)
    result = udp_sender(cfg) if role == "_udp" else asyncio.run(TcpFuzz(cfg).run())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- the daemon, from outside --------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """The daemon's RSS every ``interval`` seconds, labelled with the phase under way."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval, self.phase = pid, interval, "start"
        self.samples: list[tuple[str, float, int]] = []
        self.stopped = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                rss = rss_kib(self.pid)
            except OSError:
                return  # the daemon is gone
            self.samples.append((self.phase, round(time.monotonic() - self.started_at, 2), rss))


def timed_queries(net: Net, label: str, names: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """One query per name from the pod at CACHED_SOURCE, each timed from send to reply."""

    def ask() -> tuple[list[float], list[str]]:
        times: list[float] = []
        failures: list[str] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((CACHED_SOURCE, 0))
            sock.connect((EGRESSGW, 53))
            sock.settimeout(1.0)
            for name, qtype in names:
                data = DNSRecord.question(name, qtype).pack()
                started = time.perf_counter()
                try:
                    sock.send(data)
                    while (reply := sock.recv(4096))[:2] != data[:2]:
                        pass
                except OSError as exc:
                    failures.append(f"{name}: {exc}")
                    continue
                took, key = (time.perf_counter() - started) * 1000, reply_key(reply)
                if key == "NOERROR":
                    times.append(took)
                else:
                    failures.append(f"{name}: {key}")
                time.sleep(0.02)
        return sorted(times), failures

    times, failures = call_in(net.client, ask)
    return {"label": label, "answered": len(times), "failed": len(failures),
            "within_10ms": sum(t <= LATENCY_TARGET_MS for t in times),
            "p50_ms": round(median(times), 3) if times else None,
            "max_ms": round(times[-1], 3) if times else None, "failures": failures[:5]}  # fmt: skip


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Options:
    datagrams: int = 1_000_000
    rounds: int = 1
    tcp_streams: int = 10_000
    seconds: float = 120.0
    tcp_seconds: float = 90.0
    rate: float = 20_000.0
    senders: int = 2
    seed: int = 1
    max_ttl: int = 5
    settle: float | None = None
    probes: int = 20
    per_source: int = 12
    slowloris_share: float = 0.05
    slowloris_hold: float = 15.0
    sender_cpu: int = 1
    daemon_args: list[str] = field(default_factory=list)
    json_path: str | None = None
    keep: bool = False


@dataclass
class Results:
    machine: dict[str, Any]
    options: dict[str, Any]
    phases: list[dict[str, Any]] = field(default_factory=list)
    udp: dict[str, Any] = field(default_factory=dict)
    tcp: dict[str, Any] = field(default_factory=dict)
    rss_kib: dict[str, int] = field(default_factory=dict)
    rss_timeline: list[tuple[str, float, int]] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    daemon_log: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Fuzz:
    def __init__(self, net: Net, workdir: Path, options: Options, results: Results) -> None:
        self.net, self.workdir, self.o, self.results = net, workdir, options, results
        extra = ["--min-ttl", "1", "--max-ttl", str(options.max_ttl), *options.daemon_args]
        self.daemon = Daemon(net, workdir, 0, extra)
        self.procs: list[Proc] = []
        self.sampler: Sampler | None = None
        self.fresh = 0
        self.udp_totals: dict[str, Any] = {}  # over the rounds, with Counters

    def __enter__(self) -> Fuzz:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler is not None:
            self.sampler.stopped.set()
        self.daemon.stop()
        for proc in reversed(self.procs):
            proc.stop()

    def start(self) -> None:
        addresses(self.net.client, ("eth0", f"{UNKNOWN_SOURCE}/24"))
        upstream = in_ns(self.net.upstream, *dnsmasq_argv(UPSTREAM, *synth_args()))
        self.procs.append(Proc("dnsmasq upstream", upstream, self.workdir / "dnsmasq.log"))
        (self.workdir / "manifests").mkdir()
        (self.workdir / "manifests" / "bench.yaml").write_text(bench_manifests())
        time.sleep(0.3)
        self.procs[0].check()
        self.daemon.start()

    def fresh_names(self, count: int) -> list[tuple[str, str]]:
        """AAAA names nobody asked yet (2001:db8:b:ff00::/64, apart from the senders')."""
        self.fresh += count
        return [(f"u-2001-db8-b-ff00-0-0-0-{n:x}.{DOMAIN}", "AAAA")
                for n in range(self.fresh - count + 1, self.fresh + 1)]  # fmt: skip

    def rss(self) -> int:
        try:
            return rss_kib(self.daemon.pid)
        except OSError:  # gone
            return 0

    def cpu_seconds(self) -> float:
        try:
            return process_cpu_s(self.daemon.pid)
        except OSError:
            return 0.0

    def check(self, phase: str) -> None:
        """Alive, /healthz, and valid queries answered in time."""
        at, alive = time.strftime("%H:%M:%S"), self.daemon.alive()
        health = http_get(self.net, "/healthz")[0] if alive else 0
        probes = []
        if alive:
            cached = cached_names()[: self.o.probes]
            timed_queries(self.net, "warm", cached)  # so that the cached probes are cache hits
            probes.append(timed_queries(self.net, "cached names", cached))
            probes.append(timed_queries(self.net, "fresh names", self.fresh_names(self.o.probes)))
        else:
            self.results.notes.append(f"the daemon was gone after {phase}: {self.daemon_tail()}")
        rss = self.results.rss_kib[phase] = self.rss()
        self.results.phases.append({"phase": phase, "at": at, "alive": alive, "healthz": health,
                                    "rss_kib": rss, "probes": probes})  # fmt: skip
        progress(f"  after {phase}: alive {alive}, /healthz {health}, RSS {rss / 1024:.1f} MiB, "
                 + "; ".join(f"{p['label']} {p['within_10ms']}/{p['answered']} within 10 ms, "
                             f"max {p['max_ms']} ms" for p in probes))  # fmt: skip

    def daemon_tail(self) -> str:
        log = self.workdir / "egressgw.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join([ln for ln in text.splitlines() if "dns decision" not in ln][-15:])

    def worker(self, role: str, name: str, cfg: dict[str, Any]) -> Proc:
        argv = [sys.executable, "-m", "loadtest.fuzz", role, json.dumps(cfg)]
        proc = Proc(name, in_ns(self.net.client, *argv, cpu=self.o.sender_cpu),
                    self.workdir / f"{name}.log")  # fmt: skip
        self.procs.append(proc)  # stopped on the way out if the run ends early
        return proc

    def collect(self, proc: Proc, timeout: float) -> dict[str, Any]:
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.stop()
            raise RuntimeError(f"{proc.name} did not finish within {timeout:.0f} s") from None
        lines = proc.log.read_text(errors="replace").splitlines()
        found = [line for line in lines if line.startswith("RESULT ")]
        if proc.popen.returncode != 0 or not found:
            tail = "\n".join(lines[-30:])
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail}")
        result: dict[str, Any] = json.loads(found[-1].removeprefix("RESULT "))
        return result

    def udp(self, round_: int) -> None:
        """One UDP round: ``--datagrams`` from fresh seeds (and fresh names) of its own."""
        o = self.o
        label = f"UDP {round_ + 1}" if o.rounds > 1 else "UDP"
        progress(f"{label}: {o.datagrams:,} datagrams at {o.rate:,.0f}/s from {o.senders} "
                 f"senders, at most {o.seconds:g} s")  # fmt: skip
        assert self.sampler is not None
        self.sampler.phase = label
        snmp_before, cpu_before = udp_counters(self.net), self.cpu_seconds()
        workers = [
            self.worker("_udp", f"udp-sender-{round_}-{i}", {
                "seed": o.seed * 1000 + round_ * 10 + i, "segment": 0x100 + round_ * 8 + i,
                "count": o.datagrams // o.senders + (1 if i < o.datagrams % o.senders else 0),
                "rate": o.rate / o.senders, "seconds": o.seconds, "server": EGRESSGW,
                "source": UNIQUE_SOURCES[i], "unknown_source": UNKNOWN_SOURCE})
            for i in range(o.senders)
        ]  # fmt: skip
        parts = [self.collect(w, o.seconds + 60) for w in workers]
        cpu = self.cpu_seconds() - cpu_before
        snmp_after = udp_counters(self.net)
        u = self.udp_totals
        if not u:
            u.update({k: Counter() for k in ("sent", "sent_bytes", "reply_bytes", "errors",
                                             "kernel")}, replies={}, sending_s=0.0,
                     daemon_cpu_s=0.0)  # fmt: skip
        u["kernel"].update(
            {k: snmp_after[k] - v for k, v in snmp_before.items() if k in snmp_after}
        )
        for part in parts:
            for key in ("sent", "sent_bytes", "reply_bytes", "errors"):
                u[key].update(part[key])
            for kind, tally in part["replies"].items():
                u["replies"].setdefault(kind, Counter()).update(tally)
        u["sending_s"] += max(part["seconds"] for part in parts)
        u["daemon_cpu_s"] += cpu
        u["total_sent"] = sum(u["sent"].values())
        u["daemon_us_per_datagram"] = u["daemon_cpu_s"] / max(1, u["total_sent"]) * 1e6
        self.results.udp = json.loads(json.dumps(u))  # Counters as plain dicts
        self.check(label)

    def tcp(self) -> None:
        o = self.o
        progress(f"TCP: {o.tcp_streams:,} streams, at most {o.tcp_seconds:g} s")
        assert self.sampler is not None
        self.sampler.phase = "tcp"
        sources = UNIQUE_SOURCES[o.senders : len(UNIQUE_SOURCES) - 1]
        half = len(sources) // 2
        proc = self.worker("_tcp", "tcp-client", {
            "seed": o.seed * 1000 + 999, "segment": 0x1FF, "count": o.tcp_streams,
            "seconds": o.tcp_seconds, "server": EGRESSGW, "slow_sources": sources[:half],
            "fast_sources": sources[half:], "unknown_source": UNKNOWN_SOURCE,
            "burst_source": UNIQUE_SOURCES[-1], "per_source": o.per_source,
            "slowloris_share": o.slowloris_share, "slowloris_hold": o.slowloris_hold})  # fmt: skip
        self.results.tcp = self.collect(proc, o.tcp_seconds + 60)

    def run(self) -> None:
        self.start()
        before = self.daemon.metrics()
        self.check("start")
        self.sampler = Sampler(self.daemon.pid)
        self.sampler.start()
        for round_ in range(self.o.rounds):
            self.udp(round_)
        self.tcp()
        self.check("TCP")
        wait = self.o.settle
        wait = self.o.max_ttl + DnsSettings().grace_s + 5 if wait is None else wait
        progress(f"settle: {wait:g} s without traffic, so the caches expire")
        self.sampler.phase = "settle"
        time.sleep(wait)
        self.results.rss_kib["settled"] = self.rss()
        self.check("settle")
        self.sampler.stopped.set()
        peak = max((rss for _p, _t, rss in self.sampler.samples), default=0)
        self.results.rss_kib["peak"] = max(peak, *self.results.rss_kib.values())
        self.results.rss_timeline = self.sampler.samples
        self.results.counters = self.daemon.metrics().minus(before).matching("egressgw_dns")
        log = (self.workdir / "egressgw.log").read_text(errors="replace")
        tracebacks = log.count("Traceback (most recent call last)")
        gcs = GC_LINE.findall(log)
        self.results.daemon_log = {
            "lines": log.count("\n"), "tracebacks": tracebacks,
            "error_lines": sum(" ERROR " in line or '"ERROR"' in line for line in log.splitlines()),
            "internal_error_lines": log.count("internal error"),
            "first_traceback": log[log.find("Traceback") :][:3000] if tracebacks else "",
            "gc_full_ms": [float(ms) for gen, ms in gcs if gen == "2"],
            "gc_young_over_10ms": [float(ms) for gen, ms in gcs if gen != "2"],
            "gc_over_10ms_at": [f"{at} gen {gen} {float(ms):.0f} ms"
                                for at, gen, ms in GC_STAMPED.findall(log)
                                if float(ms) >= LATENCY_TARGET_MS],
        }  # fmt: skip


# -- report --------------------------------------------------------------------------------------
def render(results: Results) -> str:
    out: list[str] = ["", "egressgw DNS interceptor under junk"]
    u = results.udp
    if u:
        total = u["total_sent"]
        out += [
            "",
            f"UDP: {total:,} datagrams in {u['sending_s']:.1f} s "
            f"({total / max(u['sending_s'], 1e-9):,.0f}/s); daemon CPU "
            f"{u['daemon_cpu_s']:.1f} s, {u['daemon_us_per_datagram']:.1f} us per datagram",
        ]
        keys = sorted({k for tally in u["replies"].values() for k in tally})
        rows, totals = [], Counter[str]()
        for kind in (*KINDS, UNKNOWN_KIND):
            tally = u["replies"].get(kind, {})
            totals.update(tally)
            ratio = u["reply_bytes"].get(kind, 0) / max(1, u["sent_bytes"].get(kind, 0))
            rows.append([kind, f"{u['sent'].get(kind, 0):,}", f"{sum(tally.values()):,}",
                         *(f"{tally.get(k, 0):,}" for k in keys), f"{ratio:.2f}"])  # fmt: skip
        ratio = sum(u["reply_bytes"].values()) / max(1, sum(u["sent_bytes"].values()))
        rows.append(["all", f"{total:,}", f"{totals.total():,}",
                     *(f"{totals.get(k, 0):,}" for k in keys), f"{ratio:.2f}"])  # fmt: skip
        out += table(["class", "sent", "replied", *keys, "bytes back/sent"], rows, right=True)
        if u["errors"]:
            out.append(f"sender errors: {u['errors']}")
        names = ("InDatagrams", "OutDatagrams", "RcvbufErrors", "InErrors", "NoPorts")
        kernel = ", ".join(f"{name} {u['kernel'].get(name, 0):,}" for name in names)
        out.append(f"gateway kernel, UDP over the UDP phase: {kernel}")
    t = results.tcp
    if t:
        out += ["", f"TCP: {t['seconds']:g} s; streams not started (time bound): "
                f"{t['not_started']}"]  # fmt: skip
        for kind, tally in t["tally"].items():
            items = ", ".join(f"{k} {v:,}" for k, v in sorted(tally.items(), key=lambda i: -i[1]))
            out.append(f"  {kind}: {items}")
        for kind, times in t["closed_after"].items():
            if times:
                out.append(f"  {kind}: closed by the gateway after median {median(times):.1f} s,"
                           f" max {max(times):.1f} s")  # fmt: skip
    out += ["", "after each phase (daemon alive, /healthz, RSS, valid queries from 192.0.2.10):"]
    slow_probes = []
    for phase in results.phases:
        cells = [
            f"{phase['at']} {phase['phase']:<6} alive {phase['alive']!s:<5} "
            f"/healthz {phase['healthz']}",
            f"RSS {phase['rss_kib'] / 1024:6.1f} MiB",
        ]
        for p in phase["probes"]:
            asked = p["answered"] + p["failed"]
            cells.append(f"{p['label']}: {p['within_10ms']}/{asked} within 10 ms "
                         f"(p50 {p['p50_ms']} ms, max {p['max_ms']} ms)")  # fmt: skip
            if p["within_10ms"] < asked and phase["phase"] != "start":
                slow_probes.append(f"{p['label']} after {phase['phase']}")
        out.append("  " + "; ".join(cells))
        out += [f"    failed: {f}" for p in phase["probes"] for f in p["failures"]]
    r = results.rss_kib
    start, settled = r.get("start", 0), r.get("settled", 0)
    ratio = settled / start if start else 0.0
    if r:
        steps = ", ".join(f"after {p['phase']} {p['rss_kib'] / 1024:.1f}"
                          for p in results.phases[1:] if p["phase"] != "settle")  # fmt: skip
        out += ["", f"RSS (MiB): start {start / 1024:.1f}, peak {r.get('peak', 0) / 1024:.1f}; "
                f"{steps}; after the settle (before its probes) {settled / 1024:.1f} = "
                f"{ratio:.2f}x the start"]  # fmt: skip
        timeline = results.rss_timeline
        if timeline:
            step = max(1, len(timeline) // 16)
            points = ", ".join(f"{t:.0f}s {p} {v / 1024:.0f}" for p, t, v in timeline[::step])
            out.append(f"RSS timeline (MiB): {points}")
    crashed = [p["phase"] for p in results.phases if not p["alive"] or p["healthz"] != 200]
    d = results.daemon_log
    if d:
        full, young = d["gc_full_ms"], d["gc_young_over_10ms"]
        out += ["", f"daemon log: {d['lines']:,} lines, {d['tracebacks']} tracebacks, "
                f"{d['error_lines']} ERROR lines, {d['internal_error_lines']} 'internal error'",
                f"daemon garbage collector: {len(full)} full collections, max "
                f"{max(full, default=0):.1f} ms, total {sum(full):.0f} ms; {len(young)} younger "
                f"ones of 10 ms or more (max {max(young, default=0):.1f} ms)"]  # fmt: skip
        if d["gc_over_10ms_at"]:
            out.append(f"  of 10 ms or more: {', '.join(d['gc_over_10ms_at'])}")
        if d["first_traceback"]:
            out += ["first traceback:", d["first_traceback"]]
    if results.counters:
        out += ["", "egressgw DNS counters over the run:"]
        out += [f"  {k} {v:,.0f}" for k, v in sorted(results.counters.items())]
    out += [
        "", "targets:",
        f"  daemon crashes: {len(crashed)}" + (f" (after {', '.join(crashed)})" if crashed else "")
        + f"; alive with /healthz 200 after every phase: {verdict(not crashed)}",
        f"  valid queries within {LATENCY_TARGET_MS:g} ms after each phase: "
        + verdict(not slow_probes) + (f" (not: {', '.join(slow_probes)})" if slow_probes else ""),
        f"  RSS after the settle within {RSS_TARGET - 1:.0%} of the start: {ratio:.2f}x, "
        + verdict(0 < ratio <= RSS_TARGET),
    ]  # fmt: skip
    out += commits_measured(results.machine) + notes_section(results.notes)
    return "\n".join(out)


def parse(argv: Sequence[str]) -> Options:
    p = parser("fuzz", __doc__, Options())
    add = p.add_argument
    add("--datagrams", type=int, help="UDP datagrams (%(default)s)")
    add("--rounds", type=int, help="UDP rounds of --datagrams each, RSS after each (%(default)s)")
    add("--tcp-streams", type=int, help="TCP streams (%(default)s)")
    add("--seconds", type=float, help="UDP phase bound (%(default)s)")
    add("--tcp-seconds", type=float, help="TCP phase bound (%(default)s)")
    add("--rate", type=float, help="datagrams per second in all (%(default)s)")
    add("--senders", type=int, help="UDP sender processes (%(default)s)")
    add("--seed", type=int, help="random seed (%(default)s)")
    add("--max-ttl", type=int, help="egressgw --max-ttl (%(default)s)")
    add("--settle", type=float, help="seconds without traffic at the end (max-ttl + grace + 5)")
    add("--probes", type=int, help="valid queries of each kind per check (%(default)s)")
    add("--per-source", type=int, help="TCP connections per client address at once (%(default)s)")
    add("--slowloris-share", type=float, help="share of slowloris streams (%(default)s)")
    add("--slowloris-hold", type=float, help="seconds (%(default)s)")
    add("--sender-cpu", type=int, help="CPU of the senders (%(default)s)")
    add("--daemon-arg", dest="daemon_args", action="append", metavar="ARG", help="for egressgw run")
    add("--keep", action="store_true", help="keep the work directory (logs)")
    o = Options(**vars(p.parse_args(argv)))
    if o.datagrams < 0 or o.tcp_streams < LIMIT_BURST or o.rate <= 0 or o.seconds <= 0:
        p.error(f"--datagrams >= 0, --tcp-streams >= {LIMIT_BURST}, --rate and --seconds > 0")
    if not 1 <= o.senders <= 8 or not 1 <= o.per_source <= 64 or not 1 <= o.rounds <= 10:
        p.error("--senders 1-8, --per-source 1-64, --rounds 1-10")
    return o


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["_udp"], ["_tcp"]):
        return worker_main(args[0], args[1])
    options = parse(args)
    if not preflight(("ip", "nft", "dnsmasq", "taskset")):
        return 2
    results = Results(machine={"start": git_state()}, options=asdict(options))
    with workspace(options.keep) as workdir, dns_net() as net:
        progress(f"work directory {workdir}")
        with Fuzz(net, workdir, options, results) as fuzz:
            fuzz.run()
    results.machine["end"] = git_state()
    return finish(render(results), results, options.json_path)


if __name__ == "__main__":
    sys.exit(main())
