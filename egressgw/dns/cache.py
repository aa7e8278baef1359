"""Upstream answers, shared by every identity allowed to see them, served with TTLs counting down.

In: a parsed upstream response (made ready by ``prepare``: TTLs clamped, addresses capped, CNAME
chain followed). Out: for a later query of the same question, the bytes to send, with the
client's ID and question and every TTL lowered by the time spent in the cache, plus the addresses
and their remaining lifetime so the caller programs them before it answers. Time is a parameter.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from cachetools import LRUCache
from dnslib import CNAME, QTYPE, RCODE, DNSRecord

from egressgw.dns.wire import HEADER, NOERROR, NXDOMAIN, TYPE_A, TYPE_AAAA, Question, ttl_offsets

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_TTL = struct.Struct("!I")
CacheKey = tuple[str, int, int, bool, bool]


@dataclass(frozen=True, slots=True)
class Answer:
    """One upstream response, ready to serve."""

    wire: bytes  # ID zero; TTLs as clamped at ``stored_at``
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    addresses: tuple[IPAddress, ...]  # A/AAAA reached from the question through CNAMEs
    address_ttl: int  # the longest TTL of those address records, as stored
    ttl: int  # how long the whole answer may be cached (its shortest TTL)
    stored_at: float
    capped: int = 0  # address records dropped by the per-name cap
    rcode: int = NOERROR

    def served(self, question: Question, query: bytes, now: float) -> bytes:
        """The answer for this client: its ID and question, TTLs lowered by the time cached."""
        elapsed = int(now - self.stored_at)
        out = bytearray(self.wire)
        struct.pack_into("!H", out, 0, question.id)
        out[HEADER.size : question.end] = query[HEADER.size : question.end]  # client's 0x20 case
        for offset, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
            _TTL.pack_into(out, offset, max(0, ttl - elapsed))
        return bytes(out)


def clamp(ttl: int, min_ttl: int, max_ttl: int) -> int:
    return max(min_ttl, min(max_ttl, ttl))


def prepare(
    response: bytes,
    question: Question,
    now: float,
    *,
    min_ttl: int,
    max_ttl: int,
    max_addresses: int,
) -> Answer:
    """Parse an upstream response for ``question``; raises dnslib's or our errors if malformed."""
    record = DNSRecord.parse(response)
    chain = {question.name}
    for _ in range(16):  # a CNAME chain longer than that is not followed further
        grown = chain | {
            str(rr.rdata.label).rstrip(".").lower()
            for rr in record.rr
            if rr.rtype == QTYPE.CNAME
            and isinstance(rr.rdata, CNAME)
            and str(rr.rname).rstrip(".").lower() in chain
        }
        if grown == chain:
            break
        chain = grown
    address_rrs = [
        rr
        for rr in record.rr
        if rr.rtype in (TYPE_A, TYPE_AAAA) and str(rr.rname).rstrip(".").lower() in chain
    ]
    capped = max(0, len(address_rrs) - max_addresses)
    if capped:
        dropped = {id(rr) for rr in address_rrs[max_addresses:]}
        record.rr = [rr for rr in record.rr if id(rr) not in dropped]
        address_rrs = address_rrs[:max_addresses]
        response = record.pack()
    wire = bytearray(response)
    struct.pack_into("!H", wire, 0, 0)
    offsets = ttl_offsets(bytes(wire))
    ttls = []
    for offset in offsets:
        ttl = clamp(_TTL.unpack_from(wire, offset)[0], min_ttl, max_ttl)
        _TTL.pack_into(wire, offset, ttl)
        ttls.append(ttl)
    addresses = tuple(ipaddress.ip_address(str(rr.rdata)) for rr in address_rrs)
    address_ttl = max((clamp(rr.ttl, min_ttl, max_ttl) for rr in address_rrs), default=0)
    rcode = record.header.rcode
    cache_ttl = min(ttls) if ttls else min_ttl
    return Answer(
        wire=bytes(wire),
        ttl_offsets=tuple(offsets),
        ttls=tuple(ttls),
        addresses=addresses,
        address_ttl=address_ttl,
        ttl=cache_ttl if rcode in (NOERROR, NXDOMAIN) else 0,
        stored_at=now,
        capped=capped,
        rcode=int(rcode),
    )


class AnswerCache:
    def __init__(self, maxsize: int = 65536) -> None:
        self._entries: LRUCache[CacheKey, Answer] = LRUCache(maxsize=maxsize)

    def get(self, key: CacheKey, now: float) -> Answer | None:
        answer = self._entries.get(key)
        if answer is None:
            return None
        if now - answer.stored_at >= answer.ttl:
            self._entries.pop(key, None)
            return None
        return answer

    def put(self, key: CacheKey, answer: Answer) -> None:
        if answer.ttl > 0:
            self._entries[key] = answer

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["RCODE", "Answer", "AnswerCache", "clamp", "prepare"]
