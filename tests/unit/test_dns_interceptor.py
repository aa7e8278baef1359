"""The DNS decision path with a fake datapath and a fake upstream: what a workload would see."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import time

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from egressgw import logs
from egressgw.dns.interceptor import Deferred, DnsSettings, Interceptor, PolicyView
from egressgw.dns.names import NamePolicy
from egressgw.dns.upstream import Upstream
from egressgw.dns.wire import REFUSED
from egressgw.identity import IdentityRegistry
from egressgw.metrics import REMEMBERED_KINDS
from egressgw.plan import build
from egressgw.policy.model import (
    Action,
    EgressGateway,
    EgressPolicy,
    EgressRule,
    LabelSelector,
    Mode,
    Namespace,
    Peer,
    Pod,
    PortSpec,
    Protocol,
    Snapshot,
)
from egressgw.testing.datapath import FakeDatapath
from egressgw.testing.upstream import FakeUpstream

IP = ipaddress.ip_address
API = IP("192.0.2.10")
ETL = IP("192.0.2.20")
ZONE = """
db.lab.example. 60 A 203.0.113.10
db.lab.example. 60 AAAA 2001:db8:203::10
web.lab.example. 30 A 203.0.113.20
alias.lab.example. 300 CNAME web.lab.example.
www.cdn.lab.example. 100000 A 203.0.113.21
short.lab.example. 0 A 203.0.113.22
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def policy(
    namespace: str,
    app: str,
    *peers: Peer,
    mode: Mode = Mode.ENFORCE,
    ports: tuple[PortSpec, ...] = (PortSpec(Protocol.TCP, 5432),),
    action: Action = Action.ALLOW,
) -> EgressPolicy:
    rule = EgressRule(action=action, to=peers, ports=ports)
    return EgressPolicy(namespace, f"{app}-policy", sel(app=app), mode, (rule,))


def snapshot(*policies: EgressPolicy) -> Snapshot:
    return Snapshot(
        namespaces={
            "payments": Namespace("payments", {"project": "payments"}),
            "analytics": Namespace("analytics", {"project": "analytics"}),
        },
        pods=(
            Pod("payments", "api-0", {"app": "api"}, (API,)),
            Pod("analytics", "etl-0", {"app": "etl"}, (ETL,)),
        ),
        gateways=(
            EgressGateway("payments", sel(project="payments"), egress_ips=(IP("198.51.100.10"),)),
            EgressGateway("analytics", sel(project="analytics"), egress_ips=(IP("198.51.100.20"),)),
        ),
        policies=policies,
    )


DEFAULT_POLICIES = (
    policy(
        "payments",
        "api",
        Peer(fqdn="db.lab.example"),
        Peer(fqdn_pattern="*.cdn.lab.example"),
        Peer(fqdn="alias.lab.example"),
        Peer(fqdn="short.lab.example"),
    ),
    policy("analytics", "etl", Peer(cidr=ipaddress.ip_network("203.0.113.10/32"))),
)


class Env:
    def __init__(self, *policies: EgressPolicy, zone: str = ZONE, **overrides: object) -> None:
        self.clock = Clock()
        self.datapath = FakeDatapath()
        self.upstream = FakeUpstream(zone)
        dns = DnsSettings(**overrides)  # type: ignore[arg-type]
        self.interceptor = Interceptor(dns, self.upstream, self.datapath, self.clock)
        plan = build(snapshot(*(policies or DEFAULT_POLICIES)), IdentityRegistry())
        self.plan = plan
        self.interceptor.update(PolicyView(plan.workloads, NamePolicy(plan.selections)))

    def identity(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        return self.plan.desired.workloads[address]

    def ask(
        self,
        name: str,
        qtype: str = "A",
        source: ipaddress.IPv4Address | ipaddress.IPv6Address = API,
        udp: bool = True,
    ) -> DNSRecord:
        raw = asyncio.run(self.interceptor.handle(self.query(name, qtype), str(source), udp))
        assert raw is not None
        return DNSRecord.parse(raw)

    @staticmethod
    def query(name: str, qtype: str = "A") -> bytes:
        return bytes(DNSRecord.question(name, qtype).pack())


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]


