"""What every pod should be able to reach, on which path, and the checks that find out.

In: a lab that is up with egressgw ready on its nodes. Out: one ``CheckResult`` per row of the
tables of expected outcomes the demo and the end-to-end tests share, and printable tables:

- ``EXPECTED``: both gateway nodes up. Pods of both projects on both workers, the unselected pods,
  and pod-to-pod traffic between the workers;
- ``FAILOVER``: the gateway node that holds payments' egress IPs is down. Payments fails closed,
  analytics and the unselected pods carry on;
- ``RECOVERED``: that node is back.

Each check asks the cluster DNS address for the destination's name from the pod first, as an
application would (A for IPv4 rows over IPv4, AAAA for IPv6 rows over IPv6): a selected pod's
gateway answers it, an unselected pod's query reaches the cluster DNS itself. It compares the
answer (addresses, or NXDOMAIN / no answer) with the row. Then it connects to the lab's address
for that name whatever DNS said, so a datapath that lets through what DNS denied still shows up. A
row may first have another pod resolve the same name ("primed by"), so that an address learned for
one project is shown to open nothing for another. The evidence is the source address the server
reports, the node router's per-pod counters (a selected pod's packet there left without its
gateway) and the external network's counters of untranslated pod addresses. Every probe is bounded
in time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from egressgw.lab.dnsquery import DnsResult
from egressgw.lab.lab import Lab, url
from egressgw.lab.netns import LabError
from egressgw.lab.probes import Outcome, Verdict
from egressgw.lab.topology import (
    BLOCKED_V4,
    BLOCKED_V6,
    CDN_V4,
    CDN_V6,
    CLUSTER_DNS_V4,
    CLUSTER_DNS_V6,
    DB_V4,
    DB_V6,
    EGRESS_IPS,
    GATEWAYS,
    ORIGIN_V4,
    ORIGIN_V6,
    PAYMENTS_GATEWAY,
    POD_HTTP_PORT,
    PODS,
    POSTGRES_PORT,
    ROUTER_V4,
    ROUTER_V6,
    WEB_V4,
    WEB_V6,
    gateway_of,
    pod_by_key,
)

POSTGRES = "postgres"
HTTP = "http"

# What a row expects from DNS: the lab's address for the name, a response code, or no answer.
ANSWER = "answer"
NXDOMAIN = "NXDOMAIN"
REFUSED = "REFUSED"
NO_ANSWER = "no answer"  # a timeout, SERVFAIL, or the query refused on its way
_NO_ANSWER_RCODES = frozenset({"TIMEOUT", "SERVFAIL", "ERROR"})

# Traffic that must never leave: rejected, or dropped (a timeout) with nothing arriving outside
# (checked by the router's and the external network's counters).
NEVER_LEAVES = frozenset({Verdict.REJECTED_AT_GATEWAY, Verdict.TIMEOUT})

# Whose address the server must see, besides a project's egress IP.
ROUTER = "router"  # the node router's: ordinary node egress
SELF = "self"  # the client pod's own: cluster-internal traffic


@dataclass(frozen=True)
class Destination:
    """A name the pods ask for and the lab's address for it, per family."""

    name: str
    service: str  # POSTGRES or HTTP
    v4: str
    v6: str
    by_name_only: bool  # no policy allows its address as a CIDR: only an answer opens it
    cname: str | None = None  # the name the answer's chain leads to, if the name is an alias

    def address(self, family: int) -> str:
        return self.v4 if family == 4 else self.v6


DB = Destination("db.lab.example", POSTGRES, DB_V4, DB_V6, by_name_only=False)
WEB = Destination("web.lab.example", HTTP, WEB_V4, WEB_V6, by_name_only=True)
CDN = Destination("www.cdn.lab.example", HTTP, CDN_V4, CDN_V6, by_name_only=True)
ALIAS = Destination(
    "alias.lab.example", HTTP, ORIGIN_V4, ORIGIN_V6, by_name_only=True, cname="origin.lab.example"
)
BLOCKED = Destination("blocked.lab.example", HTTP, BLOCKED_V4, BLOCKED_V6, by_name_only=True)


def pod_destination(key: str) -> Destination:
    """An unselected pod's echo server, by its name in the cluster DNS."""
    pod = pod_by_key(key)
    return Destination(pod.dns_name, HTTP, pod.ipv4, pod.ipv6, by_name_only=False)


