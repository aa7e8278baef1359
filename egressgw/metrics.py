"""Every Prometheus metric egressgw exports, defined in one place.

In: updates from the daemon, the DNS interceptor, the agent, and (on each scrape) a
``GatewayReport`` that the runtime assembles from the kernel or an ``AgentReport`` that the agent
assembles from the plan in force. Out: the default ``prometheus_client`` registry.

Workload labels are limited to ``namespace``: never a pod, a DNS name or an address, so the
number of series grows with namespaces, not with traffic. The only addresses in labels are
egress IPs, which the platform admin lists in EgressGateways (a handful per gateway), and the
configured upstream resolvers; gateway and node names are the admin's too, a handful each. This
module imports nothing of egressgw but the version, so every layer may use it.

Kernel-derived values (learned elements, traffic counters, egress IP holders, policy counts) are
produced by ``GatewayCollector`` at scrape time rather than copied into gauges by a background
task: the kernel counters are the truth and are already cumulative, so reading them when
Prometheus asks gives exact values with no second copy to drift and no timer to tune, and they
are exposed as real counters so ``rate()`` works. ``TrafficTotals`` keeps each namespace's sums
monotonic when an identity (and its kernel counter) goes away or its number is reused.
Counters carry no ``_created`` series.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from egressgw import __version__

if TYPE_CHECKING:  # metrics is imported by the layers below these: types only
    from egressgw.datapath.kernel import Traffic
    from egressgw.identity import IPAddress
    from egressgw.plan import Plan
    from egressgw.policy.load import Problem
    from egressgw.policy.model import Snapshot

log = logging.getLogger("egressgw.metrics")

# no ``_created`` series beside each counter: nothing queries them, and per namespace they were
# a third of a big cluster's scrape (about 50,000 of 120,000 lines at 10,000 namespaces)
_disable_created: Callable[[], None] = disable_created_metrics  # the library's is unannotated
_disable_created()

CounterChild = Counter  # what ``Counter.labels(...)`` returns

BUILD = Info("egressgw_build", "Build information")
BUILD.info(
    {"version": __version__, "python_allocator": os.environ.get("PYTHONMALLOC") or "pymalloc"}
)

RECONCILE_SECONDS = Histogram(
    "egressgw_reconcile_duration_seconds",
    "Time to apply one desired state to the datapath",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "egressgw_reconcile_errors_total", "Reconciles the kernel or the system refused"
)
APPLY_RETRIES = Counter(
    "egressgw_apply_retries_total", "Failed applies of the desired state tried again"
)
LEARNED_REVOKED = Counter(
    "egressgw_learned_revoked_total",
    "Learned elements removed or narrowed because the plan in force no longer allows them",
)
DATAPATH_CHANGES = Counter(
    "egressgw_datapath_elements_changed_total", "Set elements written or removed", ["operation"]
)
for _operation in ("add", "remove"):  # known label values start at 0, not at "no data"
    DATAPATH_CHANGES.labels(_operation)
WORKLOADS = Gauge("egressgw_workloads", "Workload addresses leaving through this gateway")
IDENTITIES = Gauge("egressgw_identities", "Workload identities known to the datapath")
EGRESS_IPS_HELD = Gauge("egressgw_egress_ips_held", "Egress IPs this node holds on its uplink")
INVALID_MANIFESTS = Gauge(
    "egressgw_invalid_manifest_problems", "Problems in manifests currently ignored"
)
GC_FROZEN_OBJECTS = Gauge(
    "egressgw_gc_frozen_objects",
    "Objects moved out of the collector's way; growing with every apply means a leak",
)
# counted when scraped: gc.get_freeze_count walks every frozen object (39 ms for 3 million),
# too much to do every second on the event loop
GC_FROZEN_OBJECTS.set_function(gc.get_freeze_count)
PLAN_NOTES = Gauge("egressgw_plan_conflicts", "Conflicts noted in the last plan")

DNS_QUERIES = Counter(
    "egressgw_dns_queries_total", "DNS queries by verdict and reason", ["verdict", "reason"]
)
DNS_DROPPED_REPLIES = Counter(
    "egressgw_dns_dropped_replies_total", "UDP answers dropped because the socket buffer was full"
)
DNS_CACHE = Counter("egressgw_dns_cache_total", "Answer cache look-ups", ["result"])
DNS_UPSTREAM_SECONDS = Histogram(
    "egressgw_dns_upstream_duration_seconds",
    "Time for an upstream to answer",
    ["upstream"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DNS_UPSTREAM_ERRORS = Counter(
    "egressgw_dns_upstream_errors_total", "Upstream tries that failed or timed out", ["upstream"]
)
DNS_UPSTREAM_DEMOTIONS = Counter(
    "egressgw_dns_upstream_demotions_total",
    "Times an upstream was demoted (asked after the others for a while), by the evidence: "
    "unreachable (an ICMP error), timeouts (several names in a row), probe (a failed probe)",
    ["upstream", "reason"],
)
DNS_UPSTREAM_PROBES = Counter(
    "egressgw_dns_upstream_probes_total",
    "Health probes of an upstream whose query timed out with no answer since, by result",
    ["upstream", "result"],
)
DNS_TCP_CONNECTIONS = Gauge("egressgw_dns_tcp_connections", "Open DNS-over-TCP connections")
DNS_TCP_CLOSED = Counter(
    "egressgw_dns_tcp_closed_total",
    "DNS-over-TCP connections the gateway closed, by reason: source limit (the source already "
    "had the most connections allowed), write timeout (the client did not take a reply in "
    "time), idle (nothing asked for the idle timeout)",
    ["reason"],
)
DNS_TCP_CLOSE_REASONS = ("source limit", "write timeout", "idle")
for _reason in DNS_TCP_CLOSE_REASONS:
    DNS_TCP_CLOSED.labels(_reason)
DNS_TCP_PIPELINE_FULL = Counter(
    "egressgw_dns_tcp_pipeline_full_total",
    "Times a DNS-over-TCP connection had the most queries in flight allowed, so its next "
    "query was read only once one was answered",
)
DNS_PROGRAM_SECONDS = Histogram(
    "egressgw_dns_programming_duration_seconds",
    "Time to program an answer's addresses into the datapath",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25),
)
DNS_PROGRAM_FAILURES = Counter(
    "egressgw_dns_programming_failures_total",
    "Answers withheld (SERVFAIL) because programming failed or exceeded its bound",
)
DNS_CAP_HITS = Counter(
    "egressgw_dns_cap_hits_total",
    "Address caps hit (per name: records dropped; per identity: oldest evicted)",
    ["namespace", "cap"],
)
DNS_DENIALS = Counter(
    "egressgw_dns_denials_total",
    "DNS queries denied by policy or refused (unknown source: namespace empty), by namespace",
    ["namespace"],
)
DNS_REMEMBERED = Gauge(
    "egressgw_dns_remembered",
    "What the DNS path holds in memory, by kind: answers (the answer cache), replies (ready "
    "replies to repeated queries), programmed (answers known to be programmed per identity), "
    "learned (addresses counted against the per-identity cap), sources (rate-limited sources), "
    "decisions (names decided per identity, kept while they are asked); "
    "updated when expired entries are dropped",
    ["kind"],
)
REMEMBERED_KINDS = ("answers", "replies", "programmed", "learned", "sources", "decisions")
DNS_ADDRESS_CAPS = Gauge(
    "egressgw_dns_address_cap",
    "Configured address caps (per name: records kept per answer; per identity: learned addresses)",
    ["cap"],
)


TUNNEL_POD_ADDRESSES = Gauge(
    "egressgw_tunnel_pod_addresses",
    "Pod addresses this gateway node accepts from the tunnel (each only from its own node)",
)
TUNNEL_PEERS = Gauge(
    "egressgw_tunnel_peers", "Worker nodes whose pods this gateway node serves through the tunnel"
)

AGENT_APPLY_SECONDS = Histogram(
    "egressgw_agent_apply_duration_seconds",
    "Time to apply one changed steering plan on a worker node",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
AGENT_APPLIES = Counter(
    "egressgw_agent_applies_total",
    "Changed steering plans applied on this worker node (an unchanged plan is not applied)",
)
AGENT_APPLY_ERRORS = Counter(
    "egressgw_agent_apply_errors_total",
    "Steering plans the kernel or the system refused; the previous one stays in force and the "
    "apply is tried again with backoff",
)


# -- scrape-time values from the kernel and the last plan ---------------------------------------


class TrafficSample(NamedTuple):
    """Cumulative kernel counters of one identity (packets and bytes toward the uplink).

    A tuple: a scrape makes one per identity, and per namespace, tens of thousands of them.
    """

    accepted_packets: int = 0
    accepted_bytes: int = 0
    rejected_packets: int = 0
    rejected_bytes: int = 0

    def values(self) -> tuple[int, int, int, int]:
        return (
            self.accepted_packets,
            self.accepted_bytes,
            self.rejected_packets,
            self.rejected_bytes,
        )


def _went_back(now: TrafficSample, before: TrafficSample) -> bool:
    """Whether any of an identity's counters is lower than at the last scrape (restarted)."""
    return now[0] < before[0] or now[1] < before[1] or now[2] < before[2] or now[3] < before[3]


