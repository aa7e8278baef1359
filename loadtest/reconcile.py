"""DNS latency while the daemon reconciles a large change, against a quiet window of the same run.

"DNS p99 during a reconcile of 10,000 pods": the namespaces, servers and names are those of
``loadtest.dns`` (client ``-c``, gateway ``-g`` with egressgw on 192.0.2.1:53, upstream ``-u``
dnsmasq synthesizing ``*.bench.example``), in namespaces created here and removed afterwards, also
on failure. The manifests directory holds:

- ``cluster.yaml``, never rewritten: one EgressGateway (egress IPs 198.51.100.10 and
  2001:db8:100::10) selecting ``project: bench``; ``--namespaces`` Namespaces; ``--policies``
  EgressPolicies spread over them, each selecting one shard of its namespace's pods and allowing
  ``*.bench.example`` plus a name of its own on TCP 443 and 198.51.100.128/25 on TCP 5432;
- ``pods.yaml``: ``--pods`` Pods. Pod 0 is the querying client, ``ns-000/client`` at 192.0.2.10;
  the others have IPv6 addresses from 2001:db8:c0:G::/64 and labels ``app: w-N`` (one identity
  per pod), ``shard`` and ``rev``. A change rewrites the file (written aside, then renamed, so the
  daemon reads it whole and applies it once) with the next ``rev`` and the other G: every other
  pod's address, workload element and identity changes. The client keeps its address and
  labels, so its learned elements survive the change and the apply has to re-decide them.

Before the rounds, egressgw starts on the full manifests, the client resolves the 500 cached names
and ``--learned`` unique names once (learned elements in the datapath), so an apply re-decides
that many elements. Each round then runs two windows of ``--seconds``, each a dnsperf run from the
client at a fixed offered load (``-Q --qps``) over the 500 cached names with per-query times
(``-v``):

- quiet: nothing changes;
- change: after ``--lead`` seconds the change is written; the window waits for the daemon's
  ``applied:`` line (its "(N ms)" is the reconcile duration) and dnsperf runs on to the end.

dnsperf keeps up to ``--outstanding`` queries in flight with a 5 s timeout, so a stall of the
daemon does not hold back the sending. A query that gets no answer within 5 s (dropped from a
full server socket, or answered too late) is lost, and per-query times cover answered queries
only: the percentiles are given twice, over the answered queries (as ``loadtest.dns`` reports
them) and over every query sent with a lost one counted as 5 s (a lower bound: a stub resolver
retries only then). Each window also records the gateway namespace's UDP ``RcvbufErrors``
(queries dropped because the server's socket was not read in time). Figures over a window depend
on its length: compare trees at the same ``--seconds``. Reported per round: p50/p99/p99.9/max of
both windows, the added p99 (change minus quiet) and their ratio, the reconcile's duration,
SERVFAIL and lost queries; the summary gives medians and ranges over rounds.

The daemon runs from ``--egressgw-src`` (default: this tree), with PYTHONPATH pointing there and
its working directory elsewhere, so the same script measures another checkout. A wrapper around
``egressgw run`` logs, with the thread and a CLOCK_MONOTONIC start, how long each phase of an apply
took (manifest scan, plan build, datapath reconcile and its parts, netlink transactions over
20 ms), every ``program`` call over 20 ms (a DNS answer waiting for the datapath), and garbage
collections over 10 ms or of the oldest generation; the phases that exist in the tree under test
are logged. Throughout each round, the daemon's main thread (the event loop, which answers every
query) is sampled from /proc every 20 ms (``LoopSampler``): during each window and phase, how
long it ran, how long it waited runnable for a CPU, and how often it slept on a futex (the
interpreter lock or a threading lock) or idle in epoll. If py-spy is installed, two more change
windows are sampled afterwards, one with ``--gil`` (which thread holds the interpreter lock) and
one with ``--idle`` (where each thread is, waiting included); they are not part of the rounds'
figures.

Two switches take a cause apart: ``--no-cidr`` drops each policy's CIDR rule, and with it the
interval-set element each identity has in ``allow4_net`` (that set's change is almost all of the
kernel's time: about 6 s for 10,000 boxes replaced, 0.2 s without them); ``--server-cpu -1``
leaves egressgw unpinned (on a machine with two CPUs it then shares one with dnsperf: read with
care). Pinned to one CPU, the event loop cannot run while the kernel applies a transaction:
the kernel does it inside the applying thread's ``sendmsg`` and, with this kernel's preemption
model (PREEMPT_NONE), runs nothing else on that CPU until it ends. Unpinned, as on a gateway node
with several cores, the loop runs on the other CPU: that is the figure an operator sees.

Run as root: ``python -m loadtest.reconcile [--egressgw-src DIR] [--json PATH]``. Every dnsperf
run is bounded in time, every wait has a deadline, every process started here is stopped by its
own pid.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.dns import (
    CACHED_SOURCE,
    DOMAIN,
    EGRESSGW,
    HTTP_PORT,
    OVER_BOUND_LINE,
    REPO,
    UPSTREAM,
    Net,
    Perf,
    Proc,
    _http_get,
    _in,
    build_net,
    cached_names,
    dnsmasq_argv,
    git_of,
    parse_dnsperf,
    percentile,
    probe,
    progress,
    synth_args,
    unique_names,
    workspace,
    write_queries,
)

CLIENT = CACHED_SOURCE  # pod ns-000/client: the only source that queries
UPSTREAM_TTL_S = 3600  # longer than a run: no cached name expires and goes upstream mid-window
DNSPERF_TIMEOUT_S = 5
DEFAULT_CAP = 4096  # egressgw's --max-addresses-per-identity, in every tree measured
APPLIED = re.compile(
    r"applied: (\d+) workloads, (\d+) identities, \d+ egress IPs; \+(\d+) -(\d+) elements, "
    r"(\d+) learned removed.*\(([0-9.]+) ms\)"
)
APPLY_FAILED = re.compile(r"could not apply.*|task follow-source stopped.*")
PHASE = re.compile(r"^egd: phase (\S+) (\S+) ([0-9.]+) ([0-9.]+)$", re.M)
GC = re.compile(r"^egd: gc generation (\d) (\S+) ([0-9.]+) ([0-9.]+)$", re.M)
FUTEX, EPOLL = "202", ("232", "281", "441")  # x86-64 numbers: futex, epoll_wait/pwait/pwait2
LOOP_PHASES = ("scan", "plan", "netlink_apply", "kernel_apply_locked")
LOOP_WAITS = ("program", "revoke", "forget_expired", "learned_by_identity", "counters")
LATENCY = re.compile(r"^> \S+ \S+ \S+ ([0-9.]+)$", re.M)


# -- the daemon's wrapper --------------------------------------------------------------------
def _daemon_bootstrap(src: str, argv: list[str]) -> int:
    """Run in the daemon's own interpreter (as ``python -c``): ``egressgw <argv>`` from ``src``,
    with timing lines on stderr. Only the standard library is imported before egressgw, and
    every patched name is looked up in the tree under test; one that is missing is skipped."""
    import functools
    import gc
    import importlib
    import threading
    import time

    sys.path.insert(0, src)
    import egressgw

    def note(text: str) -> None:
        print(f"egd: {text}", file=sys.stderr, flush=True)

    note(f"egressgw from {egressgw.__file__}")

    def timed(module: str, name: str, label: str, min_ms: float) -> None:
        try:
            owner: Any = importlib.import_module(module)
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, attr)
        except (ImportError, AttributeError):
            return

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                ms = (time.monotonic() - started) * 1000
                if ms >= min_ms:
                    thread = threading.current_thread().name
                    note(f"phase {label} {thread} {started:.4f} {ms:.1f}")

        setattr(owner, attr, wrapper)

    kernel, netlink = "egressgw.datapath.kernel", "egressgw.datapath.netlink"
    for module, name, label, min_ms in (
        ("egressgw.sources.manifests", "ManifestSource.scan", "scan", 5.0),
        ("egressgw.runtime", "build", "plan", 0.0),  # runtime's own reference to plan.build
        ("egressgw.runtime", "Daemon.apply", "apply", 0.0),
        (kernel, "NftDatapath.reconcile", "reconcile", 0.0),
        (kernel, "NftDatapath._static_changes", "static_diff", 0.0),
        (kernel, "NftDatapath._redecide", "redecide_copy", 0.0),
        (kernel, "NftDatapath._learned_changes", "learned_locked", 0.0),
        (kernel, "NftDatapath._apply", "kernel_apply_locked", 0.0),
        # the datapath's lock, taken on the event loop's thread: a wait here stalls every answer
        (kernel, "NftDatapath.program", "program", 20.0),
        (kernel, "NftDatapath.revoke", "revoke", 20.0),
        (kernel, "NftDatapath.forget_expired", "forget_expired", 20.0),
        (kernel, "NftDatapath.learned_by_identity", "learned_by_identity", 20.0),
        (kernel, "NftDatapath.counters", "counters", 20.0),
        (netlink, "NftSocket.apply", "netlink_apply", 20.0),
        (netlink, "NftSocket.apply_steps", "netlink_steps", 0.0),
    ):
        timed(module, name, label, min_ms)

    started = [0.0]

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.monotonic()
            return
        ms = (time.monotonic() - started[0]) * 1000
        if info["generation"] == 2 or ms >= 10.0:
            thread = threading.current_thread().name
            note(f"gc generation {info['generation']} {thread} {started[0]:.4f} {ms:.1f}")

    gc.callbacks.append(collected)
    from egressgw.cli import main

    return int(main(argv))


def daemon_argv(src: Path, workdir: Path, daemon_args: Sequence[str]) -> list[str]:
    program = "from __future__ import annotations\nimport sys\nfrom typing import Any\n\n"
    program += inspect.getsource(_daemon_bootstrap)
    program += "\nsys.exit(_daemon_bootstrap(sys.argv[1], sys.argv[2:]))\n"
    argv = ["env", "-C", str(workdir), f"PYTHONPATH={src}", sys.executable, "-c", program]
    argv += [str(src), "run", "--manifests", str(workdir / "manifests"), "--uplink", "up0"]
    argv += ["--dns-listen", f"{EGRESSGW}:53", "--upstream", f"{UPSTREAM}:53"]
    argv += ["--http-listen", f"127.0.0.1:{HTTP_PORT}", "--rate-limit", "10000000"]
    return argv + list(daemon_args)


# -- manifests -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    pods: int
    namespaces: int
    policies: int
    cidr: bool = True  # each policy's 198.51.100.128/25 rule: one interval-set box per identity

    @property
    def shards(self) -> int:
        """Policies per namespace; each selects one shard of the namespace's pods."""
        return max(1, self.policies // self.namespaces)

    def namespace_of(self, pod: int) -> str:
        per = -(-self.pods // self.namespaces)
        return f"ns-{pod // per:03d}"


def cluster_yaml(shape: Shape) -> str:
    docs = [
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: bench}\n"
        "spec:\n  namespaceSelector: {matchLabels: {project: bench}}\n"
        '  egressIPs: ["198.51.100.10", "2001:db8:100::10"]\n'
    ]
    for n in range(shape.namespaces):
        ns = f"ns-{n:03d}"
        docs.append(
            "apiVersion: v1\nkind: Namespace\n"
            f"metadata: {{name: {ns}, labels: {{project: bench}}}}\n"
        )
        for k in range(shape.shards):
            docs.append(
                "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
                f"metadata: {{name: p-{k}, namespace: {ns}}}\n"
                f"spec:\n  podSelector: {{matchLabels: {{shard: s-{k}}}}}\n  egress:\n"
                f'    - to: [{{fqdnPattern: "*.{DOMAIN}"}}, {{fqdn: svc-{k}.{ns}.example}}]\n'
                "      ports: [{protocol: TCP, port: 443}]\n"
            )
            if shape.cidr:
                docs[-1] += (
                    "    - to: [{cidr: 198.51.100.128/25}]\n"
                    "      ports: [{protocol: TCP, port: 5432}]\n"
                )
    return "---\n".join(docs)


def pods_yaml(shape: Shape, rev: int) -> str:
    docs = [
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns-000, "
        f"labels: {{app: client, shard: s-0}}}}\nstatus: {{podIPs: [{{ip: {CLIENT}}}]}}\n"
    ]
    half = rev % 2
    for i in range(1, shape.pods):
        labels = f"{{app: w-{i}, shard: s-{i % shape.shards}, rev: r-{rev}}}"
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: w-{i}, "
            f"namespace: {shape.namespace_of(i)}, labels: {labels}}}\n"
            f"status: {{podIPs: [{{ip: '2001:db8:c0:{half:x}::{i:x}'}}]}}\n"
        )
    return "---\n".join(docs)