def test_allowed_name_is_programmed_for_the_asker_before_the_answer() -> None:
    env = Env()
    reply = env.ask("db.lab.example")
    assert reply.header.rcode == RCODE.NOERROR and addresses(reply) == ["203.0.113.10"]
    api = env.identity(API)
    assert env.datapath.allowed(api) == {"203.0.113.10"}
    ((element, lifetime),) = env.datapath.learned.items()
    assert (element.protocol, element.ports) == (6, (5432, 5432))
    # at least the released TTL + grace; at most one second more (TTLs tick in whole seconds)
    assert reply.rr[0].ttl + 10 <= lifetime <= reply.rr[0].ttl + 11


def test_denied_name_is_nxdomain_and_never_reaches_the_upstream() -> None:
    env = Env()
    reply = env.ask("db.lab.example", source=ETL)  # analytics allows the address, not the name
    assert reply.header.rcode == RCODE.NXDOMAIN and reply.rr == []
    assert env.upstream.asked["db.lab.example"] == 0
    assert env.datapath.learned == {}


def test_refused_rcode_is_configurable() -> None:
    env = Env(deny_rcode=REFUSED)
    assert env.ask("blocked.lab.example").header.rcode == RCODE.REFUSED


def test_unknown_source_is_refused() -> None:
    env = Env()
    reply = env.ask("db.lab.example", source=IP("192.0.2.99"))
    assert reply.header.rcode == RCODE.REFUSED
    assert env.upstream.asked["db.lab.example"] == 0


def test_cname_chain_opens_the_target_addresses() -> None:
    env = Env()
    reply = env.ask("alias.lab.example")
    assert addresses(reply) == ["203.0.113.20"]
    assert env.datapath.allowed(env.identity(API)) == {"203.0.113.20"}


def test_repeated_hits_program_once_and_always_cover_the_released_ttl() -> None:
    env = Env()
    env.ask("db.lab.example")
    assert env.datapath.batches == 1
    for step in range(40):
        env.clock.now += 0.7
        reply = env.ask("db.lab.example")
        ((_element, lifetime),) = env.datapath.learned.items()
        programmed_until = 1000.0 + lifetime
        assert programmed_until >= env.clock.now + reply.rr[0].ttl + 10, step
    assert env.datapath.batches == 1


def test_cached_answer_counts_down_and_is_still_programmed_per_identity() -> None:
    zone = ZONE + "\nshared.lab.example. 60 A 203.0.113.40\n"
    shared = Peer(fqdn="shared.lab.example")
    env = Env(policy("payments", "api", shared), policy("analytics", "etl", shared), zone=zone)
    first = env.ask("shared.lab.example")
    env.clock.now += 25
    second = env.ask("shared.lab.example", source=ETL)
    assert env.upstream.asked["shared.lab.example"] == 1
    assert first.rr[0].ttl == 60 and second.rr[0].ttl == 35
    assert env.datapath.allowed(env.identity(ETL)) == {"203.0.113.40"}
    assert env.datapath.allowed(env.identity(API)) == {"203.0.113.40"}
    env.clock.now += 40  # expired: asked again
    env.ask("shared.lab.example")
    assert env.upstream.asked["shared.lab.example"] == 2


def test_ttls_are_clamped() -> None:
    env = Env(min_ttl_s=5, max_ttl_s=3600)
    assert env.ask("www.cdn.lab.example").rr[0].ttl == 3600
    assert env.ask("short.lab.example").rr[0].ttl == 5


def test_failed_programming_gives_servfail_not_the_answer() -> None:
    env = Env()
    env.datapath.fail_with = OSError("netlink said no")
    reply = env.ask("db.lab.example")
    assert reply.header.rcode == RCODE.SERVFAIL and reply.rr == []


def test_slow_programming_gives_servfail() -> None:
    env = Env(program_timeout_s=0.01)
    env.datapath.delay_s = 0.05
    assert env.ask("db.lab.example").header.rcode == RCODE.SERVFAIL


