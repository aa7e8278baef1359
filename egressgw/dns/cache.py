"""Upstream answers, shared by every identity allowed to see them, served with TTLs counting down.

In: a parsed upstream response (made ready by ``prepare``: TTLs clamped, addresses capped, CNAME
chain followed). Out: for a later query of the same question, the bytes to send, with the
client's ID, question and RD bit, its own OPT record or none, and every TTL lowered by the time
spent in the cache, plus the addresses and their remaining lifetime so the caller programs them
before it answers. Time is a parameter.

What belongs to one exchange is never shared: the upstream's OPT record (its options, such as a
DNS cookie or NSID, are for the client that asked) is taken out before an answer is stored, and
an answer with an extended error (BADVERS, BADCOOKIE) or any rcode other than NOERROR and
NXDOMAIN is served to its own asker only. A negative answer is kept no longer than its SOA says
(RFC 2308: the lesser of the SOA's TTL and MINIMUM).
"""

from __future__ import annotations

import heapq
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
    RD,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_OPT,
    CacheKey,
    Question,
    Record,
    opt_record,
    read_name,
    records,
)
from egressgw.identity import IPAddress

_TTL = struct.Struct("!I")
_COUNTS = struct.Struct("!HHHH")
TYPE_SOA = 6


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
    upstream_opt: bool = False  # ``wire`` keeps the upstream's OPT (an answer for its asker only)

    def served(self, question: Question, query: bytes, now: float) -> bytes:
        """The answer for this client: its ID, question and RD bit, its own OPT record (if it
        sent one), TTLs lowered by the time cached."""
        elapsed = int(now - self.stored_at)
        out = bytearray(self.wire)
        flags = (out[2] << 8 | out[3]) & ~RD | question.flags & RD
        struct.pack_into("!HH", out, 0, question.id, flags)
        out[HEADER.size : question.end] = query[HEADER.size : question.end]  # client's 0x20 case
        for offset, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
            _TTL.pack_into(out, offset, max(0, ttl - elapsed))
        if question.edns and not self.upstream_opt:
            struct.pack_into("!H", out, 10, (out[10] << 8 | out[11]) + 1)
            out += opt_record(question.dnssec_ok)
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
    rcode = struct.unpack_from("!H", response, 2)[0] & RCODE_MASK
    response, upstream_opt = _without_opt(response, found)
    wire = bytearray(response)
    struct.pack_into("!H", wire, 0, 0)
    kept = [r for r in found if r.rtype != TYPE_OPT]
    offsets = [r.ttl_offset for r in kept]
    ttls = [clamp(_negative_ttl(response, r), min_ttl, max_ttl) for r in kept]
    for offset, ttl in zip(offsets, ttls, strict=True):
        _TTL.pack_into(wire, offset, ttl)
    addresses = tuple(
        parse_address(response[r.rdata : r.rdata + r.rdlength]) for r in address_records
    )
    address_ttl = max((clamp(r.ttl, min_ttl, max_ttl) for r in address_records), default=0)
    cache_ttl = min(ttls) if ttls else min_ttl
    shared = rcode in (NOERROR, NXDOMAIN) and not upstream_opt
    return Answer(
        wire=bytes(wire),
        ttl_offsets=tuple(offsets),
        ttls=tuple(ttls),
        addresses=addresses,
        address_ttl=address_ttl,
        ttl=cache_ttl if shared else 0,
        stored_at=now,
        capped=capped,
        rcode=rcode,
        upstream_opt=upstream_opt,
    )


def _without_opt(response: bytes, found: list[Record]) -> tuple[bytes, bool]:
    """The response without its OPT record, and whether it had to keep it: an extended error
    (BADVERS, BADCOOKIE) lives in the OPT and is for the asker alone, and an OPT that is not the
    last record is left where it is (such an answer is not shared either)."""
    opts = [r for r in found if r.rtype == TYPE_OPT]
    if not opts:
        return response, False
    opt = opts[-1]
    if len(opts) > 1 or opt.ttl >> 24 or opt.rdata + opt.rdlength != len(response):
        return response, True
    start = opt.ttl_offset - 5  # the root name, type and class before the TTL
    if start < HEADER.size or response[start] != 0:
        return response, True
    counts = list(_COUNTS.unpack_from(response, 4))
    counts[3] -= 1
    return response[:4] + _COUNTS.pack(*counts) + response[HEADER.size : start], False


def _negative_ttl(response: bytes, record: Record) -> int:
    """A record's TTL as a cache keeps it: for an SOA (which negative answers carry), the lesser
    of its TTL and its MINIMUM field (RFC 2308 section 5)."""
    if record.rtype != TYPE_SOA or record.rdlength < 20:
        return record.ttl
    minimum = int(_TTL.unpack_from(response, record.rdata + record.rdlength - 4)[0])
    return min(record.ttl, minimum)


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
    """Answers by cache key, least recently used evicted at ``maxsize``; an expired answer is
    dropped when it is next asked for, or by ``forget_expired``, which costs what expired. Once
    everything has expired, the table gives its memory back."""

    def __init__(self, maxsize: int = 65536) -> None:
        self.maxsize = maxsize
        self._entries: LRUCache[CacheKey, Answer] = LRUCache(maxsize=maxsize)
        self._expiries: list[tuple[float, CacheKey, float]] = []  # (expiry, key, stored_at)

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
            heapq.heappush(self._expiries, (answer.stored_at + answer.ttl, key, answer.stored_at))

    def forget_expired(self, now: float) -> int:
        """Drop the answers that expired by ``now``; how many."""
        heap, entries, dropped = self._expiries, self._entries, 0
        while heap and heap[0][0] <= now:
            _expiry, key, stored_at = heapq.heappop(heap)
            answer = entries.get(key)
            if answer is not None and answer.stored_at == stored_at:  # not replaced since
                del entries[key]
                dropped += 1
        if not entries and dropped:  # emptied: a dict keeps the room of what it held
            self._entries = LRUCache(maxsize=self.maxsize)
            heap.clear()
        if len(heap) > 2 * len(entries) + 1024:  # mostly evicted or replaced: start over
            self._expiries = [(a.stored_at + a.ttl, k, a.stored_at) for k, a in entries.items()]
            heapq.heapify(self._expiries)
        return dropped

    def __len__(self) -> int:
        return len(self._entries)