def write_atomically(path: Path, text: str) -> None:
    """Written under a name no manifest walk reads, then renamed over ``path``."""
    aside = path.with_name(f".{path.name}.part")
    aside.write_text(text)
    os.replace(aside, path)


# -- dnsperf in the background ---------------------------------------------------------------
@dataclass
class Window:
    """One dnsperf run with per-query times."""

    perf: Perf
    started: float  # CLOCK_MONOTONIC, as the daemon's phase lines
    ended: float
    p999_ms: float | None = None
    # the same over every query sent: a lost one counts as the timeout, a lower bound of what
    # it cost the client (a stub resolver retries only then)
    p99_all_ms: float | None = None
    p999_all_ms: float | None = None
    over_10ms: int = 0
    over_100ms: int = 0
    dropped_at_socket: int = 0  # the gateway's UDP RcvbufErrors over the run

    @property
    def servfail(self) -> int:
        return self.perf.rcodes.get("SERVFAIL", 0)


class PerfRun:
    """dnsperf from the client namespace, started now and read by ``wait``."""

    def __init__(self, net: Net, out: Path, options: Options, datafile: Path, seconds: float,
                 qps: float, *, once: bool = False) -> None:  # fmt: skip
        self.net, self.out, self.seconds = net, out, seconds
        self.udp_before = udp_counters(net)
        argv = ["dnsperf", "-s", EGRESSGW, "-p", "53", "-a", CLIENT, "-d", str(datafile)]
        argv += ["-l", f"{seconds:g}", "-c", str(options.clients), "-T", "1"]
        argv += ["-q", str(options.outstanding), "-t", str(DNSPERF_TIMEOUT_S)]
        argv += ["-Q", str(max(1, int(qps))), "-v"] + (["-n", "1"] if once else [])
        self.sink = out.open("w")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            _in(net.client, options.client_cpu, *argv),
            stdin=subprocess.DEVNULL,
            stdout=self.sink,
            stderr=subprocess.STDOUT,
        )

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        self.sink.close()

    def wait(self) -> Window:
        try:
            self.popen.wait(timeout=self.seconds + DNSPERF_TIMEOUT_S + 30)
        finally:
            self.stop()
        ended = time.monotonic()
        text = self.out.read_text(errors="replace")
        if self.popen.returncode != 0:
            raise RuntimeError(f"dnsperf exited with {self.popen.returncode}:\n{text[-2000:]}")
        perf = parse_dnsperf(EGRESSGW, text)
        times = sorted(float(m.group(1)) * 1000 for m in LATENCY.finditer(text))
        window = Window(perf, self.started, ended)
        udp = udp_counters(self.net)
        window.dropped_at_socket = udp.get("RcvbufErrors", 0) - self.udp_before.get(
            "RcvbufErrors", 0
        )
        if times:
            perf.p50_ms, perf.p99_ms = percentile(times, 50), percentile(times, 99)
            perf.max_ms, perf.latencies = times[-1], len(times)
            window.p999_ms = percentile(times, 99.9)
            window.over_10ms = sum(1 for t in times if t > 10)
            window.over_100ms = sum(1 for t in times if t > 100)
        every = sorted(times + [DNSPERF_TIMEOUT_S * 1000.0] * perf.lost)
        if every:
            window.p99_all_ms = percentile(every, 99)
            window.p999_all_ms = percentile(every, 99.9)
        return window