SHELL_0 = pod_destination("sandbox/shell-0")
SHELL_1 = pod_destination("sandbox/shell-1")

PHASE_UP = "both gateway nodes up"
PHASE_DOWN = f"{PAYMENTS_GATEWAY} (payments' egress IPs) down"
PHASE_BACK = f"{PAYMENTS_GATEWAY} back"


@dataclass(frozen=True)
class Expectation:
    pod: str  # "namespace/name"
    target: Destination
    port: int
    family: int  # 4 or 6
    dns: str  # ANSWER, NXDOMAIN, REFUSED or NO_ANSWER
    verdicts: frozenset[Verdict]
    source: str | None  # the source address the server must report, if any
    why: str
    primed_by: str | None = None  # a pod that resolves the name first
    via_router: bool = False  # the node router is this row's normal path
    phase: str = PHASE_UP

    @property
    def project(self) -> str:
        return pod_by_key(self.pod).namespace

    @property
    def node(self) -> str:
        return pod_by_key(self.pod).node

    @property
    def service(self) -> str:
        return self.target.service

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def address(self) -> str:
        return self.target.address(self.family)

    @property
    def qtype(self) -> str:
        return "A" if self.family == 4 else "AAAA"

    @property
    def by_name(self) -> bool:
        """Whether the row's outcome rests on the DNS interceptor (a name-only destination)."""
        return self.target.by_name_only

    @property
    def destination(self) -> str:
        client = "psql" if self.service == POSTGRES else "curl"
        return f"{self.name}:{self.port} IPv{self.family} ({client})"

    def expected_dns_text(self) -> str:
        return self.address if self.dns == ANSWER else self.dns

    def expected_text(self) -> str:
        text = " or ".join(sorted(str(v) for v in self.verdicts))
        return f"{text} from {self.source}" if self.source else text

    def dns_matches(self, result: DnsResult | None) -> bool:
        if result is None:
            return False
        if self.dns == NO_ANSWER:
            return result.rcode in _NO_ANSWER_RCODES
        if self.dns != ANSWER:
            return result.rcode == self.dns
        return result.rcode == "NOERROR" and result.addresses == (self.address,)

    def matches(self, outcome: Outcome) -> bool:
        if outcome.verdict not in self.verdicts:
            return False
        return self.source is None or outcome.source == self.source


def _source(kind: str | None, pod: str, family: int) -> str | None:
    if kind is None:
        return None
    if kind == ROUTER:
        return ROUTER_V4 if family == 4 else ROUTER_V6
    if kind == SELF:
        return pod_by_key(pod).address(family)
    v4, v6 = EGRESS_IPS[kind]
    return v4 if family == 4 else v6


Row = tuple[str, Destination, int, str, frozenset[Verdict], str | None, str | None, str]

CONNECTED = frozenset({Verdict.CONNECTED})
REFUSED_BY_SERVER = frozenset({Verdict.REFUSED_BY_SERVER})
REJECTED = frozenset({Verdict.REJECTED_AT_GATEWAY})
PAYMENTS_0, PAYMENTS_1 = "payments/api-0", "payments/api-1"
ANALYTICS_0, ANALYTICS_1 = "analytics/etl-0", "analytics/etl-1"
SANDBOX_0, SANDBOX_1 = "sandbox/shell-0", "sandbox/shell-1"

