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
from dnslib import DNSRecord

from egressgw.datapath.keys import parse_address
from egressgw.dns.wire import (
    HEADER,
    NOERROR,
    NXDOMAIN,
    RCODE_MASK,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_OPT,
    Question,
    read_name,
    records,
)

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
    """Make an upstream response for ``question`` ready to serve; raises WireError (or dnslib's
    errors, when the per-name cap makes it rebuild the answer) if it is malformed. The
    response must carry ``question`` (``upstream.answers``), as every upstream path checks."""
    found = records(response, question.name)  # the caller checked the response's question
    answers = [r for r in found if r.section == 0]
    chain = {question.name}
    follow = any(r.rtype == TYPE_CNAME for r in answers)
    for _ in range(16 if follow else 0):  # a CNAME chain longer than 16 is not followed further
        grown = chain | {
            read_name(response, r.rdata)[0]
            for r in answers
            if r.rtype == TYPE_CNAME and r.name in chain
        }
        if grown == chain:
            break
        chain = grown
    address_records = [
        r
        for r in answers
        if r.name in chain
        and ((r.rtype == TYPE_A and r.rdlength == 4) or (r.rtype == TYPE_AAAA and r.rdlength == 16))
    ]
    capped = max(0, len(address_records) - max_addresses)
    if capped:  # rare: rebuild the answer without the address records over the cap
        response = _keep_addresses(response, chain, max_addresses)
        found = records(response)
        address_records = [
            r
            for r in found
            if r.section == 0 and r.name in chain and r.rtype in (TYPE_A, TYPE_AAAA)
        ]
    wire = bytearray(response)
    struct.pack_into("!H", wire, 0, 0)
    offsets = [r.ttl_offset for r in found if r.rtype != TYPE_OPT]
    ttls = [clamp(r.ttl, min_ttl, max_ttl) for r in found if r.rtype != TYPE_OPT]
    for offset, ttl in zip(offsets, ttls, strict=True):
        _TTL.pack_into(wire, offset, ttl)
    addresses = tuple(
        parse_address(response[r.rdata : r.rdata + r.rdlength]) for r in address_records
    )
    address_ttl = max((clamp(r.ttl, min_ttl, max_ttl) for r in address_records), default=0)
    rcode = struct.unpack_from("!H", response, 2)[0] & RCODE_MASK
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
        rcode=rcode,
    )


def _keep_addresses(response: bytes, chain: set[str], limit: int) -> bytes:
    """The response with only the first ``limit`` address records of the chain, via dnslib."""
    record = DNSRecord.parse(response)
    kept, seen = [], 0
    for rr in record.rr:
        if rr.rtype in (TYPE_A, TYPE_AAAA) and str(rr.rname).rstrip(".").lower() in chain:
            seen += 1
            if seen > limit:
                continue
        kept.append(rr)
    record.rr = kept
    return bytes(record.pack())


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