# -- the daemon's log ------------------------------------------------------------------------
class DaemonLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = 0

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def mark(self) -> int:
        self.seen = len(self.text())
        return self.seen

    def since(self, offset: int) -> str:
        text = self.text()[offset:]
        return text[: text.rfind("\n") + 1]  # whole lines only


@dataclass
class Applied:
    workloads: int
    identities: int
    added: int
    removed: int
    learned_removed: int
    reconcile_ms: float  # what the daemon logged
    detected_ms: float  # from the write to the line showing in the log


def phases_in(text: str, start: float, end: float) -> list[dict[str, Any]]:
    found = [
        {"phase": m[1], "thread": m[2], "at_s": round(float(m[3]) - start, 3), "ms": float(m[4])}
        for m in PHASE.finditer(text)
        if start <= float(m[3]) <= end
    ]
    found += [
        {"phase": f"gc{m[1]}", "thread": m[2], "at_s": round(float(m[3]) - start, 3),
         "ms": float(m[4])}
        for m in GC.finditer(text)
        if start <= float(m[3]) <= end
    ]  # fmt: skip
    return sorted(found, key=lambda p: p["at_s"])


class LoopSampler:
    """The daemon's main thread (the event loop's, which answers every query) as the scheduler
    sees it, every 20 ms: state, the syscall it sleeps in, and the cumulative time it ran and
    the time it waited runnable for a CPU (``schedstat``). Tells a loop that sleeps on a futex
    (the interpreter lock or a threading lock) from one that is runnable but gets no CPU."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.base = f"/proc/{pid}/task/{pid}"
        self.interval_s = interval_s
        self.samples: list[tuple[float, str, str, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded even if stop() is never reached
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                with open(f"{self.base}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"{self.base}/syscall") as f:
                    call = f.read().split()[0]  # the syscall it sleeps in, or "running"
                with open(f"{self.base}/schedstat") as f:
                    ran, waited, _ = (int(x) for x in f.read().split())
            except (OSError, ValueError):
                return
            self.samples.append((time.monotonic(), state, call, ran, waited))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def during(self, start: float, end: float) -> dict[str, Any] | None:
        """States from the samples inside [start, end]; times from the last sample before it
        to the first one after the thread ran again (the kernel adds a wait to schedstat only
        when the wait ends)."""
        inside = [x for x in self.samples if start <= x[0] <= end]
        if len(inside) < 2:
            return None
        before = [x for x in self.samples if x[0] <= start]
        first = before[-1] if before else inside[0]
        last = next((x for x in self.samples if x[0] > end and x[3] > inside[-1][3]), inside[-1])
        kinds: Tally[str] = Tally()
        for _, state, call, _, _ in inside:
            if state == "R" or call == "running":
                kinds["runnable or running"] += 1
            elif call == FUTEX:
                kinds["asleep on a futex"] += 1  # the interpreter lock or a threading lock
            elif call in EPOLL:
                kinds["asleep in epoll (idle)"] += 1
            else:
                kinds[f"{state} in syscall {call}"] += 1
        return {
            "span_ms": round((end - start) * 1000, 1),
            "ran_ms": round((last[3] - first[3]) / 1e6, 1),
            "waited_for_cpu_ms": round((last[4] - first[4]) / 1e6, 1),
            "states": {k: round(v / len(inside), 3) for k, v in kinds.most_common()},
        }


def udp_counters(net: Net) -> dict[str, int]:
    """The gateway namespace's UDP counters: RcvbufErrors are queries dropped because the
    server's socket was full, i.e. not read in time."""
    out = subprocess.run(_in(net.gateway, None, "cat", "/proc/net/snmp"), capture_output=True,
                         text=True, timeout=10, check=True).stdout  # fmt: skip
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Udp:")]
    return dict(zip(rows[0], (int(v) for v in rows[1]), strict=True)) if len(rows) == 2 else {}


