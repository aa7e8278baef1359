"""Metrics a dashboard relies on: bounded series, monotonic traffic counters, JSON log lines."""

from __future__ import annotations

import asyncio
import gc
import io
import ipaddress
import json
import logging
import sys

import pytest
from dnslib import AAAA, QTYPE, RR, DNSRecord
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from egressgw import metrics
from egressgw.dns.wire import Question
from egressgw.logs import JsonFormatter, configure
from egressgw.metrics import (
    EgressIPState,
    GatewayCollector,
    GatewayReport,
    TrafficSample,
    TrafficTotals,
)
from egressgw.policy.model import Action, Peer
from egressgw.testing.upstream import FakeUpstream
from tests.unit.test_dns_interceptor import API, ETL, Env, policy

NAMES = 10_000


class EveryName(FakeUpstream):
    """An upstream that answers ``nN.<anything>`` with its own AAAA record (no zone to scan)."""

    async def resolve(self, question: Question, query: bytes) -> bytes:
        reply = DNSRecord.parse(query).reply()
        index = int(question.name.split(".")[0][1:])
        address = ipaddress.IPv6Address("2001:db8:7::") + index
        reply.add_answer(RR(question.name, QTYPE.AAAA, rdata=AAAA(str(address)), ttl=60))
        return bytes(reply.pack())


