"""What the benchmarks share: processes, namespaces, statistics, reports, the run's scaffolding,
and the DNS test bed of dns, reconcile, fuzz and conformance (namespaces, dnsmasq, dnsperf, the
egressgw daemon and its metrics)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from dnslib import QTYPE, RCODE, DNSRecord
from prometheus_client.parser import text_string_to_metric_families

from egressgw.cli import build_parser, daemon_environ
from egressgw.datapath.netns import call_in

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


# -- output and statistics -----------------------------------------------------------------------
def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation between the closest ranks: the
    value at rank (n - 1) * p / 100 of the sorted values, ranks counted from 0."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def table(head: Sequence[str], rows: Iterable[Sequence[str]], right: bool = False) -> list[str]:
    """Aligned lines; the first column left-aligned, the others too or, with ``right``, right."""
    rows = list(rows)
    widths = [max(len(cell) for cell in column) for column in zip(head, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        aligned = (c.rjust(w) if right and i else c.ljust(w)
                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip
        return "  ".join(aligned).rstrip()

    return [line(head), *map(line, rows)]


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "met" if ok else "MISSED"


def notes_section(notes: Sequence[str]) -> list[str]:
    """The report's closing notes, if any."""
    return ["", "notes:", *(f"  {n}" for n in notes)] if notes else []


def commits_measured(machine: dict[str, Any]) -> list[str]:
    """The egressgw commit at the start and at the end of a run, as far as recorded."""
    return [f"egressgw at the {when}: {describe_git(machine[when])}"
            for when in ("start", "end") if when in machine]  # fmt: skip


# -- processes -----------------------------------------------------------------------------------
def run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=timeout)


def in_ns(ns: str, *argv: str, cpu: int | str | None = None) -> list[str]:
    """``argv`` in network namespace ``ns``, pinned with taskset to ``cpu`` (a CPU list) if set."""
    pin = [] if cpu is None or cpu == "" else ["taskset", "-c", str(cpu)]
    return ["ip", "netns", "exec", ns, *pin, *argv]


def reap(popen: subprocess.Popen[Any], timeout: float) -> None:
    """Wait for a process that ends by itself, killed if it has not within ``timeout``."""
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=10)


class Proc:
    """A process started here, its output in a log file; stopped through its own pid only."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.log = name, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, cwd=cwd, env=env)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            reap(self.popen, 10)


def process_cpu_s(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> dict[str, tuple[int, int]]:
    """(busy, all) clock ticks so far per CPU line of /proc/stat: "cpu" for all CPUs, "cpuN" for
    one. Idle and iowait are not busy; guest time is counted in user time already."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu"):
            break
        values = [int(x) for x in fields[:8]]
        out[name] = (sum(values) - values[3] - values[4], sum(values))
    return out


def busy_share(before: dict[str, tuple[int, int]], cpu: str = "cpu") -> float:
    """The share of ``cpu``'s time (all CPUs by default) spent busy since ``before``."""
    (busy0, total0), (busy1, total1) = before[cpu], cpu_ticks()[cpu]
    return (busy1 - busy0) / max(1, total1 - total0)


def version(argv: Sequence[str], pattern: str) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "?"


