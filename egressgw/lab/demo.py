"""What every pod should be able to reach, and the checks that find out.

In: a lab that is up with its daemon ready. Out: one ``CheckResult`` per row of ``EXPECTED`` (the
single table of expected outcomes the demo and the end-to-end tests share) and a printable table.
Each check asks the gateway's DNS interceptor for the destination's name from the pod first (as an
application would, so FQDN policies see the query; A for IPv4 rows, AAAA over IPv6 for IPv6 rows)
and compares the answer (addresses, or NXDOMAIN / REFUSED) with the row. Then it connects to the
lab's address for that name whatever DNS said, so a datapath that lets through what DNS denied
still shows up. A row may first have another pod resolve the same name ("primed by"), so that an
address learned for one project is shown to open nothing for another. Every probe is bounded in
time.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    DB_V4,
    DB_V6,
    EGRESS_IPS,
    ORIGIN_V4,
    ORIGIN_V6,
    POSTGRES_PORT,
    TRANSIT_GATEWAY_V4,
    TRANSIT_GATEWAY_V6,
    WEB_V4,
    WEB_V6,
    pod_by_key,
)

POSTGRES = "postgres"
HTTP = "http"

# What a row expects from DNS: the lab's address for the name, or a response code.
ANSWER = "answer"
NXDOMAIN = "NXDOMAIN"
REFUSED = "REFUSED"

# Traffic of the unselected namespace must never leave the gateway: rejected there, or dropped
# (a timeout) with nothing arriving at the external network (checked by the leak counters).
NEVER_LEAVES = frozenset({Verdict.REJECTED_AT_GATEWAY, Verdict.TIMEOUT})


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


@dataclass(frozen=True)
class Expectation:
    pod: str  # "namespace/name"
    target: Destination
    port: int
    family: int  # 4 or 6
    dns: str  # ANSWER, NXDOMAIN or REFUSED
    verdicts: frozenset[Verdict]
    source: str | None  # the source address the server must report, if any
    why: str
    primed_by: str | None = None  # a pod that resolves the name first

    @property
    def project(self) -> str:
        return pod_by_key(self.pod).namespace

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
        if self.dns != ANSWER:
            return result.rcode == self.dns
        return result.rcode == "NOERROR" and result.addresses == (self.address,)

    def matches(self, outcome: Outcome) -> bool:
        if outcome.verdict not in self.verdicts:
            return False
        return self.source is None or outcome.source == self.source


def _egress_ip(project: str, family: int) -> str:
    v4, v6 = EGRESS_IPS[project]
    return v4 if family == 4 else v6


def _expand() -> tuple[Expectation, ...]:
    connected = frozenset({Verdict.CONNECTED})
    refused = frozenset({Verdict.REFUSED_BY_SERVER})
    rejected = frozenset({Verdict.REJECTED_AT_GATEWAY})
    payments, analytics, sandbox = "payments/api-0", "analytics/etl-0", "sandbox/shell-0"
    # pod, destination, port, DNS, verdicts, whose egress IP the server must see (None: no
    # source), the pod that resolves the name first, why
    rows: tuple[
        tuple[str, Destination, int, str, frozenset[Verdict], str | None, str | None, str], ...
    ] = (
        (payments, DB, POSTGRES_PORT, ANSWER, connected, "payments", None,
         "policy allows db:5432 and pg_hba allowlists payments' egress IP"),
        (analytics, DB, POSTGRES_PORT, ANSWER, refused, "analytics", None,
         "the gateway lets it out with analytics' egress IP, which pg_hba does not list"),
        (payments, WEB, 80, ANSWER, connected, "payments", None,
         "policy allows web.lab.example:80 by name only: the answer opened its address"),
        (payments, WEB, 8080, ANSWER, rejected, None, None,
         "the name is allowed, but no policy allows port 8080"),
        (analytics, WEB, 80, NXDOMAIN, rejected, None, payments,
         "no analytics policy names web; the address payments learned opens nothing for analytics"),
        (payments, CDN, 80, ANSWER, connected, "payments", None,
         "the pattern *.cdn.lab.example matches"),
        (payments, ALIAS, 80, ANSWER, connected, "payments", None,
         "alias is a CNAME to origin.lab.example: the chain is followed and its address opened"),
        (payments, BLOCKED, 80, NXDOMAIN, rejected, None, None,
         "no policy names blocked.lab.example: answered at the gateway, never forwarded"),
        (sandbox, DB, POSTGRES_PORT, REFUSED, NEVER_LEAVES, None, None,
         "no EgressGateway selects namespace sandbox"),
        (sandbox, WEB, 80, REFUSED, NEVER_LEAVES, None, None,
         "no EgressGateway selects namespace sandbox"),
    )  # fmt: skip
    return tuple(
        Expectation(
            pod=pod,
            target=target,
            port=port,
            family=family,
            dns=dns,
            verdicts=verdicts,
            source=_egress_ip(project, family) if project else None,
            why=why,
            primed_by=primed_by,
        )
        for family in (4, 6)
        for pod, target, port, dns, verdicts, project, primed_by, why in rows
    )


EXPECTED: tuple[Expectation, ...] = _expand()
# The rows whose outcome rests on the DNS interceptor: names that only an answer opens.
NAME_ROWS: tuple[Expectation, ...] = tuple(e for e in EXPECTED if e.by_name)


@dataclass(frozen=True)
class CheckResult:
    expectation: Expectation
    resolved: DnsResult | None  # what the interceptor answered the pod (None: not asked)
    outcome: Outcome
    leaked: int  # packets that reached the external network with the pod's own address
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
    def ok(self) -> bool:
        return self.leaked == 0 and self.dns_ok and self.expectation.matches(self.outcome)

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
    server = TRANSIT_GATEWAY_V4 if e.family == 4 else TRANSIT_GATEWAY_V6
    try:
        return lab.dns_query(pod, e.name, e.qtype, server=server, timeout_s=timeout_s)
    except LabError as exc:
        return DnsResult("ERROR", error=str(exc))


def check(
    lab: Lab, expectation: Expectation, *, timeout_s: int = 3, resolve: bool = True
) -> CheckResult:
    """Resolve (after the priming pod, if any), then connect, from the pod; attribute leaked
    packets to this check. ``resolve=False`` skips DNS (a lab without the daemon)."""
    e = expectation
    primer = resolved = None
    if resolve:
        if e.primed_by is not None:
            primer = _lookup(lab, e.primed_by, e, timeout_s)
        resolved = _lookup(lab, e.pod, e, timeout_s)
    counter = f"{e.pod} v{e.family}"
    leaked_before = lab.leaked_packets()[counter]
    if e.service == POSTGRES:
        outcome = lab.psql(e.pod, e.address, connect_timeout_s=timeout_s)
    else:
        outcome = lab.http(e.pod, url(e.address, e.port), timeout_s=timeout_s)
    leaked = lab.leaked_packets()[counter] - leaked_before
    if leaked and outcome.verdict is not Verdict.CONNECTED:
        outcome = Outcome(Verdict.LEAKED, outcome.source, outcome.detail, outcome.elapsed_s)
    return CheckResult(e, resolved, outcome, leaked, primer, dns_checked=resolve)


def run_checks(
    lab: Lab,
    expectations: Sequence[Expectation] = EXPECTED,
    *,
    timeout_s: int = 3,
    resolve: bool = True,
) -> list[CheckResult]:
    """Run the checks, one pod's checks in sequence (so leak counters attribute cleanly) and the
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


def format_table(results: Sequence[CheckResult]) -> str:
    header = (
        "project", "pod", "destination", "resolved", "verdict", "source seen by server", "check",
    )  # fmt: skip
    rows = [header]
    for r in results:
        e = r.expectation
        if r.ok:
            mark = "ok"
        elif not r.dns_ok:
            mark = f"MISMATCH: expected DNS {e.expected_dns_text()}"
            if not e.matches(r.outcome) or r.leaked:
                mark += f" and {e.expected_text()}"
        else:
            mark = f"MISMATCH: expected {e.expected_text()}"
        rows.append(
            (e.project, pod_by_key(e.pod).name, e.destination, r.resolved_text(),
             str(r.outcome.verdict), r.outcome.source or "-", mark)
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
            f"- {e.pod} -> {e.destination}: {r.outcome}"
            f" (DNS: {dns}, expected {e.expected_dns_text()}{primer}; leaked packets: {r.leaked};"
            f" expected {e.expected_text()} because {e.why})"
        )
    return "\n".join(lines)
