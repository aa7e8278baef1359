"""Every Prometheus metric egressgw exports, defined in one place.

Workload labels are limited to ``namespace``: never a pod, a DNS name or an address.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from egressgw import __version__

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
