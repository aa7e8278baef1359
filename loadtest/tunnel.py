"""Benchmark of a pod leaving through egressgw's tunnel against the same pod leaving through the
node router, each figure a ratio within the same run.

The lab (``egressgw.lab``, under a name of its own, ``egb-<8 hex>``): two workers running
``egressgw agent``, two gateway nodes running ``egressgw run --node-name``, a node router that
masquerades ordinary node egress, and the external network. The benchmark's server is
203.0.113.40, an address of its own on the external network. One pod (``--pod``, default
sandbox/shell-0 on worker-1) is measured both ways, the path switched between rounds:

- *tunnel*: its namespace labelled ``project: <--project>`` (payments), so that project's
  EgressGateway selects it: worker -> egressgw's VXLAN tunnel -> the gateway node holding the
  project's egress IP (gateway-1) -> policy -> SNAT to 198.51.100.10 -> the external network;
- *router*: the label removed: worker -> node router -> masquerade to 198.51.100.100.

A policy file of the benchmark (``EgressPolicy bench-tunnel`` in the pod's namespace) allows
the server on the two benchmark ports. After each switch the benchmark waits, bounded, until the
agent's kernel state (its ``steered4`` map) shows the pod in or out, then until a probe
connection reaches the server with the expected source address (counted in the external
network). Rounds alternate in pairs t r, r t, t r, ...; each round measures

1. new TCP connections/s from inside the pod (connect, send a byte, read the echo, close),
   with the CPU time of the client and server processes per connection;
2. iperf3 throughput, pod -> server, with the whole machine's CPU seconds per Gbit
   (/proc/stat: every namespace shares one kernel) and per TCP segment.

Clients, servers and iperf3 are pinned to CPU 0 by default (``--*-cpus``; "" for none): the
whole path runs on one CPU, and each rate is the inverse of its CPU cost. Split over two CPUs,
cross-CPU wakeups (on this VM an IPI is a VM exit) decided the rates more than the path did.

Targets: tunnel >= 0.8 x router for connections/s and for throughput (median of the pairs'
ratios). With ``perf``, a profile round per path (``--perf-rounds``): a connection window and
an iperf3 run under ``perf record -a -g``, set up as in the rounds, give the CPU per connection
and per TCP segment of the whole path and of the worker's hop for the pod's packets, by stage
(nft, conntrack, NAT, route lookups, VXLAN) and by function, and what the tunnel adds.

Run as root: ``python -m loadtest.tunnel [--json PATH]`` (about two minutes with the
defaults); loadtest/README.md explains the figures. Every loop is bounded in count and time; the
lab is removed afterwards, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from egressgw.datapath.agent import AGENT_TABLE
from egressgw.lab import Lab
from egressgw.lab.manifests import CLUSTER_FILE, cluster_objects, cluster_yaml
from egressgw.lab.topology import (
    EGRESS_IPS,
    ROUTER_V4,
    SERVICE_IFNAME,
    LabPod,
    gateway_of,
    pod_by_key,
    worker_of,
)
from loadtest.common import (
    commits_measured,
    cpu_ticks,
    finish,
    git_state,
    in_ns,
    median,
    notes_section,
    parser,
    preflight,
    progress,
    reap,
    run,
    table,
    verdict,
    version,
)
from loadtest.datapath import CpuMeter, Fleet, softirq_threads

SERVER_V4 = "203.0.113.40"
CPS_PORT, IPERF_PORT = 7000, 5201
PATHS = ("tunnel", "router")
TARGET = 0.8
POLICY_FILE = "bench-tunnel.yaml"
PROJECT_LABEL = "project"
PERF_HZ = 999
SWITCH_POLL_S = 0.02
UNITS = {"connections": "connection", "iperf3": "segment"}
UNIT_FORMAT = {"connections": (1e-3, "us", 2), "iperf3": (1.0, "ns", 0)}  # from ns per unit
SOFTIRQ_ENTRY = "handle_softirqs"  # where a chain's softirq work begins (outer frames interrupted)
NETWORK = "net_rx_action"
HOP_ENTRIES = ("process_backlog", "gro_cell_poll")  # a veth's backlog, a VXLAN device's GRO cell
# Only the workers' pod bridges pass bridged traffic to netfilter (as Kubernetes nodes do): a
# hop that runs br_nf_pre_routing is the worker's, for a packet from the pod.
WORKER_HOP = "br_nf_pre_routing"
IDLE = ("do_idle", "cpuidle_enter", "default_idle_call")
# The netfilter hooks an encapsulated packet passes on its way out (conntrack of the outer UDP
# flow, NAT hooks): samples of nf_hook_slow called below vxlan_xmit.
OUTER_NETFILTER = "of which: netfilter hooks on the outer packet"
# Functions whose inclusive time (up to the softirq entry) marks a piece of the path. They
# overlap: a NAT hook runs an nft chain; the gateway's SNAT runs inside its conntrack confirm.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("nft rulesets (nft_do_chain)", ("nft_do_chain",)),
    ("conntrack (nf_conntrack_in, confirm)", ("nf_conntrack_in", "__nf_conntrack_confirm")),
    ("NAT (nf_nat_inet_fn, nf_nat_ipv4_*)",
     ("nf_nat_inet_fn", "nf_nat_ipv4_fn", "nf_nat_ipv4_out", "nf_nat_ipv4_local_fn",
      "nf_nat_ipv4_pre_routing", "nf_nat_ipv4_local_in")),
    ("route lookups (fib_*)", ("fib_rules_lookup", "fib_table_lookup")),
    ("VXLAN encapsulation (vxlan_xmit)", ("vxlan_xmit",)),
    (OUTER_NETFILTER, ()),
    ("VXLAN decapsulation (vxlan_rcv)", ("vxlan_rcv",)),
    ("GSO segmentation (__skb_gso_segment)", ("__skb_gso_segment",)),
    ("TCP receive (tcp_v4_rcv)", ("tcp_v4_rcv",)),
)  # fmt: skip
# Where interrupts are enabled again. The cpu-clock's timer cannot interrupt a section with
# interrupts off, so its sample lands here: own time of the caller, not of the unlock.
IRQS_ON = ("_raw_spin_unlock_irqrestore", "_raw_spin_unlock_irq")
IRQS_OFF = " (irqs off)"
# Own time by kind of function; the first match wins, the rest is "other".
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("wakeups, timers, IPIs", re.compile(
        r"(\(irqs off\)$|^(native_write_msr|x2apic|__x2apic|smp_call|__smp_call|"
        r"generic_exec_single|try_to_wake_up|ttwu|__wake_up|schedule|__schedule|"
        r"finish_task_switch|hrtimer|__hrtimer|handle_softirqs|__irq_exit_rcu|sysvec_|"
        r"read_tsc|ktime_get|pv_native_safe_halt|lapic|clockevents))")),
    ("VXLAN / UDP tunnel", re.compile(r"(vxlan|udp_tunnel|iptunnel|gro_cell|^udp|^__udp|"
                                      r"skb_udp_tunnel)")),
    ("netfilter", re.compile(r"^(nf_|nft_|__nf|__nft|ipv4_conntrack|hash_conntrack|"
                             r"init_conntrack|resolve_normal_ct|nf_ct|tcp_in_window|"
                             r"tcp_packet|__nf_ct|nf_nat|__nf_nat|ipt_|xt_|ip_sabotage)")),
    ("bridge", re.compile(r"^(br_|__br_|nbp_|fdb_)")),
    ("routing", re.compile(r"^(fib|__fib|ip_route|ip_rt|rt_|dst_|__ip_route|ipv4_dst|"
                           r"ip_mkroute|l3mdev|ipv4_neigh|neigh_|__neigh)")),
    ("GSO / GRO", re.compile(r"(gso|gro|skb_segment)")),
    ("checksums", re.compile(r"csum")),
    ("copies", re.compile(r"(copy_to_iter|copy_from_iter|copy_user|memcpy|memmove|"
                          r"skb_copy_datagram|__check_object_size|__virt_addr_valid)")),
    ("TCP", re.compile(r"^(tcp_|__tcp_|inet_|__inet_|inet6_|sk_|__sk_|sock_|__sock_|"
                       r"release_sock|__release_sock|lock_sock|bbr_|minmax_)")),
    ("IP, veth, backlog", re.compile(r"^(ip_|__ip_|ipv4_|dev_|__dev_|netif_|__netif_|veth_|"
                                     r"process_backlog|net_rx_action|enqueue_to_backlog|"
                                     r"eth_|validate_xmit|__napi_poll|napi_|__napi|"
                                     r"__siphash|siphash|memcmp)")),
    ("locks, RCU", re.compile(r"(_raw_spin|queued_spin|__pv_queued|pv_queued|__rcu_read|"
                              r"^rcu_|^__rcu)")),
    ("skb / memory", re.compile(r"^(kmem_|kfree|__kmalloc|__alloc_skb|alloc_skb|skb_|"
                                r"__skb|__slab|slab|___slab|memset|build_skb|pskb_|__pskb|"
                                r"consume_skb|__kfree|page_|__page|__build_skb|"
                                r"get_netmem|put_netmem|__free_|free_|__memcg|"
                                r"__alloc_frozen|__call_rcu)")),
    ("syscalls, user space", re.compile(r"^(\[unknown\]|entry_SYSCALL|do_syscall|syscall_|"
                                        r"__x64_sys|do_sys_|fdget|vfs_|core_sys_select|"
                                        r"do_select|__select|read$|write$|__send|_Py|Py|"
                                        r"__libc|__GI_|[A-Za-z_]+@@GLIBC|__vdso)")),
)  # fmt: skip


# -- the pod, its two paths and the lab's manifests ----------------------------------------------
@dataclass(frozen=True)
class Subject:
    """The measured pod, the project whose EgressGateway selects it in tunnel rounds, and the
    addresses the server sees on each path."""

    pod: LabPod
    project: str

    @property
    def egress_ip(self) -> str:
        return EGRESS_IPS[self.project][0]

    def source(self, path: str) -> str:
        return self.egress_ip if path == "tunnel" else ROUTER_V4

    @property
    def gateway(self) -> str:
        return gateway_of(self.project).name

    @property
    def worker(self) -> str:
        return worker_of(self.pod).name


def policy_yaml(subject: Subject) -> str:
    """The benchmark's EgressPolicy: the server's address on both benchmark ports, for the pod's
    labels, in the pod's namespace."""
    labels = ", ".join(f"{k}: {v}" for k, v in sorted(subject.pod.labels.items()))
    return (
        "# Written by loadtest.tunnel: the benchmark's server, for the measured pod.\n"
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
        f"metadata: {{name: bench-tunnel, namespace: {subject.pod.namespace}}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{{labels}}}}}\n  mode: Enforce\n  egress:\n"
        f"    - action: Allow\n      to: [{{cidr: {SERVER_V4}/32}}]\n"
        f"      ports: [{{protocol: TCP, port: {CPS_PORT}}},"
        f" {{protocol: TCP, port: {IPERF_PORT}}}]\n"
    )


