"""Benchmark of the DNS interceptor, each figure a ratio against a baseline of the same run.

What runs, in three network namespaces it creates and removes (``egd-<8 hex>-c/-g/-u``):

- client ``-c``: dnsperf, pinned to the client CPU. It sends the repeated names from 192.0.2.10
  (pod ``bench/cached``) and each unique-name run from an address of its own, 192.0.2.20 and up
  (pods ``bench/unique-N``): one identity per run, so each run starts with an empty per-identity
  address budget whatever ran before it;
- gateway ``-g`` (eth0 192.0.2.1-3 toward the client, up0 198.51.100.2 toward the upstream): the
  server under test and the baselines, all pinned to the server CPU and reached over the same link
  through the same netfilter hooks (egressgw's NAT chain turns conntrack on for the namespace,
  baselines included):
  egressgw (``egressgw run --manifests``) on 192.0.2.1:53, forwarding to the upstream;
  dnsmasq *direct* on 192.0.2.2:53, answering the benchmark names itself;
  dnsmasq *forwarder* on 192.0.2.3:53, forwarding to the same upstream, cache 10,000;
- upstream ``-u`` (198.51.100.1, behind up0 like a resolver beyond the uplink): dnsmasq answering
  every benchmark name from ``--synth-domain`` with TTL 300 s, pinned to the client CPU
  (``--upstream-cpu``). It stands for resolvers beyond the uplink, which run on other machines:
  next to the servers it preempted egressgw about once per unique query (0.9 involuntary
  switches per query at 2,950 qps), and its work was charged to the forwarder under test. At
  the loads of (b) and (c) the client CPU has room for it.

Every name answers an address of its own, in documentation ranges: ``h-203-0-113-N`` (A) and
``a-2001-db8-a-0-0-0-0-N`` (AAAA) are the 500 repeated names; unique names are AAAA
``u-2001-db8-b-S-0-0-H-L`` (2001:db8:b:S::H:L) with a fresh S per run, so every query of a unique
run goes upstream and every answer brings an address egressgw has not programmed yet (one new
allow6 element per answer). The manifests allow ``*.bench.example`` on TCP 443 to every pod; the
egress IPs are 198.51.100.10 and 2001:db8:100::10. egressgw runs with its defaults except
``--rate-limit 10000000`` (all load comes from a few sources; the default 500 qps per source
would measure the limiter) and ``--max-addresses-per-identity`` = ``--cap`` (default: egressgw's).

Scenarios (configurations alternated within each round, order reversed every other round;
qps are medians over rounds, ratios the median of the rounds' own ratios):

(a) cached: the 500 repeated names against dnsmasq direct, egressgw on asyncio and egressgw on
    uvloop (the same daemon through ``_daemon uvloop``, see ``daemon_main``). The daemon starts
    once per loop, with one warming pass, and its runs alternate with dnsmasq runs of their own
    (``dnsmasq-next-to-uvloop`` for uvloop), so no restart separates the two runs of a round.
    Target: egressgw >= 1.0 x dnsmasq qps. Each run also records
    how busy the server's and the client's CPUs were and the server process's CPU time per
    query: with both CPUs near 100%, qps is bounded by dnsperf as much as by the server, and
    CPU per query is the figure that compares the servers themselves.
(b) unique: fresh names, egressgw (asyncio) against the dnsmasq forwarder. An egressgw run stops
    after cap - 96 names, below the per-identity cap. Target: >= 0.5 x.
(b-cap) the same with the identity already holding ``cap`` addresses (filled by a first pass), so
    every answer evicts one, dnsperf ``-q 4``; against the forwarder's median from (b).
(c) p99 latency (dnsperf ``-v`` per-query times) with both servers offered the same load, ``-Q``:
    half of the lower of their median maxima from (a) and (b), so neither runs above half of
    what it can take; reported as egressgw p99 minus baseline p99. Target: <= 2 ms. "Added"
    latency compares the same traffic: with ``--latency-load own`` each server gets half of its
    own maximum instead, and the faster one is driven harder. On unique names both get the same
    count of names (cap - 96, egressgw's limit per identity): a pause of a few milliseconds
    moves the p99 of a short run more than that of a long one. A run of unique names lasts
    about a second and a half, and whether one of this machine's pauses falls in it moves its
    p99 by several milliseconds, for either server: (c) takes the median over
    ``--latency-rounds`` (12) rounds, not ``--rounds``.
(d) programming time: ``egressgw_dns_programming_duration_seconds`` from ``/metrics``, its
    increase over the (b) runs: the share of writes within 1 ms, interpolated p50/p99.
    Target: p99 <= 1 ms.
Then, if py-spy is installed, the daemon is sampled under each load (``py-spy record --format raw
--nolineno``) and the functions with the most own and inclusive time are listed. Throughout, the
daemon's wrapper logs every full garbage collection with its duration, and the report lists them
per scenario next to the programming calls egressgw logged as over their bound (those answers
were SERVFAIL).

Run as root: ``python -m loadtest.dns [--json PATH]``; ``--help`` lists counts and durations (the
defaults take about six minutes). Compare ratios, never absolute figures across runs or
machines. Every dnsperf run is bounded in queries and seconds; every process started here is
stopped by its pid and the namespaces are removed afterwards, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from dnslib import QTYPE, RCODE, DNSRecord
from prometheus_client.parser import text_string_to_metric_families

from egressgw.datapath.netns import call_in
from egressgw.dns.interceptor import DnsSettings

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
DOMAIN = "bench.example"
CACHED_SOURCE = "192.0.2.10"
UNIQUE_SOURCES = [f"192.0.2.{n}" for n in range(20, 60)]
EGRESSGW, DIRECT, FORWARDER = "192.0.2.1", "192.0.2.2", "192.0.2.3"
GATEWAY_UP, UPSTREAM = "198.51.100.2", "198.51.100.1"
HTTP_PORT = 9461
PROGRAM_METRIC = "egressgw_dns_programming_duration_seconds"
UPSTREAM_TTL_S = 300
FORWARDER_CACHE = 10_000
FORWARDER_NAMES = 400_000  # per forwarder run: more than it answers in the run's seconds
CAP_MARGIN = 96  # an egressgw unique run stops this many names below the cap
CAP_OUTSTANDING = 4  # dnsperf -q at the cap: each answer takes tens of ms there
CACHED_A, CACHED_AAAA = 250, 250
COUNTERS = (
    "egressgw_dns_queries_total",
    "egressgw_dns_cache_total",
    "egressgw_dns_programming_failures_total",
    "egressgw_dns_upstream_errors_total",
    "egressgw_dns_cap_hits_total",
)


def manifests() -> str:
    pods = [("cached", CACHED_SOURCE)] + [(f"unique-{i}", a) for i, a in enumerate(UNIQUE_SOURCES)]
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {project: bench}}\n",
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: bench}\n"
        "spec:\n  namespaceSelector: {matchLabels: {project: bench}}\n"
        '  egressIPs: ["198.51.100.10", "2001:db8:100::10"]\n',
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
        "metadata: {name: bench, namespace: bench}\nspec:\n  podSelector: {}\n  egress:\n"
        f'    - to: [{{fqdnPattern: "*.{DOMAIN}"}}]\n'
        "      ports: [{protocol: TCP, port: 443}]\n",
    ]
    docs += [
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, "
        f"labels: {{app: {name}}}}}\nstatus: {{podIPs: [{{ip: {address}}}]}}\n"
        for name, address in pods
    ]
    return "---\n".join(docs)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout)


def _in(ns: str, cpu: int | None, *argv: str) -> list[str]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return ["ip", "netns", "exec", ns, *pin, *argv]


# -- names and data files ------------------------------------------------------------------------
def cached_names() -> list[tuple[str, str]]:
    """The 500 repeated (name, type) pairs, each with its own address, A and AAAA interleaved."""
    a = [(f"h-203-0-113-{i}.{DOMAIN}", "A") for i in range(1, CACHED_A + 1)]
    aaaa = [(f"a-2001-db8-a-0-0-0-0-{i:x}.{DOMAIN}", "AAAA") for i in range(1, CACHED_AAAA + 1)]
    return [pair for both in zip(a, aaaa, strict=True) for pair in both]


def unique_names(segment: int, count: int) -> Iterator[tuple[str, str]]:
    """``count`` AAAA names in 2001:db8:b:<segment>::/64, each answering its own address."""
    for n in range(count):
        hi, lo = divmod(n, 0x10000)
        yield f"u-2001-db8-b-{segment:x}-0-0-{hi:x}-{lo:x}.{DOMAIN}", "AAAA"


def write_queries(path: Path, names: Iterator[tuple[str, str]] | list[tuple[str, str]]) -> Path:
    with path.open("w") as out:
        out.writelines(f"{name} {qtype}\n" for name, qtype in names)
    return path


# -- processes -----------------------------------------------------------------------------------
class Proc:
    """A process started here, its output in a log file; stopped through its own pid only."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, cwd: Path | None = None) -> None:
        self.name, self.log = name, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def dnsmasq_argv(listen: str, *extra: str) -> list[str]:
    return [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={listen}",
        "--port=53",
        *extra,
    ]