# -- the bench -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    rounds: int = 5
    pods: int = 10_000
    namespaces: int = 100
    policies: int = 1_000
    qps: float = 2_000
    seconds: float = 12.0
    lead: float = 1.5
    learned: int = 3_000
    cidr: bool = True
    clients: int = 4
    outstanding: int = 20_000  # dnsperf -q: above qps x timeout, so a stall never stops sending
    apply_timeout: float = 120.0
    server_cpu: int = 0
    client_cpu: int = 1
    egressgw_src: str = str(REPO)
    daemon_args: tuple[str, ...] = ()
    profile: bool = True
    json_path: str | None = None
    keep: bool = False


@dataclass
class Round:
    round: int
    quiet: dict[str, Any]
    change: dict[str, Any]
    applied: dict[str, Any] | None
    phases: list[dict[str, Any]]
    over_bound_ms: list[int]
    loop: dict[str, Any] = field(default_factory=dict)  # the event loop thread, per phase
    notes: list[str] = field(default_factory=list)

    def added(self, key: str) -> float:
        """Change window minus quiet window, for ``p99_ms`` (answered) or ``p99_all_ms``."""
        return float(self.change[key] - self.quiet[key])

    def ratio(self, key: str) -> float:
        return float(self.change[key] / self.quiet[key])


@dataclass
class Results:
    setup: dict[str, Any]
    options: dict[str, Any]
    rounds: list[Round] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def window_figures(w: Window) -> dict[str, Any]:
    p = w.perf
    return {
        "p50_ms": p.p50_ms, "p99_ms": p.p99_ms, "p999_ms": w.p999_ms, "max_ms": p.max_ms,
        "p99_all_ms": w.p99_all_ms, "p999_all_ms": w.p999_all_ms,
        "over_10ms": w.over_10ms, "over_100ms": w.over_100ms, "sent": p.sent,
        "completed": p.completed, "lost": p.lost, "servfail": w.servfail, "rcodes": p.rcodes,
        "dropped_at_socket": w.dropped_at_socket,
        "qps": p.qps, "latencies": p.latencies,
    }  # fmt: skip


