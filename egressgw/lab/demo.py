"""What every pod should be able to reach, and the checks that find out.

In: a lab that is up with its daemon ready. Out: one ``CheckResult`` per row of ``EXPECTED`` (the
single table of expected outcomes the demo and the end-to-end tests share) and a printable table.
Each check resolves the destination's name from the pod first (as an application would, so FQDN
policies see the query), then connects to the lab's address for that name whatever DNS said, so a
datapath that lets through what DNS denied still shows up. Every probe is bounded in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from egressgw.lab.lab import Lab
from egressgw.lab.probes import Outcome, Verdict
from egressgw.lab.topology import (
    DB_V4,
    DB_V6,
    EGRESS_IPS,
    POSTGRES_PORT,
    WEB_V4,
    WEB_V6,
    pod_by_key,
)

POSTGRES = "postgres"
HTTP = "http"
_SERVICE_NAMES = {POSTGRES: "db.lab.example", HTTP: "web.lab.example"}
_SERVICE_ADDRESSES = {
    (POSTGRES, 4): DB_V4,
    (POSTGRES, 6): DB_V6,
    (HTTP, 4): WEB_V4,
    (HTTP, 6): WEB_V6,
}

# Traffic of the unselected namespace must never leave the gateway: rejected there, or dropped
# (a timeout) with nothing arriving at the external network (checked by the leak counters).
NEVER_LEAVES = frozenset({Verdict.REJECTED_AT_GATEWAY, Verdict.TIMEOUT})


@dataclass(frozen=True)
class Expectation:
    pod: str  # "namespace/name"
    service: str  # POSTGRES or HTTP
    port: int
    family: int  # 4 or 6
    verdicts: frozenset[Verdict]
    source: str | None  # the source address the server must report, if any
    why: str

    @property
    def project(self) -> str:
        return pod_by_key(self.pod).namespace

    @property
    def name(self) -> str:
        return _SERVICE_NAMES[self.service]

    @property
    def address(self) -> str:
        return _SERVICE_ADDRESSES[(self.service, self.family)]

    @property
    def destination(self) -> str:
        client = "psql" if self.service == POSTGRES else "curl"
        return f"{self.name}:{self.port} IPv{self.family} ({client})"

    def expected_text(self) -> str:
        text = " or ".join(sorted(str(v) for v in self.verdicts))
        return f"{text} from {self.source}" if self.source else text

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
    # pod, service, port, verdicts, whose egress IP the server must see (None: no source), why
    rows: tuple[tuple[str, str, int, frozenset[Verdict], str | None, str], ...] = (
        ("payments/api-0", POSTGRES, POSTGRES_PORT, connected, "payments",
         "policy allows db:5432 and pg_hba allowlists payments' egress IP"),
        ("analytics/etl-0", POSTGRES, POSTGRES_PORT, refused, "analytics",
         "the gateway lets it out with analytics' egress IP, which pg_hba does not list"),
        ("payments/api-0", HTTP, 80, connected, "payments", "policy allows web:80"),
        ("payments/api-0", HTTP, 8080, rejected, None, "no policy allows port 8080"),
        ("analytics/etl-0", HTTP, 80, rejected, None, "no analytics policy allows web"),
        ("sandbox/shell-0", POSTGRES, POSTGRES_PORT, NEVER_LEAVES, None,
         "no EgressGateway selects namespace sandbox"),
        ("sandbox/shell-0", HTTP, 80, NEVER_LEAVES, None,
         "no EgressGateway selects namespace sandbox"),
    )  # fmt: skip
    return tuple(
        Expectation(
            pod=pod,
            service=service,
            port=port,
            family=family,
            verdicts=verdicts,
            source=_egress_ip(project, family) if project else None,
            why=why,
        )
        for family in (4, 6)
        for pod, service, port, verdicts, project, why in rows
    )


EXPECTED: tuple[Expectation, ...] = _expand()


@dataclass(frozen=True)
class CheckResult:
    expectation: Expectation
    resolved: tuple[str, ...]  # what the pod's resolver returned for the name (may be empty)
    outcome: Outcome
    leaked: int  # packets that reached the external network with the pod's own address

    @property
    def ok(self) -> bool:
        return self.leaked == 0 and self.expectation.matches(self.outcome)


def check(lab: Lab, expectation: Expectation, *, timeout_s: int = 3) -> CheckResult:
    """Resolve, then connect, from the pod; attribute leaked packets to this check."""
    e = expectation
    resolved = tuple(lab.resolve(e.pod, e.name, e.family, timeout_s=timeout_s + 2))
    counter = f"{e.pod} v{e.family}"
    leaked_before = lab.leaked_packets()[counter]
    if e.service == POSTGRES:
        outcome = lab.psql(e.pod, e.address, connect_timeout_s=timeout_s)
    else:
        url = lab.web_url(e.family, e.port)
        outcome = lab.http(e.pod, url, timeout_s=timeout_s)
    leaked = lab.leaked_packets()[counter] - leaked_before
    if leaked and outcome.verdict is not Verdict.CONNECTED:
        outcome = Outcome(Verdict.LEAKED, outcome.source, outcome.detail, outcome.elapsed_s)
    return CheckResult(e, resolved, outcome, leaked)


def run_checks(
    lab: Lab, expectations: Sequence[Expectation] = EXPECTED, *, timeout_s: int = 3
) -> list[CheckResult]:
    """Run the checks, one pod's checks in sequence (so leak counters attribute cleanly) and the
    pods side by side; results come back in the order of ``expectations``."""
    by_pod: dict[str, list[Expectation]] = {}
    for e in expectations:
        by_pod.setdefault(e.pod, []).append(e)

    def run_pod(items: list[Expectation]) -> list[CheckResult]:
        return [check(lab, e, timeout_s=timeout_s) for e in items]

    with ThreadPoolExecutor(max_workers=max(1, len(by_pod))) as pool:
        per_pod = dict(zip(by_pod, pool.map(run_pod, by_pod.values()), strict=True))
    done = {id(r.expectation): r for results in per_pod.values() for r in results}
    return [done[id(e)] for e in expectations]


def format_table(results: Sequence[CheckResult]) -> str:
    header = ("project", "pod", "destination", "verdict", "source seen by server", "check")
    rows = [header]
    for r in results:
        e = r.expectation
        mark = "ok" if r.ok else f"MISMATCH: expected {e.expected_text()}"
        rows.append(
            (e.project, pod_by_key(e.pod).name, e.destination, str(r.outcome.verdict),
             r.outcome.source or "-", mark)
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
        lines.append(
            f"- {e.pod} -> {e.destination}: {r.outcome}"
            f" (resolved: {', '.join(r.resolved) or 'nothing'}; leaked packets: {r.leaked};"
            f" expected {e.expected_text()} because {e.why})"
        )
    return "\n".join(lines)