def test_dead_upstreams_give_servfail() -> None:
    env = Env()
    env.upstream.fail = True
    assert env.ask("db.lab.example").header.rcode == RCODE.SERVFAIL


def test_many_addresses_hit_the_per_name_cap() -> None:
    zone = "\n".join(
        f"big.lab.example. 60 A 203.0.113.{i % 250}"
        if i < 250
        else f"big.lab.example. 60 A 198.51.100.{i - 250}"
        for i in range(500)
    )
    env = Env(
        policy("payments", "api", Peer(fqdn="big.lab.example")),
        zone=zone,
        max_addresses_per_name=64,
    )
    reply = env.ask("big.lab.example", udp=False)
    assert len(addresses(reply)) == 64
    assert env.datapath.allowed(env.identity(API)) == set(addresses(reply))


def test_per_identity_cap_evicts_the_oldest_expiring() -> None:
    zone = "\n".join(f"n{i}.lab.example. {100 + i} A 203.0.113.{i}" for i in range(6))
    env = Env(
        policy("payments", "api", Peer(fqdn_pattern="*.lab.example")),
        zone=zone,
        max_addresses_per_identity=4,
    )
    for i in range(6):
        env.ask(f"n{i}.lab.example")
    assert env.datapath.allowed(env.identity(API)) == {f"203.0.113.{i}" for i in range(2, 6)}


def test_audit_mode_resolves_would_deny_names_without_programming() -> None:
    env = Env(policy("payments", "api", Peer(fqdn="web.lab.example"), mode=Mode.AUDIT))
    reply = env.ask("db.lab.example")
    assert addresses(reply) == ["203.0.113.10"]
    assert env.datapath.learned == {}


def test_passthrough_domain_is_forwarded_without_programming() -> None:
    zone = ZONE + "\nkube-dns.kube-system.svc.cluster.local. 30 A 192.0.2.53\n"
    env = Env(zone=zone, passthrough_domains=("cluster.local",))
    reply = env.ask("kube-dns.kube-system.svc.cluster.local")
    assert addresses(reply) == ["192.0.2.53"] and env.datapath.learned == {}


def test_udp_answer_too_big_for_the_client_is_truncated() -> None:
    zone = "\n".join(f"wide.lab.example. 60 A 203.0.113.{i}" for i in range(60))
    env = Env(policy("payments", "api", Peer(fqdn="wide.lab.example")), zone=zone)
    reply = env.ask("wide.lab.example")
    assert reply.header.tc == 1 and reply.rr == []
    assert len(addresses(env.ask("wide.lab.example", udp=False))) == 60


def test_rate_limit_drops_a_flood_from_one_source() -> None:
    env = Env(rate_per_source_qps=1, burst_per_source=5)
    results = [
        asyncio.run(env.interceptor.handle(Env.query("blocked.lab.example"), str(API)))
        for _ in range(8)
    ]
    assert sum(r is None for r in results) == 3


def test_malformed_queries_get_formerr_and_what_is_no_query_is_dropped() -> None:
    env = Env()
    assert asyncio.run(env.interceptor.handle(b"\x01", str(API))) is None
    short = b"\x12\x34\x01\x00\x00\x02\x00\x00"  # shorter than a header: nothing to answer
    assert asyncio.run(env.interceptor.handle(short, str(API))) is None
    # a whole header and a question cut short after its name
    cut = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03abc\x00\x00"
    raw = asyncio.run(env.interceptor.handle(cut, str(API)))
    assert raw is not None and raw[:2] == b"\x12\x34" and raw[3] & 0x0F == 1  # FORMERR


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_packets_never_crash_the_interceptor(packet: bytes) -> None:
    env = FUZZ_ENV
    response = asyncio.run(env.interceptor.handle(packet, str(API)))
    if response is not None:
        assert len(response) >= 12


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=80), st.integers(0, 40))
def test_mutated_queries_never_crash_the_interceptor(noise: bytes, cut: int) -> None:
    base = bytearray(Env.query("db.lab.example"))
    for i, byte in enumerate(noise[: len(base)]):
        if byte % 5 == 0:
            base[i] = byte
    asyncio.run(FUZZ_ENV.interceptor.handle(bytes(base[: len(base) - cut]), str(API)))