def cluster_text(subject: Subject, path: str) -> str:
    """The lab's cluster.yaml with the pod's namespace labelled for ``path``: ``project:
    <project>`` (tunnel) or no ``project`` label at all (router)."""
    objects = cluster_objects()
    for obj in objects:
        meta = obj["metadata"]
        if obj["kind"] == "Namespace" and meta["name"] == subject.pod.namespace:
            labels = {k: v for k, v in meta.get("labels", {}).items() if k != PROJECT_LABEL}
            if path == "tunnel":
                labels[PROJECT_LABEL] = subject.project
            meta["labels"] = labels
    return cluster_yaml(objects)


# -- measurements --------------------------------------------------------------------------------
@dataclass
class Switch:
    path: str
    agent_s: float  # cluster.yaml written -> the agent's steered4 map shows the switch
    ready_s: float  # cluster.yaml written -> a probe connection reached the server as expected
    probes: int


@dataclass
class Round:
    path: str
    pair: int
    switch: Switch
    cps: float
    connections: int
    errors: int
    cpu_us_per_connection: float  # client and server processes and ksoftirqd, per connection
    foreign_cpu: float  # share of all CPUs used by other processes during the connection window
    gbps: float
    retransmits: int
    mss: int
    segments: int  # TCP segments the pod sent during the iperf3 run (by MSS)
    cpu_s_per_gbit: float  # the whole machine's busy time over the iperf3 run, per Gbit received
    cpu_ns_per_segment: float
    machine_busy: float  # share of all CPUs busy during the iperf3 run
    router_packets: int  # the pod's packets the node router forwarded during the round