# -- the run's scaffolding -----------------------------------------------------------------------
def git_state(src: Path = REPO) -> dict[str, Any]:
    """The commit of an egressgw tree and its uncommitted changes to the package. Read only
    (``--no-optional-locks``): the tree may be another engineer's working copy."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(src), *args],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "egressgw").splitlines()
    return {"commit": git("log", "-1", "--format=%h %s"), "uncommitted": dirty}


def describe_git(state: dict[str, Any]) -> str:
    changed = ", ".join(s.strip() for s in state["uncommitted"]) or "none"
    return f"{state['commit']}; uncommitted in egressgw/: {changed}"


def parser(prog: str, doc: str | None, defaults: Any) -> argparse.ArgumentParser:
    """A parser whose options default to the fields of the dataclass ``defaults`` (each option's
    dest is a field), with ``--json``."""
    p = argparse.ArgumentParser(prog=f"python -m loadtest.{prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.set_defaults(**asdict(defaults))
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    return p


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that remove namespaces


def preflight(tools: Iterable[str]) -> bool:
    """Root and every command there, or a message; then SIGTERM unwinds like an exception."""
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return False
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print(f"missing commands: {', '.join(missing)} (make deps installs them)", file=sys.stderr)
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


def finish(report: str, results: Any, json_path: str | None) -> int:
    print(report)
    if json_path:
        Path(json_path).write_text(json.dumps(asdict(results), indent=2) + "\n")
        progress(f"results written to {json_path}")
    return 0


@contextmanager
def workspace(keep: bool, prefix: str = "egd-") -> Iterator[Path]:
    """A temporary work directory (logs, data files), removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            progress(f"work directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- network namespaces --------------------------------------------------------------------------
@contextmanager
def namespaces(prefix: str, roles: str) -> Iterator[list[str]]:
    """A namespace per letter of ``roles``, ``<prefix>-<8 hex>-<letter>``, with loopback up and
    no duplicate address detection; all removed afterwards, also on failure."""
    tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
    names = [f"{tag}-{role}" for role in roles]
    try:
        for ns in names:
            run(["ip", "netns", "add", ns])
            ip(ns, "link", "set", "lo", "up")
            sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        progress(f"namespaces {tag}-{{{','.join(roles)}}}")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def ip(ns: str, *args: str) -> None:
    run(["ip", "-n", ns, *args])


def sysctl(ns: str, *settings: str) -> None:
    run(in_ns(ns, "sysctl", "-qw", *settings))


def veth(near: str, dev: str, far: str, peer: str = "eth0") -> None:
    ip(near, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", far)


def addresses(ns: str, *entries: tuple[str, str]) -> None:
    """Each (device, address/prefix) added, IPv6 ones without DAD; then the devices up."""
    for dev, cidr in entries:
        ip(ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
    for dev in sorted({d for d, _ in entries} - {"lo"}):
        ip(ns, "link", "set", dev, "up")


# -- the DNS test bed ----------------------------------------------------------------------------
DOMAIN = "bench.example"
CACHED_SOURCE = "192.0.2.10"
UNIQUE_SOURCES = [f"192.0.2.{n}" for n in range(20, 60)]
EGRESSGW, DIRECT, FORWARDER = "192.0.2.1", "192.0.2.2", "192.0.2.3"
GATEWAY_UP, UPSTREAM = "198.51.100.2", "198.51.100.1"
HTTP_PORT = 9461
UPSTREAM_TTL_S = 300
GC_LINE = re.compile(r"loadtest\.dns: gc generation (\d) took ([0-9.]+) ms")
OVER_BOUND_LINE = re.compile(r"programming took (\d+) ms, over the bound")
LATENCY_LINE = re.compile(r"^> \S+ \S+ \S+ ([0-9.]+)$", re.M)


@dataclass(frozen=True)
class Net:
    """client (eth0: CACHED_SOURCE, UNIQUE_SOURCES) -> gateway (eth0: EGRESSGW, DIRECT,
    FORWARDER; up0: GATEWAY_UP) -> upstream (eth0: UPSTREAM)."""

    client: str
    gateway: str
    upstream: str


@contextmanager
def dns_net() -> Iterator[Net]:
    """The three namespaces ``egd-<8 hex>-{c,g,u}``, removed afterwards, also on failure."""
    with namespaces("egd", "cgu") as (client, gateway, upstream):
        veth(client, "eth0", gateway)
        veth(gateway, "up0", upstream)
        addresses(client, *(("eth0", f"{a}/24") for a in (CACHED_SOURCE, *UNIQUE_SOURCES)))
        addresses(gateway, *(("eth0", f"{a}/24") for a in (EGRESSGW, DIRECT, FORWARDER)),
                  ("up0", f"{GATEWAY_UP}/24"), ("up0", "2001:db8:100::2/64"))  # fmt: skip
        addresses(upstream, ("eth0", f"{UPSTREAM}/24"), ("eth0", "2001:db8:100::1/64"))
        yield Net(client, gateway, upstream)


def bench_manifests() -> str:
    """Pods ``bench/cached`` (CACHED_SOURCE) and ``bench/unique-N`` (UNIQUE_SOURCES), allowed
    ``*.bench.example`` on TCP 443; egress IPs 198.51.100.10 and 2001:db8:100::10."""
    pods = [("cached", CACHED_SOURCE)] + [(f"unique-{i}", a) for i, a in enumerate(UNIQUE_SOURCES)]
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {project: bench}}\n",
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: bench}\n"
        "spec:\n  namespaceSelector: {matchLabels: {project: bench}}\n"
        '  egressIPs: ["198.51.100.10", "2001:db8:100::10"]\n',
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
        "metadata: {name: bench, namespace: bench}\nspec:\n  podSelector: {}\n  egress:\n"
        f'    - to: [{{fqdnPattern: "*.{DOMAIN}"}}]\n      ports: [{{protocol: TCP, port: 443}}]\n',
    ]
    docs += [
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, "
        f"labels: {{app: {name}}}}}\nstatus: {{podIPs: [{{ip: {address}}}]}}\n"
        for name, address in pods
    ]
    return "---\n".join(docs)