FUZZ_ENV = Env(rate_per_source_qps=1e9, burst_per_source=1e9)


def test_upstream_needs_a_server() -> None:
    with pytest.raises(ValueError, match="at least one upstream"):
        Upstream([])


def test_denials_are_kept_for_the_api_and_logged_as_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = Env(recent_denials=2)
    with caplog.at_level("INFO", logger="egressgw.dns"):
        for name in ("a.lab.example", "b.lab.example", "blocked.lab.example"):
            env.ask(name, source=ETL)
        env.ask("db.lab.example", source=IP("192.0.2.99"))
    assert [r.name for r in env.interceptor.recent_denials] == [
        "blocked.lab.example",
        "db.lab.example",
    ]
    last = env.interceptor.recent_denials[-1]
    assert (last.verdict, last.source, last.namespace) == ("refused", "192.0.2.99", None)
    lines = [r.getMessage() for r in caplog.records if "dns decision" in r.getMessage()]
    assert lines[2].startswith(
        "dns decision identity=analytics/etl-0 name=blocked.lab.example type=A verdict=deny"
    )
    assert 'reason="no rule matches' in lines[2]
    assert caplog.records[0].decision["namespace"] == "analytics"  # type: ignore[attr-defined]


def test_an_identity_at_its_cap_keeps_the_latest_expiring_and_logs_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    zone = "\n".join(f"n{i}.lab.example. {100 + i} AAAA 2001:db8:5::{i:x}" for i in range(300))
    env = Env(
        policy("payments", "api", Peer(fqdn_pattern="*.lab.example")),
        zone=zone,
        max_addresses_per_identity=100,
        rate_per_source_qps=1e9,
        burst_per_source=1e9,
    )
    with caplog.at_level("WARNING", logger="egressgw.dns"):
        for i in range(300):
            env.ask(f"n{i}.lab.example", "AAAA")
    allowed = env.datapath.allowed(env.identity(API))
    assert allowed == {str(ipaddress.ip_address(f"2001:db8:5::{i:x}")) for i in range(200, 300)}
    assert sum("at its cap" in r.getMessage() for r in caplog.records) == 1


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_repeated_query_gets_its_own_id_and_ttls_that_keep_counting_down() -> None:
    env = Env()
    hits = _sample("egressgw_dns_cache_total", result="hit")
    resolved = _sample("egressgw_dns_queries_total", verdict="allow", reason="resolved")
    for step in range(30):
        if step == 0:  # a miss: the upstream is asked
            assert env.ask("db.lab.example").rr[0].ttl == 60
            continue
        query = DNSRecord.question("db.lab.example", "A")
        raw = asyncio.run(env.interceptor.handle(bytes(query.pack()), str(API)))
        assert raw is not None
        reply = DNSRecord.parse(raw)
        assert reply.header.id == query.header.id
        assert addresses(reply) == ["203.0.113.10"]
        assert reply.rr[0].ttl == 60 - int(env.clock.now - 1000.0), step
        env.clock.now += 0.4
    env.interceptor.flush_counts()
    assert env.upstream.asked["db.lab.example"] == 1
    # the first answer_now was a miss; every later query was a hit and counted as resolved
    assert _sample("egressgw_dns_cache_total", result="hit") - hits == 29
    assert _sample("egressgw_dns_queries_total", verdict="allow", reason="resolved") == (
        resolved + 30
    )


def test_a_policy_update_applies_to_the_very_next_repeated_query() -> None:
    env = Env()
    assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]
    assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]
    narrower = policy("payments", "api", Peer(fqdn="web.lab.example"))
    plan = build(snapshot(narrower), IdentityRegistry())
    env.interceptor.update(PolicyView(plan.workloads, NamePolicy(plan.selections)))
    assert env.ask("db.lab.example").header.rcode == RCODE.NXDOMAIN


def test_a_repeated_answer_is_programmed_again_after_its_addresses_were_evicted() -> None:
    env = Env(max_addresses_per_identity=1)
    api = env.identity(API)
    env.ask("db.lab.example")
    env.ask("www.cdn.lab.example")  # the identity's one address is now this one
    assert env.datapath.allowed(api) == {"203.0.113.21"}
    assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]
    assert env.datapath.allowed(api) == {"203.0.113.10"}


