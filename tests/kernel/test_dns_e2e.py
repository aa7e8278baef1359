"""End to end: the DNS interceptor in the lab, against the real upstreams.

Pods ask the cluster DNS (their resolv.conf names it); a selected pod's query travels with the rest
of its traffic to the gateway node that holds its project's egress IPs, whose interceptor answers
it from the address the pod asked (payments' on gateway-1, analytics' on gateway-2) and forwards
what it allows to the cluster DNS, which forwards the rest to the external dnsmasq. The evidence
is what the pods get back, what the servers behind the gateway saw, the cluster DNS's and
dnsmasq's query logs, the gateways' logs and metrics, and the kernel's sets. One lab with the
lab's default daemons serves most tests; a second lab, whose daemons each test starts with its own
arguments (dead upstreams, short TTLs), serves the rest. Each test takes names no other test asks
for (``_fresh``), so the interceptor's answer cache and the kernel's learned elements never make
one test depend on another, except where a test says it must run before another (the CNAME test
before the demo's rows).
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from egressgw.lab import Lab, Verdict
from egressgw.lab.demo import NAME_ROWS, format_failures, format_table, run_checks
from egressgw.lab.dnsquery import DnsResult
from egressgw.lab.lab import url
from egressgw.lab.services import daemon_available
from egressgw.lab.topology import (
    ANALYTICS_GATEWAY,
    CLUSTER_DNS_V4,
    CLUSTER_DNS_V6,
    DNS_BLACKHOLE_V4,
    DNS_BLACKHOLE_V6,
    DNS_DEAD_V4,
    DNS_DEAD_V6,
    DNS_V4,
    EGRESS_IPS,
    MANY_NAME,
    ORIGIN_V4,
    ORIGIN_V6,
    RACE_DOMAIN,
    RACE_LOOP_COUNT,
    RACE_NAME_COUNT,
    SHORT_NAME,
    SHORT_TTL_SECONDS,
    SHORT_V4,
    SHORT_V6,
    TEST_PORT,
    WEB_V4,
    gateway_of,
    many_addresses,
    race_address,
    race_name,
)
from tests.conftest import require, require_kernel, unique_name

pytestmark = pytest.mark.kernel

PAYMENTS = "payments/api-0"
ANALYTICS = "analytics/etl-0"
SANDBOX = "sandbox/shell-0"
PAY_V4, PAY_V6 = EGRESS_IPS["payments"]
# payments' gateway node: its interceptor listens on its node addresses
PAYMENTS_GW = gateway_of("payments")
PER_NAME_CAP = 64  # the daemon's default --max-addresses-per-name

# Race names after the first RACE_LOOP_COUNT, handed out one by one.
_spare = itertools.count(RACE_LOOP_COUNT)


def _fresh() -> int:
    """The index of a race name no test has asked for yet."""
    index = next(_spare)
    assert index < RACE_NAME_COUNT, "out of spare race names: raise RACE_NAME_COUNT"
    return index


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab with the lab's own daemon (the interceptor as ``lab up`` runs it)."""
    require_kernel()
    require(daemon_available(), "`python -m egressgw run` is not available")
    with Lab.up(unique_name("egt")) as built:
        yield built


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    """A lab whose daemon each test starts with its own arguments (see ``daemon_with``)."""
    require_kernel()
    require(daemon_available(), "`python -m egressgw run` is not available")
    with Lab.up(unique_name("egt"), start_daemon=False) as built:
        yield built


@contextmanager
def daemon_with(lab: Lab, args: Sequence[str]) -> Iterator[Lab]:
    """The daemon with ``args`` (``--upstream`` replaces the lab's upstreams), stopped after."""
    lab.start_daemon(list(args))
    try:
        yield lab
    finally:
        lab.stop_daemon()


def _connect(lab: Lab, pod: str, address: str, port: int = TEST_PORT) -> Verdict:
    return lab.http(pod, url(address, port), timeout_s=3).verdict