# pod, destination, port, DNS, verdicts, whose address the server must see (a project: its egress
# IP; ROUTER; SELF; None: no source), the pod that resolves the name first, why
_UP: tuple[Row, ...] = (
    (
        PAYMENTS_0,
        DB,
        POSTGRES_PORT,
        ANSWER,
        CONNECTED,
        "payments",
        None,
        "policy allows db:5432 and pg_hba allowlists payments' egress IP",
    ),
    (
        PAYMENTS_1,
        DB,
        POSTGRES_PORT,
        ANSWER,
        CONNECTED,
        "payments",
        None,
        "the other worker's payments pod leaves through the same gateway node, with the same IP",
    ),
    (
        ANALYTICS_0,
        DB,
        POSTGRES_PORT,
        ANSWER,
        REFUSED_BY_SERVER,
        "analytics",
        None,
        "analytics leaves through its own gateway node with its IP, which pg_hba does not list",
    ),
    (
        ANALYTICS_1,
        DB,
        POSTGRES_PORT,
        ANSWER,
        REFUSED_BY_SERVER,
        "analytics",
        None,
        "the same from the other worker",
    ),
    (
        PAYMENTS_0,
        WEB,
        80,
        ANSWER,
        CONNECTED,
        "payments",
        None,
        "policy allows web.lab.example:80 by name only: the answer opened its address",
    ),
    (
        PAYMENTS_1,
        WEB,
        8080,
        ANSWER,
        REJECTED,
        None,
        None,
        "the name is allowed, but no policy allows port 8080",
    ),
    (
        ANALYTICS_1,
        WEB,
        80,
        NXDOMAIN,
        REJECTED,
        None,
        PAYMENTS_1,
        "no analytics policy names web; the address payments learned opens nothing for analytics",
    ),
    (
        PAYMENTS_1,
        CDN,
        80,
        ANSWER,
        CONNECTED,
        "payments",
        None,
        "the pattern *.cdn.lab.example matches",
    ),
    (
        PAYMENTS_0,
        ALIAS,
        80,
        ANSWER,
        CONNECTED,
        "payments",
        None,
        "alias is a CNAME to origin.lab.example: the chain is followed and its address opened",
    ),
    (
        PAYMENTS_0,
        BLOCKED,
        80,
        NXDOMAIN,
        REJECTED,
        None,
        None,
        "no policy names blocked.lab.example: answered at the gateway, never forwarded",
    ),
    (
        SANDBOX_0,
        WEB,
        80,
        ANSWER,
        CONNECTED,
        ROUTER,
        None,
        "no EgressGateway selects sandbox: untouched, it leaves as the node through the router",
    ),
    (
        SANDBOX_1,
        DB,
        POSTGRES_PORT,
        ANSWER,
        REFUSED_BY_SERVER,
        ROUTER,
        None,
        "untouched: it reaches the database as the node router, which pg_hba does not list",
    ),
    (
        PAYMENTS_0,
        SHELL_1,
        POD_HTTP_PORT,
        ANSWER,
        CONNECTED,
        SELF,
        None,
        "pod to pod across the workers is cluster-internal: not steered, its source kept",
    ),
    (
        ANALYTICS_1,
        SHELL_0,
        POD_HTTP_PORT,
        ANSWER,
        CONNECTED,
        SELF,
        None,
        "the same the other way round",
    ),
)
_DOWN: tuple[Row, ...] = (
    (
        PAYMENTS_0,
        DB,
        POSTGRES_PORT,
        NO_ANSWER,
        NEVER_LEAVES,
        None,
        None,
        "payments' gateway node is down: its traffic is dropped, never sent out as the node",
    ),
    (
        PAYMENTS_1,
        WEB,
        80,
        NO_ANSWER,
        NEVER_LEAVES,
        None,
        None,
        "the same on the other worker: fail closed",
    ),
    (
        ANALYTICS_0,
        DB,
        POSTGRES_PORT,
        ANSWER,
        REFUSED_BY_SERVER,
        "analytics",
        None,
        "analytics' gateway node is up: unaffected",
    ),
    (
        ANALYTICS_1,
        DB,
        POSTGRES_PORT,
        ANSWER,
        REFUSED_BY_SERVER,
        "analytics",
        None,
        "unaffected on the other worker too",
    ),
    (
        SANDBOX_0,
        WEB,
        80,
        ANSWER,
        CONNECTED,
        ROUTER,
        None,
        "unselected traffic never depended on a gateway",
    ),
)
_BACK: tuple[Row, ...] = (
    (PAYMENTS_0, DB, POSTGRES_PORT, ANSWER, CONNECTED, "payments", None,
     "the node is back with payments' egress IPs"),
    (PAYMENTS_1, WEB, 80, ANSWER, CONNECTED, "payments", None,
     "and answers the DNS of the pods steered to it again"),
)  # fmt: skip


def _expand(rows: tuple[Row, ...], phase: str) -> tuple[Expectation, ...]:
    return tuple(
        Expectation(
            pod=pod,
            target=target,
            port=port,
            family=family,
            dns=dns,
            verdicts=verdicts,
            source=_source(kind, pod, family),
            why=why,
            primed_by=primed_by,
            via_router=kind == ROUTER,
            phase=phase,
        )
        for family in (4, 6)
        for pod, target, port, dns, verdicts, kind, primed_by, why in rows
    )