def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (sample name, labels) in the default registry."""
    found = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            found.add((sample.name, tuple(sorted(sample.labels.items()))))
    return found


def test_series_do_not_grow_with_distinct_names(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="egressgw.dns")  # thousands of cap-eviction warnings
    env = Env(
        policy(
            "payments",
            "api",
            Peer(fqdn_pattern="*.allowed.example"),
        ),
        policy("payments", "api", Peer(fqdn_pattern="*.denied.example"), action=Action.DENY),
        max_addresses_per_identity=20,  # caps are hit (and counted) along the way
        burst_per_source=float(NAMES),  # the fake clock stands still: no rate limiting
    )
    env.interceptor.upstream = EveryName()

    async def resolve(first: int, last: int) -> None:
        for i in range(first, last):
            zone = "allowed" if i % 2 == 0 else "denied"
            source = str(API if i % 3 else ETL)  # etl-0 has no policy: denied too
            await env.interceptor.handle(env.query(f"n{i}.{zone}.example", "AAAA"), source)

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    asyncio.run(resolve(0, 200))  # every label combination these queries can produce, once
    before = series()
    denied = value("egressgw_dns_queries_total", verdict="deny", reason="denied by policy")
    evicted = value("egressgw_dns_cap_hits_total", namespace="payments", cap="identity")
    asyncio.run(resolve(200, NAMES))
    after = series()
    more_denied = value("egressgw_dns_queries_total", verdict="deny", reason="denied by policy")
    assert more_denied - denied > NAMES / 2  # the names really were asked and counted
    assert value("egressgw_dns_cap_hits_total", namespace="payments", cap="identity") > evicted
    assert after == before, sorted(after - before)
    assert len(env.interceptor.recent_denials) == env.interceptor.settings.recent_denials
    print(f"series in the registry after 200 names: {len(before)}; after {NAMES}: {len(after)}")
    label_values = {value for _, labels in after for _, value in labels}
    assert not any(".example" in v or v.startswith("2001:db8:7:") for v in label_values)


def test_traffic_totals_never_go_backwards() -> None:
    totals = TrafficTotals()
    first = totals.update({1: ("payments", TrafficSample(10, 1000, 2, 200))})
    assert first == {"payments": TrafficSample(10, 1000, 2, 200)}
    # identity 1 removed (its kernel counter with it), identity 2 appears in the same namespace
    second = totals.update({2: ("payments", TrafficSample(1, 100, 0, 0))})
    assert second == {"payments": TrafficSample(11, 1100, 2, 200)}
    # number 2 reused: its counter restarted from zero
    third = totals.update({2: ("payments", TrafficSample(0, 0, 1, 50))})
    assert third == {"payments": TrafficSample(11, 1100, 3, 250)}


def test_gateway_collector_exposes_counters_per_namespace() -> None:
    registry = CollectorRegistry()
    collector = GatewayCollector()
    registry.register(collector)
    assert generate_latest(registry) == b""  # unbound: nothing, and no error
    report = GatewayReport(
        node="gw-1",
        learned_elements={"payments": 3, "analytics": 0},
        traffic={
            1: ("payments", TrafficSample(5, 500, 1, 60)),
            2: ("payments", TrafficSample(1, 100, 0, 0)),
        },
        egress_ips=[EgressIPState("payments", "198.51.100.10", True)],
        policies={("payments", "Enforce"): 2},
        invalid_objects={("EgressPolicy", "analytics"): 1},
    )
    collector.bind(lambda: report)
    text = generate_latest(registry).decode()
    for line in (
        'egressgw_allowed_elements{namespace="payments"} 3.0',
        'egressgw_allowed_elements{namespace="analytics"} 0.0',
        'egressgw_traffic_packets_total{namespace="payments",verdict="accepted"} 6.0',
        'egressgw_traffic_bytes_total{namespace="payments",verdict="rejected"} 60.0',
        'egressgw_egress_ip_held{egress_ip="198.51.100.10",gateway="payments",node="gw-1"} 1.0',
        'egressgw_policies{mode="Enforce",namespace="payments"} 2.0',
        'egressgw_invalid_objects{kind="EgressPolicy",namespace="analytics"} 1.0',
    ):
        assert line in text.splitlines(), line

    def broken() -> GatewayReport:
        raise OSError("netlink socket closed")

    collector.bind(broken)
    assert generate_latest(registry) == b""  # a scrape never fails on the kernel


def test_gateway_collector_is_registered_once_in_the_default_registry() -> None:
    assert metrics.GATEWAY in REGISTRY._collector_to_names


def test_json_log_line_carries_the_decision_fields() -> None:
    stream = io.StringIO()
    configure("INFO", "json", stream)
    try:
        logging.getLogger("egressgw.dns").info(
            "dns decision identity=payments/api-0",
            extra={"decision": {"verdict": "deny", "name": "x.example", "level": "ignored"}},
        )
        logging.getLogger("egressgw").warning("plain %s", "line")
    finally:
        configure("INFO", "text")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "egressgw.dns"
    assert first["message"] == "dns decision identity=payments/api-0"
    assert (first["verdict"], first["name"]) == ("deny", "x.example")
    assert second == {
        "time": second["time"],
        "level": "WARNING",
        "logger": "egressgw",
        "message": "plain line",
    }


def test_json_formatter_keeps_tracebacks_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("egressgw", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_series_whose_labels_are_known_are_exported_at_zero_from_the_start() -> None:
    # A dashboard panel on a healthy gateway shows 0, not "No data".
    from egressgw.dns.interceptor import OUTCOMES
    from egressgw.dns.upstream import Upstream

    Upstream([("192.0.2.53", 53), ("2001:db8::53", 5353)], timeout_s=1.0)
    Env()
    exposition = generate_latest(REGISTRY).decode()
    for upstream in ("192.0.2.53:53", "[2001:db8::53]:5353"):
        assert f'egressgw_dns_upstream_errors_total{{upstream="{upstream}"}}' in exposition
    for verdict, reason in OUTCOMES:
        assert f'egressgw_dns_queries_total{{reason="{reason}",verdict="{verdict}"}}' in exposition
    for operation in ("add", "remove"):
        line = f'egressgw_datapath_elements_changed_total{{operation="{operation}"}}'
        assert line in exposition
    for unlabelled in ("egressgw_apply_retries_total", "egressgw_learned_revoked_total"):
        assert f"\n{unlabelled} " in exposition


def test_frozen_objects_are_counted_when_scraped() -> None:
    gc.freeze()
    try:
        # another thread (the test runner's own) may free a frozen object meanwhile: the count
        # read at the scrape lies between the counts just before and just after it
        before = gc.get_freeze_count()
        scraped = REGISTRY.get_sample_value("egressgw_gc_frozen_objects")
        after = gc.get_freeze_count()
        assert scraped is not None and after > 0
        assert min(before, after) <= scraped <= max(before, after)
    finally:
        gc.unfreeze()
    assert REGISTRY.get_sample_value("egressgw_gc_frozen_objects") == 0


def test_a_scrape_reports_the_datapaths_figures_per_namespace_of_the_plan() -> None:
    from egressgw.datapath.kernel import Traffic
    from egressgw.identity import IdentityRegistry
    from egressgw.plan import build
    from egressgw.policy.load import Problem
    from tests.unit.test_dns_interceptor import DEFAULT_POLICIES, snapshot

    state = snapshot(*DEFAULT_POLICIES)
    plan = build(state, IdentityRegistry())
    api, etl = plan.desired.workloads[API], plan.desired.workloads[ETL]
    held = frozenset({ipaddress.ip_address("198.51.100.10")})
    problems = [Problem("bad.yaml", "EgressPolicy", "payments", "x", "spec", "no rules")]
    report = metrics.gateway_report(
        "gw-a",
        plan,
        state,
        held,
        lambda: problems,
        lambda: {api: 3, etl: 1, 999: 7},  # 999: an identity the plan no longer has
        lambda: {api: Traffic(10, 1000, 2, 120), 999: Traffic(5, 5, 5, 5)},
    )
    assert report.learned_elements == {"analytics": 1, "payments": 3}
    assert report.traffic == {api: ("payments", metrics.TrafficSample(10, 1000, 2, 120))}
    assert sorted((e.gateway, e.address, e.held) for e in report.egress_ips) == [
        ("analytics", "198.51.100.20", False),
        ("payments", "198.51.100.10", True),
    ]
    assert report.invalid_objects == {("EgressPolicy", "payments"): 1}
    # before anything is adopted the kernel's counters are not read; before a plan, nothing
    unadopted = metrics.gateway_report("gw-a", plan, state, held, list, dict, None)
    assert unadopted.traffic == {}
    assert metrics.gateway_report("gw-a", None, None, held, list, dict, None).policies == {}