@dataclass
class Window:
    """What a workload did: its units (connections or TCP segments), its rate (connections/s
    or Gbit/s), its wall time, each CPU's (busy, all) ticks meanwhile, and its processes."""

    units: int
    rate: float
    wall_s: float
    ticks: dict[str, tuple[int, int]]
    pids: list[int]


@dataclass
class Tally:
    """Samples of one part of the work: in all, per function running itself, and per stage
    (samples inside one of the stage's functions)."""

    samples: int = 0
    own: dict[str, int] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)


@dataclass
class Profile:
    """One ``perf record -a -g`` of a workload from the pod, the path processed inline as in the
    rounds. *whole*: the samples of the workload's own processes and of every network softirq;
    *worker*: among them, the worker's hop for packets from the pod (the one hop through a bridge
    that passes traffic to netfilter: the worker's pod bridge)."""

    path: str
    workload: str
    units: int  # connections, or TCP segments the pod sent
    rate: float  # connections/s or Gbit/s
    wall_s: float
    busy_s: float  # /proc/stat: the machine's busy time over the workload
    whole: Tally
    worker: Tally
    other_tasks_per_s: float  # samples of other processes, left out


class PathError(RuntimeError):
    """The pod's traffic did not take the path the round is for."""


class TunnelBench:
    """The lab's pod, its client workers and the server's, and the switch between the paths."""

    def __init__(self, lab: Lab, subject: Subject, options: Options) -> None:
        self.lab, self.subject, self.o = lab, subject, options
        self.pod_ns = lab.netns_of(subject.pod.key)
        self.ext_ns = lab.netns_of("ext")
        self.worker_ns = lab.netns_of(subject.worker)
        self.fleet: Fleet | None = None
        self.softirq = softirq_threads()
        self.path: str | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The server's address on the external network, the policy file, and a wide port range
        in the pod (the client closes second, so TIME_WAIT stays on the server)."""
        run(["ip", "-n", self.ext_ns, "addr", "add", f"{SERVER_V4}/32", "dev", SERVICE_IFNAME])
        run(in_ns(self.pod_ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"))
        self.lab.write_manifest(POLICY_FILE, policy_yaml(self.subject))

    def __enter__(self) -> TunnelBench:
        o = self.o
        self.fleet = Fleet(
            (self.ext_ns, o.server_cpus, 1),
            (self.pod_ns, o.client_cpus, o.clients),
            SERVER_V4,
            CPS_PORT,
            600 + o.pairs * 2 * (o.cps_seconds + o.iperf_seconds + o.switch_timeout),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fleet is not None:
            self.fleet.stop()

    def worker_pids(self) -> list[int]:
        assert self.fleet is not None
        return self.fleet.pids()

    # -- switching paths --------------------------------------------------------------------------
    def steered(self) -> bool:
        """Whether the agent's kernel state steers the pod (its IPv4 address in steered4)."""
        argv = in_ns(self.worker_ns, "nft", "list", "map", "inet", AGENT_TABLE, "steered4")
        address = re.escape(self.subject.pod.ipv4)
        return re.search(rf"(^|[\s{{,]){address} :", run(argv).stdout) is not None

    def switch(self, path: str) -> Switch:
        """Relabel the pod's namespace for ``path``, wait (bounded) for the agent's kernel state,
        then for a probe connection that the server sees from the path's source address."""
        started = time.monotonic()
        deadline = started + self.o.switch_timeout
        self.lab.write_manifest(CLUSTER_FILE, cluster_text(self.subject, path))
        while self.steered() != (path == "tunnel"):
            if time.monotonic() > deadline:
                raise PathError(f"the agent's {AGENT_TABLE} steered4 did not switch to {path}"
                                f" within {self.o.switch_timeout:g} s")  # fmt: skip
            time.sleep(SWITCH_POLL_S)
        agent_s = time.monotonic() - started
        probes = 0
        while True:
            probes += 1
            ok, seen = self.probe(path)
            if ok:
                break
            if time.monotonic() > deadline:
                raise PathError(f"no probe connection took the {path} path within"
                                f" {self.o.switch_timeout:g} s (last: {seen})")  # fmt: skip
            time.sleep(0.1)
        self.path = path
        return Switch(path, agent_s, time.monotonic() - started, probes)

    def probe(self, path: str) -> tuple[bool, str]:
        """One connection, counted in the external network by source address: whether it got
        through and arrived only from ``path``'s source, and what was seen."""
        matches = [f"ip saddr {self.subject.source(p)} ip daddr {SERVER_V4} tcp dport {CPS_PORT}"
                   for p in PATHS]  # fmt: skip
        with self.lab.counting("ext", *matches) as read:
            assert self.fleet is not None
            client = self.fleet.clients[0]
            client.send({"seconds": 3.0, "max": 1, "reset": False})
            done = client.receive(timeout=30.0)
            counts = dict(zip(PATHS, read(), strict=True))
        other = PATHS[1] if path == PATHS[0] else PATHS[0]
        ok = done["connections"] == 1 and counts[path] > 0 and counts[other] == 0
        return ok, f"{done['connections']} connected, packets seen per path {counts}"

    def flush_conntrack(self) -> None:
        """Conntrack emptied on every node the pod's traffic crosses, so no round inherits the
        previous rounds' entries."""
        for where in (self.subject.worker, "router", self.subject.gateway):
            subprocess.run(in_ns(self.lab.netns_of(where), "conntrack", "-F"), check=False,
                           capture_output=True, timeout=30)  # fmt: skip

    def routed(self) -> int:
        return self.lab.routed_packets()[f"{self.subject.pod.key} v4"]

    # -- workloads --------------------------------------------------------------------------------
    def connections(self, seconds: float) -> tuple[float, int, int]:
        """(connections/s, connections, errors) of all clients together, bounded by ``seconds``
        and ``--cps-max`` attempts."""
        assert self.fleet is not None
        return self.fleet.connections(seconds, self.o.cps_max, reset=False)

    def connection_window(self) -> Window:
        ticks, t0 = cpu_ticks(), time.perf_counter()
        rate, count, _errors = self.connections(self.o.cps_seconds)
        wall = time.perf_counter() - t0
        return Window(count, rate, wall, ticks_since(ticks), self.worker_pids())

    def segments(self) -> int:
        """TCP segments sent from the pod's namespace so far (counted by MSS, not by GSO
        packet)."""
        text = run(in_ns(self.pod_ns, "cat", "/proc/net/snmp")).stdout
        rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
        return int(dict(zip(rows[0], rows[1], strict=True))["OutSegs"])

    def iperf(self, client_cpus: str, server_cpus: str) -> tuple[Window, dict[str, Any]]:
        """One iperf3 run from the pod to the server, ``--iperf-seconds`` long: the window
        (TCP segments of the pod, Gbit/s received) and iperf3's end report."""
        seconds = self.o.iperf_seconds
        server = subprocess.Popen(
            in_ns(self.ext_ns, "iperf3", "-s", "-1", "-B", SERVER_V4, "-p", str(IPERF_PORT),
                  cpu=server_cpus),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 10.0
            listening = in_ns(self.ext_ns, "ss", "-Hltn", f"sport = :{IPERF_PORT}")
            while not run(listening).stdout.strip():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"iperf3 does not listen on {IPERF_PORT} after 10 s")
                time.sleep(0.05)
            argv = ["iperf3", "-c", SERVER_V4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
            segments, ticks, t0 = self.segments(), cpu_ticks(), time.perf_counter()
            client = subprocess.Popen(in_ns(self.pod_ns, *argv, cpu=client_cpus),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)  # fmt: skip
            try:
                stdout, stderr = client.communicate(timeout=seconds + 30)
            finally:
                reap(client, 5.0)
            wall, busy = time.perf_counter() - t0, ticks_since(ticks)
            if client.returncode != 0:
                raise RuntimeError(f"iperf3 failed ({client.returncode}): {stderr or stdout}")
            segments = self.segments() - segments
        finally:
            reap(server, 10.0)
        report = json.loads(stdout)
        end = report["end"]
        gbps = float(end["sum_received"]["bits_per_second"]) / 1e9
        window = Window(segments, gbps, wall, busy, [client.pid, server.pid])
        return window, {
            "gbit": float(end["sum_received"]["bytes"]) * 8 / 1e9,
            "retransmits": int(end["sum_sent"].get("retransmits", 0)),
            "mss": int(report["start"].get("tcp_mss_default", 0)),
        }

    def round(self, path: str, pair: int) -> Round:
        o, tick = self.o, os.sysconf("SC_CLK_TCK")
        switch = self.switch(path)
        routed = self.routed()
        self.flush_conntrack()
        if o.warmup_seconds > 0:
            self.connections(o.warmup_seconds)
        self.flush_conntrack()
        meter = CpuMeter(self.worker_pids() + self.softirq)
        cps, count, errors = self.connections(o.cps_seconds)
        mine_ns, foreign = meter.stop()
        self.flush_conntrack()
        window, end = self.iperf(o.iperf_client_cpus, o.iperf_server_cpus)
        busy, ticks = window.ticks["cpu"]
        busy_s, gbit, segments = busy / tick, end["gbit"], window.units
        return Round(
            path, pair, switch, cps, count, errors, mine_ns / 1000 / max(1, count), foreign,
            window.rate, end["retransmits"], end["mss"], segments,
            busy_s / gbit if gbit else 0.0, busy_s * 1e9 / segments if segments else 0.0,
            busy / max(1, ticks), self.routed() - routed,
        )  # fmt: skip

    # -- profiles -------------------------------------------------------------------------------
    def profile(self, path: str) -> list[Profile]:
        """A connection window and an iperf3 run, each under perf, set up as in the rounds."""
        o = self.o
        if self.path != path:
            self.switch(path)
        self.flush_conntrack()
        samples, window = perf_window(o.cps_seconds, self.connection_window)
        connections = reduce(path, "connections", window, samples)
        self.flush_conntrack()
        client, server = o.iperf_client_cpus, o.iperf_server_cpus
        samples, (window, _) = perf_window(o.iperf_seconds, lambda: self.iperf(client, server))
        return [connections, reduce(path, "iperf3", window, samples)]


def ticks_since(before: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Each CPU line's (busy, all) ticks since ``before``."""
    now = cpu_ticks()
    return {cpu: (now[cpu][0] - before[cpu][0], now[cpu][1] - before[cpu][1]) for cpu in now}


Sample = tuple[int, int, tuple[str, ...]]  # (pid, CPU, functions from the sampled one outwards)
T = TypeVar("T")


def perf_window(seconds: float, body: Callable[[], T]) -> tuple[list[Sample], T]:
    """``perf record -a -g`` while ``body`` runs: ``body`` starts once perf has written its
    header, and perf stops when ``body`` returns (SIGINT), at the latest after ``seconds`` and a
    margin. The samples and ``body``'s result."""
    fd, data = tempfile.mkstemp(prefix="egb-perf-", suffix=".data")
    os.close(fd)
    try:
        recorder = subprocess.Popen(
            ["perf", "record", "-a", "-g", "-F", str(PERF_HZ), "-o", data, "--", "sleep",
             f"{seconds + 10.0:.2f}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 10.0
            while os.path.getsize(data) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            result = body()
        finally:
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)
            reap(recorder, 30.0)
        samples = perf_samples(data)
    finally:
        os.unlink(data)
    return samples, result


_HEAD = re.compile(r"^\s*(\d+)\s+\[(\d+)\]")
_FRAME = re.compile(r"^\s+[0-9a-f]+ (\S+)")


def perf_samples(data: str) -> list[Sample]:
    """Each sample of a perf.data file as (pid, CPU, functions, innermost first)."""
    argv = ["perf", "script", "-i", data, "-F", "pid,cpu,ip,sym"]
    script = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: list[Sample] = []
    pid, cpu, frames = -1, -1, list[str]()
    assert script.stdout is not None
    try:
        for line in script.stdout:
            if head := _HEAD.match(line):
                if cpu >= 0:
                    samples.append((pid, cpu, tuple(frames)))
                pid, cpu, frames = int(head[1]), int(head[2]), []
            elif (frame := _FRAME.match(line)) and cpu >= 0:
                frames.append(frame[1])
        if cpu >= 0:
            samples.append((pid, cpu, tuple(frames)))
    finally:
        reap(script, 120.0)
    return samples


def hop(frames: Sequence[str]) -> Sequence[str]:
    """The frames of the hop a softirq sample is in: up to the innermost backlog or GRO cell
    poll (each veth hands a packet on through a backlog, so one poll is one namespace's work);
    for a sample outside softirq work, up to where softirq work was entered, if anywhere."""
    for i, name in enumerate(frames):
        if name in HOP_ENTRIES or name == SOFTIRQ_ENTRY:
            return frames[:i]
    return frames


def own_function(frames: Sequence[str]) -> str:
    """The function a sample's time belongs to: the sampled one, or, where the sample only
    marks interrupts coming on again, its caller (with ``IRQS_OFF``)."""
    if not frames:
        return "?"
    if frames[0] in IRQS_ON and len(frames) > 1:
        return frames[1] + IRQS_OFF
    return frames[0]


def count(tally: Tally, frames: Sequence[str]) -> None:
    tally.samples += 1
    own = own_function(frames)
    tally.own[own] = tally.own.get(own, 0) + 1
    inner = frames[: frames.index(SOFTIRQ_ENTRY)] if SOFTIRQ_ENTRY in frames else frames
    names = set(inner)
    for stage, functions in STAGES:
        if names.intersection(functions) or (stage == OUTER_NETFILTER and outer_netfilter(inner)):
            tally.stages[stage] = tally.stages.get(stage, 0) + 1


def outer_netfilter(frames: Sequence[str]) -> bool:
    """Whether a sample is in a netfilter hook that vxlan_xmit's output of the outer packet
    called (frames run from the sampled function outwards)."""
    if "vxlan_xmit" not in frames or "nf_hook_slow" not in frames:
        return False
    return frames.index("nf_hook_slow") < frames.index("vxlan_xmit")


def reduce(path: str, workload: str, window: Window, samples: Sequence[Sample]) -> Profile:
    """A recording reduced to the workload's cost: the samples of its processes and of every
    network softirq (idle and other processes left out), and among them the worker's hop for
    packets from the pod."""
    pids = set(window.pids)
    whole, worker, other = Tally(), Tally(), 0
    for pid, _cpu, frames in samples:
        names = set(frames)
        if NETWORK not in names and pid not in pids:
            other += 0 if names.intersection(IDLE) else 1
            continue
        count(whole, frames)
        if NETWORK in names and WORKER_HOP in hop(frames):
            count(worker, frames)
    busy_s = window.ticks["cpu"][0] / os.sysconf("SC_CLK_TCK")
    recorded = max(window.wall_s, 1e-3)
    return Profile(path, workload, window.units, window.rate, window.wall_s, busy_s, whole,
                   worker, other / recorded)  # fmt: skip


def category(function: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(function):
            return name
    return "other"


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Options:
    pod: str = "sandbox/shell-0"
    project: str = "payments"
    pairs: int = 8
    cps_seconds: float = 2.0
    cps_max: int = 200_000
    warmup_seconds: float = 0.25
    clients: int = 2
    client_cpus: str = "0"
    server_cpus: str = "0"
    iperf_seconds: int = 3
    iperf_client_cpus: str = "0"
    iperf_server_cpus: str = "0"
    switch_timeout: float = 10.0
    perf_rounds: int = 1
    json_path: str | None = None


@dataclass
class Results:
    machine: dict[str, Any]
    options: dict[str, Any]
    lab: str = ""
    rounds: list[Round] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def pair_order(pair: int) -> tuple[str, str]:
    """t r, r t, t r, ...: a drift of the machine over the run weighs on both paths alike."""
    return PATHS if pair % 2 == 0 else (PATHS[1], PATHS[0])


def compare(rounds: Sequence[Round], metric: str) -> dict[str, Any]:
    """Medians per path, their ratio, and the tunnel/router ratio within each pair: its median,
    minimum and maximum."""
    by_pair: dict[int, dict[str, float]] = {}
    for r in rounds:
        by_pair.setdefault(r.pair, {})[r.path] = float(getattr(r, metric))
    ratios = [p["tunnel"] / p["router"] for _, p in sorted(by_pair.items())
              if len(p) == 2 and p["router"]]  # fmt: skip
    tunnel, router = (median([float(getattr(r, metric)) for r in rounds if r.path == path] or [0.0])
                      for path in PATHS)  # fmt: skip
    return {
        "tunnel_median": tunnel, "router_median": router,
        "ratio_of_medians": tunnel / router if router else None,
        "pair_ratios": ratios, "median": median(ratios) if ratios else None,
        "min": min(ratios, default=None), "max": max(ratios, default=None),
    }  # fmt: skip


def per_unit(tallies: Sequence[Tally], units: int) -> dict[str, Any]:
    """Tallies summed into ns of CPU per unit: in all, by stage, by kind of own time and by
    function."""
    ns = 1e9 / PERF_HZ / max(1, units)  # one sample's CPU time, per unit
    own: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for t in tallies:
        own.update(t.own)
        stages.update(t.stages)
    kinds: Counter[str] = Counter()
    for function, n in own.items():
        kinds[category(function)] += n
    return {
        "ns": sum(t.samples for t in tallies) * ns,
        "stages": {s: stages.get(s, 0) * ns for s, _ in STAGES},
        "kinds": {k: n * ns for k, n in kinds.most_common()},
        "functions": {f: n * ns for f, n in own.most_common()},
    }


def profile_summary(profiles: Sequence[Profile]) -> dict[str, Any]:
    """Per workload: each path's CPU per unit (the whole path, and the worker's hop for packets
    from the pod), and the functions whose own time grew most from router to tunnel."""
    out: dict[str, Any] = {}
    for workload in UNITS:
        found = {path: [p for p in profiles if (p.workload, p.path) == (workload, path)]
                 for path in PATHS}  # fmt: skip
        if not all(found.values()):
            continue
        entry: dict[str, Any] = {}
        for path, mine in found.items():
            units = sum(p.units for p in mine)
            entry[path] = {
                "units": units, "rate": median(p.rate for p in mine),
                "busy_ns": sum(p.busy_s for p in mine) * 1e9 / max(1, units),
                "other_tasks_per_s": median(p.other_tasks_per_s for p in mine),
                "whole": per_unit([p.whole for p in mine], units),
                "worker": per_unit([p.worker for p in mine], units),
            }  # fmt: skip
        for part in ("whole", "worker"):
            t, r = entry["tunnel"][part]["functions"], entry["router"][part]["functions"]
            grew = sorted(((t.get(f, 0.0) - r.get(f, 0.0), f) for f in set(t) | set(r)),
                          reverse=True)  # fmt: skip
            entry[f"grew_most_{part}"] = [(f, d) for d, f in grew[:12]]
            for path in PATHS:
                functions = entry[path][part]["functions"]
                entry[path][part]["functions"] = dict(list(functions.items())[:15])
        out[workload] = entry
    return out


def summarize(results: Results) -> None:
    s, rounds = results.summary, results.rounds
    for metric in ("cps", "gbps", "cpu_us_per_connection", "cpu_s_per_gbit",
                   "cpu_ns_per_segment"):  # fmt: skip
        s[metric] = compare(rounds, metric)
    for metric in ("cps", "gbps"):
        judged = s[metric]["median"]
        s[metric]["target"] = TARGET
        s[metric]["met"] = None if judged is None else judged >= TARGET
    s["agent_switch_s"] = {path: [r.switch.agent_s for r in rounds if r.path == path]
                           for path in PATHS}  # fmt: skip
    s["router_packets_in_tunnel_rounds"] = sum(r.router_packets for r in rounds
                                               if r.path == "tunnel")  # fmt: skip
    s["errors"] = {path: sum(r.errors for r in rounds if r.path == path) for path in PATHS}
    if results.profiles:
        s["profile"] = profile_summary(results.profiles)


def measure(o: Options, results: Results) -> None:
    started = time.perf_counter()
    subject = Subject(pod_by_key(o.pod), o.project)
    name = f"egb-{uuid.uuid4().hex[:8]}"
    results.lab = name
    progress(f"bringing up lab {name}")
    with Lab.up(name) as lab:
        progress(f"lab up in {lab.state.timings_s.get('total', 0.0):.1f} s; pod {o.pod} on"
                 f" {subject.worker}, tunnel via {subject.gateway} ({subject.egress_ip}),"
                 f" router {ROUTER_V4}")  # fmt: skip
        bench = TunnelBench(lab, subject, o)
        bench.prepare()
        with bench:
            for pair in range(o.pairs):
                for path in pair_order(pair):
                    r = bench.round(path, pair)
                    results.rounds.append(r)
                    progress(f"pair {pair} {path:6}: {r.cps:7.0f} conn/s ({r.errors} errors),"
                             f" {r.gbps:5.2f} Gbit/s, {r.cpu_s_per_gbit:.3f} CPU s/Gbit;"
                             f" agent switched in {r.switch.agent_s * 1000:.0f} ms")  # fmt: skip
            for n in range(o.perf_rounds):
                for path in pair_order(n):
                    results.profiles += bench.profile(path)
                    progress(f"profile {n} {path}: " + ", ".join(
                        f"{p.workload} {p.whole.samples} samples ({p.worker.samples} in the"
                        " worker's hop)" for p in results.profiles[-2:]))  # fmt: skip
    results.wall_s = time.perf_counter() - started


# -- report --------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(results: Results) -> str:
    m, s, o = results.machine, results.summary, results.options
    out = [
        f"egressgw tunnel benchmark: kernel {m['kernel']}, {m['cpus']} CPUs, iperf3"
        f" {m['iperf3']}, perf {m['perf']}, lab {results.lab}, wall {results.wall_s:.0f} s",
        f"pod {o['pod']}: tunnel = worker -> VXLAN -> {gateway_of(o['project']).name} -> SNAT"
        f" ({EGRESS_IPS[o['project']][0]}); router = worker -> node router -> masquerade"
        f" ({ROUTER_V4}); server {SERVER_V4}",
    ]  # fmt: skip
    if results.rounds:
        out += rounds_lines(results)
    if "profile" in s:
        out += profile_lines(s["profile"])
    out += ["", *commits_measured(results.machine), *notes_section(results.notes)]
    return "\n".join(out)


def rounds_lines(results: Results) -> list[str]:
    s = results.summary
    rows = []
    figures = (("TCP connections/s", "cps", "{:,.0f}"), ("iperf3 Gbit/s", "gbps", "{:.2f}"),
               ("CPU us/connection (tasks)", "cpu_us_per_connection", "{:.1f}"),
               ("CPU s/Gbit (machine)", "cpu_s_per_gbit", "{:.3f}"),
               ("CPU ns/segment (machine)", "cpu_ns_per_segment", "{:,.0f}"))  # fmt: skip
    for label, key, fmt in figures:
        c = s[key]
        target = f">= {TARGET} {verdict(c['met'])}" if "met" in c else ""
        rows.append((label, fmt.format(c["tunnel_median"]), fmt.format(c["router_median"]),
                     _ratio(c["median"]), f"{_ratio(c['min'])} - {_ratio(c['max'])}",
                     _ratio(c["ratio_of_medians"]), target))  # fmt: skip
    pairs = len(s["cps"]["pair_ratios"])
    out = ["", f"{pairs} pairs of rounds (t r, r t, ...): medians per path; tunnel/router: median"
           " of the pairs' ratios, their range, ratio of the medians"]  # fmt: skip
    head = ("", "tunnel", "router", "ratio", "min - max", "of medians", "target")
    out += ["  " + line for line in table(head, rows, right=True)]
    out.append("  pairs' ratios: conn/s " + " ".join(f"{x:.2f}" for x in s["cps"]["pair_ratios"])
               + "; Gbit/s " + " ".join(f"{x:.2f}" for x in s["gbps"]["pair_ratios"]))  # fmt: skip
    out.append("  rounds: conn/s, errors, others' CPU share | Gbit/s, retransmits, MSS, machine"
               " busy | path switch: agent's kernel state, path proven by a probe")  # fmt: skip
    for r in results.rounds:
        out.append(f"    {r.pair:2} {r.path:6} {r.cps:7,.0f} {r.errors:3} {r.foreign_cpu:4.0%}"
                   f" | {r.gbps:5.2f} {r.retransmits:6} {r.mss:5} {r.machine_busy:4.0%}"
                   f" | {r.switch.agent_s * 1000:4.0f} ms, {r.switch.ready_s * 1000:4.0f} ms"
                   f" ({r.switch.probes} probe{'s' if r.switch.probes > 1 else ''})")  # fmt: skip
    followed = "; ".join(f"to {p} {median(v) * 1000:.0f} ms (max {max(v) * 1000:.0f} ms)"
                         for p, v in s["agent_switch_s"].items() if v)  # fmt: skip
    out.append(f"  the agent's kernel state followed each relabel: {followed}; the node router"
               f" forwarded {s['router_packets_in_tunnel_rounds']} of the pod's packets during"
               " tunnel rounds (expected 0)")  # fmt: skip
    return out


def profile_row(name: str, tunnel: float, router: float, unit_format: tuple[float, str, int],
                with_ratio: bool = False) -> tuple[str, ...]:  # fmt: skip
    """A profile table's row: both paths' figures, their ratio if wanted, what the tunnel adds."""
    scale, _, digits = unit_format
    q = _ratio(ratio(tunnel, router)) if with_ratio else ""
    return (name, f"{tunnel * scale:,.{digits}f}", f"{router * scale:,.{digits}f}", q,
            f"{(tunnel - router) * scale:+,.2f}")  # fmt: skip


def stage_label(stage: str) -> str:
    return f"    {stage}" if stage == OUTER_NETFILTER else f"  in {stage}"


def profile_lines(profile: dict[str, Any]) -> list[str]:
    out = ["", f"profiles: perf record -a -g at {PERF_HZ} Hz of the cpu-clock (this VM has no"
           " hardware counters: CPU time, not cycles), one window per path and workload, set up"
           " as in the rounds"]  # fmt: skip
    per_packet = []
    for workload, entry in profile.items():
        scale, label, digits = UNIT_FORMAT[workload]
        t, r = entry["tunnel"]["worker"]["ns"], entry["router"]["worker"]["ns"]
        per_packet.append(f"{t * scale:,.{digits}f} vs {r * scale:,.{digits}f} {label} per"
                          f" {UNITS[workload]} ({_ratio(ratio(t, r))} x)")  # fmt: skip
    out.append("  the worker's CPU for packets from the pod, tunnel vs router: "
               + "; ".join(per_packet))  # fmt: skip
    for workload, entry in profile.items():
        fmt, unit = UNIT_FORMAT[workload], UNITS[workload]
        t, r = entry["tunnel"], entry["router"]
        rate = "Gbit/s" if workload == "iperf3" else "conn/s"
        tw, rw = t["whole"], r["whole"]
        rows = [profile_row("whole path (perf samples)", tw["ns"], rw["ns"], fmt, True),
                profile_row("whole path (/proc/stat busy)", t["busy_ns"], r["busy_ns"], fmt,
                            True)]  # fmt: skip
        rows += [profile_row(stage_label(stage), tw["stages"][stage], rw["stages"][stage], fmt)
                 for stage, _ in STAGES]  # fmt: skip
        kinds = sorted(set(tw["kinds"]) | set(rw["kinds"]),
                       key=lambda k: -abs(tw["kinds"].get(k, 0.0)
                                          - rw["kinds"].get(k, 0.0)))  # fmt: skip
        rows += [profile_row(f"  own: {k}", tw["kinds"].get(k, 0.0), rw["kinds"].get(k, 0.0), fmt)
                 for k in kinds]  # fmt: skip
        tk, rk = t["worker"], r["worker"]
        rows.append(profile_row("worker, packets from the pod", tk["ns"], rk["ns"], fmt, True))
        rows += [profile_row(stage_label(stage), tk["stages"][stage], rk["stages"][stage], fmt)
                 for stage, _ in STAGES if tk["stages"][stage] or rk["stages"][stage]]  # fmt: skip
        out += ["", f"  {workload}: CPU {fmt[1]} per {unit} ({t['units']:,} / {r['units']:,}"
                f" {unit}s, {rate} {t['rate']:,.2f} / {r['rate']:,.2f})"]  # fmt: skip
        head = ("", "tunnel", "router", "ratio", "tunnel adds")
        out += ["    " + line for line in table(head, rows, right=True)]
        for part, what in (("whole", "whole path"), ("worker", "worker hop")):
            out.append(f"    own time that grew most, {what}: " + ", ".join(
                f"{f} {d * fmt[0]:+,.2f}" for f, d in entry[f"grew_most_{part}"][:10]))  # fmt: skip
        out.append(f"    other processes' samples left out: {t['other_tasks_per_s']:.0f}/s,"
                   f" {r['other_tasks_per_s']:.0f}/s")  # fmt: skip
    return out


# -- command line --------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> Options:
    p = parser("tunnel", __doc__, Options())
    add = p.add_argument
    add("--pod", help="the measured pod, namespace/name (%(default)s)")
    add("--project", choices=sorted(EGRESS_IPS),
        help="whose EgressGateway selects the pod in tunnel rounds (%(default)s)")  # fmt: skip
    add("--pairs", type=int, help="pairs of tunnel + router rounds (%(default)s)")
    add("--cps-seconds", type=float, help="connection window per round (%(default)s s)")
    add("--cps-max", type=int, help="connection attempts per window at most (%(default)s)")
    add("--warmup-seconds", type=float, help="connections before each window (%(default)s s)")
    add("--clients", type=int, help="client processes in the pod (%(default)s)")
    add("--client-cpus", help="taskset CPU list of the connection clients, '' none (%(default)s)")
    add("--server-cpus", help="taskset CPU list of the connection server (%(default)s)")
    add("--iperf-seconds", type=int, help="iperf3 -t per round (%(default)s)")
    add("--iperf-client-cpus", help="taskset CPU list of the iperf3 client (%(default)s)")
    add("--iperf-server-cpus", help="taskset CPU list of the iperf3 server (%(default)s)")
    add("--switch-timeout", type=float, help="bound of a path switch (%(default)s s)")
    add("--perf-rounds", type=int, help="profile rounds per path, 0: none (%(default)s)")
    o = Options(**vars(p.parse_args(argv)))
    try:
        pod_by_key(o.pod)
    except ValueError as exc:
        p.error(str(exc))
    if o.pairs < 1 or o.clients < 1 or o.iperf_seconds < 1 or o.cps_seconds <= 0:
        p.error("need at least 1 pair, 1 client, 1 s of iperf3 and a connection window")
    return o


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    if not preflight(("ip", "nft", "iperf3", "conntrack", "ss", "taskset", "curl")):
        return 2
    perf = shutil.which("perf")
    results = Results(
        machine={"kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version(),
                 "iperf3": version(["iperf3", "--version"], r"iperf (\S+)"),
                 "perf": version(["perf", "--version"], r"perf version (\S+)") if perf else "-",
                 "start": git_state()},
        options=asdict(options),
    )  # fmt: skip
    if options.perf_rounds > 0 and not perf:
        options.perf_rounds = 0
        results.notes.append("no profiles: perf is not installed (Debian package linux-perf)")
    measure(options, results)
    results.machine["end"] = git_state()
    summarize(results)
    return finish(render(results), results, options.json_path)


if __name__ == "__main__":
    sys.exit(main())