def learned_elements(net: Net) -> int:
    """Elements of the learned sets in the kernel, whatever the tree calls them."""
    out = subprocess.run(
        _in(net.gateway, None, "nft", "-j", "list", "table", "inet", "egressgw"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if out.returncode != 0:
        return -1
    count = 0
    for item in json.loads(out.stdout).get("nftables", []):
        s = item.get("set")
        if s and re.fullmatch(r"allow[46](_any|_range)?", s.get("name", "")):
            count += len(s.get("elem", []))
    return count


class Bench:
    def __init__(self, net: Net, workdir: Path, options: Options) -> None:
        self.net, self.workdir, self.options = net, workdir, options
        self.src = Path(options.egressgw_src).resolve()
        self.shape = Shape(options.pods, options.namespaces, options.policies, options.cidr)
        self.procs: list[Proc] = []
        self.perfs: list[PerfRun] = []
        self.daemon: Proc | None = None
        self.log = DaemonLog(workdir / "egressgw.log")
        self.rev = 0
        self.runs = 0
        self.results = Results(
            setup={"egressgw_src": str(self.src), **git_of(self.src),
                   "python": sys.version.split()[0], "cpus": os.cpu_count()},
            options=asdict(options),
        )  # fmt: skip
        self.cached_file = write_queries(workdir / "cached.txt", cached_names())

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        for run in self.perfs:
            run.stop()
        if self.daemon is not None:
            self.daemon.stop()
        for proc in reversed(self.procs):
            proc.stop()

    # -- plumbing ----------------------------------------------------------------------------
    def dnsperf(self, label: str, datafile: Path, seconds: float, qps: float,
                once: bool = False) -> PerfRun:  # fmt: skip
        self.runs += 1
        out = self.workdir / f"dnsperf-{self.runs:02d}-{label}.out"
        run = PerfRun(self.net, out, self.options, datafile, seconds, qps, once=once)
        self.perfs.append(run)
        return run

    def start(self) -> None:
        o = self.options
        ttl = [a for a in synth_args() if not a.startswith("--local-ttl=")]
        ttl.append(f"--local-ttl={UPSTREAM_TTL_S}")
        argv = _in(self.net.upstream, o.client_cpu, *dnsmasq_argv(UPSTREAM, *ttl))
        self.procs.append(Proc("dnsmasq upstream", argv, self.workdir / "dnsmasq-upstream.log"))
        manifests = self.workdir / "manifests"
        manifests.mkdir()
        (manifests / "cluster.yaml").write_text(cluster_yaml(self.shape))
        write_atomically(manifests / "pods.yaml", pods_yaml(self.shape, self.rev))
        time.sleep(0.3)
        self.procs[-1].check()
        argv = daemon_argv(self.src, self.workdir, o.daemon_args)
        started = time.monotonic()
        cpu = o.server_cpu if o.server_cpu >= 0 else None
        self.daemon = Proc("egressgw", _in(self.net.gateway, cpu, *argv), self.log.path)
        while _http_get(self.net, "/readyz")[0] != 200:
            self.daemon.check()
            if time.monotonic() - started > o.apply_timeout:
                tail = self.log.text()[-3000:]
                raise RuntimeError(f"egressgw not ready within {o.apply_timeout:g} s:\n{tail}")
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        text = self.log.text()
        where = re.search(r"egd: egressgw from (\S+)", text)
        if where is None or not where[1].startswith(str(self.src)):
            raise RuntimeError(f"the daemon did not import egressgw from {self.src}: {where}")
        first = APPLIED.search(text)
        self.results.setup.update(
            ready_s=round(ready_s, 2),
            first_apply_ms=float(first[6]) if first else None,
            egressgw_module=where[1],
        )  # fmt: skip
        name = f"h-203-0-113-1.{DOMAIN}"
        rcode, answer = probe(self.net, EGRESSGW, name, "A", CLIENT)
        if rcode != "NOERROR" or answer != ["203.0.113.1"]:
            raise RuntimeError(f"egressgw answered {rcode} {answer} to the first probe")
        progress(f"egressgw ready in {ready_s:.1f} s ({self.shape.pods:,} pods)")

    def warm(self) -> None:
        """The cached names once, then ``--learned`` unique names once: the learned elements
        every apply has to decide again."""
        names = len(cached_names())
        window = self.dnsperf("warm-cached", self.cached_file, 30, 1_000, once=True).wait()
        if window.perf.completed != names or window.perf.noerror_share < 1.0:
            raise RuntimeError(f"warming pass on cached names: {window.perf}")
        if self.options.learned:
            unique = write_queries(self.workdir / "unique.txt",
                                   unique_names(1, self.options.learned))  # fmt: skip
            seconds = self.options.learned / 1_000 + 30
            window = self.dnsperf("warm-unique", unique, seconds, 1_000, once=True).wait()
            if window.perf.noerror_share < 0.99:
                raise RuntimeError(f"warming pass on unique names: {window.perf}")
        learned = learned_elements(self.net)
        self.results.setup["learned_elements"] = learned
        progress(f"learned elements in the datapath: {learned:,}")

    def change(self, label: str) -> tuple[Window, Applied | None, list[str]]:
        """A change window: dnsperf throughout, the change written after ``--lead`` s."""
        o = self.options
        notes: list[str] = []
        offset = self.log.mark()
        run = self.dnsperf(label, self.cached_file, o.seconds, o.qps)
        time.sleep(o.lead)
        self.rev += 1
        text = pods_yaml(self.shape, self.rev)
        written = time.monotonic()
        write_atomically(self.workdir / "manifests" / "pods.yaml", text)
        applied: Applied | None = None
        deadline = written + o.apply_timeout
        while time.monotonic() < deadline:
            assert self.daemon is not None
            self.daemon.check()
            new = self.log.since(offset)
            found = APPLIED.search(new)
            if found:
                detected = (time.monotonic() - written) * 1000
                counts = [int(found[i]) for i in range(1, 6)]
                applied = Applied(counts[0], counts[1], counts[2], counts[3], counts[4],
                                  float(found[6]), round(detected, 1))  # fmt: skip
                break
            failed = APPLY_FAILED.search(new)
            if failed:
                notes.append(f"{label}: apply failed: {failed[0][:300]}")
                break
            time.sleep(0.02)
        else:
            notes.append(f"{label}: no 'applied:' line within {o.apply_timeout:g} s")
        if applied is not None and not run.running():
            notes.append(f"{label}: the apply ended after the window; widen --seconds")
        window = run.wait()
        if applied is not None and len(APPLIED.findall(self.log.since(offset))) > 1:
            notes.append(f"{label}: more than one apply in the window")
        return window, applied, notes

    def round(self, n: int) -> Round:
        o = self.options
        offset = self.log.mark()
        assert self.daemon is not None
        sampler = LoopSampler(self.daemon.pid)
        try:
            quiet = self.dnsperf(f"quiet-{n}", self.cached_file, o.seconds, o.qps).wait()
            stray = APPLIED.search(self.log.since(offset))
            window, applied, notes = self.change(f"change-{n}")
        finally:
            sampler.stop()
        text = self.log.since(offset)
        phases = phases_in(text, window.started, window.ended)
        loop = {"quiet window": sampler.during(quiet.started, quiet.ended),
                "change window": sampler.during(window.started, window.ended)}  # fmt: skip
        for name in LOOP_PHASES:  # the longest of each: the apply's, not a DNS answer's
            found = [p for p in phases if p["phase"] == name]
            if found:
                longest = max(found, key=lambda p: p["ms"])
                begin = window.started + longest["at_s"]
                loop[name] = sampler.during(begin, begin + longest["ms"] / 1000)
        if stray is not None:
            notes.append(f"round {n}: an apply ran during the quiet window")
        result = Round(
            round=n,
            quiet=window_figures(quiet),
            change=window_figures(window),
            applied=asdict(applied) if applied else None,
            phases=phases,
            over_bound_ms=[int(ms) for ms in OVER_BOUND_LINE.findall(text)],
            loop={k: v for k, v in loop.items() if v is not None},
            notes=notes,
        )
        for which, w in (("quiet", quiet), ("change", window)):
            if w.perf.lost:
                notes.append(f"round {n} {which}: {w.perf.lost} of {w.perf.sent} queries lost")
        took = f"{applied.reconcile_ms:,.0f} ms" if applied else "n/a"
        progress(
            f"round {n}: p99 quiet {quiet.perf.p99_ms:.2f} ms, change {window.perf.p99_ms:.2f} "
            f"ms (max {window.perf.max_ms:.0f} ms; with lost ones {window.p99_all_ms:.0f} ms), "
            f"reconcile {took}, SERVFAIL {window.servfail}, lost {window.perf.lost} "
            f"({window.dropped_at_socket} dropped at the server's socket)"
        )
        self.results.notes += notes
        time.sleep(1.0)  # let the last answers of the change drain before the next quiet window
        return result

    def profile(self) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            self.results.notes.append("py-spy is not installed: no profiles")
            return
        assert self.daemon is not None
        for mode in ("gil", "idle"):
            raw = self.workdir / f"profile-{mode}.txt"
            spy = subprocess.Popen(
                ["taskset", "-c", str(self.options.client_cpu), pyspy, "record",
                 "--pid", str(self.daemon.pid), "--duration", f"{self.options.seconds:g}",
                 "--rate", "200", "--format", "raw", "--nolineno", "--threads", f"--{mode}",
                 "--nonblocking", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                progress(f"profile: py-spy --{mode} over a change window")
                window, applied, notes = self.change(f"profile-{mode}")
            finally:
                try:
                    spy.wait(timeout=self.options.seconds + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(timeout=10)
            self.results.notes += notes
            if raw.exists():
                summary = summarize_threads(raw.read_text())
                summary["change_p99_ms"] = window.perf.p99_ms
                summary["reconcile_ms"] = applied.reconcile_ms if applied else None
                self.results.profiles[mode] = summary
            time.sleep(1.0)

    def run(self) -> Results:
        self.start()
        self.warm()
        for n in range(1, self.options.rounds + 1):
            self.results.rounds.append(self.round(n))
        self.results.setup["learned_elements_after"] = learned_elements(self.net)
        if self.options.profile:
            self.profile()
        self.results.summary = summarize(self.results.rounds, self.options.qps)
        return self.results


# -- profiles --------------------------------------------------------------------------------
def _frame(frame: str) -> str:
    found = re.match(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$", frame.strip())
    if not found:
        return frame.strip()
    path = found["file"]
    for marker in ("egressgw/", "site-packages/", "python3.11/"):
        if marker in path:
            path = (marker if marker == "egressgw/" else "") + path.split(marker, 1)[1]
            break
    return f"{found['func']} ({path})"


def summarize_threads(raw: str, top: int = 8) -> dict[str, Any]:
    """Per thread (py-spy ``--threads``): its share of all samples, and the functions with the
    most own and inclusive samples within it. Inclusive lists only egressgw's functions."""
    total = 0
    per: dict[str, Tally[str]] = {}
    own: dict[str, Tally[str]] = {}
    inclusive: dict[str, Tally[str]] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        head, _, rest = stack.partition(";")
        name = head.split(": ", 1)[1] if ": " in head else head
        name = re.sub(r"_\d+$", "_N", name)  # asyncio_0, asyncio_1...: the apply's workers
        frames = [_frame(f) for f in rest.split(";") if f.strip()]
        count = int(count_text)
        total += count
        per.setdefault(name, Tally())[name] += count
        own.setdefault(name, Tally())[frames[-1] if frames else "?"] += count
        mine = inclusive.setdefault(name, Tally())
        for f in set(frames):
            if "(egressgw/" in f:
                mine[f] += count
    threads = {}
    for name, tally in sorted(per.items(), key=lambda kv: -kv[1][kv[0]]):
        n = tally[name]
        threads[name] = {
            "samples": n,
            "share": round(n / total, 3) if total else 0.0,
            "own": [(f, round(c / n, 3)) for f, c in own[name].most_common(top)],
            "inclusive": [(f, round(c / n, 3)) for f, c in inclusive[name].most_common(top)],
        }
    return {"samples": total, "threads": threads}


# -- report ----------------------------------------------------------------------------------
def _spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": percentile(ordered, 50), "min": ordered[0], "max": ordered[-1]}


def summarize(rounds: Sequence[Round], qps: float) -> dict[str, Any]:
    if not rounds:
        return {}
    done = [r.applied for r in rounds if r.applied is not None]
    phase_totals: dict[str, list[float]] = {}
    for r in rounds:
        sums: Tally[str] = Tally()
        for p in r.phases:
            key = p["phase"]
            if key in LOOP_WAITS:  # the longest wait, not a sum over overlapping calls
                key += " (max)"
                sums[key] = max(sums[key], p["ms"])
            else:
                sums[key] += p["ms"]
        for key, value in sums.items():
            phase_totals.setdefault(key, []).append(value)
    return {
        **{
            f"{prefix}{name}": figure
            for prefix, key in (("", "p99_ms"), ("all_sent_", "p99_all_ms"))
            for name, figure in (
                ("quiet_p99_ms", _spread([r.quiet[key] for r in rounds])),
                ("change_p99_ms", _spread([r.change[key] for r in rounds])),
                ("added_p99_ms", _spread([r.added(key) for r in rounds])),
                ("added_p99_ms_rounds", [round(r.added(key), 2) for r in rounds]),
                ("p99_ratio", _spread([r.ratio(key) for r in rounds])),
            )
        },
        "quiet_max_ms": _spread([r.quiet["max_ms"] for r in rounds]),
        "change_max_ms": _spread([r.change["max_ms"] for r in rounds]),
        "reconcile_ms": _spread([a["reconcile_ms"] for a in done]) if done else None,
        "write_to_applied_ms": _spread([a["detected_ms"] for a in done]) if done else None,
        "servfail_change": [r.change["servfail"] for r in rounds],
        "servfail_quiet": [r.quiet["servfail"] for r in rounds],
        "lost_change": [r.change["lost"] for r in rounds],
        # how long the offered load went unanswered, if the lost queries were consecutive
        "lost_seconds_change": _spread([r.change["lost"] / qps for r in rounds]),
        "applied_rounds": len(done),
        "dropped_at_socket_change": [r.change["dropped_at_socket"] for r in rounds],
        "loop": loop_summary(rounds),
        "phase_ms_per_round": {k: _spread(v) for k, v in sorted(phase_totals.items())},
    }


def loop_summary(rounds: Sequence[Round]) -> dict[str, Any]:
    """Per window or phase: the event loop thread's run time, time waiting for a CPU and share
    of samples in each state, medians over the rounds that have it."""
    out: dict[str, Any] = {}
    for key in ("quiet window", "change window", *LOOP_PHASES):
        seen = [r.loop[key] for r in rounds if key in r.loop]
        if not seen:
            continue
        states = sorted({k for x in seen for k in x["states"]})
        out[key] = {
            "rounds": len(seen),
            **{f: percentile(sorted(x[f] for x in seen), 50)
               for f in ("span_ms", "ran_ms", "waited_for_cpu_ms")},
            "states": {k: percentile(sorted(x["states"].get(k, 0.0) for x in seen), 50)
                       for k in states},
        }  # fmt: skip
    return out


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _range(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s:
        return "n/a"
    return f"{_ms(s['median'], digits)} [{_ms(s['min'], digits)} .. {_ms(s['max'], digits)}]"


def render(results: Results) -> str:
    o, setup = results.options, results.setup
    out = [
        f"egressgw from {setup['egressgw_src']} (commit {setup.get('commit') or '?'}"
        f"{', uncommitted changes' if setup.get('uncommitted') else ''}); "
        f"{o['pods']:,} pods in {o['namespaces']} namespaces, {o['policies']:,} policies; "
        f"dnsperf -Q {o['qps']:g} over {o['seconds']:g} s windows, change written at "
        f"+{o['lead']:g} s",
        f"daemon ready in {setup.get('ready_s')} s (first apply "
        f"{_ms(setup.get('first_apply_ms'), 0)} ms); learned elements before the rounds "
        f"{setup.get('learned_elements')}, after {setup.get('learned_elements_after')}",
        "",
        "latency per query in ms over the answered queries, as loadtest.dns reports it",
        f"{'':>5}   {'quiet window':^27}   {'change window':^30}",
        f"{'round':>5} | {'p50':>6} {'p99':>6} {'p99.9':>6} {'max':>6} | {'p50':>6} {'p99':>7} "
        f"{'p99.9':>7} {'max':>7} | {'added p99':>9} {'ratio':>7} | {'>100ms':>6} "
        f"{'SERVFAIL':>8} {'lost':>6} {'sent':>6} {'dropped@socket':>14}",
    ]
    for r in results.rounds:
        q, c = r.quiet, r.change
        out.append(
            f"{r.round:>5} | {_ms(q['p50_ms'], 2):>6} {_ms(q['p99_ms'], 2):>6} "
            f"{_ms(q['p999_ms'], 2):>6} {_ms(q['max_ms']):>6} | {_ms(c['p50_ms'], 2):>6} "
            f"{_ms(c['p99_ms'], 2):>7} {_ms(c['p999_ms']):>7} {_ms(c['max_ms']):>7} | "
            f"{r.added('p99_ms'):>+9.2f} {r.ratio('p99_ms'):>6.1f}x | {c['over_100ms']:>6} "
            f"{c['servfail']:>8} {c['lost']:>6} {c['sent']:>6} {c['dropped_at_socket']:>14}"
        )
    timeout_ms = DNSPERF_TIMEOUT_S * 1000
    out += [
        "",
        f"latency per query in ms over every query sent, a lost one counted as {timeout_ms} ms;"
        " the apply as the daemon logged it",
        f"{'round':>5} | {'quiet p99':>9} {'p99.9':>7} | {'change p99':>10} {'p99.9':>7} | "
        f"{'added p99':>9} {'ratio':>7} | {'reconcile':>9} {'write->log':>10} | elements",
    ]
    for r in results.rounds:
        q, c, a = r.quiet, r.change, r.applied
        elements = f"+{a['added']:,} -{a['removed']:,}" if a else "apply failed"
        out.append(
            f"{r.round:>5} | {_ms(q['p99_all_ms'], 2):>9} {_ms(q['p999_all_ms'], 2):>7} | "
            f"{_ms(c['p99_all_ms'], 2):>10} {_ms(c['p999_all_ms']):>7} | "
            f"{r.added('p99_all_ms'):>+9.2f} {r.ratio('p99_all_ms'):>6.1f}x | "
            f"{_ms(a['reconcile_ms'], 0) if a else 'n/a':>9} "
            f"{_ms(a['detected_ms'], 0) if a else 'n/a':>10} | {elements}"
        )
    s = results.summary
    if s:
        out += [
            "",
            "summary over rounds: median [min .. max]",
            f"  {'':<26} {'answered queries':<28} every query sent (lost = {timeout_ms} ms)",
            *(
                f"  {label:<26} {_range(s[key], 2) + unit:<28} {_range(s['all_sent_' + key], 2)}"
                f"{unit}"
                for label, key, unit in (
                    ("baseline (quiet) p99", "quiet_p99_ms", " ms"),
                    ("during reconcile p99", "change_p99_ms", " ms"),
                    ("added p99", "added_p99_ms", " ms"),
                    ("p99 ratio change / quiet", "p99_ratio", " x"),
                )
            ),
            f"  max, quiet / change        {_range(s['quiet_max_ms'])} / "
            f"{_range(s['change_max_ms'])} ms",
            f"  reconcile (daemon's ms)    {_range(s['reconcile_ms'], 0)} ms "
            f"({s['applied_rounds']}/{len(results.rounds)} rounds applied)",
            f"  write -> 'applied:' line   {_range(s['write_to_applied_ms'], 0)} ms",
            f"  SERVFAIL per change window {s['servfail_change']} (quiet: {s['servfail_quiet']})",
            f"  lost per change window     {s['lost_change']} (dropped at the server's socket: "
            f"{s['dropped_at_socket_change']})",
            f"  ... as seconds of the load {_range(s['lost_seconds_change'], 2)} s",
            "",
            "daemon phases per change window, ms (sum per round; (max): the longest call)",
        ]
        for phase, spread in s["phase_ms_per_round"].items():
            out.append(f"  {phase:<22} {_range(spread, 0)}")
        over = [ms for r in results.rounds for ms in r.over_bound_ms]
        if over:
            out.append(f"  'programming ... over the bound' lines: {len(over)}, max {max(over)} ms")
    if s and s["loop"]:
        out += [
            "",
            "the event loop thread (answers every query), from /proc every 20 ms; medians over "
            "rounds; for a phase, the apply's longest call of it",
            f"  {'during':<20} {'span ms':>8} {'ran ms':>8} {'waited for CPU ms':>18}  "
            "share of samples",
        ]
        for key, x in s["loop"].items():
            states = ", ".join(f"{k} {v:.0%}" for k, v in x["states"].items() if v)
            out.append(
                f"  {key:<20} {x['span_ms']:>8,.0f} {x['ran_ms']:>8,.0f} "
                f"{x['waited_for_cpu_ms']:>18,.0f}  {states}"
            )
    if results.rounds:
        last = results.rounds[-1]
        out += ["", f"timeline of round {last.round}'s change window (s from dnsperf start):"]
        for p in last.phases:
            out.append(f"  +{p['at_s']:6.3f} {p['phase']:<22} {p['thread']:<12} {p['ms']:9.1f} ms")
    for mode, prof in results.profiles.items():
        out += [
            "",
            f"py-spy --{mode} over one change window ({prof['samples']} samples; change p99 "
            f"{_ms(prof.get('change_p99_ms'), 2)} ms, reconcile {_ms(prof.get('reconcile_ms'), 0)}"
            " ms)",
        ]
        for name, t in prof["threads"].items():
            out.append(f"  thread {name}: {t['share']:.0%} of samples")
            own = ", ".join(f"{f} {share:.0%}" for f, share in t["own"][:5])
            out.append(f"    own: {own}")
            if t["inclusive"]:
                inc = ", ".join(f"{f} {share:.0%}" for f, share in t["inclusive"][:6])
                out.append(f"    inclusive (egressgw): {inc}")
    if results.notes:
        out += ["", "notes:"] + [f"  {n}" for n in results.notes]
    return "\n".join(out)


# -- command line ----------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.reconcile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--rounds", type=int, default=d.rounds, help="quiet + change rounds (%(default)s)")
    add("--pods", type=int, default=d.pods, help="pods in the manifests (%(default)s)")
    add("--namespaces", type=int, default=d.namespaces, help="(%(default)s)")
    add("--policies", type=int, default=d.policies, help="EgressPolicies in all (%(default)s)")
    add("--qps", type=float, default=d.qps, help="dnsperf -Q, offered load (%(default)s)")
    add("--seconds", type=float, default=d.seconds, help="window length (%(default)s)")
    add("--lead", type=float, default=d.lead, help="s into a change window the change is written")
    add("--learned", type=int, default=d.learned,
        help="unique names the client resolves first (%(default)s)")  # fmt: skip
    add("--no-cidr", action="store_true",
        help="policies without their CIDR rule: no interval-set element per identity")  # fmt: skip
    add("--clients", type=int, default=d.clients, help="dnsperf -c (%(default)s)")
    add("--outstanding", type=int, default=d.outstanding, help="dnsperf -q (%(default)s)")
    add("--apply-timeout", type=float, default=d.apply_timeout, help="s to wait for an apply")
    add("--server-cpu", type=int, default=d.server_cpu,
        help="CPU of egressgw, -1: any (%(default)s)")  # fmt: skip
    add("--client-cpu", type=int, default=d.client_cpu, help="CPU of dnsperf (%(default)s)")
    add("--egressgw-src", default=d.egressgw_src, metavar="DIR",
        help="checkout whose egressgw package the daemon runs (default: this tree)")  # fmt: skip
    add("--daemon-arg", action="append", default=[], metavar="ARG", help="for egressgw run")
    add("--no-profile", action="store_true", help="leave the py-spy windows out")
    add("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    add("--keep", action="store_true", help="keep the work directory (logs, dnsperf output)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.pods < 2 or not 1 <= a.namespaces <= a.pods or a.policies < 1:
        p.error("--rounds >= 1, --pods >= 2, 1 <= --namespaces <= --pods, --policies >= 1")
    if not 0 < a.lead < a.seconds or a.qps <= 0:
        p.error("--lead must fall inside the window, --qps be positive")
    if a.learned < 0 or a.learned + len(cached_names()) > DEFAULT_CAP - 96:
        p.error(f"--learned + {len(cached_names())} cached names must stay below the cap")
    if a.pods > 0xFFFF * 0xFFFF:
        p.error("--pods: too many for the address plan")
    if not (Path(a.egressgw_src) / "egressgw" / "__init__.py").is_file():
        p.error(f"{a.egressgw_src} holds no egressgw package")
    return Options(
        rounds=a.rounds, pods=a.pods, namespaces=a.namespaces, policies=a.policies, qps=a.qps,
        seconds=a.seconds, lead=a.lead, learned=a.learned, cidr=not a.no_cidr, clients=a.clients,
        outstanding=a.outstanding, apply_timeout=a.apply_timeout, server_cpu=a.server_cpu,
        client_cpu=a.client_cpu, egressgw_src=str(Path(a.egressgw_src).resolve()),
        daemon_args=tuple(a.daemon_arg), profile=not a.no_profile, json_path=a.json_path,
        keep=a.keep,
    )  # fmt: skip


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(list(sys.argv[1:] if argv is None else argv))
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    tools = ("ip", "nft", "dnsmasq", "dnsperf", "taskset", "env")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print(f"missing commands: {', '.join(missing)} (make deps installs them)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    with workspace(options.keep) as workdir:
        net = build_net()
        progress(f"namespaces {net.tag}-{{c,g,u}}, work directory {workdir}")
        try:
            with Bench(net, workdir, options) as bench:
                results = bench.run()
        finally:
            net.close()
    results.setup["duration_s"] = round(time.monotonic() - started, 1)
    print(render(results))
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(asdict(results), indent=2) + "\n")
        progress(f"results written to {options.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