def test_every_repeated_audit_decision_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    env = Env(policy("payments", "api", Peer(fqdn="web.lab.example"), mode=Mode.AUDIT))
    with caplog.at_level("INFO", logger="egressgw.dns"):
        for _ in range(3):
            assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]
    lines = [r.getMessage() for r in caplog.records if "verdict=audit" in r.getMessage()]
    assert len(lines) == 3


def test_the_rate_limit_holds_for_repeated_allowed_queries() -> None:
    env = Env(rate_per_source_qps=1, burst_per_source=5)
    results = [
        asyncio.run(env.interceptor.handle(Env.query("db.lab.example"), str(API))) for _ in range(8)
    ]
    assert sum(r is None for r in results) == 3


def test_a_workload_at_its_cap_invalidates_only_its_own_repeated_answers() -> None:
    zone = ZONE + "\nshared.lab.example. 60 A 203.0.113.40\n"
    everything = Peer(fqdn_pattern="*.lab.example")
    env = Env(
        policy("payments", "api", everything),
        policy("analytics", "etl", everything),
        zone=zone,
        max_addresses_per_identity=1,
    )
    shared, db = Env.query("shared.lab.example"), Env.query("db.lab.example")
    env.ask("shared.lab.example", source=ETL)
    env.ask("db.lab.example")
    assert env.interceptor.ready(str(ETL), shared[2:]) is not None
    assert env.interceptor.ready(str(API), db[2:]) is not None
    env.ask("web.lab.example")  # payments holds one address: db's is evicted
    assert env.datapath.allowed(env.identity(API)) == {"203.0.113.20"}
    assert env.interceptor.ready(str(API), db[2:]) is None  # answered again, and programmed
    assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]
    assert env.datapath.allowed(env.identity(API)) == {"203.0.113.10"}
    assert env.interceptor.ready(str(ETL), shared[2:]) is not None


def _view(*policies: EgressPolicy) -> PolicyView:
    plan = build(snapshot(*policies), IdentityRegistry())
    return PolicyView(plan.workloads, NamePolicy(plan.selections))


def test_a_plan_offered_from_another_thread_is_taken_before_a_ready_reply() -> None:
    env = Env()
    query = Env.query("db.lab.example")
    env.ask("db.lab.example")
    assert env.interceptor.ready(str(API), query[2:]) is not None  # memoised under the old plan
    narrower = _view(policy("payments", "api", Peer(fqdn="web.lab.example")))
    env.datapath.commit(narrower.names)  # the kernel now enforces the narrower plan ...
    env.interceptor.offer(narrower)  # ... and the applying thread hands it over
    assert env.interceptor.ready(str(API), query[2:]) is None
    assert env.ask("db.lab.example").header.rcode == RCODE.NXDOMAIN


def test_no_ready_reply_is_served_for_an_identity_a_reconcile_is_changing() -> None:
    # between the kernel change and the hand-over, what was memoised for the identities whose
    # learned elements the change removes is not served; the others' replies still are
    env = Env()
    query = Env.query("db.lab.example")
    cdn = Env.query("www.cdn.lab.example")
    env.ask("db.lab.example")
    assert env.interceptor.ready(str(API), query[2:]) is not None
    env.datapath.unsettled = frozenset({env.identity(ETL)})
    env.datapath.epoch += 1
    assert env.interceptor.ready(str(API), query[2:]) is not None
    env.datapath.unsettled = frozenset({env.identity(API)})
    env.datapath.epoch += 1
    assert env.interceptor.ready(str(API), query[2:]) is None
    env.ask("www.cdn.lab.example")
    assert env.interceptor.ready(str(API), cdn[2:]) is not None
    env.datapath.epoch += 2  # two reconciles since: every identity may be affected
    assert env.interceptor.ready(str(API), cdn[2:]) is None