@dataclass(frozen=True)
class EgressIPState:
    gateway: str
    address: str
    held: bool


@dataclass
class GatewayReport:
    """What the runtime knows at scrape time. Keys are namespaces unless said otherwise."""

    node: str = ""
    learned_elements: Mapping[str, int] = field(default_factory=dict)
    traffic: Mapping[int, tuple[str, TrafficSample]] = field(default_factory=dict)  # identity ->
    egress_ips: Iterable[EgressIPState] = ()
    policies: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (namespace, mode) ->
    invalid_objects: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (kind, ns) ->


def gateway_report(
    node: str,
    plan: Plan | None,
    snapshot: Snapshot | None,
    held: frozenset[IPAddress],
    problems: Callable[[], Sequence[Problem]],
    learned_by_identity: Callable[[], Mapping[int, int]],
    counters: Callable[[], Mapping[int, Traffic]] | None,
) -> GatewayReport:
    """What a scrape shows of the gateway: learned elements and traffic per namespace (from
    the datapath's per-identity figures, read now; ``counters`` None while nothing is adopted),
    each egress IP and whether this node holds it, policies per namespace and mode, and the
    objects the source found invalid. Nothing until the first plan."""
    report = GatewayReport(node=node)
    if plan is None or snapshot is None:
        return report
    namespace_of = {i: c.rsplit("/", 1)[0] for i, c in plan.desired.identities.items()}
    namespace_of.update({i: s.pod.namespace for i, s in plan.selections.items()})
    learned: dict[str, int] = dict.fromkeys(sorted(set(namespace_of.values())), 0)
    for identity, count in learned_by_identity().items():
        namespace = namespace_of.get(identity)
        if namespace is not None:
            learned[namespace] += count
    report.learned_elements = learned
    if counters is not None:
        report.traffic = {
            identity: (
                namespace_of[identity],
                TrafficSample(
                    t.accepted_packets, t.accepted_bytes, t.rejected_packets, t.rejected_bytes
                ),
            )
            for identity, t in counters().items()
            if identity in namespace_of
        }
    report.egress_ips = [
        EgressIPState(g.name, str(a), a in held) for g in snapshot.gateways for a in g.egress_ips
    ]
    policies: dict[tuple[str, str], int] = {}
    for policy in snapshot.policies:
        key = (policy.namespace, str(policy.mode))
        policies[key] = policies.get(key, 0) + 1
    report.policies = policies
    invalid: dict[tuple[str, str], int] = {}
    for problem in problems():
        key = (problem.kind if problem.kind != "?" else "unknown", problem.namespace or "")
        invalid[key] = invalid.get(key, 0) + 1
    report.invalid_objects = invalid
    return report


