"""DNS latency while the daemon reconciles a large change, against a quiet window of the same run.

The namespaces, servers and names of ``loadtest.dns``; the manifests hold ``--pods`` pods in
``--namespaces`` namespaces under ``--policies`` EgressPolicies. Before the rounds the client
(192.0.2.10, the only pod that queries) resolves the 500 cached names and ``--learned`` unique
names. Each round is two windows of ``--seconds``, dnsperf at ``--qps`` over the cached names:
*quiet*, and *change*, in which ``pods.yaml`` is rewritten after ``--lead`` seconds so that
every other pod's address and identity change. Reported per round: p50/p99/p99.9/max of both
windows (over the answered queries, and over every query with a lost one counted as 5 s), the
added p99, the reconcile as the daemon logged it, SERVFAIL and lost queries; where the apply's
time went and what the event loop's thread did meanwhile; py-spy windows if installed.

Run as root: ``python -m loadtest.reconcile [--egressgw-src DIR] [--json PATH]``;
loadtest/README.md explains the set-up and the switches. Every dnsperf run is bounded in time
and every wait has a deadline.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.common import (
    CACHED_SOURCE,
    DOMAIN,
    EGRESSGW,
    OVER_BOUND_LINE,
    REPO,
    UPSTREAM,
    Load,
    Net,
    Proc,
    cached_names,
    daemon_argv,
    dns_net,
    dnsmasq_argv,
    dnsperf_argv,
    finish,
    git_state,
    in_ns,
    median,
    notes_section,
    parse_dnsperf,
    parser,
    percentile,
    preflight,
    progress,
    pyspy,
    reap,
    spying,
    stack_profile,
    synth_args,
    table,
    udp_counters,
    unique_names,
    wait_ready,
    workspace,
    write_queries,
)

CLIENT = CACHED_SOURCE  # pod ns-000/client: the only source that queries
UPSTREAM_TTL_S = 3600  # longer than a run: no cached name expires and goes upstream mid-window
DNSPERF_TIMEOUT_S = 5
DEFAULT_CAP = 4096  # egressgw's --max-addresses-per-identity, in every tree measured
APPLIED = re.compile(r"applied: (\d+) workloads, (\d+) identities, \d+ egress IPs; \+(\d+) -(\d+) "
                     r"elements, (\d+) learned removed.*\(([0-9.]+) ms\)")  # fmt: skip
APPLY_FAILED = re.compile(r"could not apply.*|task follow-source stopped.*")
PHASE = re.compile(r"^egd: phase (\S+) (\S+) ([0-9.]+) ([0-9.]+)$", re.M)
GC = re.compile(r"^egd: gc generation (\d) (\S+) ([0-9.]+) ([0-9.]+)$", re.M)
FUTEX, EPOLL = "202", ("232", "281", "441")  # x86-64 numbers: futex, epoll_wait/pwait/pwait2
LOOP_PHASES = ("scan", "plan", "netlink_apply", "kernel_apply_locked")
LOOP_WAITS = ("program", "revoke", "forget_expired", "learned_by_identity", "counters")


# -- the daemon's wrapper ------------------------------------------------------------------------
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


def bootstrap_argv(src: Path, workdir: Path, daemon_args: Sequence[str]) -> list[str]:
    """The daemon with PYTHONPATH at ``src`` and its working directory elsewhere."""
    program = "from __future__ import annotations\nimport sys\nfrom typing import Any\n\n"
    program += inspect.getsource(_daemon_bootstrap)
    program += "\nsys.exit(_daemon_bootstrap(sys.argv[1], sys.argv[2:]))\n"
    argv = ["env", "-C", str(workdir), f"PYTHONPATH={src}", sys.executable, "-c", program, str(src)]
    return argv + daemon_argv(workdir / "manifests") + list(daemon_args)


# -- manifests -----------------------------------------------------------------------------------
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
        return f"ns-{pod // -(-self.pods // self.namespaces):03d}"


def cluster_yaml(shape: Shape) -> str:
    docs = ["apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: bench}\n"
            "spec:\n  namespaceSelector: {matchLabels: {project: bench}}\n"
            '  egressIPs: ["198.51.100.10", "2001:db8:100::10"]\n']  # fmt: skip
    cidr = "    - to: [{cidr: 198.51.100.128/25}]\n      ports: [{protocol: TCP, port: 5432}]\n"
    for n in range(shape.namespaces):
        ns = f"ns-{n:03d}"
        docs.append(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: "
                    "{project: bench}}\n")  # fmt: skip
        docs += [
            "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
            f"metadata: {{name: p-{k}, namespace: {ns}}}\n"
            f"spec:\n  podSelector: {{matchLabels: {{shard: s-{k}}}}}\n  egress:\n"
            f'    - to: [{{fqdnPattern: "*.{DOMAIN}"}}, {{fqdn: svc-{k}.{ns}.example}}]\n'
            "      ports: [{protocol: TCP, port: 443}]\n" + (cidr if shape.cidr else "")
            for k in range(shape.shards)
        ]
    return "---\n".join(docs)


def pods_yaml(shape: Shape, rev: int) -> str:
    """Every pod but the client moves to the other half of 2001:db8:c0::/60 with each rev."""
    docs = [
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns-000, "
        f"labels: {{app: client, shard: s-0}}}}\nstatus: {{podIPs: [{{ip: {CLIENT}}}]}}\n"
    ]
    docs += [
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: w-{i}, namespace: {shape.namespace_of(i)},"
        f" labels: {{app: w-{i}, shard: s-{i % shape.shards}, rev: r-{rev}}}}}\n"
        f"status: {{podIPs: [{{ip: '2001:db8:c0:{rev % 2:x}::{i:x}'}}]}}\n"
        for i in range(1, shape.pods)
    ]  # fmt: skip
    return "---\n".join(docs)


def write_atomically(path: Path, text: str) -> None:
    """Written under a name no manifest walk reads, then renamed over ``path``."""
    aside = path.with_name(f".{path.name}.part")
    aside.write_text(text)
    os.replace(aside, path)


# -- what happens during a window ----------------------------------------------------------------
class PerfRun:
    """dnsperf from the client at a fixed load, in the background from now until ``wait``."""

    def __init__(self, net: Net, out: Path, o: Options, datafile: Path, seconds: float,
                 qps: float, once: bool = False) -> None:  # fmt: skip
        self.net, self.out, self.seconds = net, out, seconds
        self.udp_before = udp_counters(net)
        load = Load(o.clients, o.outstanding, o.client_cpu)
        argv = dnsperf_argv(net, load, EGRESSGW, CLIENT, datafile, seconds, qps=qps, once=once,
                            timeout_s=DNSPERF_TIMEOUT_S, verbose=True)  # fmt: skip
        self.started = self.ended = time.monotonic()
        self.proc = Proc("dnsperf", argv, out)

    def wait(self) -> dict[str, Any]:
        """The window's figures: percentiles over the answered queries, and (``_all``) over every
        query sent with a lost one counted as the timeout, a lower bound of what it cost (a stub
        resolver retries only then); the queries the gateway dropped at a full socket."""
        reap(self.proc.popen, self.seconds + DNSPERF_TIMEOUT_S + 30)
        self.ended = time.monotonic()
        text = self.out.read_text(errors="replace")
        if self.proc.popen.returncode != 0:
            raise RuntimeError(f"dnsperf exited with {self.proc.popen.returncode}:\n{text[-2000:]}")
        perf, times = parse_dnsperf(EGRESSGW, text)
        every = sorted(times + [DNSPERF_TIMEOUT_S * 1000.0] * perf.lost)
        drops = udp_counters(self.net).get("RcvbufErrors", 0)
        drops -= self.udp_before.get("RcvbufErrors", 0)
        return {
            "p50_ms": perf.p50_ms, "p99_ms": perf.p99_ms,
            "p999_ms": percentile(times, 99.9) if times else None, "max_ms": perf.max_ms,
            "p99_all_ms": percentile(every, 99) if every else None,
            "p999_all_ms": percentile(every, 99.9) if every else None,
            "over_10ms": sum(t > 10 for t in times), "over_100ms": sum(t > 100 for t in times),
            "sent": perf.sent, "completed": perf.completed, "lost": perf.lost,
            "servfail": perf.rcodes.get("SERVFAIL", 0), "rcodes": perf.rcodes,
            "noerror_share": perf.noerror_share, "dropped_at_socket": drops, "qps": perf.qps,
            "latencies": perf.latencies,
        }  # fmt: skip


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
    """The wrapper's phase and collection lines that started within [start, end]."""
    found = [
        (prefix + m[1], m[2], float(m[3]), float(m[4]))
        for prefix, lines in (("", PHASE), ("gc", GC))
        for m in lines.finditer(text)
    ]
    return sorted(({"phase": phase, "thread": thread, "at_s": round(at - start, 3), "ms": ms}
                   for phase, thread, at, ms in found if start <= at <= end),
                  key=lambda p: p["at_s"])  # fmt: skip