def _wait_for_dns_log(lab: Lab, text: str, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in lab.dns_log():
            return True
        time.sleep(0.05)
    return False


def _asked(log: str, name: str) -> list[str]:
    """The lines of a dnsmasq query log where ``name`` was asked (any type). Other lines may
    name it too: the external namespace's own servers look their addresses up (PTR) at start."""
    return re.findall(rf"^.*query\[\w+\] {re.escape(name)} from .*$", log, re.MULTILINE)


def _metric(lab: Lab, name: str, **labels: str) -> float:
    """The sum of the samples of metric ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in lab.daemon_metrics().items():
        sample, _, rest = key.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if sample == name and labels.items() <= found.items():
            total += value
    return total


# --- the main lab -----------------------------------------------------------------------------


def test_resolve_then_connect_2000_times_in_a_row_without_a_failure(lab: Lab) -> None:
    # Control: an address of the race zone that nobody resolved is closed, so every iteration
    # below connects only because its own answer was programmed before it was released.
    unresolved = race_address(_fresh())
    assert _connect(lab, PAYMENTS, unresolved) is Verdict.REJECTED_AT_GATEWAY
    failures_before = _metric(lab, "egressgw_dns_programming_failures_total")

    report = lab.resolve_connect(
        PAYMENTS,
        "r{}." + RACE_DOMAIN,
        RACE_LOOP_COUNT,
        TEST_PORT,
        family=6,
        budget_s=50,
        expect_source=PAY_V6,
    )
    print("\nresolve-then-connect:", report.describe())
    assert report.failed == 0 and report.succeeded == RACE_LOOP_COUNT, report.describe()
    assert _metric(lab, "egressgw_dns_programming_failures_total") == failures_before
    assert lab.daemon_healthy()


def test_a_name_allowed_for_one_project_is_nxdomain_for_the_other(lab: Lab) -> None:
    index = _fresh()
    name, address = race_name(index), race_address(index)
    # analytics' queries are answered, and its decisions logged, by its own gateway node
    offset = lab.daemon_log_offset(node=ANALYTICS_GATEWAY)

    learned = lab.dns_query(PAYMENTS, name, "AAAA")
    assert learned.rcode == "NOERROR" and learned.addresses == (address,), learned
    other = lab.dns_query(ANALYTICS, name, "AAAA")
    assert other.rcode == "NXDOMAIN" and not other.answers, other
    line = lab.wait_for_daemon_log(
        f"identity={ANALYTICS} name={name} type=AAAA", since=offset, node=ANALYTICS_GATEWAY
    )
    assert "verdict=deny" in line, line

    # The address payments learned opens nothing for analytics, and still opens for payments.
    assert _connect(lab, ANALYTICS, address) is Verdict.REJECTED_AT_GATEWAY
    outcome = lab.http(PAYMENTS, url(address, TEST_PORT))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == PAY_V6, outcome

    # The same over IPv4 with the web server's name (allowed for payments only).
    assert lab.dns_query(PAYMENTS, "web.lab.example").addresses == (WEB_V4,)
    assert lab.dns_query(ANALYTICS, "web.lab.example").rcode == "NXDOMAIN"
    http_before = lab.http_log()
    assert _connect(lab, ANALYTICS, WEB_V4, 80) is Verdict.REJECTED_AT_GATEWAY
    assert lab.http_log() == http_before, "the web server must never see analytics"


def test_a_denied_name_is_answered_at_the_gateway_and_never_reaches_the_upstream(
    lab: Lab,
) -> None:
    allowed = race_name(_fresh())
    # A name that could carry data out, unique to this run; no policy allows it.
    exfiltration = f"x{uuid.uuid4().hex}.exfil.lab.example"
    offset = lab.daemon_log_offset()

    for tcp in (False, True):
        for name in (exfiltration, "blocked.lab.example"):
            denied = lab.dns_query(PAYMENTS, name, tcp=tcp)
            assert denied.rcode == "NXDOMAIN" and not denied.answers, (name, tcp, denied)
            assert denied.elapsed_ms < 500, denied
    assert lab.dns_query(PAYMENTS, allowed, "AAAA").rcode == "NOERROR"

    # The cluster DNS (the gateway's upstream) and dnsmasq behind it log every query they
    # receive: the allowed one arrives, the denied ones never do.
    assert _wait_for_dns_log(lab, f"query[AAAA] {allowed} from"), "the allowed name never arrived"
    assert f"query[AAAA] {allowed} from" in lab.cluster_dns_log()
    for log in (lab.cluster_dns_log(), lab.dns_log()):
        assert exfiltration not in log
        assert _asked(log, "blocked.lab.example") == []
    line = lab.wait_for_daemon_log(f"name={exfiltration} type=A verdict=deny", since=offset)
    assert f"identity={PAYMENTS}" in line and 'reason="' in line, line


def test_a_cname_chain_opens_the_target_address(lab: Lab) -> None:
    # Runs before the demo's rows, which resolve the alias too: origin is still closed here.
    assert _connect(lab, PAYMENTS, ORIGIN_V4, 80) is Verdict.REJECTED_AT_GATEWAY
    # The policy names the alias, not its target: the target asked directly is denied.
    assert lab.dns_query(PAYMENTS, "origin.lab.example").rcode == "NXDOMAIN"

    answer = lab.dns_query(PAYMENTS, "alias.lab.example")
    assert answer.rcode == "NOERROR", answer
    assert [(t, d) for _n, t, _ttl, d in answer.answers] == [
        ("CNAME", "origin.lab.example"),
        ("A", ORIGIN_V4),
    ]
    outcome = lab.http(PAYMENTS, url(ORIGIN_V4, 80))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == PAY_V4, outcome

    answer6 = lab.dns_query(PAYMENTS, "alias.lab.example", "AAAA", server=CLUSTER_DNS_V6)
    assert answer6.addresses == (ORIGIN_V6,), answer6
    outcome = lab.http(PAYMENTS, url(ORIGIN_V6, 80))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == PAY_V6, outcome


def test_aaaa_over_ipv6_end_to_end(lab: Lab) -> None:
    index = _fresh()
    # The query itself travels over IPv6 (to the cluster DNS's IPv6 address, answered by the
    # gateway's interceptor from there).
    answer = lab.dns_query(PAYMENTS, race_name(index), "AAAA", server=CLUSTER_DNS_V6)
    assert answer.server == CLUSTER_DNS_V6
    assert answer.rcode == "NOERROR" and answer.addresses == (race_address(index),), answer
    outcome = lab.http(PAYMENTS, url(race_address(index), TEST_PORT))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == PAY_V6, outcome


@pytest.mark.parametrize("server", [CLUSTER_DNS_V4, CLUSTER_DNS_V6], ids=["v4", "v6"])
def test_queries_over_tcp(lab: Lab, server: str) -> None:
    index = _fresh()
    answer = lab.dns_query(PAYMENTS, race_name(index), "AAAA", server=server, tcp=True)
    assert answer.rcode == "NOERROR" and answer.addresses == (race_address(index),), answer
    outcome = lab.http(PAYMENTS, url(race_address(index), TEST_PORT))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == PAY_V6, outcome

    denied = lab.dns_query(PAYMENTS, "blocked.lab.example", server=server, tcp=True)
    assert denied.rcode == "NXDOMAIN", denied


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
def test_an_unknown_source_is_refused_and_an_unselected_pod_asks_the_cluster_dns(
    lab: Lab, family: int
) -> None:
    # A node is no workload: the gateway's interceptor, asked at its node address, refuses it.
    interceptor = PAYMENTS_GW.ipv4 if family == 4 else PAYMENTS_GW.ipv6
    for tcp in (False, True):
        unknown = lab.dns_query("worker-1", "web.lab.example", server=interceptor, tcp=tcp)
        assert unknown.rcode == "REFUSED" and not unknown.answers, (tcp, unknown)
    # No gateway selects sandbox: its DNS is not intercepted and the cluster DNS answers it.
    cluster_dns = CLUSTER_DNS_V4 if family == 4 else CLUSTER_DNS_V6
    for tcp in (False, True):
        answer = lab.dns_query(SANDBOX, "web.lab.example", server=cluster_dns, tcp=tcp)
        assert answer.rcode == "NOERROR" and answer.addresses == (WEB_V4,), (tcp, answer)


def test_an_answer_over_the_per_name_cap_is_cut_and_the_daemon_stays_healthy(lab: Lab) -> None:
    offset = lab.daemon_log_offset()
    answer = lab.dns_query(PAYMENTS, MANY_NAME, "AAAA", tcp=True)
    assert answer.rcode == "NOERROR", answer
    assert len(answer.addresses) == PER_NAME_CAP, answer.summary()
    everything = set(many_addresses())
    assert set(answer.addresses) <= everything
    line = lab.wait_for_daemon_log(f"{MANY_NAME} answered", since=offset)
    assert f"answered {len(everything)} addresses" in line, line
    assert f"{len(everything) - PER_NAME_CAP} dropped by the per-name cap of {PER_NAME_CAP}" in line
    assert _metric(lab, "egressgw_dns_cap_hits_total", namespace="payments", cap="name") >= 1

    # Over UDP the capped answer fits an EDNS0 buffer; without EDNS0 the client is sent to TCP.
    assert len(lab.dns_query(PAYMENTS, MANY_NAME, "AAAA", edns=4096).addresses) == PER_NAME_CAP
    assert lab.dns_query(PAYMENTS, MANY_NAME, "AAAA").truncated

    # What was released opens; what the cap dropped stays closed.
    kept = answer.addresses[0]
    dropped = sorted(everything - set(answer.addresses))[0]
    outcome = lab.http(PAYMENTS, url(kept, TEST_PORT))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == PAY_V6, outcome
    assert _connect(lab, PAYMENTS, dropped) is Verdict.REJECTED_AT_GATEWAY

    assert lab.daemon_healthy()
    index = _fresh()
    assert lab.dns_query(PAYMENTS, race_name(index), "AAAA").addresses == (race_address(index),)


def test_the_demo_name_rows_hold(lab: Lab) -> None:
    results = run_checks(lab, NAME_ROWS)
    assert len(results) == 14
    assert all(r.ok for r in results), (
        "\n" + format_table(results) + "\n" + format_failures(results)
    )
    assert _asked(lab.dns_log(), "blocked.lab.example") == []


# --- the lab whose daemon each test starts with its own arguments ----------------------------


def _timed_answers(lab: Lab, count: int, timeout_s: float = 5.0) -> list[DnsResult]:
    """``count`` queries for fresh names from payments, one after the other."""
    return [
        lab.dns_query(PAYMENTS, race_name(_fresh()), "AAAA", timeout_s=timeout_s)
        for _ in range(count)
    ]


def _ms(results: Sequence[DnsResult]) -> list[float]:
    return [round(r.elapsed_ms, 1) for r in results]


def test_a_dead_first_upstream_fails_over_at_once(bare_lab: Lab) -> None:
    # Nothing listens on port 53 of the dead address: ICMP port unreachable comes back at once.
    # Linux sends at most about six of those in a burst, so only a few queries are timed here.
    args = ["--upstream", f"{DNS_DEAD_V4}:53", "--upstream", f"{DNS_V4}:53"]
    with daemon_with(bare_lab, args) as lab:
        results = _timed_answers(lab, 3)
        print(f"\ndead first upstream: answers after {_ms(results)} ms")
        assert all(r.rcode == "NOERROR" and r.addresses for r in results), results
        assert all(r.elapsed_ms < 250 for r in results), _ms(results)
        # after its first failure the dead upstream is asked after the live one for a while
        errors = _metric(lab, "egressgw_dns_upstream_errors_total", upstream=f"{DNS_DEAD_V4}:53")
        assert errors == 1


def test_a_blackhole_first_upstream_fails_over_after_the_timeout(bare_lab: Lab) -> None:
    timeout_ms = 300
    args = ["--upstream", f"{DNS_BLACKHOLE_V4}:53", "--upstream", f"{DNS_V4}:53"]
    args += ["--upstream-timeout-ms", str(timeout_ms)]
    with daemon_with(bare_lab, args) as lab:
        results = _timed_answers(lab, 3)
        print(f"\nblackhole first upstream ({timeout_ms} ms): answers after {_ms(results)} ms")
        assert all(r.rcode == "NOERROR" and r.addresses for r in results), results
        # the first query waits out the blackhole once; then it is asked last and costs nothing
        first, *later = results
        assert timeout_ms <= first.elapsed_ms < timeout_ms + 250, _ms(results)
        assert all(r.elapsed_ms < 250 for r in later), _ms(results)


@pytest.mark.parametrize(
    ("upstreams", "timeout_ms", "within_ms"),
    [
        # first query: each waited out in turn (both per-try timeouts); once both have failed,
        # only one is probed, so later queries get SERVFAIL within a single timeout
        ((DNS_BLACKHOLE_V4, DNS_BLACKHOLE_V6), 300, ((600, 850), (300, 550))),
        # each refuses at once: SERVFAIL long before a single timeout
        ((DNS_DEAD_V4, DNS_DEAD_V6), 1000, ((0, 250), (0, 250))),
    ],
    ids=["blackholes", "dead"],
)
def test_all_upstreams_dead_gives_servfail_within_the_timeout(
    bare_lab: Lab,
    upstreams: tuple[str, str],
    timeout_ms: int,
    within_ms: tuple[tuple[int, int], tuple[int, int]],
) -> None:
    args = ["--upstream-timeout-ms", str(timeout_ms)]
    for address in upstreams:
        args += ["--upstream", f"[{address}]:53" if ":" in address else f"{address}:53"]
    with daemon_with(bare_lab, args) as lab:
        offset = lab.daemon_log_offset()
        index = _fresh()
        results = [lab.dns_query(PAYMENTS, race_name(index), "AAAA", timeout_s=5) for _ in range(2)]
        print(f"\nall upstreams {upstreams} down: SERVFAIL after {_ms(results)} ms")
        assert all(r.rcode == "SERVFAIL" and not r.answers for r in results), results
        for result, (low, high) in zip(results, within_ms, strict=True):
            assert low <= result.elapsed_ms < high, _ms(results)
        line = lab.wait_for_daemon_log("every upstream failed", since=offset)
        assert race_name(index) in line, line
        # A SERVFAIL programs nothing.
        assert race_address(index) not in lab.nft_list()
        assert lab.daemon_healthy()


def test_an_element_expires_after_ttl_plus_grace_while_an_established_flow_lives_on(
    bare_lab: Lab,
) -> None:
    grace_s, margin_s = 1, 1.0
    args = ["--min-ttl", "1", "--grace", str(grace_s)]
    with daemon_with(bare_lab, args) as lab:
        for qtype, address in (("A", SHORT_V4), ("AAAA", SHORT_V6)):
            answer = lab.dns_query(PAYMENTS, SHORT_NAME, qtype)
            assert answer.addresses == (address,), answer
            assert answer.ttls(qtype) == [SHORT_TTL_SECONDS], answer  # released as the server said
        # Both answers are in hand, so both elements were programmed before this instant. Their
        # timeout is the released TTL + grace, plus at most the one second by which a cached
        # answer's TTL can still be released later (it counts down in whole seconds).
        resolved_at = time.monotonic()
        family_sets = lab.exec("gw", ["nft", "list", "set", "inet", "egressgw", "allow4"]).stdout
        found = re.search(
            rf"{re.escape(SHORT_V4)} \. tcp \. {TEST_PORT} timeout (\d+)s", family_sets
        )
        assert found is not None, family_sets
        timeout_s = int(found.group(1))
        assert SHORT_TTL_SECONDS + grace_s <= timeout_s <= SHORT_TTL_SECONDS + grace_s + 1
        with (
            lab.http_keepalive(PAYMENTS, host=SHORT_V4, port=TEST_PORT) as held4,
            lab.http_keepalive(PAYMENTS, host=SHORT_V6, port=TEST_PORT) as held6,
        ):
            first = {4: held4.first(), 6: held6.first()}
            assert first[4]["ok"] and first[4]["source"] == PAY_V4, first
            assert first[6]["ok"] and first[6]["source"] == PAY_V6, first
            expired_at = resolved_at + timeout_s + margin_s
            time.sleep(max(0.0, expired_at - time.monotonic()))

            # A new flow to the expired address is rejected; nobody asked the name again.
            assert _connect(lab, PAYMENTS, SHORT_V4) is Verdict.REJECTED_AT_GATEWAY
            assert _connect(lab, PAYMENTS, SHORT_V6) is Verdict.REJECTED_AT_GATEWAY
            assert SHORT_V4 not in lab.nft_list() and SHORT_V6 not in lab.nft_list()
            # The flows opened while it was allowed go on, on the same connections.
            for held, family in ((held4, 4), (held6, 6)):
                again = held.again()
                assert again["ok"] and again["local_port"] == first[family]["local_port"], again
        elapsed = time.monotonic() - resolved_at
        print(f"\nTTL {SHORT_TTL_SECONDS}s + grace {grace_s}s: closed at {elapsed:.1f}s")
