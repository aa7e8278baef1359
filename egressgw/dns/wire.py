"""The few DNS wire-format operations on the hot path, without building record objects.

In: raw messages. Out: the question of a query; the records of a response with their offsets,
so a cached answer is served by patching bytes and an upstream answer is read in one pass; small
local responses (NXDOMAIN, REFUSED, SERVFAIL, FORMERR, truncated). Anything this module cannot
walk raises ``WireError``. Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010
RCODE_MASK = 0x000F
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 5, 28, 41
MAX_NAME_WIRE = 255
PLAIN_UDP_SIZE = 512


class WireError(ValueError):
    pass


CacheKey = tuple[str, int, int, bool, bool]


class Question(NamedTuple):  # built per query: a tuple is the cheapest record to build
    id: int
    flags: int
    name: str  # lower case, no trailing dot; "" for the root
    qtype: int
    qclass: int
    end: int  # offset just past the question
    udp_size: int  # what the client accepts over UDP (EDNS0, else 512)
    dnssec_ok: bool
    cache_key: CacheKey  # (name, type, class, DO, CD): what an answer may be shared by


def skip_name(msg: bytes, offset: int) -> int:
    """Offset just past a (possibly compressed) name."""
    length = len(msg)
    while True:
        if offset >= length:
            raise WireError("name runs past the end of the message")
        byte = msg[offset]
        if byte == 0:
            return offset + 1
        if byte & 0xC0 == 0xC0:
            if offset + 2 > length:
                raise WireError("truncated compression pointer")
            return offset + 2
        if byte & 0xC0:
            raise WireError("unsupported label type")
        offset += 1 + byte


def read_name(msg: bytes, offset: int) -> tuple[str, int]:
    """(lower-case dotted name, offset past it), following compression pointers safely."""
    labels: list[str] = []
    end = -1
    jumps = 0
    total = 0
    length = len(msg)
    while True:
        if offset >= length:
            raise WireError("name runs past the end of the message")
        byte = msg[offset]
        if byte == 0:
            if end < 0:
                end = offset + 1
            break
        if byte & 0xC0 == 0xC0:
            if offset + 2 > length:
                raise WireError("truncated compression pointer")
            if end < 0:
                end = offset + 2
            jumps += 1
            if jumps > 64:
                raise WireError("compression loop")
            offset = ((byte & 0x3F) << 8) | msg[offset + 1]
            continue
        if byte & 0xC0:
            raise WireError("unsupported label type")
        label = msg[offset + 1 : offset + 1 + byte]
        if len(label) != byte:
            raise WireError("label runs past the end of the message")
        total += byte + 1
        if total > MAX_NAME_WIRE:
            raise WireError("name longer than 255 octets")
        labels.append(label.decode("ascii", "backslashreplace").lower())
        offset += 1 + byte
    return ".".join(labels), end


def parse_question(msg: bytes) -> Question:
    """The single question of a standard query, and its EDNS0 UDP size if any."""
    if len(msg) < HEADER.size:
        raise WireError("shorter than a DNS header")
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(msg)
    if flags & QR:
        raise WireError("a response, not a query")
    if qdcount != 1:
        raise WireError(f"{qdcount} questions")
    name, offset = read_name(msg, HEADER.size)
    if offset + 4 > len(msg):
        raise WireError("truncated question")
    qtype, qclass = _TYPE_CLASS.unpack_from(msg, offset)
    end = offset + 4
    udp_size, dnssec_ok = PLAIN_UDP_SIZE, False
    if arcount and not ancount and not nscount:
        pos = end
        for _ in range(arcount):
            pos = skip_name(msg, pos)
            if pos + _RR_FIXED.size > len(msg):
                raise WireError("truncated additional record")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(msg, pos)
            if rtype == TYPE_OPT:
                udp_size = max(PLAIN_UDP_SIZE, rclass)
                dnssec_ok = bool(ttl & 0x8000)
            pos += _RR_FIXED.size + rdlength
            if pos > len(msg):
                raise WireError("truncated additional record")
    key = (name, qtype, qclass, dnssec_ok, bool(flags & CD))
    return Question(ident, flags, name, qtype, qclass, end, udp_size, dnssec_ok, key)


_POINTER_TO_QUESTION = bytes((0xC0, HEADER.size))  # a compressed name at offset 12


class Record(NamedTuple):
    section: int  # 0 answer, 1 authority, 2 additional
    name: str
    rtype: int
    ttl: int
    ttl_offset: int
    rdata: int  # offset of the record data
    rdlength: int


def records(msg: bytes, question_name: str | None = None) -> list[Record]:
    """Every resource record after the question, with offsets; raises WireError if malformed.

    ``question_name``: the name of the message's question, when the caller has checked it; an
    owner name that is only a pointer to it (the usual case) is then not decoded again."""
    if len(msg) < HEADER.size:
        raise WireError("shorter than a DNS header")
    _id, _flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(msg)
    pos = HEADER.size
    for _ in range(qdcount):
        pos = skip_name(msg, pos) + 4
    out: list[Record] = []
    counts = (ancount, nscount, arcount)
    known = question_name if qdcount == 1 else None
    for section, count in enumerate(counts):
        for _ in range(count):
            if known is not None and msg[pos : pos + 2] == _POINTER_TO_QUESTION:
                name, pos = known, pos + 2
            else:
                name, pos = read_name(msg, pos)
            if pos + _RR_FIXED.size > len(msg):
                raise WireError("truncated record")
            rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(msg, pos)
            rdata = pos + _RR_FIXED.size
            if rdata + rdlength > len(msg):
                raise WireError("record data runs past the end")
            out.append(Record(section, name, rtype, ttl, pos + 4, rdata, rdlength))
            pos = rdata + rdlength
    return out


def local_response(query: bytes, question: Question | None, rcode: int) -> bytes:
    """An answer made here: the query's header and question, no records, the given rcode."""
    if question is None:
        if len(query) < 2:
            raise WireError("too short to answer")
        flags = QR | rcode
        if len(query) >= 4:
            flags |= struct.unpack_from("!H", query, 2)[0] & (OPCODE_MASK | RD)
        return struct.pack("!HHHHHH", struct.unpack_from("!H", query)[0], flags, 0, 0, 0, 0)
    flags = QR | RA | (question.flags & (OPCODE_MASK | RD | CD)) | rcode
    header = HEADER.pack(question.id, flags, 1, 0, 0, 0)
    return header + query[HEADER.size : question.end]


def truncated(response: bytes, question: Question, query: bytes) -> bytes:
    """The TC answer a UDP client gets when the full answer does not fit its buffer."""
    _id, flags, *_ = HEADER.unpack_from(response)
    header = HEADER.pack(question.id, flags | TC, 1, 0, 0, 0)
    return header + query[HEADER.size : question.end]