class LoopSampler:
    """The daemon's main thread (the event loop's, which answers every query) as the scheduler
    sees it, every 20 ms: state, the syscall it sleeps in, and the cumulative time it ran and
    the time it waited runnable for a CPU (``schedstat``). Tells a loop that sleeps on a futex
    (the interpreter lock or a threading lock) from one that is runnable but gets no CPU."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.base, self.interval_s = f"/proc/{pid}/task/{pid}", interval_s
        self.samples: list[tuple[float, str, str, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded even if stop() is never reached
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                state = Path(f"{self.base}/stat").read_text().rsplit(")", 1)[1].split()[0]
                call = Path(f"{self.base}/syscall").read_text().split()[0]  # or "running"
                ran, waited, _ = map(int, Path(f"{self.base}/schedstat").read_text().split())
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
        kinds: Counter[str] = Counter()
        for _, state, call, _, _ in inside:
            if state == "R" or call == "running":
                kinds["runnable or running"] += 1
            elif call == FUTEX:
                kinds["asleep on a futex"] += 1  # the interpreter lock or a threading lock
            elif call in EPOLL:
                kinds["asleep in epoll (idle)"] += 1
            else:
                kinds[f"{state} in syscall {call}"] += 1
        return {"span_ms": round((end - start) * 1000, 1),
                "ran_ms": round((last[3] - first[3]) / 1e6, 1),
                "waited_for_cpu_ms": round((last[4] - first[4]) / 1e6, 1),
                "states": {k: round(v / len(inside), 3)
                           for k, v in kinds.most_common()}}  # fmt: skip


def learned_elements(net: Net) -> int:
    """Elements of the learned sets in the kernel, whatever the tree calls them."""
    done = subprocess.run(in_ns(net.gateway, "nft", "-j", "list", "table", "inet", "egressgw"),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if done.returncode != 0:
        return -1
    sets = [item["set"] for item in json.loads(done.stdout).get("nftables", []) if "set" in item]
    return sum(len(s.get("elem", [])) for s in sets
               if re.fullmatch(r"allow[46](_any|_range)?", s.get("name", "")))  # fmt: skip


# -- the bench -----------------------------------------------------------------------------------
@dataclass
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
    daemon_args: list[str] = field(default_factory=list)
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


class Bench:
    def __init__(self, net: Net, workdir: Path, options: Options) -> None:
        self.net, self.workdir, self.o = net, workdir, options
        self.src = Path(options.egressgw_src).resolve()
        self.shape = Shape(options.pods, options.namespaces, options.policies, options.cidr)
        self.procs: list[Proc] = []
        self.daemon: Proc | None = None
        self.log = workdir / "egressgw.log"
        self.rev = self.runs = 0
        state = git_state(self.src)
        self.results = Results(setup={"egressgw_src": str(self.src), **state,
                                      "python": sys.version.split()[0], "cpus": os.cpu_count()},
                               options=asdict(options))  # fmt: skip
        self.cached_file = write_queries(workdir / "cached.txt", cached_names())

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def log_text(self, offset: int = 0) -> str:
        """The daemon's log from ``offset`` on, whole lines only."""
        text = self.log.read_text(errors="replace")[offset:] if self.log.exists() else ""
        return text[: text.rfind("\n") + 1]

    def dnsperf(self, label: str, datafile: Path, seconds: float, qps: float,
                once: bool = False) -> PerfRun:  # fmt: skip
        self.runs += 1
        out = self.workdir / f"dnsperf-{self.runs:02d}-{label}.out"
        run = PerfRun(self.net, out, self.o, datafile, seconds, qps, once)
        self.procs.append(run.proc)
        return run

    def start(self) -> None:
        o = self.o
        argv = in_ns(self.net.upstream, *dnsmasq_argv(UPSTREAM, *synth_args(UPSTREAM_TTL_S)),
                     cpu=o.client_cpu)  # fmt: skip
        self.procs.append(Proc("dnsmasq upstream", argv, self.workdir / "dnsmasq-upstream.log"))
        manifests = self.workdir / "manifests"
        manifests.mkdir()
        (manifests / "cluster.yaml").write_text(cluster_yaml(self.shape))
        write_atomically(manifests / "pods.yaml", pods_yaml(self.shape, self.rev))
        time.sleep(0.3)
        self.procs[-1].check()
        started = time.monotonic()
        argv = in_ns(self.net.gateway, *bootstrap_argv(self.src, self.workdir, o.daemon_args),
                     cpu=o.server_cpu if o.server_cpu >= 0 else None)  # fmt: skip
        self.daemon = Proc("egressgw", argv, self.log)
        self.procs.append(self.daemon)
        wait_ready(self.net, self.daemon, o.apply_timeout)
        ready_s, text = time.monotonic() - started, self.log_text()
        where = re.search(r"egd: egressgw from (\S+)", text)
        if where is None or not where[1].startswith(str(self.src)):
            raise RuntimeError(f"the daemon did not import egressgw from {self.src}: {where}")
        first = APPLIED.search(text)
        self.results.setup.update(ready_s=round(ready_s, 2), egressgw_module=where[1],
                                  first_apply_ms=float(first[6]) if first else None)  # fmt: skip
        progress(f"egressgw ready in {ready_s:.1f} s ({self.shape.pods:,} pods)")

    def warm(self) -> None:
        """The cached names once, then ``--learned`` unique names once: the learned elements
        every apply has to decide again."""
        figures = self.dnsperf("warm-cached", self.cached_file, 30, 1_000, once=True).wait()
        if figures["completed"] != len(cached_names()) or figures["noerror_share"] < 1.0:
            raise RuntimeError(f"warming pass on cached names: {figures}")
        if self.o.learned:
            unique = write_queries(self.workdir / "unique.txt", unique_names(1, self.o.learned))
            seconds = self.o.learned / 1_000 + 30
            figures = self.dnsperf("warm-unique", unique, seconds, 1_000, once=True).wait()
            if figures["noerror_share"] < 0.99:
                raise RuntimeError(f"warming pass on unique names: {figures}")
        learned = self.results.setup["learned_elements"] = learned_elements(self.net)
        progress(f"learned elements in the datapath: {learned:,}")

    def change(self, label: str) -> tuple[PerfRun, dict[str, Any], Applied | None, list[str]]:
        """A change window: dnsperf throughout, the change written after ``--lead`` s."""
        o, notes, applied = self.o, [], None
        offset = len(self.log_text())
        run = self.dnsperf(label, self.cached_file, o.seconds, o.qps)
        time.sleep(o.lead)
        self.rev += 1
        text = pods_yaml(self.shape, self.rev)
        written = time.monotonic()
        write_atomically(self.workdir / "manifests" / "pods.yaml", text)
        while time.monotonic() < written + o.apply_timeout:
            assert self.daemon is not None
            self.daemon.check()
            new = self.log_text(offset)
            if found := APPLIED.search(new):
                detected = round((time.monotonic() - written) * 1000, 1)
                applied = Applied(int(found[1]), int(found[2]), int(found[3]), int(found[4]),
                                  int(found[5]), float(found[6]), detected)  # fmt: skip
                break
            if failed := APPLY_FAILED.search(new):
                notes.append(f"{label}: apply failed: {failed[0][:300]}")
                break
            time.sleep(0.02)
        else:
            notes.append(f"{label}: no 'applied:' line within {o.apply_timeout:g} s")
        if applied is not None and not run.proc.alive():
            notes.append(f"{label}: the apply ended after the window; widen --seconds")
        figures = run.wait()
        if applied is not None and len(APPLIED.findall(self.log_text(offset))) > 1:
            notes.append(f"{label}: more than one apply in the window")
        return run, figures, applied, notes

    def round(self, n: int) -> Round:
        o = self.o
        offset = len(self.log_text())
        assert self.daemon is not None
        sampler = LoopSampler(self.daemon.pid)
        try:
            quiet_run = self.dnsperf(f"quiet-{n}", self.cached_file, o.seconds, o.qps)
            quiet = quiet_run.wait()
            stray = APPLIED.search(self.log_text(offset))
            run, change, applied, notes = self.change(f"change-{n}")
        finally:
            sampler.stop()
        text = self.log_text(offset)
        phases = phases_in(text, run.started, run.ended)
        loop = {"quiet window": sampler.during(quiet_run.started, quiet_run.ended),
                "change window": sampler.during(run.started, run.ended)}  # fmt: skip
        for name in LOOP_PHASES:  # the longest of each: the apply's, not a DNS answer's
            found = [p for p in phases if p["phase"] == name]
            if found:
                longest = max(found, key=lambda p: p["ms"])
                begin = run.started + longest["at_s"]
                loop[name] = sampler.during(begin, begin + longest["ms"] / 1000)
        if stray is not None:
            notes.append(f"round {n}: an apply ran during the quiet window")
        notes += [f"round {n} {which}: {w['lost']} of {w['sent']} queries lost"
                  for which, w in (("quiet", quiet), ("change", change)) if w["lost"]]  # fmt: skip
        took = f"{applied.reconcile_ms:,.0f} ms" if applied else "n/a"
        progress(f"round {n}: p99 quiet {quiet['p99_ms']:.2f} ms, change {change['p99_ms']:.2f} "
                 f"ms (max {change['max_ms']:.0f} ms; with lost ones {change['p99_all_ms']:.0f} "
                 f"ms), reconcile {took}, SERVFAIL {change['servfail']}, lost {change['lost']} "
                 f"({change['dropped_at_socket']} dropped at the server's socket)")  # fmt: skip
        self.results.notes += notes
        time.sleep(1.0)  # let the last answers of the change drain before the next quiet window
        return Round(n, quiet, change, asdict(applied) if applied else None, phases,
                     [int(ms) for ms in OVER_BOUND_LINE.findall(text)],
                     {k: v for k, v in loop.items() if v is not None}, notes)  # fmt: skip

    def profile(self) -> None:
        if pyspy() is None:
            self.results.notes.append("py-spy is not installed: no profiles")
            return
        assert self.daemon is not None
        for mode in ("gil", "idle"):
            raw = self.workdir / f"profile-{mode}.txt"
            progress(f"profile: py-spy --{mode} over a change window")
            with spying(self.daemon.pid, self.o.client_cpu, self.o.seconds, raw, "--rate", "200",
                        "--threads", f"--{mode}"):  # fmt: skip
                _run, figures, applied, notes = self.change(f"profile-{mode}")
            self.results.notes += notes
            if raw.exists():
                summary = stack_profile(raw.read_text(), lambda f: "(egressgw/" in f, True, 8)
                summary["change_p99_ms"] = figures["p99_ms"]
                summary["reconcile_ms"] = applied.reconcile_ms if applied else None
                self.results.profiles[mode] = summary
            time.sleep(1.0)

    def run(self) -> Results:
        self.start()
        self.warm()
        self.results.rounds = [self.round(n) for n in range(1, self.o.rounds + 1)]
        self.results.setup["learned_elements_after"] = learned_elements(self.net)
        if self.o.profile:
            self.profile()
        self.results.summary = summarize(self.results.rounds, self.o.qps)
        return self.results


