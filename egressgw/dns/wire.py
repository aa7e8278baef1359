r"""The few DNS wire-format operations on the hot path, without building record objects.

In: raw messages. Out: the question of a query; the records of a response with their offsets,
so a cached answer is served by patching bytes and an upstream answer is read in one pass; small
local responses (NXDOMAIN with a synthesized SOA, REFUSED, SERVFAIL, FORMERR, NOTIMP, truncated),
each carrying an OPT record exactly when the query did (RFC 6891). Anything this module cannot
walk raises ``WireError``; ``not_a_query`` says which of those datagrams deserve no reply at all.
Pure: no I/O.

Names are read in presentation format (RFC 1035 section 5.1), lower case: labels joined by
``.``, and inside a label ``\.`` for a dot, ``\\`` for a backslash, a backslash before the other
characters zone files treat specially (``"();@$``), and ``\DDD`` (decimal) for every byte
outside printable ASCII. Two different wire names therefore never read as the same string: the
label ``db.payments`` reads ``db\.payments``, so ``db\.payments.example`` is cached, decided and
logged as itself, never as ``db.payments.example`` (and as no policy can name a backslash, it is
denied). A question name may not be compressed: nothing precedes it that a pointer could name.
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
AD = 0x0020
CD = 0x0010
RCODE_MASK = 0x000F
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A, TYPE_SOA, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 6, 5, 28, 41
CLASS_IN = 1
DO = 0x8000  # the DNSSEC OK bit of an OPT record's TTL field
MAX_NAME_WIRE = 255
PLAIN_UDP_SIZE = 512
# What local answers advertise: the size that avoids IP fragmentation on common paths (DNS flag
# day 2020); the server reads datagrams of any size.
EDNS_UDP_SIZE = 1232
_MIN_QUESTION = 5  # the root name and a type and class
_LAST_ROOT_OFFSET = HEADER.size + MAX_NAME_WIRE - 1  # where a question name's last byte may be
_MIN_RECORD = 11  # the root name, type, class, TTL and an empty rdata


class WireError(ValueError):
    pass


# (name, type, class, DO, the query's CD and AD flags): what an answer may be shared by; the
# flags a resolver's answer depends on (RFC 6840 5.7, 5.9), and nothing else of the query's
# goes upstream (``forwarded``)
CacheKey = tuple[str, int, int, bool, int]


class Question(NamedTuple):  # built per query: a tuple is the cheapest record to build
    id: int
    flags: int
    name: str  # presentation format, lower case, no trailing dot; "" for the root
    qtype: int
    qclass: int
    end: int  # offset just past the question
    udp_size: int  # what the client accepts over UDP (EDNS0, else 512)
    dnssec_ok: bool
    cache_key: CacheKey
    edns: bool = False  # the query carried an OPT record: so must every answer to it
    edns_version: int = 0  # of that OPT record; only version 0 is spoken here


def _escaped(byte: int) -> str:
    if byte in b'."();\\@$':
        return "\\" + chr(byte)
    if byte < 0x21 or byte > 0x7E:
        return f"\\{byte:03d}"
    return chr(byte)


_ESCAPED = tuple(_escaped(byte) for byte in range(256))
_PLAIN = bytes(byte for byte in range(256) if len(_ESCAPED[byte]) == 1)  # stand for themselves


def _presentation(labels: list[bytes]) -> str:
    """Labels (wire bytes) as one lower-case name in presentation format."""
    joined = b".".join(labels).lower()
    # the usual case in two C calls: once the bytes that stand for themselves are gone, only
    # the dots put between labels are left
    if len(joined.translate(None, _PLAIN)) == len(labels) - 1:
        return joined.decode("ascii")
    escaped = _ESCAPED
    return ".".join("".join([escaped[byte] for byte in label.lower()]) for label in labels)


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
    """(lower-case name in presentation format, offset past it), following compression pointers
    safely."""
    labels: list[bytes] = []
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
        labels.append(label)
        offset += 1 + byte
    return _presentation(labels) if labels else "", end


def parse_question(msg: bytes) -> Question:
    """The single question of a standard query, and its EDNS0 UDP size if any."""
    length = len(msg)
    if length < HEADER.size:
        raise WireError("shorter than a DNS header")
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(msg)
    if flags & QR:
        raise WireError("a response, not a query")
    if qdcount != 1:
        raise WireError(f"{qdcount} questions")
    labels: list[bytes] = []
    offset = HEADER.size
    while True:  # each turn moves past one label, at most 128 before the name is too long
        if offset >= length:
            raise WireError("question name runs past the end of the message")
        byte = msg[offset]
        if byte == 0:
            break
        if byte & 0xC0:
            raise WireError("compressed or unsupported label in the question")
        offset += 1 + byte
        if offset > _LAST_ROOT_OFFSET:
            raise WireError("name longer than 255 octets")
        labels.append(msg[offset - byte : offset])
    name = _presentation(labels) if labels else ""
    offset += 1
    if offset + 4 > length:
        raise WireError("truncated question")
    qtype, qclass = _TYPE_CLASS.unpack_from(msg, offset)
    end = offset + 4
    udp_size, dnssec_ok, edns, version = PLAIN_UDP_SIZE, False, False, 0
    if arcount and not ancount and not nscount:
        pos = end
        for _ in range(arcount):
            pos = skip_name(msg, pos)
            if pos + _RR_FIXED.size > length:
                raise WireError("truncated additional record")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(msg, pos)
            if rtype == TYPE_OPT:
                if edns:
                    raise WireError("more than one OPT record")  # RFC 6891 6.1.1: FORMERR
                edns = True
                udp_size = max(PLAIN_UDP_SIZE, rclass)
                dnssec_ok = bool(ttl & DO)
                version = (ttl >> 16) & 0xFF
            pos += _RR_FIXED.size + rdlength
            if pos > length:
                raise WireError("truncated additional record")
    key = (name, qtype, qclass, dnssec_ok, flags & (CD | AD))
    return Question(ident, flags, name, qtype, qclass, end, udp_size, dnssec_ok, key, edns, version)


def not_a_query(msg: bytes) -> str | None:
    """Why a datagram that ``parse_question`` rejected gets no reply at all, or None when it is
    a query, if a malformed one (FORMERR) or of an opcode not served (NOTIMP).

    Never answered: anything shorter than a header; a response (QR=1: answering it could start
    a loop of error replies between two servers); a header whose counts need more bytes than
    follow it (noise, not a query)."""
    if len(msg) < HEADER.size:
        return "shorter than a header"
    _id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(msg)
    if flags & QR:
        return "not a query"
    needed = qdcount * _MIN_QUESTION + (ancount + nscount + arcount) * _MIN_RECORD
    if needed > len(msg) - HEADER.size:
        return "counts exceed the message"
    return None


def _opt_of(msg: bytes) -> int | None:
    """The DO bit (0 or ``DO``) of the OPT record of a query that ``parse_question`` could not
    read, or None if it has none or none can be found."""
    try:
        _id, _flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(msg)
        pos = HEADER.size
        for _ in range(qdcount):  # every turn moves forward: the message's length bounds it
            pos = skip_name(msg, pos) + 4
        for index in range(ancount + nscount + arcount):
            pos = skip_name(msg, pos)
            rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(msg, pos)
            if rtype == TYPE_OPT and index >= ancount + nscount:
                return int(ttl & DO)
            pos += _RR_FIXED.size + rdlength
    except (WireError, struct.error):
        return None
    return None


_OPT = b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_UDP_SIZE, 0, 0)
_OPT_DO = b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_UDP_SIZE, DO, 0)


def opt_record(dnssec_ok: bool) -> bytes:
    """The OPT record of an answer made for an EDNS query: this server's UDP size, the query's
    DO bit, no options (an option belongs to the exchange it came with)."""
    return _OPT_DO if dnssec_ok else _OPT


def forwarded(query: bytes, question: Question) -> bytes:
    """What the upstream is asked for a query: its ID, opcode, RD, CD and AD flags and its
    question as sent, and nothing after it but, for an EDNS query, an OPT record of this
    server's (version 0, the query's DO bit, no options). A client's options (a cookie, a
    client subnet, anything unknown) and other records never leave the gateway: every answer
    the upstream gives is one that any client with the same cache key may share."""
    flags = question.flags & (OPCODE_MASK | RD | CD | AD)
    additional = opt_record(question.dnssec_ok) if question.edns else b""
    header = HEADER.pack(question.id, flags, 1, 0, 0, bool(additional))
    return header + query[HEADER.size : question.end] + additional


# MNAME and RNAME of the synthesized SOA: under .invalid (RFC 6761), so nothing resolves them
SOA_MNAME = "egressgw.invalid"
SOA_RNAME = "hostmaster.egressgw.invalid"
_SOA_NAMES = b"\x08egressgw\x07invalid\x00\x0ahostmaster\x08egressgw\x07invalid\x00"
SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 1, 3600, 600, 86400
_SOA_TIMERS = struct.Struct("!IIIII")


def _soa(query: bytes, question: Question, ttl: int) -> bytes:
    """An SOA record for the zone of the question's name, so caches keep the NXDOMAIN for
    ``ttl`` (RFC 2308: the lower of the record's TTL and its MINIMUM). Owner: the name's parent,
    or the name itself when it has a single label; a compression pointer into the question,
    which a response carries at the same offset as the query."""
    first = query[HEADER.size]
    if first == 0:
        owner = b"\x00"  # the root
    else:
        parent = HEADER.size + 1 + first
        start = parent if query[parent] != 0 else HEADER.size
        owner = struct.pack("!H", 0xC000 | start)
    # a meta-class (NONE, ANY) is not a record's class
    rclass = question.qclass if question.qclass < 254 else CLASS_IN
    rdata = _SOA_NAMES + _SOA_TIMERS.pack(SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, ttl)
    return owner + _RR_FIXED.pack(TYPE_SOA, rclass, ttl, len(rdata)) + rdata


def _answer_flags(question: Question) -> int:
    """The header flags of an answer made here: QR and RA, the query's opcode, RD and CD."""
    return QR | RA | (question.flags & (OPCODE_MASK | RD | CD))


def local_response(
    query: bytes, question: Question | None, rcode: int, negative_ttl: int | None = None
) -> bytes:
    """An answer made here: the query's header and question, the given rcode; an OPT record if
    the query had one; and for an NXDOMAIN, given ``negative_ttl``, an SOA in the authority
    section. Without a question (the query could not be read): the header alone, and an OPT if
    one can be found."""
    if question is None:
        if len(query) < HEADER.size:
            raise WireError("too short to answer")
        ident, flags = struct.unpack_from("!HH", query)
        do = _opt_of(query)
        flags = QR | (flags & (OPCODE_MASK | RD)) | rcode
        if do is None:
            return HEADER.pack(ident, flags, 0, 0, 0, 0)
        return HEADER.pack(ident, flags, 0, 0, 0, 1) + opt_record(bool(do))
    flags = _answer_flags(question) | rcode
    authority = b""
    if rcode == NXDOMAIN and negative_ttl is not None:
        authority = _soa(query, question, negative_ttl)
    additional = opt_record(question.dnssec_ok) if question.edns else b""
    header = HEADER.pack(question.id, flags, 1, 0, bool(authority), bool(additional))
    return header + query[HEADER.size : question.end] + authority + additional


def badvers_response(query: bytes, question: Question) -> bytes:
    """The answer to a query of an EDNS version this server does not speak (RFC 6891 6.1.3):
    BADVERS (16: the OPT's extended rcode 1 over a header rcode 0), in an OPT of version 0."""
    flags = _answer_flags(question)
    ttl = 1 << 24 | (DO if question.dnssec_ok else 0)
    opt = b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_UDP_SIZE, ttl, 0)
    return HEADER.pack(question.id, flags, 1, 0, 0, 1) + query[HEADER.size : question.end] + opt


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


def truncated(response: bytes, question: Question, query: bytes) -> bytes:
    """The TC answer a UDP client gets when the full answer does not fit its buffer."""
    _id, flags, *_ = HEADER.unpack_from(response)
    additional = opt_record(question.dnssec_ok) if question.edns else b""
    header = HEADER.pack(question.id, flags | TC, 1, 0, 0, bool(additional))
    return header + query[HEADER.size : question.end] + additional