def synth_args() -> list[str]:
    return [
        f"--local-ttl={UPSTREAM_TTL_S}",
        f"--synth-domain={DOMAIN},203.0.113.0/24,h-",
        f"--synth-domain={DOMAIN},2001:db8:a::/64,a-",
        f"--synth-domain={DOMAIN},2001:db8:b::/48,u-",
    ]


# -- the namespaces ------------------------------------------------------------------------------
@dataclass
class Net:
    tag: str
    client: str
    gateway: str
    upstream: str

    def all(self) -> tuple[str, str, str]:
        return (self.client, self.gateway, self.upstream)

    def close(self) -> None:
        for ns in self.all():
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _ip(ns: str, *args: str) -> None:
    _run(["ip", "-n", ns, *args])


def build_net() -> Net:
    tag = f"egd-{uuid.uuid4().hex[:8]}"
    net = Net(tag, f"{tag}-c", f"{tag}-g", f"{tag}-u")
    try:
        for ns in net.all():
            _run(["ip", "netns", "add", ns])
            _ip(ns, "link", "set", "lo", "up")
            for key in ("all", "default"):
                _run(_in(ns, None, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"))
        for near, dev, far in (
            (net.client, "eth0", net.gateway),
            (net.gateway, "up0", net.upstream),
        ):
            _ip(near, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", far)
        client = [CACHED_SOURCE, *UNIQUE_SOURCES]
        addresses = {
            net.client: [("eth0", f"{a}/24") for a in client],
            net.gateway: [
                *(("eth0", f"{a}/24") for a in (EGRESSGW, DIRECT, FORWARDER)),
                ("up0", f"{GATEWAY_UP}/24"),
                ("up0", "2001:db8:100::2/64"),
            ],
            net.upstream: [("eth0", f"{UPSTREAM}/24"), ("eth0", "2001:db8:100::1/64")],
        }
        for ns, entries in addresses.items():
            for dev, cidr in entries:
                _ip(ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
            for dev in sorted({d for d, _ in entries}):
                _ip(ns, "link", "set", dev, "up")
    except BaseException:
        net.close()
        raise
    return net


# -- DNS probes and dnsperf ----------------------------------------------------------------------
def probe(net: Net, server: str, name: str, qtype: str, source: str) -> tuple[str, list[str]]:
    """(rcode, answer addresses) of one query from the client namespace."""

    def ask() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(2.0)
            sock.sendto(DNSRecord.question(name, qtype).pack(), (server, 53))
            return sock.recv(4096)

    reply = DNSRecord.parse(call_in(net.client, ask))
    addresses = [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
    return str(RCODE.get(reply.header.rcode, reply.header.rcode)), addresses


@dataclass
class Perf:
    """One dnsperf run."""

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


def parse_dnsperf(server: str, text: str) -> Perf:
    def number(label: str) -> float:
        found = re.search(rf"{label}:\s+([0-9.]+)", text)
        if found is None:
            raise RuntimeError(f"dnsperf output lacks {label!r}:\n{text[-2000:]}")
        return float(found.group(1))

    rcodes: dict[str, int] = {}
    found = re.search(r"Response codes:\s+(.*)", text)
    if found:
        for code, count in re.findall(r"([A-Z]+) (\d+) \(", found.group(1)):
            rcodes[code] = int(count)
    return Perf(
        server=server,
        qps=number("Queries per second"),
        sent=int(number("Queries sent")),
        completed=int(number("Queries completed")),
        lost=int(number("Queries lost")),
        rcodes=rcodes,
        run_s=number(r"Run time \(s\)"),
        avg_latency_ms=number(r"Average Latency \(s\)") * 1000,
    )


def percentile(ordered: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks; ``ordered`` sorted ascending."""
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Load:
    clients: int
    outstanding: int
    cpu: int


def dnsperf(
    net: Net,
    out: Path,
    load: Load,
    server: str,
    source: str,
    datafile: Path,
    seconds: float,
    *,
    once: bool = False,
    qps: float | None = None,
    verbose: bool = False,
) -> Perf:
    """One dnsperf run from the client namespace, bounded by ``seconds`` (and with ``once`` by
    one pass over the file); its output is kept in ``out``."""
    argv = ["dnsperf", "-s", server, "-p", "53", "-a", source, "-d", str(datafile)]
    argv += ["-l", f"{seconds:g}", "-c", str(load.clients), "-T", "1"]
    argv += ["-q", str(load.outstanding), "-t", "2"]
    if once:
        argv += ["-n", "1"]
    if qps is not None:
        argv += ["-Q", str(max(1, int(qps)))]
    if verbose:
        argv += ["-v"]
    with out.open("w") as sink:
        subprocess.run(
            _in(net.client, load.cpu, *argv),
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=seconds + 30,
        )
    text = out.read_text(errors="replace")
    perf = parse_dnsperf(server, text)
    if verbose:
        times = sorted(
            float(m.group(1)) * 1000 for m in re.finditer(r"^> \S+ \S+ \S+ ([0-9.]+)$", text, re.M)
        )
        if times:
            perf.p50_ms, perf.p99_ms = percentile(times, 50), percentile(times, 99)
            perf.max_ms, perf.latencies = times[-1], len(times)
    return perf


# -- the daemon ----------------------------------------------------------------------------------
GC_LINE = re.compile(r"loadtest\.dns: gc generation (\d) took ([0-9.]+) ms")
OVER_BOUND_LINE = re.compile(r"programming took (\d+) ms, over the bound")


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


def daemon_main(loop: str, argv: Sequence[str]) -> int:
    """``python -m loadtest.dns _daemon asyncio|uvloop ARGS``: ``egressgw ARGS`` on that loop.

    uvloop runs the daemon's main loop only (``uvloop.run``, a loop factory) and the global
    policy stays asyncio's: pyroute2's ``IPRoute`` (egressgw/datapath/addresses.py) builds an
    event loop of its own from the policy and opens an AF_NETLINK datagram endpoint on it, which
    uvloop refuses ("invalid family 16"), so with ``uvloop.install()`` the daemon dies at start.
    Both loops go through the same wrapper, which logs the class of the loop that runs and the
    garbage collector's pauses (``watch_gc``).
    """
    real_run = asyncio.run

    async def announced(main: Coroutine[Any, Any, T]) -> T:
        running = type(asyncio.get_running_loop())
        print(f"loadtest.dns: daemon loop {running.__module__}.{running.__qualname__}",
              file=sys.stderr, flush=True)  # fmt: skip
        return await main

    def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
        if loop == "uvloop":  # optional: pip install uvloop to compare loops
            uvloop = importlib.import_module("uvloop")
            return cast(T, uvloop.run(announced(main), debug=debug))
        return real_run(announced(main), debug=debug)

    asyncio.run = run  # egressgw.cli runs asyncio.run(Daemon(settings).run())
    watch_gc()
    from egressgw.cli import main

    return main(list(argv))


def _http_get(net: Net, path: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except OSError as exc:
            return 0, str(exc)

    return call_in(net.gateway, get)


Histogram = dict[float, float]  # upper bound -> cumulative count


@dataclass
class Scrape:
    counters: dict[str, float]
    program: Histogram

    def minus(self, before: Scrape) -> Scrape:
        counters = {k: v - before.counters.get(k, 0.0) for k, v in self.counters.items()}
        program = {k: v - before.program.get(k, 0.0) for k, v in self.program.items()}
        return Scrape({k: v for k, v in counters.items() if v}, program)


def parse_metrics(text: str) -> Scrape:
    counters: dict[str, float] = {}
    program: Histogram = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{PROGRAM_METRIC}_bucket":
                program[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{PROGRAM_METRIC}_count":
                counters["programming writes"] = sample.value
            elif sample.name in COUNTERS:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                counters[f"{sample.name}{{{labels}}}"] = sample.value
    return Scrape(counters, program)


class Daemon:
    """egressgw in the gateway namespace, on the asyncio or the uvloop event loop."""

    def __init__(
        self, net: Net, workdir: Path, cpu: int, extra: Sequence[str], gc_threshold: str | None
    ) -> None:
        self.net, self.workdir, self.cpu, self.extra = net, workdir, cpu, list(extra)
        self.gc_threshold = gc_threshold
        self.proc: Proc | None = None
        self.loop: tuple[str, Path | None] | None = None
        self.start_s: list[float] = []

    def start(self, loop: str, src: Path | None = None) -> None:
        """Start the daemon on ``loop``, from ``src`` (another egressgw tree: its own package
        and wrapper, run from that directory) or from this one."""
        if self.proc is not None and self.loop == (loop, src):
            return
        self.stop()
        argv = [sys.executable, "-m", "loadtest.dns", "_daemon", loop]
        if self.gc_threshold:
            argv.append(f"--gc-threshold={self.gc_threshold}")
        argv.append("run")
        argv += ["--manifests", str(self.workdir / "manifests"), "--uplink", "up0"]
        argv += ["--dns-listen", f"{EGRESSGW}:53", "--upstream", f"{UPSTREAM}:53"]
        argv += ["--http-listen", f"127.0.0.1:{HTTP_PORT}", "--rate-limit", "10000000"]
        argv += self.extra
        started = time.monotonic()
        log = self.workdir / "egressgw.log"
        command = _in(self.net.gateway, self.cpu, *argv)
        self.proc = Proc(f"egressgw ({loop}, {src or REPO})", command, log, cwd=src or REPO)
        self.loop = (loop, src)
        while _http_get(self.net, "/readyz")[0] != 200:
            self.proc.check()
            if time.monotonic() - started > 30:
                raise RuntimeError("egressgw was not ready within 30 s")
            time.sleep(0.1)
        rcode, answer = probe(self.net, EGRESSGW, f"h-203-0-113-1.{DOMAIN}", "A", CACHED_SOURCE)
        if rcode != "NOERROR" or answer != ["203.0.113.1"]:
            raise RuntimeError(f"egressgw answered {rcode} {answer} to the first probe")
        self.start_s.append(round(time.monotonic() - started, 2))

    def scrape(self) -> Scrape:
        status, text = _http_get(self.net, "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics: {status} {text[:200]}")
        return parse_metrics(text)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
            self.loop = None


# -- profiles ------------------------------------------------------------------------------------
@dataclass
class ProfileLine:
    function: str
    own_pct: float
    inclusive_pct: float


@dataclass
class Profile:
    load: str
    samples: int
    qps: float
    top_own: list[ProfileLine]
    top_inclusive: list[ProfileLine]


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
_FRAMEWORK = ("asyncio/", "<frozen", "runpy", "loadtest/", "selectors.py", "threading.py")


def _frame_name(frame: str) -> str:
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found["file"]
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{found['func']} ({path})"


def summarize_profile(load: str, qps: float, raw: str, top: int = 15) -> Profile:
    """Own and inclusive time per function from py-spy's collapsed stacks; the inclusive list
    leaves out the event loop's and this module's frames, which hold every sample. Samples are
    taken without pausing the daemon, so some stacks are cut short: inclusive shares are lower
    bounds."""
    own: Tally[str] = Tally()
    inclusive: Tally[str] = Tally()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_frame_name(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            if not any(m in name for m in _FRAMEWORK):
                inclusive[name] += count

    def lines(tally: Tally[str]) -> list[ProfileLine]:
        return [
            ProfileLine(name, 100 * own[name] / total, 100 * inclusive[name] / total)
            for name, _ in tally.most_common(top)
        ]

    return Profile(load, total, qps, lines(own) if total else [], lines(inclusive) if total else [])


# -- the bench -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    rounds: int = 9
    seconds: float = 3.0
    latency_seconds: float = 4.0
    latency_rounds: int = 12
    clients: int = 8
    outstanding: int = 100
    cap: int = DnsSettings().max_addresses_per_identity
    server_cpu: int = 0
    upstream_cpu: int | None = None  # None: the client's CPU
    client_cpu: int = 1
    uvloop: bool = True
    profile: bool = True
    profile_seconds: float = 5.0
    daemon_args: tuple[str, ...] = ()
    gc_threshold: str | None = None
    json_path: str | None = None
    keep: bool = False
    only: str | None = None  # "cached": (a) and (c) on cached names; "unique": (b), (c), (d)
    latency_load: str = "same"  # (c): "same" offered load for both, or half of each one's "own"
    compare_src: str | None = None  # (a): another egressgw tree, measured in the same rounds


@dataclass
class Results:
    machine: dict[str, Any]
    options: dict[str, Any]
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    programming: dict[str, Any] = field(default_factory=dict)
    egressgw_counters: dict[str, dict[str, float]] = field(default_factory=dict)
    daemon_start_s: list[float] = field(default_factory=list)
    daemon_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    profiles: list[Profile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Round by round, a run against the baseline of its round."""
    return [n / d for n, d in zip(numerator, denominator, strict=True)]


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of round-by-round ratios: a run is compared with the baseline of its round,
    which cancels the drift of whatever else the machine is doing."""
    return median(round_ratios(numerator, denominator))


def histogram_quantile(q: float, buckets: Histogram) -> float:
    """Prometheus' estimate: linear within the bucket that holds the q-quantile."""
    bounds = sorted(buckets)
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def git_of(src: Path) -> dict[str, Any]:
    """The commit of an egressgw tree and its uncommitted changes to the package."""

    def git(*args: str) -> str:
        # --no-optional-locks: the tree may be another engineer's working copy; read only
        proc = subprocess.run(["git", "--no-optional-locks", "-C", str(src), *args],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        return proc.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "egressgw").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": dirty}


def _git() -> dict[str, Any]:
    state = git_of(REPO)
    return {"commit": state["commit"], "egressgw_uncommitted": state["uncommitted"]}


def _cpu_times(stat: str) -> dict[str, tuple[int, int]]:
    """(busy, all) ticks per line of a /proc/stat reading: "cpu" for all CPUs, "cpuN" for one;
    idle and iowait are not busy."""
    out = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu"):
            break
        values = [int(x) for x in fields]
        out[name] = (sum(values) - values[3] - values[4], sum(values))
    return out


def _busy(before: str, after: str, cpu: str = "cpu") -> float:
    """The share of ``cpu``'s time (all CPUs by default) spent busy between two readings."""
    (busy0, total0), (busy1, total1) = _cpu_times(before)[cpu], _cpu_times(after)[cpu]
    return (busy1 - busy0) / max(1, total1 - total0)


def busy_between(stat_before: str) -> float:
    """The share of all CPUs' time spent busy since ``stat_before`` (a /proc/stat reading)."""
    return _busy(stat_before, Path("/proc/stat").read_text())


def _process_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuUse:
    """Over one run: how busy the server's and the client's CPUs were, and the CPU time the
    server process spent per query. When the client's CPU is the one at 100%, qps measures
    dnsperf, and CPU time per query compares the servers."""

    def __init__(self, server_pid: int, server_cpu: int, client_cpu: int) -> None:
        self.pid, self.cpus = server_pid, (server_cpu, client_cpu)
        self.stat, self.seconds = Path("/proc/stat").read_text(), _process_seconds(server_pid)

    def done(self, queries: int) -> dict[str, float]:
        after = Path("/proc/stat").read_text()
        busy = [_busy(self.stat, after, f"cpu{c}") for c in self.cpus]
        used = _process_seconds(self.pid) - self.seconds
        return {
            "server_cpu_busy": busy[0],
            "client_cpu_busy": busy[1],
            "server_us_per_query": used / max(1, queries) * 1e6,
        }


def cpu_busy(seconds: float) -> float:
    """The share of all CPUs' time spent busy over the next ``seconds``: others' load."""
    before = Path("/proc/stat").read_text()
    time.sleep(seconds)
    return busy_between(before)


def _version(argv: list[str], pattern: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    found = re.search(pattern, proc.stdout + proc.stderr)
    return found.group(1) if found else "?"


class Bench:
    def __init__(self, net: Net, workdir: Path, options: Options) -> None:
        self.net, self.workdir, self.options = net, workdir, options
        self.load = Load(options.clients, options.outstanding, options.client_cpu)
        self.procs: list[Proc] = []
        extra = ["--max-addresses-per-identity", str(options.cap), *options.daemon_args]
        self.daemon = Daemon(net, workdir, options.server_cpu, extra, options.gc_threshold)
        self.segment = 0
        self.sources = iter(UNIQUE_SOURCES)
        self.runs = 0
        self.log_seen = 0
        self.results = Results(
            machine={
                "kernel": platform.release(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "dnsperf": _version(["dnsperf", "-h"], r"Version (\S+)"),
                "dnsmasq": _version(["dnsmasq", "--version"], r"version (\S+)"),
                **_git(),
                "busy_before_pct": round(100 * cpu_busy(2.0), 1),
            },
            options=asdict(options),
        )
        self.cached_file = write_queries(workdir / "cached.txt", cached_names())

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()
        for proc in reversed(self.procs):
            proc.stop()

    # -- plumbing ----------------------------------------------------------------------------
    def start_servers(self) -> None:
        cpu = self.options.server_cpu
        upstream_cpu = self.options.upstream_cpu
        if upstream_cpu is None:
            upstream_cpu = self.options.client_cpu
        forward = [f"--server={UPSTREAM}", f"--cache-size={FORWARDER_CACHE}"]
        forward.append("--dns-forward-max=10000")
        servers = {
            "upstream": _in(
                self.net.upstream, upstream_cpu, *dnsmasq_argv(UPSTREAM, *synth_args())
            ),
            "direct": _in(self.net.gateway, cpu, *dnsmasq_argv(DIRECT, *synth_args())),
            "forwarder": _in(self.net.gateway, cpu, *dnsmasq_argv(FORWARDER, *forward)),
        }
        for name, argv in servers.items():
            self.procs.append(Proc(f"dnsmasq {name}", argv, self.workdir / f"dnsmasq-{name}.log"))
        self.direct_pid = self.procs[-2].pid
        (self.workdir / "manifests").mkdir()
        (self.workdir / "manifests" / "bench.yaml").write_text(manifests())
        time.sleep(0.3)
        for proc in self.procs:
            proc.check()
        for server in (DIRECT, FORWARDER):
            for name, qtype, want in (
                (f"h-203-0-113-9.{DOMAIN}", "A", "203.0.113.9"),
                (f"a-2001-db8-a-0-0-0-0-9.{DOMAIN}", "AAAA", "2001:db8:a::9"),
                (f"u-2001-db8-b-0-0-0-1-2.{DOMAIN}", "AAAA", "2001:db8:b::1:2"),
            ):
                rcode, answer = probe(self.net, server, name, qtype, CACHED_SOURCE)
                if rcode != "NOERROR" or answer != [want]:
                    raise RuntimeError(f"{server} answered {rcode} {answer} for {name}")

    def fresh_names(self, count: int) -> Path:
        """A data file of ``count`` names nobody has asked for yet."""
        self.segment += 1
        path = self.workdir / f"unique-{self.segment}.txt"
        return write_queries(path, unique_names(self.segment, count))

    def fresh_source(self) -> str:
        """The address of a pod (an identity) that has not asked anything yet."""
        source = next(self.sources, None)
        if source is None:
            raise RuntimeError("out of client addresses for fresh identities")
        return source

    def perf(self, label: str, server: str, source: str, datafile: Path, seconds: float,
             **kwargs: Any) -> Perf:  # fmt: skip
        self.runs += 1
        out = self.workdir / f"dnsperf-{self.runs:02d}-{label}.out"
        load = kwargs.pop("load", self.load)
        return dnsperf(self.net, out, load, server, source, datafile, seconds, **kwargs)

    def record(
        self,
        scenario: str,
        config: str,
        round_: int,
        perf: Perf,
        extra: dict[str, float] | None = None,
    ) -> None:
        entry = {"config": config, "round": round_, **asdict(perf), **(extra or {})}
        entry["noerror_share"] = perf.noerror_share
        self.results.runs.setdefault(scenario, []).append(entry)
        latency = f", p99 {perf.p99_ms:.2f} ms" if perf.p99_ms is not None else ""
        progress(
            f"  {scenario} {config:<17} round {round_}: {perf.qps:9.0f} qps, "
            f"NOERROR {perf.noerror_share:6.1%}, lost {perf.lost}{latency}"
        )
        if perf.noerror_share < 0.99 or perf.lost > perf.sent * 0.01:
            self.results.notes.append(
                f"{scenario} {config} round {round_}: {perf.noerror_share:.1%} NOERROR, "
                f"{perf.lost} lost of {perf.sent} ({perf.rcodes})"
            )

    def warm(self) -> None:
        perf = self.perf("warm", EGRESSGW, CACHED_SOURCE, self.cached_file, 10, once=True)
        if perf.completed != len(cached_names()) or perf.noerror_share < 0.99:
            raise RuntimeError(f"warming pass: {perf}")
        if perf.noerror_share < 1.0:
            self.results.notes.append(f"a warming pass got {perf.rcodes}")

    def events(self, scenario: str) -> None:
        """The daemon's pauses logged since the previous call: full collections (``watch_gc``)
        and programming calls over their bound (answered SERVFAIL)."""
        log = self.workdir / "egressgw.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        text, self.log_seen = text[self.log_seen :], len(text)
        full = [float(ms) for gen, ms in GC_LINE.findall(text) if gen == "2"]
        slow = [float(ms) for gen, ms in GC_LINE.findall(text) if gen != "2"]
        self.results.daemon_events[scenario] = {
            "gc_full": len(full),
            "gc_full_max_ms": max(full, default=0.0),
            "gc_full_total_ms": round(sum(full), 1),
            "gc_young_over_10ms": len(slow),
            "programming_over_bound_ms": [int(ms) for ms in OVER_BOUND_LINE.findall(text)],
        }

    def on_egressgw(self, key: str, run: Callable[[], Perf]) -> Perf:
        """``run`` with the daemon's counters' increase added up under ``key``."""
        before = self.daemon.scrape()
        perf = run()
        total = self.results.egressgw_counters.setdefault(key, {})
        for name, value in self.daemon.scrape().minus(before).counters.items():
            total[name] = total.get(name, 0.0) + value
        return perf

    def unique_run(
        self, label: str, server: str, seconds: float, count: int | None = None, **kwargs: Any
    ) -> Perf:
        """A run of fresh names (to egressgw, from a fresh identity): ``count`` names, or as
        many as the forwarder answers in ``seconds``; egressgw's stay below the cap."""
        if count is None:
            count = FORWARDER_NAMES if server == FORWARDER else self.options.cap - CAP_MARGIN
        names = self.fresh_names(count)
        source = self.fresh_source() if server == EGRESSGW else CACHED_SOURCE
        return self.perf(label, server, source, names, seconds, once=True, **kwargs)

    # -- (a) ---------------------------------------------------------------------------------
    def cached(self) -> None:
        """egressgw on each event loop against dnsmasq, each egressgw run next to a dnsmasq run
        of its own: the daemon starts (and is warmed) once per loop, not between the two runs
        of a pair, which leaves seconds of the machine's drift out of each ratio."""
        o = self.options
        variants: list[tuple[str, str, Path | None]] = [("asyncio", "asyncio", None)]
        if o.uvloop:
            variants.append(("uvloop", "uvloop", None))
        if o.compare_src:
            variants.append(("compare", "asyncio", Path(o.compare_src)))
        progress(
            f"(a) cached names: dnsmasq, egressgw {', '.join(v[0] for v in variants)}; "
            f"{o.rounds} rounds of {o.seconds:g} s each"
        )
        pairs: dict[str, str] = {}  # each egressgw config: the dnsmasq runs next to its runs
        for variant, loop, src in variants:
            self.daemon.start(loop, src)
            self.warm()
            assert self.daemon.proc is not None
            pid, gw = self.daemon.proc.pid, f"egressgw-{variant}"
            base = pairs[gw] = "dnsmasq" if variant == "asyncio" else f"dnsmasq-next-to-{variant}"
            for r in range(o.rounds):
                for config in (base, gw) if r % 2 == 0 else (gw, base):
                    if config == gw:
                        use = CpuUse(pid, o.server_cpu, o.client_cpu)
                        perf = self.on_egressgw(
                            f"(a) {config}",
                            partial(self.perf, f"a-{config}", EGRESSGW, CACHED_SOURCE,
                                    self.cached_file, o.seconds),
                        )  # fmt: skip
                    else:
                        use = CpuUse(self.direct_pid, o.server_cpu, o.client_cpu)
                        perf = self.perf(
                            "a-dnsmasq", DIRECT, CACHED_SOURCE, self.cached_file, o.seconds
                        )
                    self.record("a", config, r, perf, use.done(perf.completed))
        runs = self.by_config("a", "qps")
        qps = {c: median(v) for c, v in runs.items()}
        ratios = {gw: round_ratios(runs[gw], runs[base]) for gw, base in pairs.items()}
        ratio = median(ratios["egressgw-asyncio"])
        summary: dict[str, Any] = {"qps": qps, "ratio": ratio}
        # how many rounds egressgw did at least as well as the dnsmasq run next to it: the
        # spread of single rounds, which one median does not show
        summary["rounds_at_parity"] = {
            gw: [sum(r >= 1.0 for r in rounds), len(rounds)] for gw, rounds in ratios.items()
        }
        for key in ("server_cpu_busy", "client_cpu_busy", "server_us_per_query"):
            summary[key] = {c: median(v) for c, v in self.by_config("a", key).items()}
        if "egressgw-uvloop" in ratios:
            uvloop = median(ratios["egressgw-uvloop"])
            summary["ratio_uvloop"] = uvloop
            summary["uvloop_over_asyncio"] = uvloop / ratio  # each against its own dnsmasq runs
        if "egressgw-compare" in ratios:
            compare = median(ratios["egressgw-compare"])
            summary["ratio_compare"] = compare
            summary["compare_src"] = {"path": o.compare_src, **git_of(Path(str(o.compare_src)))}
            summary["this_over_compare"] = ratio / compare
        self.results.summary["a"] = summary
        self.events("a")

    # -- (b), (b-cap) and (d) ----------------------------------------------------------------
    def unique(self) -> None:
        o = self.options
        progress(f"(b) unique names: dnsmasq forwarder, egressgw; {o.rounds} rounds")
        self.daemon.start("asyncio")
        before = self.daemon.scrape()
        configs = ["dnsmasq-forwarder", "egressgw"]
        for r in range(o.rounds):
            for config in configs if r % 2 == 0 else configs[::-1]:
                if config == "egressgw":
                    perf = self.on_egressgw(
                        "(b) egressgw", lambda: self.unique_run("b-egressgw", EGRESSGW, o.seconds)
                    )
                else:
                    perf = self.unique_run("b-forwarder", FORWARDER, o.seconds)
                self.record("b", config, r, perf)
        program = self.daemon.scrape().minus(before).program
        runs = self.by_config("b", "qps")
        qps = {c: median(v) for c, v in runs.items()}
        ratio = paired_ratio(runs["egressgw"], runs["dnsmasq-forwarder"])
        self.results.summary["b"] = {"qps": qps, "ratio": ratio}
        self.events("b")
        total = program.get(math.inf, 0.0)
        result: dict[str, Any] = {"writes": int(total)}
        result["buckets"] = {str(k): v for k, v in sorted(program.items())}
        if total:
            result["within_1ms"] = program.get(0.001, 0.0) / total
            result["p50_ms"] = histogram_quantile(0.50, program) * 1000
            result["p99_ms"] = histogram_quantile(0.99, program) * 1000
        self.results.programming = result

    def at_cap(self) -> None:
        o = self.options
        progress(f"(b-cap) unique names to an identity at its cap of {o.cap}; {o.rounds} rounds")
        self.daemon.start("asyncio")
        load = replace(self.load, outstanding=CAP_OUTSTANDING)
        for r in range(o.rounds):
            source = self.fresh_source()
            fill = self.perf("b-cap-fill", EGRESSGW, source, self.fresh_names(o.cap), 30, once=True)
            if fill.completed != o.cap or fill.noerror_share < 0.99:
                raise RuntimeError(f"filling the identity to its cap: {fill}")
            self.record("b-cap-fill", "egressgw", r, fill)
            perf = self.on_egressgw(
                "(b-cap) egressgw",
                partial(self.perf, "b-cap", EGRESSGW, source, self.fresh_names(o.cap), o.seconds,
                        once=True, load=load),
            )  # fmt: skip
            self.record("b-cap", "egressgw", r, perf)
        qps = median(self.by_config("b-cap", "qps")["egressgw"])
        forwarder = self.results.summary["b"]["qps"]["dnsmasq-forwarder"]
        self.results.summary["b-cap"] = {"qps": qps, "ratio": qps / forwarder}
        self.events("b-cap")

    # -- (c) ---------------------------------------------------------------------------------
    def latency(self) -> None:
        o, s = self.options, self.results.summary
        self.daemon.start("asyncio")
        for kind, base, gw in (("cached", "dnsmasq", "egressgw-asyncio"),
                               ("unique", "dnsmasq-forwarder", "egressgw")):  # fmt: skip
            scenario = "a" if kind == "cached" else "b"
            if scenario not in s:
                continue
            half = {c: q / 2 for c, q in s[scenario]["qps"].items()}
            if o.latency_load == "same":
                half = dict.fromkeys(half, min(half[base], half[gw]))
            progress(
                f"(c) p99 at half load, {kind} names ({base} {half[base]:.0f} qps, "
                f"egressgw {half[gw]:.0f} qps); {o.latency_rounds} rounds of "
                f"{o.latency_seconds:g} s"
            )
            for r in range(o.latency_rounds):
                for config in (base, gw) if r % 2 == 0 else (gw, base):
                    server = {"dnsmasq": DIRECT, "dnsmasq-forwarder": FORWARDER}.get(
                        config, EGRESSGW
                    )
                    label = f"c-{kind}-{config}"
                    if kind == "unique":
                        # the same names for both: p99s of equal samples over equal time
                        perf = self.unique_run(label, server, o.latency_seconds, qps=half[config],
                                               count=o.cap - CAP_MARGIN, verbose=True)  # fmt: skip
                    else:
                        if server == EGRESSGW:
                            self.warm()
                        perf = self.perf(label, server, CACHED_SOURCE, self.cached_file,
                                         o.latency_seconds, qps=half[config],
                                         verbose=True)  # fmt: skip
                    self.record(f"c-{kind}", config, r, perf)
            p99 = {c: median(v) for c, v in self.by_config(f"c-{kind}", "p99_ms").items()}
            p50 = {c: median(v) for c, v in self.by_config(f"c-{kind}", "p50_ms").items()}
            s[f"c-{kind}"] = {"offered_qps": half, "p50_ms": p50, "p99_ms": p99,
                              "added_p99_ms": p99[gw] - p99[base]}  # fmt: skip
            self.events(f"c-{kind}")

    # -- profiles ----------------------------------------------------------------------------
    def profile(self) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            self.results.notes.append("py-spy is not installed: no profiles")
            return
        loads = [("cached", "asyncio"), ("unique", "asyncio"), ("at-cap", "asyncio")]
        if self.options.only:
            loads = [load for load in loads if load[0] == self.options.only]
        if self.options.uvloop:
            loads.append(("cached", "uvloop"))
        for kind, loop in loads:
            self.daemon.start(loop)
            progress(f"profile: py-spy on egressgw ({loop}) under {kind}-name load")
            seconds = self.options.profile_seconds
            source, load = CACHED_SOURCE, self.load
            if kind == "cached":
                self.warm()
                datafile = self.cached_file
            else:
                source = self.fresh_source()
                datafile = self.fresh_names(self.options.cap - CAP_MARGIN)
                if kind == "at-cap":
                    self.perf("profile-fill", EGRESSGW, source,
                              self.fresh_names(self.options.cap), 30, once=True)  # fmt: skip
                    datafile = self.fresh_names(self.options.cap)
                    load = replace(load, outstanding=CAP_OUTSTANDING)
            assert self.daemon.proc is not None
            raw = self.workdir / f"profile-{kind}-{loop}.txt"
            spy = subprocess.Popen(
                ["taskset", "-c", str(self.options.client_cpu), pyspy, "record",
                 "--pid", str(self.daemon.proc.pid), "--duration", f"{seconds:g}",
                 "--rate", "250", "--format", "raw", "--nolineno", "--nonblocking",
                 "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                perf = self.perf(f"profile-{kind}-{loop}", EGRESSGW, source, datafile,
                                 seconds + 1, once=kind != "cached", load=load)  # fmt: skip
            finally:
                try:
                    spy.wait(timeout=seconds + 20)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
            if raw.exists():
                label = f"{kind} names, {loop}"
                self.results.profiles.append(summarize_profile(label, perf.qps, raw.read_text()))
        self.events("profiles")

    # -- all ---------------------------------------------------------------------------------
    def run(self) -> Results:
        self.start_servers()
        only = self.options.only
        if only != "unique":
            self.cached()
        if only != "cached":
            self.unique()
        if only is None:
            self.at_cap()
        self.latency()
        if self.options.profile:
            self.profile()
        self.results.daemon_start_s = self.daemon.start_s
        return self.results

    def by_config(self, scenario: str, key: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for entry in self.results.runs.get(scenario, []):
            if entry[key] is not None:
                out.setdefault(entry["config"], []).append(float(entry[key]))
        return out


# -- report --------------------------------------------------------------------------------------
def render(results: Results) -> str:
    s, p = results.summary, results.programming
    a = s.get("a", {})
    rows: list[tuple[str, str, str, str, str, bool | None]] = []  # None: no target
    if a:
        rows.append(
            ("(a) cached names, qps", f"dnsmasq {a['qps']['dnsmasq']:,.0f}",
             f"egressgw {a['qps']['egressgw-asyncio']:,.0f}", f"{a['ratio']:.2f}x", ">= 1.0x",
             a["ratio"] >= 1.0)
        )  # fmt: skip
    if "ratio_uvloop" in a:
        rows.append(
            ("(a) ... egressgw on uvloop", f"dnsmasq {a['qps']['dnsmasq-next-to-uvloop']:,.0f}",
             f"egressgw {a['qps']['egressgw-uvloop']:,.0f}", f"{a['ratio_uvloop']:.2f}x",
             ">= 1.0x", a["ratio_uvloop"] >= 1.0)
        )  # fmt: skip
    if "client_cpu_busy" in a:
        busy, server, cost = a["client_cpu_busy"], a["server_cpu_busy"], a["server_us_per_query"]
        gw = "egressgw-asyncio"
        rows.append(
            ("(a) ... server CPU per query", f"dnsmasq {cost['dnsmasq']:.1f} us",
             f"egressgw {cost[gw]:.1f} us", f"{cost['dnsmasq'] / cost[gw]:.2f}x", "", None)
        )  # fmt: skip
        parity = ", ".join(f"{gw.removeprefix('egressgw-')} {k}/{n}"
                           for gw, (k, n) in a.get("rounds_at_parity", {}).items())  # fmt: skip
        if parity:
            rows.append(("(a) ... rounds at >= 1.0x", "", parity, "", "", None))
        rows.append(
            ("(a) ... busy: server / client CPU",
             f"{server['dnsmasq']:.0%} / {busy['dnsmasq']:.0%}",
             f"{server[gw]:.0%} / {busy[gw]:.0%}", "", "", None)
        )  # fmt: skip
    b = s.get("b")
    if b:
        rows.append(
            ("(b) unique names, qps", f"forwarder {b['qps']['dnsmasq-forwarder']:,.0f}",
             f"egressgw {b['qps']['egressgw']:,.0f}", f"{b['ratio']:.2f}x", ">= 0.5x",
             b["ratio"] >= 0.5)
        )  # fmt: skip
    if b and "b-cap" in s:
        cap = s["b-cap"]
        rows.append(
            ("(b-cap) ... identity at its cap", f"forwarder {b['qps']['dnsmasq-forwarder']:,.0f}",
             f"egressgw {cap['qps']:,.0f}", f"{cap['ratio']:.3f}x", ">= 0.5x", cap["ratio"] >= 0.5)
        )  # fmt: skip
    for kind, base, gw in (("cached", "dnsmasq", "egressgw-asyncio"),
                           ("unique", "dnsmasq-forwarder", "egressgw")):  # fmt: skip
        c = s.get(f"c-{kind}")
        if c:
            offered = c["offered_qps"]
            load = (f"both {offered[gw]:,.0f} qps" if offered[gw] == offered[base]
                    else "half of own max")  # fmt: skip
            rows.append(
                (f"(c) p99, {kind}, {load}",
                 f"{base.split('-')[-1]} {c['p99_ms'][base]:.2f} ms",
                 f"egressgw {c['p99_ms'][gw]:.2f} ms", f"{c['added_p99_ms']:+.2f} ms", "<= +2 ms",
                 c["added_p99_ms"] <= 2.0)
            )  # fmt: skip
    if p.get("writes"):
        rows.append(
            ("(d) programming p99, metric", f"{p['writes']:,} writes",
             f"{p['within_1ms']:.2%} <= 1 ms", f"p99 ~{p['p99_ms']:.2f} ms", "<= 1 ms",
             p["within_1ms"] >= 0.99)
        )  # fmt: skip
    head = ("scenario", "baseline", "egressgw", "ratio/added", "target")
    texts = [row[:5] for row in rows]
    widths = [max(len(h), *(len(t[i]) for t in texts)) for i, h in enumerate(head)]
    out = [
        "",
        "egressgw DNS interceptor against dnsmasq, same run (medians; compare ratios only)",
        "",
    ]
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + "  result")
    for text, row in zip(texts, rows, strict=True):
        cells = "  ".join(t.ljust(w) for t, w in zip(text, widths, strict=True))
        verdict = "" if row[5] is None else "met" if row[5] else "MISSED"
        out.append(f"{cells}  {verdict}".rstrip())
    if "ratio_compare" in a:
        src = a["compare_src"]
        rows.append(
            (f"(a) ... egressgw from {src.get('commit', src['path'])}",
             f"dnsmasq {a['qps']['dnsmasq-next-to-compare']:,.0f}",
             f"egressgw {a['qps']['egressgw-compare']:,.0f}", f"{a['ratio_compare']:.2f}x",
             ">= 1.0x", a["ratio_compare"] >= 1.0)
        )  # fmt: skip
    if "uvloop_over_asyncio" in a:
        out += ["", f"event loop, cached names: uvloop / asyncio = {a['uvloop_over_asyncio']:.2f}x"]
    if "this_over_compare" in a:
        out += [
            f"cached names: this tree / {a['compare_src']['path']} = "
            f"{a['this_over_compare']:.2f}x (each against its own dnsmasq runs)"
        ]
    out += ["", "runs (qps; p50/p99/max ms with -v; NOERROR share; lost):"]
    for scenario, runs in results.runs.items():
        for e in runs:
            lat = ""
            if e["p99_ms"] is not None:
                lat = f"  p50 {e['p50_ms']:.2f} p99 {e['p99_ms']:.2f} max {e['max_ms']:.1f}"
            out.append(
                f"  {scenario:<9} {e['config']:<18} r{e['round']} {e['qps']:>9,.0f}{lat}  "
                f"NOERROR {e['noerror_share']:.1%}  lost {e['lost']}"
            )
    if p.get("writes"):
        out += ["", f"(d) programming over (b): p50 ~{p['p50_ms']:.3f} ms; cumulative buckets:"]
        out.append("  " + "  ".join(f"le {k}: {v:.0f}" for k, v in p["buckets"].items()))
    for key, counters in results.egressgw_counters.items():
        out += ["", f"egressgw counters over {key}:"]
        out += [f"  {k} {v:,.0f}" for k, v in sorted(counters.items())]
    out += [
        "",
        "daemon pauses per scenario (full GC: count, max, total ms; programming over bound):",
    ]
    for scenario, ev in results.daemon_events.items():
        out.append(
            f"  {scenario:<9} full GC {ev['gc_full']}, max {ev['gc_full_max_ms']:.0f} ms, "
            f"total {ev['gc_full_total_ms']:.0f} ms; young GC >= 10 ms: "
            f"{ev['gc_young_over_10ms']}; over bound: {ev['programming_over_bound_ms']} ms"
        )
    for prof in results.profiles:
        out += ["", f"profile, {prof.load} ({prof.samples} samples, {prof.qps:,.0f} qps): own time"]
        out += [f"  {line.own_pct:5.1f}%  {line.function}" for line in prof.top_own]
        out.append("  inclusive time (egressgw and library frames):")
        out += [f"  {line.inclusive_pct:5.1f}%  {line.function}" for line in prof.top_inclusive]
    m = results.machine
    dirty = len(m["egressgw_uncommitted"])
    out += [
        "",
        f"egressgw {m['commit']} ({dirty} files uncommitted in egressgw/); CPUs "
        f"{m['busy_before_pct']}% busy in the 2 s before the run, {m['busy_during_pct']}% during",
        f"daemon (re)starts: {results.daemon_start_s} s; whole run {m.get('duration_s')} s",
    ]
    if results.notes:
        out += ["", "notes:"] + [f"  {n}" for n in results.notes]
    return "\n".join(out)


def parse(argv: Sequence[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.dns",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--rounds", type=int, default=d.rounds, help="rounds per scenario (%(default)s)")
    add("--seconds", type=float, default=d.seconds, help="max-qps run length (%(default)s)")
    add("--latency-seconds", type=float, default=d.latency_seconds, help="(c) run length")
    add("--latency-rounds", type=int, default=d.latency_rounds, help="(c) rounds (%(default)s)")
    add("--clients", type=int, default=d.clients, help="dnsperf -c (%(default)s)")
    add("--outstanding", type=int, default=d.outstanding, help="dnsperf -q (%(default)s)")
    add("--cap", type=int, default=d.cap, help="egressgw --max-addresses-per-identity")
    add("--server-cpu", type=int, default=d.server_cpu, help="CPU of the servers (%(default)s)")
    add("--client-cpu", type=int, default=d.client_cpu, help="CPU of dnsperf (%(default)s)")
    add("--upstream-cpu", type=int, help="CPU of the upstream (default: the client's)")
    add("--no-uvloop", action="store_true", help="leave egressgw on uvloop out")
    add("--no-profile", action="store_true", help="leave the py-spy profiles out")
    add("--profile-seconds", type=float, default=d.profile_seconds)
    add("--daemon-arg", action="append", default=[], metavar="ARG", help="for egressgw run")
    add("--gc-threshold", metavar="A,B,C", help="experiment: gc.set_threshold in the daemon")
    add("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    add("--keep", action="store_true", help="keep the work directory (logs, dnsperf output)")
    add("--latency-load", choices=["same", "own"], default=d.latency_load,
        help="(c): half the lower maximum for both, or half of each own (%(default)s)")  # fmt: skip
    add(
        "--compare-src",
        metavar="DIR",
        help="(a): also egressgw from this tree (e.g. a git worktree of an older commit)",
    )
    add("--only", choices=["cached", "unique"],
        help="only the scenarios on these names: (a) and (c), or (b), (c) and (d)")  # fmt: skip
    a = p.parse_args(argv)
    if a.cap <= 2 * CAP_MARGIN or a.rounds < 1 or a.latency_rounds < 1:
        p.error(f"--cap must exceed {2 * CAP_MARGIN}, --rounds and --latency-rounds be at least 1")
    identities = 2 * a.rounds + a.latency_rounds + 2  # (b) and (b-cap), (c), two profiles
    if a.only != "cached" and identities > len(UNIQUE_SOURCES):
        p.error(
            f"2 x --rounds + --latency-rounds + 2 fresh identities are needed ({identities}); "
            f"the bench has {len(UNIQUE_SOURCES)} pods"
        )
    if a.gc_threshold and not re.fullmatch(r"\d+,\d+,\d+", a.gc_threshold):
        p.error("--gc-threshold takes three whole numbers: A,B,C")
    return Options(
        rounds=a.rounds, seconds=a.seconds, latency_seconds=a.latency_seconds, clients=a.clients,
        outstanding=a.outstanding, cap=a.cap, server_cpu=a.server_cpu, client_cpu=a.client_cpu,
        upstream_cpu=a.upstream_cpu,
        uvloop=not a.no_uvloop, profile=not a.no_profile, profile_seconds=a.profile_seconds,
        daemon_args=tuple(a.daemon_arg), gc_threshold=a.gc_threshold, json_path=a.json_path,
        keep=a.keep, only=a.only, latency_load=a.latency_load, latency_rounds=a.latency_rounds,
        compare_src=str(Path(a.compare_src).resolve()) if a.compare_src else None,
    )  # fmt: skip


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="egd-dns-"))
    try:
        yield path
    finally:
        if keep:
            progress(f"work directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_daemon"]:
        loop, rest = args[1], args[2:]
        if rest[:1] and rest[0].startswith("--gc-threshold="):
            gc.set_threshold(*(int(x) for x in rest[0].split("=", 1)[1].split(",")))
            rest = rest[1:]
        return daemon_main(loop, rest)
    options = parse(args)
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "nft", "dnsmasq", "dnsperf", "taskset") if not shutil.which(t)]
    if missing:
        print(f"missing commands: {', '.join(missing)} (make deps installs them)", file=sys.stderr)
        return 2
    if options.uvloop and importlib.util.find_spec("uvloop") is None:
        print("uvloop is not installed: egressgw runs on asyncio only", file=sys.stderr)
        options = replace(options, uvloop=False)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    stat_before = Path("/proc/stat").read_text()
    with workspace(options.keep) as workdir:
        net = build_net()
        progress(f"namespaces {net.tag}-{{c,g,u}}, work directory {workdir}")
        try:
            with Bench(net, workdir, options) as bench:
                results = bench.run()
        finally:
            net.close()
    results.machine["duration_s"] = round(time.monotonic() - started, 1)
    results.machine["busy_during_pct"] = round(100 * busy_between(stat_before), 1)
    print(render(results))
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(asdict(results), indent=2) + "\n")
        progress(f"results written to {options.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