def test_a_new_plan_keeps_the_replies_of_workloads_it_decides_alike() -> None:
    env = Env()
    query = Env.query("db.lab.example")
    env.ask("db.lab.example")
    analytics_only = (
        DEFAULT_POLICIES[0],
        policy("analytics", "etl", Peer(fqdn="web.lab.example")),
    )
    view = _view(*analytics_only)
    env.datapath.commit(view.names)
    env.interceptor.offer(view)
    assert env.interceptor.ready(str(API), query[2:]) is not None  # payments' plan is the same
    moved = _view(policy("payments", "api", Peer(fqdn="web.lab.example")), analytics_only[1])
    env.datapath.commit(moved.names)
    env.interceptor.offer(moved)
    assert env.interceptor.ready(str(API), query[2:]) is None


def test_a_busy_datapath_gets_servfail_within_the_programming_bound() -> None:
    env = Env(program_timeout_s=0.05)
    env.datapath.delay_s = 5.0  # a reconcile holding the kernel for seconds
    started = time.perf_counter()
    assert env.ask("db.lab.example").header.rcode == RCODE.SERVFAIL
    assert time.perf_counter() - started < 1.0
    assert env.datapath.learned == {}


def test_an_answer_decided_under_an_old_plan_is_decided_again_before_release() -> None:
    env = Env()
    old = env.interceptor.view.names
    env.datapath.in_force = old
    deferred = env.interceptor.answer_now(Env.query("db.lab.example"), str(API))
    assert isinstance(deferred, Deferred)  # asked upstream under the old plan ...
    narrower = _view(policy("payments", "api", Peer(fqdn="web.lab.example")))
    env.datapath.commit(narrower.names)  # ... which changes while the upstream answers
    env.interceptor.offer(narrower)
    raw = asyncio.run(env.interceptor.resolve(deferred))
    assert raw is not None and DNSRecord.parse(raw).header.rcode == RCODE.NXDOMAIN
    assert env.datapath.learned == {}


def test_programming_under_a_plan_that_is_no_longer_in_force_is_refused() -> None:
    env = Env()
    env.datapath.in_force = env.interceptor.view.names
    deferred = env.interceptor.answer_now(Env.query("db.lab.example"), str(API))
    assert isinstance(deferred, Deferred)
    # the kernel moved on, and the new plan has not been offered yet: nothing is programmed
    env.datapath.commit(_view(*DEFAULT_POLICIES).names)
    raw = asyncio.run(env.interceptor.resolve(deferred))
    assert raw is not None and DNSRecord.parse(raw).header.rcode == RCODE.SERVFAIL
    assert env.datapath.learned == {}


def test_each_learned_element_records_the_name_that_opened_it() -> None:
    env = Env()
    env.ask("alias.lab.example")
    env.ask("db.lab.example")
    assert {str(k.address): v for k, v in env.datapath.names.items()} == {
        "203.0.113.20": {"alias.lab.example"},
        "203.0.113.10": {"db.lab.example"},
    }


