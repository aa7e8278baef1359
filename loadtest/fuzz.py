"""Junk against the running DNS interceptor: mutated and random UDP datagrams, junk TCP streams.

What runs, in three network namespaces it creates and removes (``egd-<8 hex>-c/-g/-u``, built
by ``loadtest.dns.build_net``), documentation addresses only:

- client ``-c``: the senders, from the pods of ``loadtest.dns`` (192.0.2.10, 192.0.2.20-59, all
  allowed ``*.bench.example``) and from 192.0.2.250, which is no pod (REFUSED territory);
- gateway ``-g``: ``egressgw run --manifests`` on 192.0.2.1:53 (``loadtest.dns.Daemon``, its
  ``--rate-limit 10000000``, so every datagram reaches the parser), with ``--min-ttl 1`` and
  ``--max-ttl 5`` (this script's ``--max-ttl``) so that what it caches expires within seconds;
- upstream ``-u``: dnsmasq answering ``*.bench.example`` from ``--synth-domain``, as in
  ``loadtest.dns``.

Phases, each bounded in count and in seconds:

1. UDP: ``--datagrams`` (1,000,000) datagrams from ``--senders`` processes pinned to CPU 1 (the
   daemon is pinned to CPU 0), ``--rate`` per second in all, at most ``--seconds``. Each is one
   of: ``valid`` (repeated, denied and fresh names, EDNS or not), ``bitflip`` (1-8 bits of a
   valid query), ``truncate``, ``label`` (label lengths corrupted: reserved label types,
   lengths past the end, names over 255 octets), ``pointer`` (compression loops, chains of
   over 64 pointers, pointers into the header or past the end, in the question and the OPT
   owner), ``counts`` (QD/AN/NS/AR counts of 0, 2, 65535, random), ``qr`` (QR=1: responses,
   some with answer records), ``odd`` (opcodes 1-15, odd classes and types, reserved flags),
   ``edns`` (OPT with garbage options, lying lengths, versions, several OPTs, a TSIG after it),
   ``random`` (random bytes, 0 to 4,096 of them), ``splice`` (two queries joined, trailing
   garbage); 3% go from the unknown address (``unknown-source``). Each class has its own
   socket, so every reply is counted by class and rcode, with the bytes that came back.
   ``--rounds N`` repeats the phase N times with other seeds and fresh names, the RSS measured
   after each: growth that stops from one round to the next is bounded state, not a leak.
2. TCP: ``--tcp-streams`` (10,000) connections, at most ``--tcp-seconds``: random bytes, a
   1-byte length prefix, a prefix promising more than comes, a zero length, a valid query then
   garbage, ten pipelined queries, framed mutated datagrams, a 65,535-byte message, a reset;
   valid queries from the unknown address; and slowloris streams (5%: nothing sent, one byte
   of the prefix, half a query, a query dripped a byte a second) held up to
   ``--slowloris-hold`` seconds, timing when the gateway closes them. At most ``--per-source``
   connections per client address at a time (the gateway's default limit is 16); a burst of 24
   from one address checks that limit.
3. Settle: ``--settle`` seconds (default max-ttl + grace + 5) with no traffic, so the caches
   expire.

Reported: whether the daemon is alive with /healthz 200 after each phase; valid queries
answered within 10 ms after each phase (cached names and fresh names, several of each); the
daemon's RSS at the start, at the peak, after each phase and after the settle (target: within
10% of the start); per class how many datagrams got a reply, of which rcode, and the bytes
back per byte sent; the TCP outcomes per kind; egressgw's DNS counters over the run; the
kernel's UDP drops in the gateway; errors and tracebacks in the daemon's log.

Run as root: ``python -m loadtest.fuzz [--datagrams N] [--tcp-streams N] [--seconds S]
[--json PATH]``; the defaults take about two minutes. Every process started here is stopped by
its pid and the namespaces are removed afterwards, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
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
from prometheus_client.parser import text_string_to_metric_families

from egressgw.datapath.netns import call_in
from egressgw.dns.interceptor import DnsSettings
from loadtest.dns import (
    CACHED_SOURCE,
    DOMAIN,
    EGRESSGW,
    GC_LINE,
    REPO,
    UNIQUE_SOURCES,
    UPSTREAM,
    Daemon,
    Net,
    Proc,
    _http_get,
    _in,
    _ip,
    _process_seconds,
    build_net,
    cached_names,
    dnsmasq_argv,
    manifests,
    progress,
    synth_args,
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
UNKNOWN_KIND = "unknown-source"
UNKNOWN_SHARE = 0.03
TYPES = (1, 28, 1, 28, 1, 28, 16, 15, 33, 12, 6, 2, 5, 255)
ODD_TYPES = (0, 41, 250, 249, 251, 252, 253, 254, 255, 65535, 32768, 666, 99, 65280)
ODD_CLASSES = (0, 2, 3, 4, 254, 255, 65535, 32769)
EDNS_CODES = (0, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20292, 65001, 65535)
TCP_FAST_KINDS = ("random", "short-prefix", "lying-prefix", "zero-length", "valid-then-garbage",
                  "pipelined", "mutated", "big", "reset")  # fmt: skip
TCP_FAST_WEIGHTS = (20, 8, 10, 5, 15, 10, 20, 2, 5)
TCP_SLOW_KINDS = ("slowloris-silent", "slowloris-prefix", "slowloris-partial", "slowloris-drip")
TCP_UNKNOWN_SHARE = 0.03
LIMIT_BURST = 24  # connections at once from one address, against the gateway's 16
LATENCY_TARGET_MS = 10.0
GC_STAMPED = re.compile(
    r"^(\d\d:\d\d:\d\d) loadtest\.dns: gc generation (\d) took ([0-9.]+) ms", re.M
)
RSS_TARGET = 1.10


# -- junk ----------------------------------------------------------------------------------------
def encode(name: str) -> bytes:
    out = bytearray()
    for label in name.split("."):
        raw = label.encode()
        out.append(len(raw))
        out += raw
    out.append(0)
    return bytes(out)


def opt_record(rng: random.Random, *, do: bool = False) -> bytes:
    size = rng.choice((512, 1232, 4096))
    return b"\x00" + RR_FIXED.pack(41, size, 0x8000 if do else 0, 0)


class Junk:
    """Valid queries and their mutations; ``segment`` keeps fresh names apart between
    processes (fresh names are AAAA names in 2001:db8:b:<segment>::/64, as in loadtest.dns)."""

    def __init__(self, rng: random.Random, segment: int) -> None:
        self.rng = rng
        self.segment = segment
        self.fresh = 0
        self.cached = [(encode(n), 1 if t == "A" else 28) for n, t in cached_names()]
        self.makers: dict[str, Callable[[], bytes]] = {
            "valid": self.valid,
            "bitflip": self.bitflip,
            "truncate": self.truncate,
            "label": self.label,
            "pointer": self.pointer,
            "counts": self.counts,
            "qr": self.qr,
            "odd": self.odd,
            "edns": self.edns,
            "random": self.random,
            "splice": self.splice,
        }

    def make(self, kind: str) -> bytes:
        return self.makers[kind]()

    def any(self) -> bytes:
        return self.make(self.rng.choices(KINDS, WEIGHTS)[0])

    # the parts of a valid query
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
            name = f"u-2001-db8-b-{self.segment:x}-0-0-{hi:x}-{lo:x}.{DOMAIN}"
            qname, qtype = encode(name), 28
        if r.random() < 0.1:
            qtype = r.choice(TYPES)
        return qname, qtype

    def valid(self, *, edns: bool | None = None) -> bytes:
        r = self.rng
        qname, qtype = self.question()
        if edns is None:
            edns = r.random() < 0.5
        flags = 0x0100 if r.random() < 0.9 else 0
        header = HEADER.pack(r.getrandbits(16), flags, 1, 0, 0, 1 if edns else 0)
        body = qname + TYPE_CLASS.pack(qtype, 1)
        if edns:
            body += opt_record(r, do=r.random() < 0.3)
        return header + body

    def bare(self) -> tuple[bytes, bytes, int]:
        """(header fields after the ID and flags are to be set, qname, qtype) of a valid query."""
        qname, qtype = self.question()
        return HEADER.pack(self.rng.getrandbits(16), 0x0100, 1, 0, 0, 0), qname, qtype

    # mutations
    def bitflip(self) -> bytes:
        r = self.rng
        data = bytearray(self.valid())
        for _ in range(r.randint(1, 8)):
            bit = r.randrange(len(data) * 8)
            data[bit >> 3] ^= 1 << (bit & 7)
        return bytes(data)

    def truncate(self) -> bytes:
        data = self.valid()
        return data[: self.rng.randrange(len(data))]

    def label(self) -> bytes:
        r = self.rng
        header, qname, qtype = self.bare()
        tail = TYPE_CLASS.pack(qtype, 1)
        roll = r.random()
        if roll < 0.15:  # over 255 octets
            qname = b"".join(b"\x3f" + b"a" * 63 for _ in range(r.randint(4, 8))) + b"\x00"
        elif roll < 0.3:  # a label over 63 octets (its length byte has a reserved type)
            size = r.randint(64, 200)
            qname = bytes([size]) + b"b" * size + b"\x00"
        elif roll < 0.4:  # no terminating zero
            qname = qname[:-1]
            tail = b""
        else:
            data = bytearray(qname)
            starts, at = [], 0
            while at < len(data) and data[at]:
                starts.append(at)
                at += 1 + data[at]
            at = r.choice(starts) if starts else 0
            data[at] = r.choice((0x3F, 0x40, 0x41, 0x7F, 0x80, 0xBF, 0xFF, 0, len(data),
                                 r.getrandbits(8)))  # fmt: skip
            qname = bytes(data)
        return header + qname + tail

    def pointer(self) -> bytes:
        r = self.rng
        header, qname, qtype = self.bare()
        tail = TYPE_CLASS.pack(qtype, 1)
        variant = r.randrange(10)
        if variant == 0:
            name = b"\xc0\x0c"  # points at itself
        elif variant == 1:
            name = b"\xc0\x0e\xc0\x0c"  # two pointers at each other
        elif variant == 2:
            name = b"\x03abc\xc0\x0c"  # a label, then back to it
        elif variant == 3:
            name = bytes([0xC0 | r.getrandbits(6), r.getrandbits(8)])  # anywhere, mostly past
        elif variant == 4:
            name = bytes([0xC0, r.randrange(12)])  # into the header
        elif variant == 5:  # a chain of 100 pointers, each to the next, then the root
            hops = 100
            name = b"".join(struct.pack("!H", 0xC000 | (12 + 2 * (i + 1))) for i in range(hops))
            name += b"\x00"
        elif variant == 6:  # forward, to a name after the question
            name = b"\xc0\x12"
            tail += b"\x03www\x00"
        elif variant == 7:  # 0x40 and 0x80 label types
            name = bytes([r.choice((0x40, 0x41, 0x80, 0xBF))]) + r.randbytes(4) + b"\x00"
        elif variant == 8:  # the OPT's owner name is a pointer to the question
            header = HEADER.pack(r.getrandbits(16), 0x0100, 1, 0, 0, 1)
            return header + qname + tail + b"\xc0\x0c" + RR_FIXED.pack(41, 1232, 0, 0)
        else:  # a pointer loop in the owner of an additional record
            header = HEADER.pack(r.getrandbits(16), 0x0100, 1, 0, 0, 1)
            at = 12 + len(qname) + len(tail)
            loop = struct.pack("!H", 0xC000 | at)
            return header + qname + tail + loop + RR_FIXED.pack(1, 1, 0, 4) + bytes(4)
        return header + name + tail

    def counts(self) -> bytes:
        r = self.rng
        data = bytearray(self.valid())
        for _ in range(r.randint(1, 4)):
            at = 4 + 2 * r.randrange(4)
            value = r.choice((0, 2, 3, 0xFFFF, 0x8000, r.getrandbits(16)))
            struct.pack_into("!H", data, at, value)
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
            ttl = (
                (r.getrandbits(8) << 24 if r.random() < 0.2 else 0)
                | (r.choice((0, 0, 1, 2, 255)) << 16)
                | (r.getrandbits(16) if r.random() < 0.3 else r.choice((0, 0x8000)))
            )
            rrs.append(owner + RR_FIXED.pack(41, size, ttl, rdlength) + bytes(options))
        if r.random() < 0.1:  # a TSIG after the OPT
            rrs.append(b"\x00" + RR_FIXED.pack(250, 255, 0, 16) + r.randbytes(16))
        arcount = len(rrs) if r.random() < 0.85 else r.choice((0, 1, len(rrs) + 3))
        header = HEADER.pack(r.getrandbits(16), 0x0100, 1, 0, 0, arcount)
        return header + qname + TYPE_CLASS.pack(qtype, 1) + b"".join(rrs)

    def random(self) -> bytes:
        r = self.rng
        roll = r.random()
        if roll < 0.2:
            size = r.randrange(12)
        elif roll < 0.6:
            size = r.randrange(12, 64)
        elif roll < 0.95:
            size = r.randrange(64, 512)
        else:
            size = r.randrange(512, 4097)
        return r.randbytes(size)

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


# -- the UDP sender (in the client namespace) ----------------------------------------------------
def reply_key(reply: bytes) -> str:
    if len(reply) < 4:
        return "short reply"
    if not reply[2] & 0x80:
        return "not a response"
    rcode = reply[3] & 0x0F
    return RCODES.get(rcode, f"RCODE{rcode}")


def udp_sender(cfg: dict[str, Any]) -> dict[str, Any]:
    """Send ``count`` datagrams at ``rate`` per second for at most ``seconds``; count replies."""
    rng = random.Random(cfg["seed"])
    junk = Junk(rng, cfg["segment"])
    server = (cfg["server"], 53)
    socks: dict[str, socket.socket] = {}
    for kind in (*KINDS, UNKNOWN_KIND):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock.bind((cfg["unknown_source"] if kind == UNKNOWN_KIND else cfg["source"], 0))
        sock.connect(server)
        sock.setblocking(False)
        socks[kind] = sock
    by_fd = {sock.fileno(): kind for kind, sock in socks.items()}
    sent: Counter[str] = Counter()
    sent_bytes: Counter[str] = Counter()
    replies: dict[str, Counter[str]] = {kind: Counter() for kind in socks}
    reply_bytes: Counter[str] = Counter()
    errors: Counter[str] = Counter()

    def drain() -> None:
        for kind, sock in socks.items():
            while True:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ECONNREFUSED: nobody listens any more
                    errors[f"receive: {exc.strerror}"] += 1
                    break
                replies[kind][reply_key(reply)] += 1
                reply_bytes[kind] += len(reply)

    count, rate, seconds = cfg["count"], cfg["rate"], cfg["seconds"]
    choices = rng.choices
    started = time.monotonic()
    deadline = started + seconds
    total = 0
    while total < count:
        now = time.monotonic()
        if now >= deadline:
            break
        due = min(count, int((now - started) * rate) + 1)
        while total < due:
            kind = choices(KINDS, WEIGHTS)[0]
            data = junk.make(kind)
            if rng.random() < UNKNOWN_SHARE:
                kind = UNKNOWN_KIND
            try:
                socks[kind].send(data)
            except BlockingIOError:
                errors["send: would block"] += 1
            except OSError as exc:
                errors[f"send: {exc.strerror}"] += 1
            sent[kind] += 1
            sent_bytes[kind] += len(data)
            total += 1
        drain()
        time.sleep(0.002)
    sending_s = time.monotonic() - started
    quiet_until = time.monotonic() + 1.5  # late replies
    while time.monotonic() < quiet_until:
        ready, _, _ = select.select(list(by_fd), [], [], 0.1)
        if ready:
            drain()
    for sock in socks.values():
        sock.close()
    return {
        "sent": dict(sent),
        "sent_bytes": dict(sent_bytes),
        "replies": {k: dict(v) for k, v in replies.items()},
        "reply_bytes": dict(reply_bytes),
        "errors": dict(errors),
        "seconds": round(sending_s, 2),
    }


# -- the TCP client (in the client namespace) ----------------------------------------------------
class TcpFuzz:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg["seed"])
        self.junk = Junk(self.rng, cfg["segment"])
        self.server = cfg["server"]
        self.tally: dict[str, Counter[str]] = {}
        self.closed_after: dict[str, list[float]] = {}
        self.deadline = 0.0

    def count(self, kind: str, key: str, n: int = 1) -> None:
        self.tally.setdefault(kind, Counter())[key] += n

    async def connect(
        self, kind: str, source: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        self.count(kind, "streams")
        try:
            async with asyncio.timeout(3.0):
                return await asyncio.open_connection(self.server, 53, local_addr=(source, 0))
        except (OSError, TimeoutError) as exc:
            self.count(kind, f"connect failed: {getattr(exc, 'strerror', None) or 'timeout'}")
            return None

    async def replies(
        self, kind: str, reader: asyncio.StreamReader, expect: int | None, timeout: float
    ) -> None:
        """Read framed replies until ``expect`` of them, the gateway's close, or ``timeout``."""
        got = 0
        try:
            async with asyncio.timeout(timeout):
                while expect is None or got < expect:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = await reader.readexactly(length)
                    got += 1
                    self.count(kind, f"reply {reply_key(reply)}")
            self.count(kind, "all expected replies")
        except asyncio.IncompleteReadError as exc:
            self.count(kind, "closed by the gateway" if not exc.partial else "closed mid-reply")
        except TimeoutError:
            self.count(kind, "still open when we gave up")
        except ConnectionResetError:
            self.count(kind, "reset by the gateway")
        except OSError as exc:
            self.count(kind, f"read error: {exc.strerror}")

    @staticmethod
    def framed(message: bytes) -> bytes:
        return struct.pack("!H", len(message)) + message

    async def send(self, kind: str, writer: asyncio.StreamWriter, data: bytes) -> bool:
        try:
            writer.write(data)
            async with asyncio.timeout(3.0):
                await writer.drain()
            return True
        except (OSError, TimeoutError) as exc:
            self.count(kind, f"write failed: {getattr(exc, 'strerror', None) or 'timeout'}")
            return False

    async def fast(self, kind: str, source: str) -> None:
        opened = await self.connect(kind, source)
        if opened is None:
            return
        reader, writer = opened
        r, junk = self.rng, self.junk
        expect: int | None = None
        try:
            if kind == "reset":
                if r.random() < 0.5:
                    writer.write(self.framed(junk.valid())[: r.randrange(1, 20)])
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                self.count(kind, "reset by us")
                return
            if kind == "random":
                data = r.randbytes(r.randrange(1, 2049))
            elif kind == "short-prefix":
                data = bytes([r.getrandbits(8)])
            elif kind == "lying-prefix":
                query = junk.valid()
                data = struct.pack("!H", len(query) + r.randint(1, 500)) + query
            elif kind == "zero-length":
                data = b"\x00\x00" + (self.framed(junk.valid()) if r.random() < 0.5 else b"")
            elif kind == "valid-then-garbage":
                data = self.framed(junk.valid()) + r.randbytes(r.randrange(1, 300))
            elif kind == "pipelined":
                data = b"".join(self.framed(junk.valid()) for _ in range(10))
                expect = 10
            elif kind == "mutated":
                data = b"".join(self.framed(junk.any()) for _ in range(r.randint(1, 5)))
            elif kind == "unknown-source":
                data = b"".join(self.framed(junk.valid()) for _ in range(3))
                expect = 3
            else:  # big
                data = b"\xff\xff" + r.randbytes(65535)
            if not await self.send(kind, writer, data):
                return
            if expect is None and writer.can_write_eof():
                writer.write_eof()  # all sent: the gateway sees the end of the stream
            await self.replies(kind, reader, expect, 3.0)
        finally:
            writer.transport.abort()

    async def slow(self, kind: str, source: str) -> None:
        opened = await self.connect(kind, source)
        if opened is None:
            return
        reader, writer = opened
        hold = self.cfg["slowloris_hold"]
        started = time.monotonic()
        query = self.framed(self.junk.valid())
        try:
            if kind == "slowloris-prefix":
                writer.write(query[:1])
            elif kind == "slowloris-partial":
                writer.write(query[: len(query) // 2])
            drip = list(query) if kind == "slowloris-drip" else []
            end = min(started + hold, self.deadline)
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    self.count(kind, "still open when we gave up")
                    return
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
            if opened is None:
                return
            reader, writer = opened
            try:
                if await self.send(kind, writer, self.framed(self.junk.valid(edns=False))):
                    await self.replies(kind, reader, 1, 3.0)
            finally:
                writer.transport.abort()

        await asyncio.gather(*(one() for _ in range(LIMIT_BURST)))

    async def run(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.rng
        started = time.monotonic()
        self.deadline = started + cfg["seconds"]
        await self.limit_burst(cfg["burst_source"])
        total = cfg["count"] - LIMIT_BURST
        slow_n = int(total * cfg["slowloris_share"])
        unknown_n = int(total * TCP_UNKNOWN_SHARE)
        fast_n = max(0, total - slow_n - unknown_n)
        queues: list[tuple[asyncio.Queue[str], list[str], Callable[..., Any]]] = []
        plans = (
            ([TCP_SLOW_KINDS[i % len(TCP_SLOW_KINDS)] for i in range(slow_n)],
             cfg["slow_sources"], self.slow),
            (["unknown-source"] * unknown_n, [cfg["unknown_source"]], self.fast),
            (r.choices(TCP_FAST_KINDS, TCP_FAST_WEIGHTS, k=fast_n), cfg["fast_sources"],
             self.fast),
        )  # fmt: skip
        for kinds, sources, handler in plans:
            queue: asyncio.Queue[str] = asyncio.Queue()
            for kind in kinds:
                queue.put_nowait(kind)
            queues.append((queue, sources, handler))

        async def worker(queue: asyncio.Queue[str], source: str, handler: Any) -> None:
            while time.monotonic() < self.deadline:
                try:
                    kind = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await handler(kind, source)

        workers = [
            worker(queue, source, handler)
            for queue, sources, handler in queues
            for source in sources
            for _ in range(cfg["per_source"])
        ]
        try:
            async with asyncio.timeout(cfg["seconds"] + 20):
                await asyncio.gather(*workers)
        except TimeoutError:
            self.count("all", "stopped at the time bound")
        left = sum(queue.qsize() for queue, _, _ in queues)
        return {
            "tally": {k: dict(v) for k, v in self.tally.items()},
            "closed_after": {k: sorted(v) for k, v in self.closed_after.items()},
            "not_started": left,
            "seconds": round(time.monotonic() - started, 2),
        }


def worker_main(role: str, cfg_text: str) -> int:
    cfg = json.loads(cfg_text)
    result = udp_sender(cfg) if role == "_udp" else asyncio.run(TcpFuzz(cfg).run())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- the daemon, from outside ----------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """The daemon's RSS every ``interval`` seconds, labelled with the phase under way."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.phase = "start"
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

    def peak(self, phase: str | None = None) -> int:
        values = [rss for p, _t, rss in self.samples if phase is None or p == phase]
        return max(values, default=0)


def dns_counters(net: Net) -> dict[str, float]:
    """Every egressgw_dns_* counter and gauge (not the histograms) from /metrics."""
    status, text = _http_get(net, "/metrics")
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("egressgw_dns") or family.type == "histogram":
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def udp_snmp(net: Net) -> dict[str, int]:
    text = subprocess.run(_in(net.gateway, None, "cat", "/proc/net/snmp"), capture_output=True,
                          text=True, timeout=10, check=True).stdout  # fmt: skip
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=True)} if len(rows) == 2 else {}


@dataclass
class Latency:
    label: str
    times_ms: list[float]
    failures: list[str]

    def summary(self) -> dict[str, Any]:
        ok = sorted(self.times_ms)
        return {
            "label": self.label,
            "answered": len(ok),
            "failed": len(self.failures),
            "within_10ms": sum(t <= LATENCY_TARGET_MS for t in ok),
            "p50_ms": round(statistics.median(ok), 3) if ok else None,
            "max_ms": round(ok[-1], 3) if ok else None,
            "failures": self.failures[:5],
        }


def timed_queries(net: Net, label: str, names: Sequence[tuple[str, str]]) -> Latency:
    """One query per name from the pod at CACHED_SOURCE, each timed from send to reply."""

    def run() -> Latency:
        times, failures = [], []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((CACHED_SOURCE, 0))
            sock.connect((EGRESSGW, 53))
            sock.settimeout(1.0)
            for name, qtype in names:
                query = DNSRecord.question(name, qtype)
                data = query.pack()
                started = time.perf_counter()
                try:
                    sock.send(data)
                    while True:
                        reply = sock.recv(4096)
                        if reply[:2] == data[:2]:
                            break
                except OSError as exc:
                    failures.append(f"{name}: {exc}")
                    continue
                took = (time.perf_counter() - started) * 1000
                key = reply_key(reply)
                if key != "NOERROR":
                    failures.append(f"{name}: {key}")
                else:
                    times.append(took)
                time.sleep(0.02)
        return Latency(label, times, failures)

    return call_in(net.client, run)


# -- the run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
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
    daemon_args: tuple[str, ...] = ()
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


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "commit": git("log", "-1", "--oneline"),
        "egressgw_status": git("status", "--short", "egressgw/").splitlines(),
    }


def plain(value: Any) -> Any:
    """``value`` with every Counter (and other dict) as a plain dict, for asdict and JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class Fuzz:
    def __init__(self, net: Net, workdir: Path, options: Options, results: Results) -> None:
        self.net, self.workdir, self.options, self.results = net, workdir, options, results
        extra = ["--min-ttl", "1", "--max-ttl", str(options.max_ttl), *options.daemon_args]
        self.daemon = Daemon(net, workdir, 0, extra, None)
        self.procs: list[Proc] = []
        self.sampler: Sampler | None = None
        self.fresh = 0
        self.udp_totals: dict[str, Any] = {}  # over the rounds, with Counters

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stopped.set()
        self.daemon.stop()
        for proc in reversed(self.procs):
            proc.stop()

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def start(self) -> None:
        _ip(self.net.client, "addr", "add", f"{UNKNOWN_SOURCE}/24", "dev", "eth0")
        upstream = _in(self.net.upstream, None, *dnsmasq_argv(UPSTREAM, *synth_args()))
        self.procs.append(Proc("dnsmasq upstream", upstream, self.workdir / "dnsmasq.log"))
        (self.workdir / "manifests").mkdir()
        (self.workdir / "manifests" / "bench.yaml").write_text(manifests())
        time.sleep(0.3)
        self.procs[0].check()
        self.daemon.start("asyncio")

    def fresh_names(self, count: int) -> list[tuple[str, str]]:
        """AAAA names nobody asked yet (2001:db8:b:ff00::/64 and up, apart from the senders')."""
        out = []
        for _ in range(count):
            self.fresh += 1
            out.append((f"u-2001-db8-b-ff00-0-0-0-{self.fresh:x}.{DOMAIN}", "AAAA"))
        return out

    def alive(self) -> bool:
        proc = self.daemon.proc
        return proc is not None and proc.popen.poll() is None

    def rss(self) -> int:
        try:
            return rss_kib(self.pid)
        except OSError:  # gone
            return 0

    def cpu_seconds(self) -> float:
        try:
            return _process_seconds(self.pid)
        except OSError:
            return 0.0

    def check(self, phase: str) -> None:
        """Alive, /healthz, and valid queries answered in time."""
        at = time.strftime("%H:%M:%S")
        alive = self.alive()
        health, _text = _http_get(self.net, "/healthz") if alive else (0, "")
        probes = []
        if alive:
            cached = cached_names()[: self.options.probes]
            timed_queries(self.net, "warm", cached)  # so that the cached probes are cache hits
            fresh = self.fresh_names(self.options.probes)
            probes.append(timed_queries(self.net, "cached names", cached).summary())
            probes.append(timed_queries(self.net, "fresh names", fresh).summary())
        else:
            self.results.notes.append(f"the daemon was gone after {phase}: {self.daemon_tail()}")
        rss = self.rss()
        self.results.rss_kib[phase] = rss
        self.results.phases.append(
            {"phase": phase, "at": at, "alive": alive, "healthz": health, "rss_kib": rss,
             "probes": probes}
        )  # fmt: skip
        progress(
            f"  after {phase}: alive {alive}, /healthz {health}, RSS {rss / 1024:.1f} MiB, "
            + "; ".join(
                f"{p['label']} {p['within_10ms']}/{p['answered']} within 10 ms, "
                f"max {p['max_ms']} ms"
                for p in probes
            )
        )

    def daemon_tail(self) -> str:
        log = self.workdir / "egressgw.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = [line for line in text.splitlines() if "dns decision" not in line]
        return "\n".join(lines[-15:])

    def worker(self, role: str, name: str, cfg: dict[str, Any], cpu: int | None) -> Proc:
        argv = [sys.executable, "-m", "loadtest.fuzz", role, json.dumps(cfg)]
        proc = Proc(name, _in(self.net.client, cpu, *argv), self.workdir / f"{name}.log")
        self.procs.append(proc)  # stopped by close() if the run ends early
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
        o = self.options
        label = f"UDP {round_ + 1}" if o.rounds > 1 else "UDP"
        progress(f"{label}: {o.datagrams:,} datagrams at {o.rate:,.0f}/s from {o.senders} "
                 f"senders, at most {o.seconds:g} s")  # fmt: skip
        assert self.sampler is not None
        self.sampler.phase = label
        snmp_before, cpu_before = udp_snmp(self.net), self.cpu_seconds()
        workers = []
        for i in range(o.senders):
            cfg = {
                "seed": o.seed * 1000 + round_ * 10 + i,
                "segment": 0x100 + round_ * 8 + i,
                "count": o.datagrams // o.senders + (1 if i < o.datagrams % o.senders else 0),
                "rate": o.rate / o.senders,
                "seconds": o.seconds,
                "server": EGRESSGW,
                "source": UNIQUE_SOURCES[i],
                "unknown_source": UNKNOWN_SOURCE,
            }
            workers.append(self.worker("_udp", f"udp-sender-{round_}-{i}", cfg, o.sender_cpu))
        parts = [self.collect(w, o.seconds + 60) for w in workers]
        cpu = self.cpu_seconds() - cpu_before
        snmp_after = udp_snmp(self.net)
        u = self.udp_totals
        if not u:
            for key in ("sent", "sent_bytes", "reply_bytes", "errors", "kernel"):
                u[key] = Counter()
            u.update(replies={}, sending_s=0.0, daemon_cpu_s=0.0)
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
        self.results.udp = plain(u)
        self.check(label)

    def tcp(self) -> None:
        o = self.options
        progress(f"TCP: {o.tcp_streams:,} streams, at most {o.tcp_seconds:g} s")
        assert self.sampler is not None
        self.sampler.phase = "tcp"
        sources = UNIQUE_SOURCES[o.senders : len(UNIQUE_SOURCES) - 1]
        half = len(sources) // 2
        cfg = {
            "seed": o.seed * 1000 + 999,
            "segment": 0x1FF,
            "count": o.tcp_streams,
            "seconds": o.tcp_seconds,
            "server": EGRESSGW,
            "slow_sources": sources[:half],
            "fast_sources": sources[half:],
            "unknown_source": UNKNOWN_SOURCE,
            "burst_source": UNIQUE_SOURCES[-1],
            "per_source": o.per_source,
            "slowloris_share": o.slowloris_share,
            "slowloris_hold": o.slowloris_hold,
        }
        proc = self.worker("_tcp", "tcp-client", cfg, o.sender_cpu)
        self.results.tcp = self.collect(proc, o.tcp_seconds + 60)

    def settle(self) -> None:
        o = self.options
        wait = o.settle if o.settle is not None else o.max_ttl + DnsSettings().grace_s + 5
        progress(f"settle: {wait:g} s without traffic, so the caches expire")
        assert self.sampler is not None
        self.sampler.phase = "settle"
        time.sleep(wait)

    def run(self) -> None:
        self.start()
        before = dns_counters(self.net)
        self.check("start")
        self.sampler = Sampler(self.pid)
        self.sampler.start()
        for round_ in range(self.options.rounds):
            self.udp(round_)
        self.tcp()
        self.check("TCP")
        self.settle()
        self.results.rss_kib["settled"] = self.rss()
        self.check("settle")
        self.sampler.stopped.set()
        self.results.rss_kib["peak"] = max(self.sampler.peak(), *self.results.rss_kib.values())
        self.results.rss_timeline = self.sampler.samples
        after = dns_counters(self.net)
        self.results.counters = {
            k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)
        }
        log = (self.workdir / "egressgw.log").read_text(errors="replace")
        tracebacks = log.count("Traceback (most recent call last)")
        first = log[log.find("Traceback") :][:3000] if tracebacks else ""
        self.results.daemon_log = {
            "lines": log.count("\n"),
            "tracebacks": tracebacks,
            "error_lines": sum(" ERROR " in line or '"ERROR"' in line for line in log.splitlines()),
            "internal_error_lines": log.count("internal error"),
            "first_traceback": first,
            "gc_full_ms": [float(ms) for gen, ms in GC_LINE.findall(log) if gen == "2"],
            "gc_young_over_10ms": [float(ms) for gen, ms in GC_LINE.findall(log) if gen != "2"],
            "gc_over_10ms_at": [
                f"{at} gen {gen} {float(ms):.0f} ms"
                for at, gen, ms in GC_STAMPED.findall(log)
                if float(ms) >= LATENCY_TARGET_MS
            ],
        }


# -- report --------------------------------------------------------------------------------------
def render(results: Results) -> str:
    out: list[str] = ["", "egressgw DNS interceptor under junk"]
    u = results.udp
    if u:
        total = u["total_sent"]
        out += [
            "",
            f"UDP: {total:,} datagrams in {u['sending_s']:.1f} s "
            f"({total / max(u['sending_s'], 1e-9):,.0f}/s); daemon CPU {u['daemon_cpu_s']:.1f} s, "
            f"{u['daemon_us_per_datagram']:.1f} us per datagram",
        ]
        keys = sorted({k for tally in u["replies"].values() for k in tally})
        head = ["class", "sent", "replied", *keys, "bytes back/sent"]
        rows = []
        totals: Counter[str] = Counter()
        for kind in (*KINDS, UNKNOWN_KIND):
            tally = u["replies"].get(kind, {})
            totals.update(tally)
            sent = u["sent"].get(kind, 0)
            ratio = u["reply_bytes"].get(kind, 0) / max(1, u["sent_bytes"].get(kind, 0))
            counts = [f"{tally.get(k, 0):,}" for k in keys]
            rows.append([kind, f"{sent:,}", f"{sum(tally.values()):,}", *counts, f"{ratio:.2f}"])
        all_bytes = sum(u["reply_bytes"].values()) / max(1, sum(u["sent_bytes"].values()))
        counts = [f"{totals.get(k, 0):,}" for k in keys]
        rows.append(["all", f"{total:,}", f"{totals.total():,}", *counts, f"{all_bytes:.2f}"])
        out += table(head, rows)
        if u["errors"]:
            out.append(f"sender errors: {dict(u['errors'])}")
        names = ("InDatagrams", "OutDatagrams", "RcvbufErrors", "InErrors", "NoPorts")
        kernel = ", ".join(f"{name} {u['kernel'].get(name, 0):,}" for name in names)
        out.append(f"gateway kernel, UDP over the UDP phase: {kernel}")
    t = results.tcp
    if t:
        out += [
            "",
            f"TCP: {t['seconds']:g} s; streams not started (time bound): {t['not_started']}",
        ]
        for kind, tally in t["tally"].items():
            items = ", ".join(f"{k} {v:,}" for k, v in sorted(tally.items(), key=lambda i: -i[1]))
            out.append(f"  {kind}: {items}")
        for kind, times in t["closed_after"].items():
            if times:
                out.append(
                    f"  {kind}: closed by the gateway after median {statistics.median(times):.1f}"
                    f" s, max {max(times):.1f} s"
                )
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
            cells.append(
                f"{p['label']}: {p['within_10ms']}/{asked} within 10 ms "
                f"(p50 {p['p50_ms']} ms, max {p['max_ms']} ms)"
            )
            if p["within_10ms"] < asked and phase["phase"] != "start":
                slow_probes.append(f"{p['label']} after {phase['phase']}")
        out.append("  " + "; ".join(cells))
        for p in phase["probes"]:
            for failure in p["failures"]:
                out.append(f"    failed: {failure}")
    r = results.rss_kib
    start, settled = r.get("start", 0), r.get("settled", 0)
    ratio = settled / start if start else 0.0
    if r:
        steps = ", ".join(
            f"after {phase['phase']} {phase['rss_kib'] / 1024:.1f}"
            for phase in results.phases[1:]
            if phase["phase"] != "settle"
        )
        out += [
            "",
            f"RSS (MiB): start {start / 1024:.1f}, peak {r.get('peak', 0) / 1024:.1f}; {steps}; "
            f"after the settle (before its probes) {settled / 1024:.1f} = {ratio:.2f}x the start",
        ]
        timeline = results.rss_timeline
        if timeline:
            step = max(1, len(timeline) // 16)
            points = ", ".join(f"{t:.0f}s {p} {v / 1024:.0f}" for p, t, v in timeline[::step])
            out.append(f"RSS timeline (MiB): {points}")
    crashed = [p["phase"] for p in results.phases if not p["alive"] or p["healthz"] != 200]
    d = results.daemon_log
    if d:
        out += [
            "",
            f"daemon log: {d['lines']:,} lines, {d['tracebacks']} tracebacks, "
            f"{d['error_lines']} ERROR lines, {d['internal_error_lines']} 'internal error'",
        ]
        full, young = d["gc_full_ms"], d["gc_young_over_10ms"]
        out.append(
            f"daemon garbage collector: {len(full)} full collections, max "
            f"{max(full, default=0):.1f} ms, total {sum(full):.0f} ms; {len(young)} younger ones "
            f"of 10 ms or more (max {max(young, default=0):.1f} ms)"
        )
        if d["gc_over_10ms_at"]:
            out.append(f"  of 10 ms or more: {', '.join(d['gc_over_10ms_at'])}")
        if d["first_traceback"]:
            out += ["first traceback:", d["first_traceback"]]
    if results.counters:
        out += ["", "egressgw DNS counters over the run:"]
        out += [f"  {k} {v:,.0f}" for k, v in sorted(results.counters.items())]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out += [
        "",
        "targets:",
        f"  daemon crashes: {len(crashed)}"
        + (f" (after {', '.join(crashed)})" if crashed else "")
        + f"; alive with /healthz 200 after every phase: {verdict(not crashed)}",
        f"  valid queries within {LATENCY_TARGET_MS:g} ms after each phase: "
        + verdict(not slow_probes)
        + (f" (not: {', '.join(slow_probes)})" if slow_probes else ""),
        f"  RSS after the settle within {RSS_TARGET - 1:.0%} of the start: {ratio:.2f}x, "
        + verdict(0 < ratio <= RSS_TARGET),
    ]
    for when in ("start", "end"):
        state = results.machine.get(when)
        if state:
            status = ", ".join(s.strip() for s in state["egressgw_status"]) or "none"
            out.append(f"egressgw at the {when}: {state['commit']}; uncommitted: {status}")
    if results.notes:
        out += ["", "notes:"] + [f"  {n}" for n in results.notes]
    return "\n".join(out)


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in
                       enumerate(zip(head, widths, strict=True)))]  # fmt: skip
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))))  # fmt: skip
    return lines


