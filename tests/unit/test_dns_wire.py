"""Reading upstream answers: each record with its owner name, as the cache sees it."""

from __future__ import annotations

from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSRecord

from egressgw.dns.wire import records


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