def test_what_the_dns_path_remembers_is_dropped_once_it_expired() -> None:
    env = Env()
    for _ in range(2):
        assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]
        assert addresses(env.ask("web.lab.example", source=API)) == []  # denied: not remembered
    held = env.interceptor.remembered()
    assert held["answers"] == 1 and held["learned"] == 1 and held["sources"] == 1
    assert held["programmed"] == 1 and held["replies"] >= 1
    env.clock.now += 30  # within the TTL: nothing is dropped
    assert env.interceptor.forget_expired() == 2  # but the replies (a second) and the source
    assert env.interceptor.remembered()["answers"] == 1
    env.clock.now += 60 + 10 + 2  # past the TTL, the grace period and the whole second
    env.interceptor.forget_expired()
    assert env.interceptor.remembered() == dict.fromkeys(REMEMBERED_KINDS, 0)
    sample = REGISTRY.get_sample_value("egressgw_dns_remembered", {"kind": "answers"})
    assert sample == 0
    assert addresses(env.ask("db.lab.example")) == ["203.0.113.10"]  # asked upstream again
    assert env.upstream.asked["db.lab.example"] == 2


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_allowed_decisions_are_logged_at_info_at_most_n_a_second(fmt: str) -> None:
    stream = io.StringIO()
    logs.configure("INFO", fmt, stream)
    env = Env(log_allowed_per_second=2)
    for _ in range(2):  # two seconds of five allowed answers each, one of them a repeat
        for name, qtype in [("db.lab.example", "A"), ("db.lab.example", "AAAA"),
                            ("www.cdn.lab.example", "A"), ("alias.lab.example", "A"),
                            ("db.lab.example", "A")]:  # fmt: skip
            assert env.ask(name, qtype).header.rcode == RCODE.NOERROR
        env.interceptor.flush_counts()  # as the server does after each batch
        env.clock.now += 1
    env.interceptor.forget_expired()  # a quiet gateway still reports its last second
    lines = stream.getvalue().splitlines()
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        decisions = [r for r in records if r.get("verdict") == "allow"]
        assert {r["level"] for r in decisions} == {"INFO"}
        texts = [r["message"] for r in records if "not logged" in r["message"]]
    else:
        decisions = [line for line in lines if "verdict=allow" in line]
        assert all(" INFO egressgw.dns: dns decision " in line for line in decisions)
        texts = [line for line in lines if "not logged" in line]
    assert len(decisions) == 4  # two a second
    # the rest of each second is counted, repeated queries answered from memory included
    assert len(texts) == 2 and all("3 allowed decisions in the last second" in t for t in texts)
    assert not logging.getLogger("egressgw.dns").isEnabledFor(logging.DEBUG)


def test_no_allowed_decision_is_logged_at_info_by_default() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "text", stream)
    env = Env()
    env.ask("db.lab.example")
    env.ask("blocked.lab.example")
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if "verdict=allow" in line] == []
    assert len([line for line in lines if "verdict=deny" in line]) == 1


# -- passthrough domains: the cluster's own names -----------------------------------------------

CLUSTER_ZONE = ZONE + (
    "\nkube-dns.kube-system.svc.cluster.local. 30 A 192.0.2.53"
    "\ncluster.local. 30 A 192.0.2.54"
    "\nevilcluster.local. 30 A 203.0.113.66\n"
)


def test_names_at_or_under_a_passthrough_domain_are_forwarded_without_a_decision(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # analytics' policy allows no name at all: passthrough names resolve anyway
    env = Env(zone=CLUSTER_ZONE, passthrough_domains=("Cluster.Local.",), log_allowed_per_second=10)
    passed = _sample("egressgw_dns_queries_total", verdict="passthrough", reason="resolved")
    with caplog.at_level("DEBUG", logger="egressgw.dns"):
        under = env.ask("KUBE-DNS.kube-system.svc.cluster.local", source=ETL)
        at = env.ask("cluster.local", source=ETL)
    assert addresses(under) == ["192.0.2.53"] and addresses(at) == ["192.0.2.54"]
    assert env.upstream.asked["kube-dns.kube-system.svc.cluster.local"] == 1
    assert env.datapath.learned == {} and env.datapath.batches == 0
    assert not [r for r in caplog.records if "dns decision" in r.getMessage()]
    assert list(env.interceptor.recent_denials) == []
    after = _sample("egressgw_dns_queries_total", verdict="passthrough", reason="resolved")
    assert after == passed + 2


def test_a_name_that_only_ends_in_the_same_letters_is_decided_by_policy() -> None:
    env = Env(zone=CLUSTER_ZONE, passthrough_domains=("cluster.local",))
    reply = env.ask("evilcluster.local", source=ETL)
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert env.upstream.asked["evilcluster.local"] == 0


def test_passthrough_does_not_answer_unknown_sources() -> None:
    env = Env(zone=CLUSTER_ZONE, passthrough_domains=("cluster.local",))
    reply = env.ask("kube-dns.kube-system.svc.cluster.local", source=IP("192.0.2.99"))
    assert reply.header.rcode == RCODE.REFUSED
    assert env.upstream.asked["kube-dns.kube-system.svc.cluster.local"] == 0


def test_a_passthrough_domain_that_is_no_name_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="empty"):
        Env(passthrough_domains=(".",))  # the root would pass every name through