def parse(argv: Sequence[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--datagrams", type=int, default=d.datagrams, help="UDP datagrams (%(default)s)")
    add("--rounds", type=int, default=d.rounds,
        help="UDP rounds of --datagrams each, RSS after each (%(default)s)")  # fmt: skip
    add("--tcp-streams", type=int, default=d.tcp_streams, help="TCP streams (%(default)s)")
    add("--seconds", type=float, default=d.seconds, help="UDP phase bound (%(default)s)")
    add("--tcp-seconds", type=float, default=d.tcp_seconds, help="TCP phase bound (%(default)s)")
    add("--rate", type=float, default=d.rate, help="datagrams per second in all (%(default)s)")
    add("--senders", type=int, default=d.senders, help="UDP sender processes (%(default)s)")
    add("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    add("--max-ttl", type=int, default=d.max_ttl, help="egressgw --max-ttl (%(default)s)")
    add("--settle", type=float, help="seconds without traffic at the end (max-ttl + grace + 5)")
    add("--probes", type=int, default=d.probes, help="valid queries of each kind per check")
    add("--per-source", type=int, default=d.per_source,
        help="TCP connections per client address at once (%(default)s)")  # fmt: skip
    add("--slowloris-share", type=float, default=d.slowloris_share)
    add("--slowloris-hold", type=float, default=d.slowloris_hold, help="seconds (%(default)s)")
    add("--sender-cpu", type=int, default=d.sender_cpu, help="CPU of the senders (%(default)s)")
    add("--daemon-arg", action="append", default=[], metavar="ARG", help="for egressgw run")
    add("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    add("--keep", action="store_true", help="keep the work directory (logs)")
    a = p.parse_args(argv)
    if a.datagrams < 0 or a.tcp_streams < LIMIT_BURST or a.rate <= 0 or a.seconds <= 0:
        p.error(f"--datagrams >= 0, --tcp-streams >= {LIMIT_BURST}, --rate and --seconds > 0")
    if not 1 <= a.senders <= 8 or not 1 <= a.per_source <= 64 or not 1 <= a.rounds <= 10:
        p.error("--senders 1-8, --per-source 1-64, --rounds 1-10")
    return Options(
        datagrams=a.datagrams, rounds=a.rounds, tcp_streams=a.tcp_streams, seconds=a.seconds,
        tcp_seconds=a.tcp_seconds, rate=a.rate, senders=a.senders, seed=a.seed,
        max_ttl=a.max_ttl, settle=a.settle, probes=a.probes, per_source=a.per_source,
        slowloris_share=a.slowloris_share, slowloris_hold=a.slowloris_hold,
        sender_cpu=a.sender_cpu, daemon_args=tuple(a.daemon_arg), json_path=a.json_path,
        keep=a.keep,
    )  # fmt: skip


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["_udp"], ["_tcp"]):
        return worker_main(args[0], args[1])
    options = parse(args)
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "nft", "dnsmasq", "taskset") if not shutil.which(t)]
    if missing:
        print(f"missing commands: {', '.join(missing)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    results = Results(machine={"start": git_state()}, options=asdict(options))
    with workspace(options.keep) as workdir:
        net = build_net()
        progress(f"namespaces {net.tag}-{{c,g,u}}, work directory {workdir}")
        fuzz = Fuzz(net, workdir, options, results)
        try:
            fuzz.run()
        finally:
            fuzz.close()
            net.close()
    results.machine["end"] = git_state()
    print(render(results))
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(asdict(results), indent=2) + "\n")
        progress(f"results written to {options.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
