"""A cached answer is built for the query in hand: nothing of one client's exchange reaches another.

Each test stores an upstream response as the first asker's answer, then serves it to a second
client whose query differs in what belongs to it alone (its ID, RD bit, EDNS), and reads the
bytes that client would get.
"""

from __future__ import annotations

from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord, EDNSOption

from egressgw.dns.cache import AnswerCache, prepare
from egressgw.dns.wire import EDNS_UDP_SIZE, CacheKey, parse_question
from egressgw.runtime import Trimmer

NOW = 1000.0
COOKIE = EDNSOption(10, bytes(range(24)))  # the upstream's DNS cookie, for the first asker
NSID = EDNSOption(3, b"upstream-1")


def query(
    name: str = "db.example", *, edns: bool = False, do: bool = False, rd: bool = True
) -> bytes:
    record = DNSRecord.question(name)
    record.header.rd = int(rd)
    if edns:
        record.add_ar(EDNS0(udp_len=4096, flags="do" if do else ""))
    return bytes(record.pack())


def upstream_answer(asked: bytes, *options: EDNSOption, ext_rcode: int = 0) -> bytes:
    reply = DNSRecord.parse(asked).reply()
    reply.add_answer(RR("db.example", QTYPE.A, rdata=A("203.0.113.10"), ttl=300))
    reply.add_ar(EDNS0(udp_len=1232, ext_rcode=ext_rcode, opts=list(options)))
    return bytes(reply.pack())


def served_to(stored_for: bytes, upstream: bytes, asker: bytes) -> DNSRecord:
    answer = prepare(
        upstream, parse_question(stored_for), NOW, min_ttl=5, max_ttl=3600, max_addresses=64
    )
    cache = AnswerCache()
    question = parse_question(asker)
    cache.put(question.cache_key, answer)
    cached = cache.get(question.cache_key, NOW + 1)
    assert cached is not None, "the answer was not cached"
    return DNSRecord.parse(cached.served(question, asker, NOW + 1))


def opts(record: DNSRecord) -> list[DNSRecord]:
    return [rr for rr in record.ar if rr.rtype == QTYPE.OPT]


def test_a_client_without_edns_gets_no_opt_from_an_edns_askers_answer() -> None:
    first = query(edns=True)
    reply = served_to(first, upstream_answer(first, COOKIE, NSID), query())
    assert [str(rr.rdata) for rr in reply.rr] == ["203.0.113.10"]
    assert opts(reply) == []


def test_an_edns_client_gets_its_own_opt_and_never_the_upstreams_options() -> None:
    first = query(edns=True, do=True)
    reply = served_to(first, upstream_answer(first, COOKIE, NSID), query(edns=True, do=True))
    (opt,) = opts(reply)
    assert opt.rclass == EDNS_UDP_SIZE and opt.rdata == []  # no cookie, no NSID
    assert opt.ttl & 0x8000  # its DO bit


def test_an_edns_client_gets_an_opt_even_when_the_first_asker_sent_none() -> None:
    plain = query()
    upstream = _plain_answer(plain)
    reply = served_to(plain, upstream, query(edns=True))
    (opt,) = opts(reply)
    assert not opt.ttl & 0x8000


def _plain_answer(asked: bytes) -> bytes:
    reply = DNSRecord.parse(asked).reply()
    reply.add_answer(RR("db.example", QTYPE.A, rdata=A("203.0.113.10"), ttl=300))
    return bytes(reply.pack())


def test_the_rd_bit_is_the_askers_own() -> None:
    first = query(rd=True)
    reply = served_to(first, _plain_answer(first), query(rd=False))
    assert reply.header.rd == 0


def test_an_extended_error_is_for_its_asker_alone() -> None:
    first = query(edns=True)
    badvers = upstream_answer(first, ext_rcode=1)  # BADVERS (16) = extended 1, header 0
    answer = prepare(
        badvers, parse_question(first), NOW, min_ttl=600, max_ttl=3600, max_addresses=64
    )
    cache = AnswerCache()
    cache.put(parse_question(first).cache_key, answer)
    assert cache.get(parse_question(first).cache_key, NOW) is None
    # the asker itself gets the upstream's OPT, which carries the error
    (opt,) = opts(DNSRecord.parse(answer.served(parse_question(first), first, NOW)))
    assert opt.ttl >> 24 == 1


def test_a_negative_answer_is_kept_no_longer_than_its_soa_says() -> None:
    asked = query("gone.example")
    reply = DNSRecord.parse(asked).reply()
    reply.header.rcode = RCODE.NXDOMAIN
    soa = SOA("ns.example.", "hostmaster.example.", (1, 3600, 600, 86400, 30))
    reply.add_auth(RR("example", QTYPE.SOA, rdata=soa, ttl=900))
    answer = prepare(
        bytes(reply.pack()), parse_question(asked), NOW, min_ttl=5, max_ttl=3600, max_addresses=64
    )
    assert answer.ttl == 30  # MINIMUM, not the SOA record's 900
    served = DNSRecord.parse(answer.served(parse_question(asked), asked, NOW + 10))
    assert served.header.rcode == RCODE.NXDOMAIN and served.auth[0].ttl == 20


def test_an_answer_asked_with_ad_or_cd_is_not_shared_with_a_query_without() -> None:
    plain = DNSRecord.question("db.example")
    flagged = DNSRecord.question("db.example")
    flagged.header.ad = 1
    checking_disabled = DNSRecord.question("db.example")
    checking_disabled.header.cd = 1
    keys = {parse_question(bytes(r.pack())).cache_key for r in (plain, flagged, checking_disabled)}
    assert len(keys) == 3  # a validating upstream's AD bit, or an unvalidated answer, stays apart


def test_a_cache_emptied_by_expiry_keeps_caching_within_its_size() -> None:
    cache = AnswerCache(maxsize=4)

    def put(name: str, now: float) -> CacheKey:
        asked = query(name)
        question = parse_question(asked)
        answer = prepare(
            upstream_answer(asked), question, now, min_ttl=5, max_ttl=3600, max_addresses=64
        )
        cache.put(question.cache_key, answer)
        return question.cache_key

    for i in range(4):
        put(f"n{i}.example", NOW)
    assert cache.forget_expired(NOW + 3600) == 4 and len(cache) == 0
    later = [put(f"m{i}.example", NOW + 4000) for i in range(6)]
    assert len(cache) == 4  # still bounded by its size
    assert cache.get(later[-1], NOW + 4001) is not None
    assert cache.get(later[0], NOW + 4001) is None  # the least recently used went


def test_memory_goes_back_after_a_burst_is_forgotten_not_under_steady_load() -> None:
    trimmer = Trimmer(least=100)
    assert not trimmer.due(dropped=0, held=10)  # nothing dropped
    assert not trimmer.due(dropped=50, held=400)  # steady load: most of it still held
    assert not trimmer.due(dropped=100, held=300)
    assert trimmer.due(dropped=200, held=100)  # a burst of 500 is down to a fifth of it
    assert not trimmer.due(dropped=10, held=90)  # measured from there on
    assert trimmer.due(dropped=90, held=0)  # everything forgotten: always
    assert not trimmer.due(dropped=5, held=20)  # a small one never
    trimmer.trim()  # glibc's malloc_trim here; harmless where there is none
