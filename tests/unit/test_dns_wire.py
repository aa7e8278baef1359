"""The wire layer: reading names and records, telling queries from noise, local answers."""

from __future__ import annotations

import struct

import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.dns.wire import (
    EDNS_UDP_SIZE,
    FORMERR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    WireError,
    local_response,
    not_a_query,
    parse_question,
    read_name,
    records,
    truncated,
)
from egressgw.policy.fqdn import InvalidName, canonical_name


def _answer() -> bytes:
    reply = DNSRecord.question("www.Example.com", "A").reply()
    reply.add_answer(RR("www.Example.com", QTYPE.CNAME, rdata=CNAME("edge.cdn.example"), ttl=60))
    reply.add_answer(RR("edge.cdn.example", QTYPE.A, rdata=A("203.0.113.7"), ttl=30))
    reply.add_answer(RR("edge.cdn.example", QTYPE.A, rdata=A("203.0.113.8"), ttl=30))
    reply.add_ar(RR("www.example.com", QTYPE.AAAA, rdata=AAAA("2001:db8::7"), ttl=30))
    return bytes(reply.pack())


def test_owner_names_are_the_same_with_the_question_name_given() -> None:
    msg = _answer()
    plain = records(msg)
    assert [(r.section, r.name, r.rtype) for r in plain] == [
        (0, "www.example.com", QTYPE.CNAME),
        (0, "edge.cdn.example", QTYPE.A),
        (0, "edge.cdn.example", QTYPE.A),
        (2, "www.example.com", QTYPE.AAAA),
    ]
    assert records(msg, "www.example.com") == plain


# -- names: what a label holds is what the name reads as -------------------------------------


def _wire_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def _query(labels: list[bytes], qtype: int = 1, flags: int = 0x0100, extra: bytes = b"") -> bytes:
    arcount = 1 if extra else 0
    header = struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, arcount)
    return header + _wire_name(labels) + struct.pack("!HH", qtype, 1) + extra


def _labels_of(text: str) -> list[bytes]:
    """RFC 1035 presentation format back to wire labels: the inverse ``read_name`` must have."""
    if text == "":
        return []
    labels: list[bytes] = []
    label = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if text[i + 1 : i + 4].isdigit() and len(text[i + 1 : i + 4]) == 3:
                label.append(int(text[i + 1 : i + 4]))
                i += 4
            else:
                label.append(ord(text[i + 1]))
                i += 2
        elif char == ".":
            labels.append(bytes(label))
            label = bytearray()
            i += 1
        else:
            label.append(ord(char))
            i += 1
    labels.append(bytes(label))
    return labels


def test_a_dot_inside_a_label_never_reads_as_the_name_it_spells() -> None:
    dotted = parse_question(_query([b"db.payments", b"example"]))
    real = parse_question(_query([b"db", b"payments", b"example"]))
    assert real.name == "db.payments.example"
    assert dotted.name == r"db\.payments.example"
    assert dotted.cache_key != real.cache_key  # the two never share a cached answer
    with pytest.raises(InvalidName):
        canonical_name(dotted.name)  # so no policy can allow it


@pytest.mark.parametrize(
    ("label", "text"),
    [
        (b"WWW", "www"),
        (b"a b", r"a\032b"),
        (b"back\\slash", r"back\\slash"),
        (b'say"hi"', r"say\"hi\""),
        (b"semi;colon", r"semi\;colon"),
        (b"at@", r"at\@"),
        (b"nul\x00", r"nul\000"),
        (b"line\nbreak", r"line\010break"),
        (b"caf\xc3\xa9", r"caf\195\169"),
        (b"_dmarc", "_dmarc"),
    ],
)
def test_bytes_a_policy_cannot_name_are_escaped_as_in_zone_files(label: bytes, text: str) -> None:
    assert parse_question(_query([label, b"example"])).name == text + ".example"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=20), min_size=0, max_size=5))
def test_every_name_reads_back_to_its_own_labels(labels: list[bytes]) -> None:
    query = _query(labels)
    name = parse_question(query).name
    assert _labels_of(name) == [label.lower() for label in labels]
    # a record owner read through a compression pointer reads the same
    response = query + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    response = response[:6] + b"\x00\x01" + response[8:]
    assert read_name(response, len(query))[0] == name


def test_a_question_name_may_take_255_octets_and_no_more() -> None:
    longest = [b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]  # 64 + 64 + 64 + 62 + 1 octets
    assert parse_question(_query(longest)).name == ".".join(x.decode() for x in longest)
    with pytest.raises(WireError, match="longer than 255"):
        parse_question(_query([*longest[:3], b"d" * 62]))
    # however the octets are split: a thousand one-octet labels are as much too long
    with pytest.raises(WireError, match="longer than 255"):
        parse_question(_query([b"x"] * 1000))


def test_a_compressed_question_name_is_malformed() -> None:
    header = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    with pytest.raises(WireError):
        parse_question(header + b"\xc0\x0c" + struct.pack("!HH", 1, 1))  # points at itself