def cached_names() -> list[tuple[str, str]]:
    """The 500 repeated (name, type) pairs, each with its own address, A and AAAA interleaved."""
    a = [(f"h-203-0-113-{i}.{DOMAIN}", "A") for i in range(1, 251)]
    aaaa = [(f"a-2001-db8-a-0-0-0-0-{i:x}.{DOMAIN}", "AAAA") for i in range(1, 251)]
    return [pair for both in zip(a, aaaa, strict=True) for pair in both]


def unique_names(segment: int, count: int) -> Iterator[tuple[str, str]]:
    """``count`` AAAA names in 2001:db8:b:<segment>::/64, each answering its own address."""
    for n in range(count):
        hi, lo = divmod(n, 0x10000)
        yield f"u-2001-db8-b-{segment:x}-0-0-{hi:x}-{lo:x}.{DOMAIN}", "AAAA"


def write_queries(path: Path, names: Iterable[tuple[str, str]]) -> Path:
    with path.open("w") as out:
        out.writelines(f"{name} {qtype}\n" for name, qtype in names)
    return path


def dnsmasq_argv(listen: str, *extra: str) -> list[str]:
    return ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
            "--no-resolv", "--no-hosts", "--bind-interfaces", f"--listen-address={listen}",
            "--port=53", *extra]  # fmt: skip


def synth_args(ttl: int = UPSTREAM_TTL_S) -> list[str]:
    """dnsmasq answering every benchmark name with the address the name spells."""
    return [f"--local-ttl={ttl}", f"--synth-domain={DOMAIN},203.0.113.0/24,h-",
            f"--synth-domain={DOMAIN},2001:db8:a::/64,a-",
            f"--synth-domain={DOMAIN},2001:db8:b::/48,u-"]  # fmt: skip


