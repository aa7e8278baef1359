"""Every Prometheus metric egressgw exports, defined in one place.

Workload labels are limited to ``namespace``: never a pod, a DNS name or an address.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from egressgw import __version__

CounterChild = Counter  # what ``Counter.labels(...)`` returns

BUILD = Info("egressgw_build", "Build information")
BUILD.info({"version": __version__})

RECONCILE_SECONDS = Histogram(
    "egressgw_reconcile_duration_seconds",
    "Time to apply one desired state to the datapath",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "egressgw_reconcile_errors_total", "Reconciles the kernel or the system refused"
)
DATAPATH_CHANGES = Counter(
    "egressgw_datapath_elements_changed_total", "Set elements written or removed", ["operation"]
)
WORKLOADS = Gauge("egressgw_workloads", "Workload addresses leaving through this gateway")
IDENTITIES = Gauge("egressgw_identities", "Workload identities known to the datapath")
EGRESS_IPS_HELD = Gauge("egressgw_egress_ips_held", "Egress IPs this node holds on its uplink")
INVALID_MANIFESTS = Gauge(
    "egressgw_invalid_manifest_problems", "Problems in manifests currently ignored"
)
PLAN_NOTES = Gauge("egressgw_plan_conflicts", "Conflicts noted in the last plan")

DNS_QUERIES = Counter(
    "egressgw_dns_queries_total", "DNS queries by verdict and reason", ["verdict", "reason"]
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
