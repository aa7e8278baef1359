"""What the interceptor answers by itself, as a workload (or a stray packet) sees it: names no
policy can name, datagrams that get no reply, and the shape of local answers (OPT, SOA, NOTIMP,
refused query types). Fake datapath and fake upstream, as in test_dns_interceptor."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord, EDNSOption
from prometheus_client import REGISTRY

from egressgw import app
from egressgw.cli import main
from egressgw.dns.interceptor import OUTCOMES
from egressgw.dns.wire import EDNS_UDP_SIZE, REFUSED
from egressgw.policy.model import Peer
from egressgw.runtime import Settings
from tests.unit.test_dns_interceptor import API, ETL, Env, addresses, policy

OPCODE_STATUS, OPCODE_NOTIFY = 2, 4


def count(verdict: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "egressgw_dns_queries_total", {"verdict": verdict, "reason": reason}
    )
    assert value is not None, f"no series for {verdict}/{reason}"
    return value


OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)  # EDNS, 1232 bytes, no DO
OPT_DO = b"\x00" + struct.pack("!HHIH", 41, 4096, 0x8000, 0)


def raw_query(labels: list[bytes], qtype: int = 1, opcode: int = 0, opt: bytes = b"") -> bytes:
    name = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    flags = 0x0100 | opcode << 11
    header = struct.pack("!HHHHHH", 0xBEEF, flags, 1, 0, 0, int(bool(opt)))
    return header + name + struct.pack("!HH", qtype, 1) + opt


def send(env: Env, query: bytes, source: str = str(API), udp: bool = True) -> bytes | None:
    return asyncio.run(env.interceptor.handle(query, source, udp))


def ask(env: Env, query: bytes, source: str = str(API), udp: bool = True) -> DNSRecord:
    raw = send(env, query, source, udp)
    assert raw is not None
    return DNSRecord.parse(raw)


def edns_query(name: str, qtype: str = "A", udp_len: int = 1232, do: bool = False) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.add_ar(EDNS0(udp_len=udp_len, flags="do" if do else ""))
    return bytes(record.pack())


def opts(reply: DNSRecord) -> list[RR]:
    return [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]


# -- a dot inside a label -------------------------------------------------------------------


def test_a_label_with_a_dot_is_denied_and_never_shares_the_real_names_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = Env()  # payments/api may resolve db.lab.example
    dotted = raw_query([b"db.lab", b"example"])
    denied = count("deny", "invalid name")
    with caplog.at_level("INFO", logger="egressgw.dns"):
        reply = ask(env, dotted)
    assert reply.header.rcode == RCODE.NXDOMAIN and reply.rr == []
    assert count("deny", "invalid name") == denied + 1
    assert sum(env.upstream.asked.values()) == 0  # nothing left the gateway
    assert env.datapath.learned == {}
    line = next(r.getMessage() for r in caplog.records if "dns decision" in r.getMessage())
    assert r"name=db\.lab.example type=A verdict=deny" in line
    assert "not a valid DNS name" in line
    assert env.interceptor.recent_denials[-1].name == r"db\.lab.example"
    # the real name is still resolved, and once it is cached the dotted one still gets nothing
    assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]
    again = ask(env, dotted)
    assert again.header.rcode == RCODE.NXDOMAIN and again.rr == []
    assert dict(env.upstream.asked) == {"db.lab.example": 1}


def test_a_dotted_label_under_a_passthrough_domain_is_not_forwarded() -> None:
    env = Env(passthrough_domains=("cluster.local",))
    denied = count("deny", "invalid name")
    reply = ask(env, raw_query([b"x.kube-dns", b"kube-system", b"svc", b"cluster", b"local"]))
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert sum(env.upstream.asked.values()) == 0
    assert count("deny", "invalid name") == denied + 1
    env.ask("kube-dns.kube-system.svc.cluster.local")  # a real name there still goes through
    assert env.upstream.asked["kube-dns.kube-system.svc.cluster.local"] == 1


# -- no reply -------------------------------------------------------------------------------


def test_every_outcome_has_a_series_from_the_start() -> None:
    Env()
    for verdict, reason in OUTCOMES:
        assert count(verdict, reason) >= 0
    reasons = {reason for verdict, reason in OUTCOMES if verdict == "dropped"}
    assert {"not a query", "shorter than a header", "counts exceed the message"} <= reasons


@pytest.mark.parametrize("udp", [True, False])
def test_a_response_gets_no_reply(udp: bool) -> None:
    env = Env()
    response = bytes(DNSRecord.question("db.lab.example").reply().pack())  # QR=1
    error = DNSRecord.question("db.lab.example").reply()
    error.header.rcode = RCODE.FORMERR
    formerr = bytes(error.pack())
    before = count("dropped", "not a query")
    assert send(env, response, udp=udp) is None
    assert send(env, formerr, udp=udp) is None  # an error reply is not answered with another
    assert count("dropped", "not a query") == before + 2
    assert sum(env.upstream.asked.values()) == 0


def test_a_datagram_shorter_than_a_header_gets_no_reply() -> None:
    env = Env()
    before = count("dropped", "shorter than a header")
    for junk in (b"\x12\x34", b"\x00" * 11, b""):
        assert send(env, junk) is None
    assert count("dropped", "shorter than a header") == before + 3


def test_noise_whose_counts_cannot_fit_gets_no_reply() -> None:
    env = Env()
    before = count("dropped", "counts exceed the message")
    noise = b"\x12\x34\x01\x00\xff\xff\x00\x00\x00\x00\x00\x00" + b"\x07" * 20
    assert send(env, noise) is None
    assert count("dropped", "counts exceed the message") == before + 1


def test_a_whole_header_with_a_malformed_question_still_gets_formerr() -> None:
    env = Env()
    before = count("formerr", "malformed query")
    cut = raw_query([b"db", b"lab", b"example"])[:-3]  # the type and class cut short
    reply = ask(env, cut)
    assert reply.header.rcode == RCODE.FORMERR and reply.header.id == 0xBEEF
    assert count("formerr", "malformed query") == before + 1


# -- OPT in every local answer to an EDNS query -----------------------------------------------


BLOCKED = [b"blocked", b"lab", b"example"]


def _two_questions(opt: bytes) -> bytes:
    query = raw_query(BLOCKED, opt=opt)
    question = query[12 : len(query) - len(opt)]
    return query[:4] + b"\x00\x02" + query[6:12] + question * 2 + opt


@pytest.mark.parametrize(
    ("build", "source", "rcode"),
    [
        pytest.param(lambda opt: raw_query(BLOCKED, opt=opt), API, RCODE.NXDOMAIN, id="denied"),
        pytest.param(
            lambda opt: raw_query(BLOCKED, opt=opt), "192.0.2.99", RCODE.REFUSED, id="stranger"
        ),
        pytest.param(
            lambda opt: raw_query(BLOCKED, opcode=OPCODE_STATUS, opt=opt),
            API,
            RCODE.NOTIMP,
            id="opcode",
        ),
        pytest.param(_two_questions, API, RCODE.FORMERR, id="malformed"),
    ],
)
def test_a_local_answer_carries_an_opt_exactly_when_the_query_did(
    build: Callable[[bytes], bytes], source: object, rcode: int
) -> None:
    env = Env()
    plain = ask(env, build(b""), str(source))
    assert plain.header.rcode == rcode and opts(plain) == []
    for opt, do in ((OPT, 0), (OPT_DO, 1)):
        reply = ask(env, build(opt), str(source))
        assert reply.header.rcode == rcode
        (echo,) = opts(reply)
        # the size this server takes, the client's DO bit, none of the client's options
        assert (echo.rclass, echo.ttl >> 15 & 1, echo.rdata) == (EDNS_UDP_SIZE, do, [])


def test_two_opt_records_get_formerr_with_one_opt() -> None:
    query = raw_query(BLOCKED, opt=OPT)
    reply = ask(env := Env(), query[:10] + b"\x00\x02" + query[12:] + OPT)
    assert reply.header.rcode == RCODE.FORMERR and len(opts(reply)) == 1
    assert sum(env.upstream.asked.values()) == 0


def test_refused_denials_carry_an_opt_and_no_soa() -> None:
    env = Env(deny_rcode=REFUSED)
    reply = ask(env, edns_query("blocked.lab.example"))
    assert reply.header.rcode == RCODE.REFUSED and reply.auth == [] and len(opts(reply)) == 1


def test_a_truncated_answer_to_an_edns_query_carries_an_opt() -> None:
    zone = "\n".join(f"wide.lab.example. 60 A 203.0.113.{i}" for i in range(60))
    env = Env(policy("payments", "api", Peer(fqdn="wide.lab.example")), zone=zone)
    reply = ask(env, edns_query("wide.lab.example", udp_len=512))  # 60 records: over 512 bytes
    assert reply.header.tc == 1 and reply.rr == [] and len(opts(reply)) == 1
    plain = env.ask("wide.lab.example")
    assert plain.header.tc == 1 and opts(plain) == []


# -- NOTIMP -----------------------------------------------------------------------------------


def test_an_unknown_opcode_gets_notimp_with_or_without_a_question() -> None:
    env = Env()
    before = count("notimp", "opcode not supported")
    with_question = ask(env, raw_query([b"db", b"lab", b"example"], opcode=OPCODE_STATUS))
    assert with_question.header.rcode == RCODE.NOTIMP
    assert str(with_question.q.qname) == "db.lab.example."
    notify = raw_query([b"lab", b"example"], opcode=OPCODE_NOTIFY)
    no_question = notify[:4] + b"\x00\x00" + notify[6:12]  # a bare header, QDCOUNT 0
    reply = ask(env, no_question)
    assert reply.header.rcode == RCODE.NOTIMP and reply.header.id == 0xBEEF
    assert reply.header.opcode == OPCODE_NOTIFY
    extended = ask(env, raw_query([b"db", b"lab", b"example"], opcode=OPCODE_STATUS, opt=OPT))
    assert extended.header.rcode == RCODE.NOTIMP and len(opts(extended)) == 1
    assert count("notimp", "opcode not supported") == before + 3
    assert sum(env.upstream.asked.values()) == 0


# -- negative caching -------------------------------------------------------------------------


def test_a_denied_nxdomain_carries_an_soa_with_the_configured_negative_ttl() -> None:
    env = Env(negative_ttl_s=17)
    reply = env.ask("blocked.lab.example", source=ETL)
    assert reply.header.rcode == RCODE.NXDOMAIN
    (soa,) = reply.auth
    assert (soa.rtype, str(soa.rname), soa.ttl) == (QTYPE.SOA, "lab.example.", 17)
    assert soa.rdata.times[-1] == 17  # MINIMUM too: RFC 2308 caches use the lower of the two
    single = env.ask("intranet", source=ETL)
    assert str(single.auth[0].rname) == "intranet."


def test_the_negative_ttl_is_set_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Settings] = []

    class Recorder:  # the gateway, as far as the command line can tell
        def __init__(self, settings: Settings, kube: object = None) -> None:
            started.append(settings)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(app, "build_gateway", Recorder)
    base = ["run", "--manifests", str(tmp_path), "--uplink", "eth0"]
    assert main([*base, "--negative-ttl", "17"]) == 0
    assert main(base) == 0
    assert [settings.dns.negative_ttl_s for settings in started] == [17, 60]
    with pytest.raises(SystemExit):
        main([*base, "--negative-ttl", "0"])


# -- query types nobody needs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("qtype", "number"), [("AXFR", 252), ("IXFR", 251), ("MAILB", 253), ("MAILA", 254)]
)
def test_zone_transfers_and_mailbox_queries_are_refused_without_asking_upstream(
    qtype: str, number: int
) -> None:
    env = Env()
    before = count("refused", "query type not served")
    allowed = [b"db", b"lab", b"example"]
    for udp in (True, False):
        reply = ask(env, raw_query(allowed, qtype=number), udp=udp)
        assert reply.header.rcode == RCODE.REFUSED and reply.rr == [] and opts(reply) == []
    assert sum(env.upstream.asked.values()) == 0
    assert count("refused", "query type not served") == before + 2
    assert env.interceptor.recent_denials[-1].reason == f"query type {qtype} is not served"
    extended = ask(env, raw_query(allowed, qtype=number, opt=OPT))
    assert extended.header.rcode == RCODE.REFUSED and len(opts(extended)) == 1


def test_any_is_decided_by_name_like_other_types() -> None:
    env = Env()
    assert env.ask("blocked.lab.example", "ANY").header.rcode == RCODE.NXDOMAIN
    env.ask("db.lab.example", "ANY")
    assert env.upstream.asked["db.lab.example"] == 1  # allowed: the upstream answers it


def test_a_query_of_an_edns_version_not_spoken_here_gets_badvers_even_with_a_cached_answer() -> (
    None
):
    env = Env()
    env.ask("db.lab.example")  # cached for version 0
    record = DNSRecord.question("db.lab.example")
    record.add_ar(EDNS0(udp_len=4096, version=1))
    asked = env.upstream.asked["db.lab.example"]
    raw = asyncio.run(env.interceptor.handle(bytes(record.pack()), str(API)))
    assert raw is not None
    reply = DNSRecord.parse(raw)
    (opt,) = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    assert (reply.header.rcode, opt.ttl >> 24, (opt.ttl >> 16) & 0xFF) == (RCODE.NOERROR, 1, 0)
    assert reply.rr == []
    assert env.upstream.asked["db.lab.example"] == asked  # not forwarded either


ECS = EDNSOption(8, bytes.fromhex("00011800c63364"))  # 198.51.100.0/24
CLIENT_COOKIE = EDNSOption(10, bytes(range(8)))
UNKNOWN_OPTION = EDNSOption(65001, b"garbage")


@pytest.mark.parametrize("do", [False, True])
def test_a_clients_edns_options_never_reach_the_upstream(do: bool) -> None:
    env = Env()
    record = DNSRecord.question("db.lab.example")
    record.add_ar(
        EDNS0(udp_len=4096, flags="do" if do else "", opts=[ECS, CLIENT_COOKIE, UNKNOWN_OPTION])
    )
    reply = ask(env, bytes(record.pack()))
    assert reply.header.rcode == RCODE.NOERROR and addresses(reply) == ["203.0.113.10"]
    (sent,) = env.upstream.queries
    upstream = DNSRecord.parse(sent)
    (opt,) = upstream.ar  # the gateway's own OPT: its size, the client's DO, no options
    assert opt.rtype == QTYPE.OPT and opt.rclass == EDNS_UDP_SIZE and opt.rdata == []
    assert bool(opt.ttl & 0x8000) == do
    assert str(upstream.q.qname) == "db.lab.example."
    # so the answer is one any client may share: a second client with another subnet gets it
    # from the cache, with its own OPT and no options
    again = ask(env, bytes(record.pack()))
    assert addresses(again) == ["203.0.113.10"] and len(env.upstream.queries) == 1
    assert [rr.rdata for rr in again.ar if rr.rtype == QTYPE.OPT] == [[]]


def test_a_query_without_edns_goes_upstream_without_one() -> None:
    env = Env()
    ask(env, raw_query([b"db", b"lab", b"example"]))
    (sent,) = env.upstream.queries
    assert DNSRecord.parse(sent).ar == []