class TrafficTotals:
    """Per-namespace sums of per-identity kernel counters that never go backwards.

    When an identity disappears, or its counter restarts (the identity was removed and its
    number reused), what it had counted is kept in its namespace's ``retired`` sum.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[str, TrafficSample]] = {}
        self._retired: dict[str, tuple[int, int, int, int]] = {}

    def _retire(self, namespace: str, sample: TrafficSample) -> None:
        old = self._retired.get(namespace, (0, 0, 0, 0))
        self._retired[namespace] = (
            old[0] + sample[0],
            old[1] + sample[1],
            old[2] + sample[2],
            old[3] + sample[3],
        )

    def update(self, current: Mapping[int, tuple[str, TrafficSample]]) -> dict[str, TrafficSample]:
        for identity, (namespace, sample) in self._last.items():
            now = current.get(identity)
            if now is None or now[0] != namespace or _went_back(now[1], sample):
                self._retire(namespace, sample)
        self._last = dict(current)
        sums: dict[str, tuple[int, int, int, int]] = dict(self._retired)
        for namespace, sample in current.values():
            total = sums.get(namespace)
            sums[namespace] = (
                sample.values()
                if total is None
                else (
                    total[0] + sample[0],
                    total[1] + sample[1],
                    total[2] + sample[2],
                    total[3] + sample[3],
                )
            )
        return {ns: TrafficSample(*v) for ns, v in sums.items()}


class GatewayCollector(Collector):
    """Produces the kernel-derived families on each scrape from a bound report function."""

    def __init__(self) -> None:
        self._report: Callable[[], GatewayReport] | None = None
        self._totals = TrafficTotals()

    def bind(self, report: Callable[[], GatewayReport]) -> None:
        self._report = report
        self._totals = TrafficTotals()

    def unbind(self) -> None:
        self._report = None

    def describe(self) -> Iterable[object]:
        return []  # families depend on the bound daemon; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self._report is None:
            return
        try:
            report = self._report()
        except Exception:  # a scrape never fails because the kernel could not be read
            log.exception("could not read the gateway's state for /metrics")
            return
        yield from self.families(report)

    def families(self, report: GatewayReport) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        elements = GaugeMetricFamily(
            "egressgw_allowed_elements",
            "Destinations learned from DNS answers and allowed in the kernel, per namespace",
            labels=["namespace"],
        )
        elements.samples = [
            Sample("egressgw_allowed_elements", {"namespace": namespace}, count)
            for namespace, count in sorted(report.learned_elements.items())
        ]
        yield elements

        totals = self._totals.update(report.traffic)
        packets = CounterMetricFamily(
            "egressgw_traffic_packets",
            "Packets from workloads toward the uplink, by namespace and verdict (kernel counters)",
            labels=["namespace", "verdict"],
        )
        octets = CounterMetricFamily(
            "egressgw_traffic_bytes",
            "Bytes from workloads toward the uplink, by namespace and verdict (kernel counters)",
            labels=["namespace", "verdict"],
        )
        # samples made directly rather than by add_metric: 40,000 of them at 10,000 namespaces
        packets_total, bytes_total = f"{packets.name}_total", f"{octets.name}_total"
        for namespace, sample in sorted(totals.items()):
            accepted = {"namespace": namespace, "verdict": "accepted"}
            rejected = {"namespace": namespace, "verdict": "rejected"}
            packets.samples.append(Sample(packets_total, accepted, sample.accepted_packets))
            packets.samples.append(Sample(packets_total, rejected, sample.rejected_packets))
            octets.samples.append(Sample(bytes_total, accepted, sample.accepted_bytes))
            octets.samples.append(Sample(bytes_total, rejected, sample.rejected_bytes))
        yield packets
        yield octets

        held = GaugeMetricFamily(
            "egressgw_egress_ip_held",
            "1 if this node holds the egress IP on its uplink, 0 if it does not",
            labels=["gateway", "egress_ip", "node"],
        )
        for ip in sorted(report.egress_ips, key=lambda i: (i.gateway, i.address)):
            held.add_metric([ip.gateway, ip.address, report.node], 1 if ip.held else 0)
        yield held

        policies = GaugeMetricFamily(
            "egressgw_policies",
            "Accepted EgressPolicies by namespace and mode",
            labels=["namespace", "mode"],
        )
        policies.samples = [
            Sample("egressgw_policies", {"namespace": namespace, "mode": mode}, count)
            for (namespace, mode), count in sorted(report.policies.items())
        ]
        yield policies

        invalid = GaugeMetricFamily(
            "egressgw_invalid_objects",
            "Objects left out of the desired state because they are invalid, by kind and "
            "namespace (empty for cluster-scoped objects and unreadable files)",
            labels=["kind", "namespace"],
        )
        for (kind, namespace), count in sorted(report.invalid_objects.items()):
            invalid.add_metric([kind, namespace], count)
        yield invalid


GATEWAY = GatewayCollector()
REGISTRY.register(GATEWAY)


@dataclass(frozen=True)
class NextHop:
    gateway: str
    family: int  # 4 or 6
    node: str  # the gateway node's name; its tunnel address when no Node has it


@dataclass
class AgentReport:
    """What the agent has in force at scrape time (empty until its first apply)."""

    steered: Mapping[str, int] = field(default_factory=dict)  # gateway -> pod addresses
    next_hops: Iterable[NextHop] = ()
    # (gateway, family) of steered addresses -> whether that traffic is dropped for want of a
    # reachable holder
    fail_closed: Mapping[tuple[str, int], bool] = field(default_factory=dict)
    dropped_packets: int | None = None  # kernel counter; None: not readable (no table yet)


class AgentCollector(Collector):
    """Produces the agent's steering families on each scrape from a bound report function."""

    def __init__(self) -> None:
        self._report: Callable[[], AgentReport] | None = None

    def bind(self, report: Callable[[], AgentReport]) -> None:
        self._report = report

    def unbind(self) -> None:
        self._report = None

    def describe(self) -> Iterable[object]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self._report is None:
            return
        try:
            report = self._report()
        except Exception:  # a scrape never fails because the agent's state could not be read
            log.exception("could not read the agent's state for /metrics")
            return
        yield from self.families(report)

    def families(self, report: AgentReport) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        steered = GaugeMetricFamily(
            "egressgw_agent_steered_addresses",
            "Addresses of pods on this node steered into the tunnel, by EgressGateway",
            labels=["gateway"],
        )
        for gateway, count in sorted(report.steered.items()):
            steered.add_metric([gateway], count)
        yield steered

        hops = GaugeMetricFamily(
            "egressgw_agent_next_hop_info",
            "The gateway node this node's pods of an EgressGateway are steered to, per address "
            "family (1 per series in force)",
            labels=["gateway", "family", "node"],
        )
        for hop in sorted(report.next_hops, key=lambda h: (h.gateway, h.family)):
            hops.add_metric([hop.gateway, f"IPv{hop.family}", hop.node], 1)
        yield hops

        closed = GaugeMetricFamily(
            "egressgw_agent_fail_closed",
            "1 while the external traffic of this node's pods of an EgressGateway, of one "
            "address family, is dropped because no reachable gateway node holds an egress IP "
            "of that family for it (none held, or the gateway lists none); 0 while it is steered",
            labels=["gateway", "family"],
        )
        for (gateway, family), dropped in sorted(report.fail_closed.items()):
            closed.add_metric([gateway, f"IPv{family}"], 1 if dropped else 0)
        yield closed

        if report.dropped_packets is not None:
            yield CounterMetricFamily(
                "egressgw_agent_dropped_packets",
                "Packets of steered pods this node dropped because their gateway had no "
                "reachable gateway node for their family (kernel counter, since the agent's "
                "table was made)",
                value=report.dropped_packets,
            )


AGENT = AgentCollector()
REGISTRY.register(AGENT)