EXPECTED: tuple[Expectation, ...] = _expand(_UP, PHASE_UP)
FAILOVER: tuple[Expectation, ...] = _expand(_DOWN, PHASE_DOWN)
RECOVERED: tuple[Expectation, ...] = _expand(_BACK, PHASE_BACK)
# The rows whose outcome rests on the DNS interceptor: names that only an answer opens.
NAME_ROWS: tuple[Expectation, ...] = tuple(e for e in EXPECTED if e.by_name)


@dataclass(frozen=True)
class CheckResult:
    expectation: Expectation
    resolved: DnsResult | None  # what the pod got from the cluster DNS address (None: not asked)
    outcome: Outcome
    leaked: int  # packets that reached the external network with the pod's own address
    routed: int = 0  # packets the node router masqueraded for this pod
    primer: DnsResult | None = None  # what the priming pod got, if the row has one
    dns_checked: bool = True

    @property
    def dns_ok(self) -> bool:
        if not self.dns_checked:
            return True
        e = self.expectation
        if e.primed_by is not None and (self.primer is None or not self.primer.addresses):
            return False  # the row proves nothing unless the other pod really learned it
        return e.dns_matches(self.resolved)

    @property
    def path_ok(self) -> bool:
        """Nothing escaped untranslated, and nothing took the router that should not."""
        return self.leaked == 0 and (self.routed == 0 or self.expectation.via_router)

    @property
    def ok(self) -> bool:
        return self.path_ok and self.dns_ok and self.expectation.matches(self.outcome)

    def resolved_text(self) -> str:
        if self.resolved is None:
            return "-"
        text = self.resolved.summary()
        e = self.expectation
        if e.target.cname and any(t == "CNAME" for _n, t, _ttl, _d in self.resolved.answers):
            text = f"{text} (CNAME {e.target.cname})"
        if e.primed_by is not None and self.primer is not None:
            text = f"{text} ({pod_by_key(e.primed_by).namespace} got {self.primer.summary()})"
        return text


def _lookup(lab: Lab, pod: str, e: Expectation, timeout_s: float) -> DnsResult:
    server = CLUSTER_DNS_V4 if e.family == 4 else CLUSTER_DNS_V6
    try:
        return lab.dns_query(pod, e.name, e.qtype, server=server, timeout_s=timeout_s)
    except LabError as exc:
        return DnsResult("ERROR", error=str(exc))


def check(
    lab: Lab, expectation: Expectation, *, timeout_s: int = 3, resolve: bool = True
) -> CheckResult:
    """Resolve (after the priming pod, if any), then connect, from the pod; attribute packets
    that took the router or escaped to this check. ``resolve=False`` skips DNS (a lab without
    egressgw)."""
    e = expectation
    primer = resolved = None
    if resolve:
        if e.primed_by is not None:
            primer = _lookup(lab, e.primed_by, e, timeout_s)
        resolved = _lookup(lab, e.pod, e, timeout_s)
    counter = f"{e.pod} v{e.family}"
    leaked_before = lab.leaked_packets()[counter]
    routed_before = lab.routed_packets()[counter]
    if e.service == POSTGRES:
        outcome = lab.psql(e.pod, e.address, connect_timeout_s=timeout_s)
    else:
        outcome = lab.http(e.pod, url(e.address, e.port), timeout_s=timeout_s)
    leaked = lab.leaked_packets()[counter] - leaked_before
    routed = lab.routed_packets()[counter] - routed_before
    if leaked and outcome.verdict is not Verdict.CONNECTED:
        outcome = Outcome(Verdict.LEAKED, outcome.source, outcome.detail, outcome.elapsed_s)
    return CheckResult(e, resolved, outcome, leaked, routed, primer, dns_checked=resolve)