def test_two_opt_records_are_malformed() -> None:
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    query = _query([b"example"], extra=opt + opt)
    query = query[:10] + b"\x00\x02" + query[12:]
    with pytest.raises(WireError, match="more than one OPT"):
        parse_question(query)


# -- what gets no reply -----------------------------------------------------------------------


def test_what_is_not_a_query_is_told_apart_from_a_malformed_query() -> None:
    query = _query([b"db", b"example"])
    assert not_a_query(b"\x12\x34") == "shorter than a header"
    assert not_a_query(query[:11]) == "shorter than a header"
    response = query[:2] + b"\x81\x80" + query[4:]  # QR=1
    assert not_a_query(response) == "not a query"
    assert not_a_query(query[:4] + b"\xff\xff" + query[6:]) == "counts exceed the message"
    # a header that could be a query, then a question cut short: a malformed query (FORMERR)
    assert not_a_query(query[:-2]) is None
    with pytest.raises(WireError):
        parse_question(query[:-2])


# -- local answers ----------------------------------------------------------------------------

OPT_512 = b"\x00" + struct.pack("!HHIH", 41, 512, 0, 0)
OPT_DO = b"\x00" + struct.pack("!HHIH", 41, 4096, 0x8000, 0)


def _opts(reply: DNSRecord) -> list[RR]:
    return [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]


@pytest.mark.parametrize("rcode", [NXDOMAIN, REFUSED, NOTIMP, FORMERR, SERVFAIL])
def test_a_local_answer_carries_an_opt_exactly_when_the_query_did(rcode: int) -> None:
    plain = _query([b"db", b"example"])
    reply = DNSRecord.parse(local_response(plain, parse_question(plain), rcode, 60))
    assert reply.header.rcode == rcode and _opts(reply) == []
    for extra, do in ((OPT_512, 0), (OPT_DO, 1)):
        query = _query([b"db", b"example"], extra=extra)
        reply = DNSRecord.parse(local_response(query, parse_question(query), rcode, 60))
        (opt,) = _opts(reply)
        # our own size, the client's DO bit, no options copied from the query
        assert (opt.rclass, opt.ttl >> 15 & 1, opt.rdata) == (EDNS_UDP_SIZE, do, [])


def test_an_answer_to_an_unreadable_query_carries_an_opt_if_one_can_be_found() -> None:
    query = _query([b"a"], extra=OPT_DO)
    two_questions = query[:4] + b"\x00\x02" + query[6:12] + query[12:19] * 2 + query[19:]
    with pytest.raises(WireError):
        parse_question(two_questions)
    reply = DNSRecord.parse(local_response(two_questions, None, FORMERR))
    assert reply.header.rcode == FORMERR and reply.header.id == 0x1234
    assert [opt.ttl >> 15 & 1 for opt in _opts(reply)] == [1]
    no_opt = DNSRecord.parse(local_response(two_questions[:-11], None, FORMERR))
    assert _opts(no_opt) == []


@pytest.mark.parametrize(
    ("labels", "owner"),
    [
        ([b"blocked", b"lab", b"example"], "lab.example."),
        ([b"intranet"], "intranet."),
        ([], "."),
    ],
)
def test_a_local_nxdomain_carries_an_soa_for_the_zone_of_the_name(
    labels: list[bytes], owner: str
) -> None:
    query = _query(labels, extra=OPT_DO)
    raw = local_response(query, parse_question(query), NXDOMAIN, 37)
    reply = DNSRecord.parse(raw)
    (soa,) = reply.auth
    assert (soa.rtype, str(soa.rname), soa.ttl) == (QTYPE.SOA, owner, 37)
    assert (str(soa.rdata.mname), str(soa.rdata.rname)) == (
        "egressgw.invalid.",
        "hostmaster.egressgw.invalid.",
    )
    assert soa.rdata.times[0] == 1 and soa.rdata.times[-1] == 37  # serial, MINIMUM
    assert len(_opts(reply)) == 1  # the OPT comes after, in the additional section


def test_only_an_nxdomain_carries_an_soa() -> None:
    query = _query([b"blocked", b"example"])
    for rcode in (REFUSED, SERVFAIL, NOTIMP):
        assert DNSRecord.parse(local_response(query, parse_question(query), rcode, 60)).auth == []
    assert DNSRecord.parse(local_response(query, parse_question(query), NXDOMAIN)).auth == []


def test_a_truncated_answer_carries_an_opt_exactly_when_the_query_did() -> None:
    upstream = DNSRecord.question("db.example").reply()
    upstream.add_answer(RR("db.example", QTYPE.A, rdata=A("203.0.113.7"), ttl=30))
    for extra, expected in ((b"", 0), (OPT_512, 1)):
        query = _query([b"db", b"example"], extra=extra)
        reply = DNSRecord.parse(truncated(bytes(upstream.pack()), parse_question(query), query))
        assert reply.header.tc == 1 and reply.rr == [] and len(_opts(reply)) == expected