def probe(net: Net, server: str, name: str, qtype: str, source: str) -> tuple[str, list[str]]:
    """(rcode, answer addresses) of one query from the client namespace."""

    def ask() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(2.0)
            sock.sendto(DNSRecord.question(name, qtype).pack(), (server, 53))
            return sock.recv(4096)

    reply = DNSRecord.parse(call_in(net.client, ask))
    found = [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
    return str(RCODE.get(reply.header.rcode, reply.header.rcode)), found


def http_get(net: Net, path: str) -> tuple[int, str]:
    """(status, body) from the daemon's HTTP listener; status 0 when it does not answer."""

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except OSError as exc:
            return 0, str(exc)

    return call_in(net.gateway, get)


def udp_counters(net: Net) -> dict[str, int]:
    """The gateway namespace's UDP counters (RcvbufErrors: queries dropped at a full socket)."""
    text = run(in_ns(net.gateway, "cat", "/proc/net/snmp")).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return dict(zip(rows[0], map(int, rows[1]), strict=True)) if len(rows) == 2 else {}


# -- dnsperf -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    clients: int
    outstanding: int
    cpu: int


@dataclass
class Perf:
    """One dnsperf run; percentiles from its per-query times (``-v``) when it printed them."""

    server: str
    qps: float
    sent: int
    completed: int
    lost: int
    rcodes: dict[str, int]
    run_s: float
    avg_latency_ms: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    latencies: int = 0  # how many per-query times the percentiles come from

    @property
    def noerror_share(self) -> float:
        return self.rcodes.get("NOERROR", 0) / self.completed if self.completed else 0.0


def dnsperf_argv(net: Net, load: Load, server: str, source: str, datafile: Path, seconds: float,
                 *, timeout_s: int = 2, once: bool = False, qps: float | None = None,
                 verbose: bool = False) -> list[str]:  # fmt: skip
    """dnsperf from the client namespace, bounded by ``seconds`` (with ``once``, also by one pass
    over the data file)."""
    argv = ["dnsperf", "-s", server, "-p", "53", "-a", source, "-d", str(datafile), "-l",
            f"{seconds:g}", "-c", str(load.clients), "-T", "1", "-q", str(load.outstanding),
            "-t", str(timeout_s)]  # fmt: skip
    argv += (["-n", "1"] if once else []) + (["-v"] if verbose else [])
    argv += ["-Q", str(max(1, int(qps)))] if qps is not None else []
    return in_ns(net.client, *argv, cpu=load.cpu)


def parse_dnsperf(server: str, text: str) -> tuple[Perf, list[float]]:
    """The run's figures and its per-query times in ms, sorted."""

    def number(label: str) -> float:
        found = re.search(rf"{label}:\s+([0-9.]+)", text)
        if found is None:
            raise RuntimeError(f"dnsperf output lacks {label!r}:\n{text[-2000:]}")
        return float(found.group(1))

    codes = re.search(r"Response codes:\s+(.*)", text)
    rcodes = {c: int(n) for c, n in re.findall(r"([A-Z]+) (\d+) \(", codes[1] if codes else "")}
    perf = Perf(server, number("Queries per second"), int(number("Queries sent")),
                int(number("Queries completed")), int(number("Queries lost")), rcodes,
                number(r"Run time \(s\)"), number(r"Average Latency \(s\)") * 1000)  # fmt: skip
    times = sorted(float(m[1]) * 1000 for m in LATENCY_LINE.finditer(text))
    if times:
        perf.p50_ms, perf.p99_ms = percentile(times, 50), percentile(times, 99)
        perf.max_ms, perf.latencies = times[-1], len(times)
    return perf, times


# -- the daemon ----------------------------------------------------------------------------------
def daemon_argv(manifests: Path) -> list[str]:
    """``egressgw run`` as every benchmark runs it: the manifests directory, the bench's
    addresses, and no rate limit to speak of (all load comes from a few sources)."""
    return ["run", "--manifests", str(manifests), "--uplink", "up0", "--dns-listen",
            f"{EGRESSGW}:53", "--upstream", f"{UPSTREAM}:53", "--http-listen",
            f"127.0.0.1:{HTTP_PORT}", "--rate-limit", "10000000"]  # fmt: skip


def wait_ready(net: Net, proc: Proc, timeout: float) -> None:
    """Until /readyz says 200 and a first query through the daemon is answered."""
    deadline = time.monotonic() + timeout
    while http_get(net, "/readyz")[0] != 200:
        proc.check()
        if time.monotonic() > deadline:
            tail = proc.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"egressgw was not ready within {timeout:g} s:\n{tail}")
        time.sleep(0.1)
    rcode, answer = probe(net, EGRESSGW, f"h-203-0-113-1.{DOMAIN}", "A", CACHED_SOURCE)
    if rcode != "NOERROR" or answer != ["203.0.113.1"]:
        raise RuntimeError(f"egressgw answered {rcode} {answer} to the first probe")