def run_checks(
    lab: Lab,
    expectations: Sequence[Expectation] = EXPECTED,
    *,
    timeout_s: int = 3,
    resolve: bool = True,
) -> list[CheckResult]:
    """Run the checks, one pod's checks in sequence (so the counters attribute cleanly) and the
    pods side by side; results come back in the order of ``expectations``."""
    by_pod: dict[str, list[Expectation]] = {}
    for e in expectations:
        by_pod.setdefault(e.pod, []).append(e)

    def run_pod(items: list[Expectation]) -> list[CheckResult]:
        return [check(lab, e, timeout_s=timeout_s, resolve=resolve) for e in items]

    with ThreadPoolExecutor(max_workers=max(1, len(by_pod))) as pool:
        per_pod = dict(zip(by_pod, pool.map(run_pod, by_pod.values()), strict=True))
    done = {id(r.expectation): r for results in per_pod.values() for r in results}
    return [done[id(e)] for e in expectations]


def describe_source(address: str | None) -> str:
    """``198.51.100.10 (payments egress IP)``: an address with whose it is."""
    if not address:
        return "-"
    for project, addresses in EGRESS_IPS.items():
        if address in addresses:
            return f"{address} ({project} egress IP)"
    if address in (ROUTER_V4, ROUTER_V6):
        return f"{address} (node router)"
    for gateway in GATEWAYS:
        if address in (gateway.uplink_v4, gateway.uplink_v6):
            return f"{address} ({gateway.name})"
    for pod in PODS:
        if address in (pod.ipv4, pod.ipv6):
            return f"{address} ({pod.name} itself)"
    return address


def format_table(results: Sequence[CheckResult]) -> str:
    header = (
        "node", "pod", "destination", "resolved", "verdict", "source seen by server", "check",
    )  # fmt: skip
    rows = [header]
    for r in results:
        e = r.expectation
        if r.ok:
            mark = "ok"
        elif not r.dns_ok:
            mark = f"MISMATCH: expected DNS {e.expected_dns_text()}"
            if not e.matches(r.outcome) or not r.path_ok:
                mark += f" and {e.expected_text()}"
        else:
            mark = f"MISMATCH: expected {e.expected_text()}"
        if r.routed and not e.via_router:
            mark += f" ({r.routed} packets through the node router)"
        rows.append(
            (e.node, e.pod, e.destination, r.resolved_text(), str(r.outcome.verdict),
             describe_source(r.outcome.source), mark)
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        if index == 0:
            lines.append("  ".join("-" * width for width in widths).rstrip())
    return "\n".join(lines)


def format_failures(results: Sequence[CheckResult]) -> str:
    """Details for every row that did not match: what the client said, what DNS returned."""
    lines = []
    for r in results:
        if r.ok:
            continue
        e = r.expectation
        dns = "not asked"
        if r.resolved is not None:
            dns = r.resolved.summary()
            if r.resolved.error:
                dns += f" ({r.resolved.error})"
        primer = ""
        if e.primed_by is not None:
            got = r.primer.summary() if r.primer else "not asked"
            primer = f"; {e.primed_by} resolved it first: {got}"
        lines.append(
            f"- [{e.phase}] {e.pod} on {e.node} -> {e.destination}: {r.outcome}"
            f" (DNS: {dns}, expected {e.expected_dns_text()}{primer}; leaked packets: {r.leaked};"
            f" through the node router: {r.routed}; expected {e.expected_text()} because {e.why})"
        )
    return "\n".join(lines)


def run_demo(
    lab: Lab, emit: Callable[[str], None], *, bring_back: bool = True
) -> list[CheckResult]:
    """The demo: every row with both gateway nodes up; then the payments gateway node goes down
    (its egressgw killed, the node unplugged) and the failover rows; then, with ``bring_back``,
    the node comes back and the recovery rows. ``emit`` prints; returns every result."""
    results = run_checks(lab, EXPECTED)
    emit(f"== {PHASE_UP}")
    emit(format_table(results))
    payments_gateway = gateway_of("payments")
    emit(
        f"\n== {PHASE_DOWN}: egressgw on {payments_gateway.name} killed, the node unplugged from"
        " the node network and the external network"
    )
    lab.take_node_down(payments_gateway.name)
    try:
        down = run_checks(lab, FAILOVER, timeout_s=2)
        emit(format_table(down))
        results += down
    finally:
        if bring_back:
            ready_s = lab.bring_node_up(payments_gateway.name)
            emit(f"\n== {PHASE_BACK}: plugged in, egressgw ready {ready_s:.1f}s after its start")
    if bring_back:
        back = run_checks(lab, RECOVERED)
        emit(format_table(back))
        results += back
    return results