# -- report --------------------------------------------------------------------------------------
def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values)}


def summarize(rounds: Sequence[Round], qps: float) -> dict[str, Any]:
    if not rounds:
        return {}
    done = [r.applied for r in rounds if r.applied is not None]
    phase_totals: dict[str, list[float]] = {}
    for r in rounds:
        sums: Counter[str] = Counter()
        for p in r.phases:
            if p["phase"] in LOOP_WAITS:  # the longest wait, not a sum over overlapping calls
                key = p["phase"] + " (max)"
                sums[key] = max(sums[key], p["ms"])
            else:
                sums[p["phase"]] += p["ms"]
        for key, value in sums.items():
            phase_totals.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for prefix, key in (("", "p99_ms"), ("all_sent_", "p99_all_ms")):
        out[f"{prefix}quiet_p99_ms"] = _spread([r.quiet[key] for r in rounds])
        out[f"{prefix}change_p99_ms"] = _spread([r.change[key] for r in rounds])
        out[f"{prefix}added_p99_ms"] = _spread([r.added(key) for r in rounds])
        out[f"{prefix}added_p99_ms_rounds"] = [round(r.added(key), 2) for r in rounds]
        out[f"{prefix}p99_ratio"] = _spread([r.ratio(key) for r in rounds])
    return out | {
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
        if seen:
            states = sorted({k for x in seen for k in x["states"]})
            out[key] = {"rounds": len(seen),
                        **{f: median(x[f] for x in seen)
                           for f in ("span_ms", "ran_ms", "waited_for_cpu_ms")},
                        "states": {k: median(x["states"].get(k, 0.0) for x in seen)
                                   for k in states}}  # fmt: skip
    return out


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _range(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s:
        return "n/a"
    return f"{_ms(s['median'], digits)} [{_ms(s['min'], digits)} .. {_ms(s['max'], digits)}]"


def render(results: Results) -> str:
    o, setup, rounds = results.options, results.setup, results.rounds
    timeout_ms = 1000 * DNSPERF_TIMEOUT_S
    out = [
        f"egressgw from {setup['egressgw_src']} (commit {setup.get('commit') or '?'}"
        f"{', uncommitted changes' if setup.get('uncommitted') else ''}); {o['pods']:,} pods in"
        f" {o['namespaces']} namespaces, {o['policies']:,} policies; dnsperf -Q {o['qps']:g} over"
        f" {o['seconds']:g} s windows, change written at +{o['lead']:g} s",
        f"daemon ready in {setup.get('ready_s')} s (first apply "
        f"{_ms(setup.get('first_apply_ms'), 0)} ms); learned elements before the rounds "
        f"{setup.get('learned_elements')}, after {setup.get('learned_elements_after')}",
        "", "latency per query in ms over the answered queries, as loadtest.dns reports it",
        *table(("round", "quiet p50", "p99", "p99.9", "max", "change p50", "p99", "p99.9", "max",
                "added p99", "ratio", ">100ms", "SERVFAIL", "lost", "sent", "dropped@socket"),
               [(str(r.round), _ms(r.quiet["p50_ms"], 2), _ms(r.quiet["p99_ms"], 2),
                 _ms(r.quiet["p999_ms"], 2), _ms(r.quiet["max_ms"]), _ms(r.change["p50_ms"], 2),
                 _ms(r.change["p99_ms"], 2), _ms(r.change["p999_ms"]), _ms(r.change["max_ms"]),
                 f"{r.added('p99_ms'):+.2f}", f"{r.ratio('p99_ms'):.1f}x",
                 *(str(r.change[k]) for k in ("over_100ms", "servfail", "lost", "sent",
                                              "dropped_at_socket")))
                for r in rounds], right=True),
        "", f"latency per query in ms over every query sent, a lost one counted as {timeout_ms} "
        "ms; the apply as the daemon logged it",
        *table(("round", "quiet p99", "p99.9", "change p99", "p99.9", "added p99", "ratio",
                "reconcile", "write->log", "elements"),
               [(str(r.round), _ms(r.quiet["p99_all_ms"], 2), _ms(r.quiet["p999_all_ms"], 2),
                 _ms(r.change["p99_all_ms"], 2), _ms(r.change["p999_all_ms"]),
                 f"{r.added('p99_all_ms'):+.2f}", f"{r.ratio('p99_all_ms'):.1f}x",
                 _ms(a["reconcile_ms"], 0) if a else "n/a",
                 _ms(a["detected_ms"], 0) if a else "n/a",
                 f"+{a['added']:,} -{a['removed']:,}" if a else "apply failed")
                for r in rounds for a in (r.applied,)], right=True),
    ]  # fmt: skip
    s = results.summary
    if s:
        out += [
            "",
            "summary over rounds: median [min .. max]",
            f"  {'':<26} {'answered queries':<28} every query sent (lost = {timeout_ms} ms)",
        ]
        for label, key, unit in (("baseline (quiet) p99", "quiet_p99_ms", " ms"),
                                 ("during reconcile p99", "change_p99_ms", " ms"),
                                 ("added p99", "added_p99_ms", " ms"),
                                 ("p99 ratio change / quiet", "p99_ratio", " x")):  # fmt: skip
            out.append(f"  {label:<26} {_range(s[key], 2) + unit:<28} "
                       f"{_range(s['all_sent_' + key], 2)}{unit}")  # fmt: skip
        out += [
            f"  max, quiet / change        {_range(s['quiet_max_ms'])} / "
            f"{_range(s['change_max_ms'])} ms",
            f"  reconcile (daemon's ms)    {_range(s['reconcile_ms'], 0)} ms "
            f"({s['applied_rounds']}/{len(rounds)} rounds applied)",
            f"  write -> 'applied:' line   {_range(s['write_to_applied_ms'], 0)} ms",
            f"  SERVFAIL per change window {s['servfail_change']} (quiet: {s['servfail_quiet']})",
            f"  lost per change window     {s['lost_change']} (dropped at the server's socket: "
            f"{s['dropped_at_socket_change']})",
            f"  ... as seconds of the load {_range(s['lost_seconds_change'], 2)} s",
            "", "daemon phases per change window, ms (sum per round; (max): the longest call)",
        ]  # fmt: skip
        out += [f"  {phase:<22} {_range(spread, 0)}"
                for phase, spread in s["phase_ms_per_round"].items()]  # fmt: skip
        over = [ms for r in rounds for ms in r.over_bound_ms]
        if over:
            out.append(f"  'programming ... over the bound' lines: {len(over)}, max {max(over)} ms")
        if s["loop"]:
            out += [
                "",
                "the event loop thread (answers every query), from /proc every 20 ms; "
                "medians over rounds; for a phase, the apply's longest call of it",
            ]
            out += ["  " + line for line in table(
                ("during", "span ms", "ran ms", "waited for CPU ms", "share of samples"),
                [(key, f"{x['span_ms']:,.0f}", f"{x['ran_ms']:,.0f}",
                  f"{x['waited_for_cpu_ms']:,.0f}",
                  ", ".join(f"{k} {v:.0%}" for k, v in x["states"].items() if v))
                 for key, x in s["loop"].items()], right=True)]  # fmt: skip
    if rounds:
        out += ["", f"timeline of round {rounds[-1].round}'s change window (s from dnsperf start):"]
        out += [f"  +{p['at_s']:6.3f} {p['phase']:<22} {p['thread']:<12} {p['ms']:9.1f} ms"
                for p in rounds[-1].phases]  # fmt: skip
    for mode, prof in results.profiles.items():
        out += ["", f"py-spy --{mode} over one change window ({prof['samples']} samples; change "
                f"p99 {_ms(prof.get('change_p99_ms'), 2)} ms, reconcile "
                f"{_ms(prof.get('reconcile_ms'), 0)} ms)"]  # fmt: skip
        for name, t in prof["threads"].items():
            out += [
                f"  thread {name}: {t['share']:.0%} of samples",
                "    own: " + ", ".join(f"{f} {share:.0%}" for f, share in t["own"][:5]),
            ]
            if t["inclusive"]:
                inc = ", ".join(f"{f} {share:.0%}" for f, share in t["inclusive"][:6])
                out.append(f"    inclusive (egressgw): {inc}")
    out += notes_section(results.notes)
    return "\n".join(out)


# -- command line --------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> Options:
    p = parser("reconcile", __doc__, Options())
    add = p.add_argument
    add("--rounds", type=int, help="quiet + change rounds (%(default)s)")
    add("--pods", type=int, help="pods in the manifests (%(default)s)")
    add("--namespaces", type=int, help="(%(default)s)")
    add("--policies", type=int, help="EgressPolicies in all (%(default)s)")
    add("--qps", type=float, help="dnsperf -Q, offered load (%(default)s)")
    add("--seconds", type=float, help="window length (%(default)s)")
    add("--lead", type=float, help="s into a change window the change is written (%(default)s)")
    add("--learned", type=int, help="unique names the client resolves first (%(default)s)")
    add("--no-cidr", dest="cidr", action="store_false",
        help="policies without their CIDR rule: no interval-set element per identity")  # fmt: skip
    add("--clients", type=int, help="dnsperf -c (%(default)s)")
    add("--outstanding", type=int, help="dnsperf -q (%(default)s)")
    add("--apply-timeout", type=float, help="s to wait for an apply (%(default)s)")
    add("--server-cpu", type=int, help="CPU of egressgw, -1: any (%(default)s)")
    add("--client-cpu", type=int, help="CPU of dnsperf (%(default)s)")
    add("--egressgw-src", metavar="DIR",
        help="checkout whose egressgw package the daemon runs (default: this tree)")  # fmt: skip
    add("--daemon-arg", dest="daemon_args", action="append", metavar="ARG", help="for egressgw run")
    add("--no-profile", dest="profile", action="store_false", help="leave the py-spy windows out")
    add("--keep", action="store_true", help="keep the work directory (logs, dnsperf output)")
    o = Options(**vars(p.parse_args(argv)))
    if o.rounds < 1 or o.pods < 2 or not 1 <= o.namespaces <= o.pods or o.policies < 1:
        p.error("--rounds >= 1, --pods >= 2, 1 <= --namespaces <= --pods, --policies >= 1")
    if not 0 < o.lead < o.seconds or o.qps <= 0:
        p.error("--lead must fall inside the window, --qps be positive")
    if o.learned < 0 or o.learned + len(cached_names()) > DEFAULT_CAP - 96:
        p.error(f"--learned + {len(cached_names())} cached names must stay below the cap")
    if o.pods > 0xFFFF * 0xFFFF:
        p.error("--pods: too many for the address plan")
    if not (Path(o.egressgw_src) / "egressgw" / "__init__.py").is_file():
        p.error(f"{o.egressgw_src} holds no egressgw package")
    o.egressgw_src = str(Path(o.egressgw_src).resolve())
    return o


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(list(sys.argv[1:] if argv is None else argv))
    if not preflight(("ip", "nft", "dnsmasq", "dnsperf", "taskset", "env")):
        return 2
    started = time.monotonic()
    with workspace(options.keep) as workdir, dns_net() as net:
        progress(f"work directory {workdir}")
        with Bench(net, workdir, options) as bench:
            results = bench.run()
    results.setup["duration_s"] = round(time.monotonic() - started, 1)
    return finish(render(results), results, options.json_path)


if __name__ == "__main__":
    sys.exit(main())