def watch_gc(threshold_ms: float = 10.0) -> None:
    """Log every full (generation 2) collection, and any other taking ``threshold_ms`` or more:
    a pause of the only thread that answers queries."""
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = (time.perf_counter() - started[0]) * 1000
        if info["generation"] == 2 or took >= threshold_ms:
            stamp, gen, freed = time.strftime("%H:%M:%S"), info["generation"], info["collected"]
            line = f"{stamp} loadtest.dns: gc generation {gen} took {took:.1f} ms, {freed} freed"
            print(line, file=sys.stderr, flush=True)

    gc.callbacks.append(callback)


def daemon_main(args: Sequence[str]) -> int:
    """``python -m loadtest.dns _daemon asyncio|uvloop [--gc-threshold=A,B,C] ARGS``:
    ``egressgw ARGS`` on that loop, logging the loop's class and the collector's pauses.

    uvloop runs the daemon's main loop only (``uvloop.run``); the global policy stays asyncio's,
    because pyroute2's ``IPRoute`` builds a loop of its own from the policy and opens an
    AF_NETLINK endpoint on it, which uvloop refuses: with ``uvloop.install()`` the daemon dies.
    """
    loop, rest = args[0], list(args[1:])
    if rest[:1] and rest[0].startswith("--gc-threshold="):
        gc.set_threshold(*(int(x) for x in rest.pop(0).split("=", 1)[1].split(",")))
    real_run = asyncio.run

    async def announced(main: Coroutine[Any, Any, T]) -> T:
        running = type(asyncio.get_running_loop())
        print(f"loadtest.dns: daemon loop {running.__module__}.{running.__qualname__}",
              file=sys.stderr, flush=True)  # fmt: skip
        return await main

    def run_on(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
        if loop == "uvloop":  # optional: pip install uvloop
            return cast(T, importlib.import_module("uvloop").run(announced(main), debug=debug))
        return real_run(announced(main), debug=debug)

    asyncio.run = run_on  # egressgw.cli runs asyncio.run(Daemon(settings).run())
    watch_gc()
    from egressgw.cli import main

    return main(rest)


@dataclass
class Metrics:
    """A /metrics reading: counters and gauges as ``name{label=value,...}``, histograms by name
    as upper bound -> cumulative count (summed over their other labels)."""

    values: dict[str, float]
    histograms: dict[str, dict[float, float]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        values: dict[str, float] = {}
        histograms: dict[str, dict[float, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                if family.type != "histogram":
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    values[f"{s.name}{{{labels}}}"] = s.value
                elif s.name.endswith("_bucket"):
                    buckets = histograms.setdefault(family.name, {})
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
        return cls(values, histograms)

    def minus(self, before: Metrics) -> Metrics:
        """The increase since ``before``; counters and gauges that did not move left out."""
        values = {k: v - before.values.get(k, 0.0) for k, v in self.values.items()}
        histograms = {
            name: {le: n - before.histograms.get(name, {}).get(le, 0.0) for le, n in b.items()}
            for name, b in self.histograms.items()
        }
        return Metrics({k: v for k, v in values.items() if v}, histograms)

    def matching(self, prefix: str) -> dict[str, float]:
        return {k: v for k, v in self.values.items() if k.startswith(prefix)}


class Daemon:
    """egressgw in the gateway namespace through ``python -m loadtest.dns _daemon LOOP``, from
    this tree or from ``src``, another one (its own package and wrapper, run from there)."""

    def __init__(self, net: Net, workdir: Path, cpu: int, extra: Sequence[str] = (),
                 gc_threshold: str | None = None) -> None:  # fmt: skip
        self.net, self.workdir, self.cpu, self.extra = net, workdir, cpu, list(extra)
        self.gc_threshold = gc_threshold
        self.proc: Proc | None = None
        self.loop: tuple[str, Path | None] | None = None
        self.start_s: list[float] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, loop: str = "asyncio", src: Path | None = None) -> None:
        """Started on ``loop`` unless it already runs there from the same tree."""
        if self.proc is not None and self.loop == (loop, src):
            return
        self.stop()
        argv = [sys.executable, "-m", "loadtest.dns", "_daemon", loop]
        argv += [f"--gc-threshold={self.gc_threshold}"] if self.gc_threshold else []
        run = daemon_argv(self.workdir / "manifests") + self.extra
        argv += run
        started = time.monotonic()
        command = in_ns(self.net.gateway, *argv, cpu=self.cpu)
        log = self.workdir / "egressgw.log"
        # on the allocator that ``egressgw run`` with these arguments starts itself over on
        env = daemon_environ(build_parser().parse_args(run), dict(os.environ))
        self.proc = Proc(f"egressgw ({loop}, {src or REPO})", command, log, src or REPO, env)
        self.loop = (loop, src)
        wait_ready(self.net, self.proc, 30.0)
        self.start_s.append(round(time.monotonic() - started, 2))

    def metrics(self) -> Metrics:
        status, text = http_get(self.net, "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics: {status} {text[:200]}")
        return Metrics.parse(text)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc, self.loop = None, None


# -- py-spy --------------------------------------------------------------------------------------
def pyspy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


@contextmanager
def spying(pid: int, cpu: int, seconds: float, raw: Path, *flags: str) -> Iterator[None]:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``raw`` (collapsed stacks), without
    pausing the process, while the body runs."""
    command = pyspy()
    assert command is not None
    spy = subprocess.Popen(
        ["taskset", "-c", str(cpu), command, "record", "--pid", str(pid), "--duration",
         f"{seconds:g}", "--format", "raw", "--nolineno", "--nonblocking", "--output", str(raw),
         *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        reap(spy, seconds + 20)


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")


def frame_name(frame: str) -> str:
    """``function (path)`` with the path from the package on: ``egressgw/...``, a library's or
    the standard library's module, ``loadtest/...``."""
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found["file"]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/egressgw/" in path:
        path = path[path.rfind("/egressgw/") + 1 :]
    elif (std := re.search(r"/lib/python3\.\d+/", path)) is not None:
        path = path[std.end() :]
    else:
        path = path.removeprefix(f"{REPO}/")
    return f"{found['func']} ({path})"


def stack_profile(raw: str, inclusive: Callable[[str], bool], threads: bool = False,
                  top: int = 15) -> dict[str, Any]:  # fmt: skip
    """py-spy's collapsed stacks: per thread (``threads``; else all as one, "all") its share of
    the samples and the functions with the most own and inclusive samples, as shares of that
    thread's samples. Inclusive lists only functions ``inclusive`` accepts. Stacks of a sampler
    that does not pause the process can be cut short: inclusive shares are lower bounds."""
    total = 0
    own: dict[str, Counter[str]] = {}
    incl: dict[str, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [f for f in stack.split(";") if f.strip()]
        name = "all"
        if threads and frames:
            head = frames.pop(0)
            name = re.sub(r"_\d+$", "_N", head.split(": ", 1)[-1])  # asyncio_0, _1...: one pool
        names = [frame_name(f) for f in frames if not f.startswith(("process ", "thread "))]
        count = int(count_text)
        total += count
        own.setdefault(name, Counter())[names[-1] if names else "?"] += count
        mine = incl.setdefault(name, Counter())
        for f in set(filter(inclusive, names)):
            mine[f] += count
    out = {}
    for name, tally in sorted(own.items(), key=lambda kv: -kv[1].total()):
        n = tally.total()
        out[name] = {
            "samples": n,
            "share": round(n / total, 3),
            "own": [(f, round(c / n, 3)) for f, c in tally.most_common(top)],
            "inclusive": [(f, round(c / n, 3)) for f, c in incl[name].most_common(top)],
        }
    return {"samples": total, "threads": out}
