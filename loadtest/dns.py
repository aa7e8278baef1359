"""Benchmark of the DNS interceptor against dnsmasq, each figure a ratio within the same run.

Namespaces ``egd-<8 hex>-{c,g,u}`` (``common.dns_net``): dnsperf in the client namespace on
``--client-cpu``; in the gateway, on ``--server-cpu``, egressgw (192.0.2.1), dnsmasq answering
directly (192.0.2.2) and dnsmasq forwarding (192.0.2.3); upstream, dnsmasq answering every
``*.bench.example`` name with the address it spells. Configurations alternate within each
round; ratios are medians of each round's own ratio.

(a) cached names: egressgw (asyncio, uvloop, ``--compare-src``) vs dnsmasq direct, >= 1.0x
(b) unique names, a fresh identity per run: egressgw vs the forwarder, >= 0.5x
(b-cap) unique names to an identity at its cap: >= 0.5x of the forwarder
(c) added p99 at the same offered load, median over ``--latency-rounds``: <= 2 ms
(d) ``egressgw_dns_programming_duration_seconds`` over (b): p99 <= 1 ms
then py-spy profiles of the daemon under each load, if py-spy is installed.

Run as root: ``python -m loadtest.dns [--json PATH]`` (about six minutes); loadtest/README.md
explains the set-up and how to read the figures. Every dnsperf run is bounded in queries and
seconds.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from egressgw.dns.interceptor import DnsSettings
from loadtest.common import (
    CACHED_SOURCE,
    DIRECT,
    DOMAIN,
    EGRESSGW,
    FORWARDER,
    GC_LINE,
    OVER_BOUND_LINE,
    UNIQUE_SOURCES,
    UPSTREAM,
    Daemon,
    Load,
    Net,
    Perf,
    Proc,
    bench_manifests,
    busy_share,
    cached_names,
    cpu_ticks,
    daemon_main,
    describe_git,
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
    preflight,
    probe,
    process_cpu_s,
    progress,
    pyspy,
    spying,
    stack_profile,
    synth_args,
    table,
    unique_names,
    verdict,
    version,
    workspace,
    write_queries,
)

PROGRAM_METRIC = "egressgw_dns_programming_duration_seconds"
FORWARDER_CACHE = 10_000
FORWARDER_NAMES = 400_000  # per forwarder run: more than it answers in the run's seconds
CAP_MARGIN = 96  # an egressgw unique run stops this many names below the cap
CAP_OUTSTANDING = 4  # dnsperf -q at the cap: each answer takes tens of ms there
COUNTERS = ("egressgw_dns_queries_total", "egressgw_dns_cache_total",
            "egressgw_dns_programming_failures_total", "egressgw_dns_upstream_errors_total",
            "egressgw_dns_cap_hits_total")  # fmt: skip
SERVERS = {"dnsmasq": DIRECT, "dnsmasq-forwarder": FORWARDER}
PAIRS = (("cached", "dnsmasq", "egressgw-asyncio"), ("unique", "dnsmasq-forwarder", "egressgw"))
FRAMEWORK = ("asyncio/", "<frozen", "runpy", "loadtest/", "selectors.py", "threading.py")


@dataclass
class Options:
    rounds: int = 9
    seconds: float = 3.0
    latency_seconds: float = 4.0
    latency_rounds: int = 12
    clients: int = 8
    outstanding: int = 100
    cap: int = DnsSettings().max_addresses_per_identity
    server_cpu: int = 0
    client_cpu: int = 1
    upstream_cpu: int | None = None  # None: the client's CPU
    uvloop: bool = True
    profile: bool = True
    profile_seconds: float = 5.0
    daemon_args: list[str] = field(default_factory=list)
    gc_threshold: str | None = None
    json_path: str | None = None
    keep: bool = False
    only: str | None = None  # "cached": (a) and (c); "unique": (b), (c) and (d)
    latency_load: str = "same"  # (c): the "same" offered load for both, or half of each "own"
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
    profiles: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _library(frame: str) -> bool:
    """Not a frame of the event loop or this wrapper, which are in every sample."""
    return not any(marker in frame for marker in FRAMEWORK)


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Round by round, a run against the baseline of its own round: the machine's drift over
    the run cancels out."""
    return [n / d for n, d in zip(numerator, denominator, strict=True)]


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' estimate: linear within the bucket that holds the q-quantile."""
    lower, below = 0.0, 0.0
    rank = q * buckets[max(buckets)]
    for bound in sorted(buckets):
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


class CpuUse:
    """Over one run: how busy the server's and the client's CPUs were, and the server process's
    CPU time per query. With the client's CPU at 100%, qps measures dnsperf as much as the
    server, and CPU time per query is what compares the servers."""

    def __init__(self, pid: int, server_cpu: int, client_cpu: int) -> None:
        self.pid, self.cpus = pid, (server_cpu, client_cpu)
        self.ticks, self.seconds = cpu_ticks(), process_cpu_s(pid)

    def done(self, queries: int) -> dict[str, float]:
        server, client = (busy_share(self.ticks, f"cpu{c}") for c in self.cpus)
        used = process_cpu_s(self.pid) - self.seconds
        return {"server_cpu_busy": server, "client_cpu_busy": client,
                "server_us_per_query": used / max(1, queries) * 1e6}  # fmt: skip


class Bench:
    def __init__(self, net: Net, workdir: Path, options: Options) -> None:
        self.net, self.workdir, self.o = net, workdir, options
        self.load = Load(options.clients, options.outstanding, options.client_cpu)
        self.procs: list[Proc] = []
        extra = ["--max-addresses-per-identity", str(options.cap), *options.daemon_args]
        self.daemon = Daemon(net, workdir, options.server_cpu, extra, options.gc_threshold)
        self.segment = self.runs = self.log_seen = 0
        self.sources = iter(UNIQUE_SOURCES)
        ticks = cpu_ticks()
        time.sleep(2.0)
        self.results = Results(
            machine={
                "kernel": platform.release(), "python": platform.python_version(),
                "cpus": os.cpu_count(), "dnsperf": version(["dnsperf", "-h"], r"Version (\S+)"),
                "dnsmasq": version(["dnsmasq", "--version"], r"version (\S+)"),
                "git": git_state(), "busy_before_pct": round(100 * busy_share(ticks), 1),
            },
            options=asdict(options),
        )  # fmt: skip
        self.cached_file = write_queries(workdir / "cached.txt", cached_names())

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()
        for proc in reversed(self.procs):
            proc.stop()

    # -- plumbing ----------------------------------------------------------------------------
    def start_servers(self) -> None:
        o = self.o
        upstream_cpu = o.client_cpu if o.upstream_cpu is None else o.upstream_cpu
        forward = [f"--server={UPSTREAM}", f"--cache-size={FORWARDER_CACHE}",
                   "--dns-forward-max=10000"]  # fmt: skip
        for name, ns, cpu, argv in (
            ("upstream", self.net.upstream, upstream_cpu, dnsmasq_argv(UPSTREAM, *synth_args())),
            ("direct", self.net.gateway, o.server_cpu, dnsmasq_argv(DIRECT, *synth_args())),
            ("forwarder", self.net.gateway, o.server_cpu, dnsmasq_argv(FORWARDER, *forward)),
        ):
            log = self.workdir / f"dnsmasq-{name}.log"
            self.procs.append(Proc(f"dnsmasq {name}", in_ns(ns, *argv, cpu=cpu), log))
        self.direct_pid = self.procs[1].pid
        (self.workdir / "manifests").mkdir()
        (self.workdir / "manifests" / "bench.yaml").write_text(bench_manifests())
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
             load: Load | None = None, **kwargs: Any) -> Perf:  # fmt: skip
        """One dnsperf run; its output is kept in the work directory."""
        self.runs += 1
        out = self.workdir / f"dnsperf-{self.runs:02d}-{label}.out"
        argv = dnsperf_argv(self.net, load or self.load, server, source, datafile, seconds,
                            **kwargs)  # fmt: skip
        with out.open("w") as sink:
            subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, check=True,
                           timeout=seconds + 30)  # fmt: skip
        return parse_dnsperf(server, out.read_text(errors="replace"))[0]

    def record(self, scenario: str, config: str, round_: int, perf: Perf,
               extra: dict[str, float] | None = None) -> None:  # fmt: skip
        entry = {"config": config, "round": round_, **asdict(perf), **(extra or {})}
        entry["noerror_share"] = perf.noerror_share
        self.results.runs.setdefault(scenario, []).append(entry)
        latency = f", p99 {perf.p99_ms:.2f} ms" if perf.p99_ms is not None else ""
        progress(f"  {scenario} {config:<17} round {round_}: {perf.qps:9.0f} qps, "
                 f"NOERROR {perf.noerror_share:6.1%}, lost {perf.lost}{latency}")  # fmt: skip
        if perf.noerror_share < 0.99 or perf.lost > perf.sent * 0.01:
            self.results.notes.append(
                f"{scenario} {config} round {round_}: {perf.noerror_share:.1%} NOERROR, "
                f"{perf.lost} lost of {perf.sent} ({perf.rcodes})"
            )

    def by_config(self, scenario: str, key: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for entry in self.results.runs.get(scenario, []):
            if entry[key] is not None:
                out.setdefault(entry["config"], []).append(float(entry[key]))
        return out

    def medians(self, scenario: str, key: str) -> dict[str, float]:
        return {c: median(v) for c, v in self.by_config(scenario, key).items()}

    def warm(self) -> None:
        perf = self.perf("warm", EGRESSGW, CACHED_SOURCE, self.cached_file, 10, once=True)
        if perf.completed != len(cached_names()) or perf.noerror_share < 0.99:
            raise RuntimeError(f"warming pass: {perf}")
        if perf.noerror_share < 1.0:
            self.results.notes.append(f"a warming pass got {perf.rcodes}")

    def events(self, scenario: str) -> None:
        """The daemon's pauses logged since the previous call: full collections and programming
        calls over their bound (answered SERVFAIL)."""
        log = self.workdir / "egressgw.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        text, self.log_seen = text[self.log_seen :], len(text)
        full = [float(ms) for gen, ms in GC_LINE.findall(text) if gen == "2"]
        slow = [float(ms) for gen, ms in GC_LINE.findall(text) if gen != "2"]
        self.results.daemon_events[scenario] = {
            "gc_full": len(full), "gc_full_max_ms": max(full, default=0.0),
            "gc_full_total_ms": round(sum(full), 1), "gc_young_over_10ms": len(slow),
            "programming_over_bound_ms": [int(ms) for ms in OVER_BOUND_LINE.findall(text)],
        }  # fmt: skip

    def on_egressgw(self, key: str, run: Callable[[], Perf]) -> Perf:
        """``run``, with the increase of the daemon's counters added up under ``key``."""
        before = self.daemon.metrics()
        perf = run()
        diff = self.daemon.metrics().minus(before)
        counters = {k: v for k, v in diff.values.items() if k.split("{")[0] in COUNTERS}
        writes = diff.histograms.get(PROGRAM_METRIC, {}).get(math.inf)
        if writes:
            counters["programming writes"] = writes
        total = self.results.egressgw_counters.setdefault(key, {})
        for name, value in counters.items():
            total[name] = total.get(name, 0.0) + value
        return perf

    def unique_run(self, label: str, server: str, seconds: float, count: int | None = None,
                   **kwargs: Any) -> Perf:  # fmt: skip
        """Fresh names (to egressgw, from a fresh identity): ``count`` of them, or as many as the
        forwarder answers in ``seconds``, egressgw's below the cap."""
        if count is None:
            count = FORWARDER_NAMES if server == FORWARDER else self.o.cap - CAP_MARGIN
        names = self.fresh_names(count)
        source = self.fresh_source() if server == EGRESSGW else CACHED_SOURCE
        return self.perf(label, server, source, names, seconds, once=True, **kwargs)

    # -- (a) ---------------------------------------------------------------------------------
    def cached(self) -> None:
        """The daemon starts (and is warmed) once per loop, not between the two runs of a pair,
        which keeps seconds of the machine's drift out of each ratio."""
        o = self.o
        variants: list[tuple[str, str, Path | None]] = [("asyncio", "asyncio", None)]
        variants += [("uvloop", "uvloop", None)] if o.uvloop else []
        variants += [("compare", "asyncio", Path(o.compare_src))] if o.compare_src else []
        progress(f"(a) cached names: dnsmasq, egressgw {', '.join(v[0] for v in variants)}; "
                 f"{o.rounds} rounds of {o.seconds:g} s each")  # fmt: skip
        pairs: dict[str, str] = {}  # each egressgw config: the dnsmasq runs next to its runs
        for variant, loop, src in variants:
            self.daemon.start(loop, src)
            self.warm()
            gw = f"egressgw-{variant}"
            base = pairs[gw] = "dnsmasq" if variant == "asyncio" else f"dnsmasq-next-to-{variant}"
            for r in range(o.rounds):
                for config in (base, gw) if r % 2 == 0 else (gw, base):
                    server, pid = (EGRESSGW, self.daemon.pid) if config == gw else (
                        DIRECT, self.direct_pid)  # fmt: skip
                    use = CpuUse(pid, o.server_cpu, o.client_cpu)
                    run = partial(self.perf, f"a-{config}", server, CACHED_SOURCE,
                                  self.cached_file, o.seconds)  # fmt: skip
                    perf = self.on_egressgw(f"(a) {config}", run) if config == gw else run()
                    self.record("a", config, r, perf, use.done(perf.completed))
        runs = self.by_config("a", "qps")
        ratios = {gw: round_ratios(runs[gw], runs[base]) for gw, base in pairs.items()}
        ratio = median(ratios["egressgw-asyncio"])
        summary: dict[str, Any] = {"qps": self.medians("a", "qps"), "ratio": ratio}
        # the rounds in which egressgw did at least as well as the dnsmasq run next to it
        summary["rounds_at_parity"] = {
            gw: [sum(r >= 1.0 for r in rounds), len(rounds)] for gw, rounds in ratios.items()
        }
        for key in ("server_cpu_busy", "client_cpu_busy", "server_us_per_query"):
            summary[key] = self.medians("a", key)
        if "egressgw-uvloop" in ratios:
            summary["ratio_uvloop"] = median(ratios["egressgw-uvloop"])
            summary["uvloop_over_asyncio"] = summary["ratio_uvloop"] / ratio
        if o.compare_src:
            summary["ratio_compare"] = median(ratios["egressgw-compare"])
            summary["compare_src"] = {"path": o.compare_src, **git_state(Path(o.compare_src))}
            summary["this_over_compare"] = ratio / summary["ratio_compare"]
        self.results.summary["a"] = summary
        self.events("a")

    # -- (b) and (d) -------------------------------------------------------------------------
    def unique(self) -> None:
        o = self.o
        progress(f"(b) unique names: dnsmasq forwarder, egressgw; {o.rounds} rounds")
        self.daemon.start()
        before = self.daemon.metrics()
        configs = ["dnsmasq-forwarder", "egressgw"]
        for r in range(o.rounds):
            for config in configs if r % 2 == 0 else configs[::-1]:
                if config == "egressgw":
                    run = partial(self.unique_run, "b-egressgw", EGRESSGW, o.seconds)
                    perf = self.on_egressgw("(b) egressgw", run)
                else:
                    perf = self.unique_run("b-forwarder", FORWARDER, o.seconds)
                self.record("b", config, r, perf)
        program = self.daemon.metrics().minus(before).histograms.get(PROGRAM_METRIC, {})
        runs = self.by_config("b", "qps")
        ratio = median(round_ratios(runs["egressgw"], runs["dnsmasq-forwarder"]))
        self.results.summary["b"] = {"qps": self.medians("b", "qps"), "ratio": ratio}
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
        o = self.o
        progress(f"(b-cap) unique names to an identity at its cap of {o.cap}; {o.rounds} rounds")
        self.daemon.start()
        load = replace(self.load, outstanding=CAP_OUTSTANDING)
        for r in range(o.rounds):
            source = self.fresh_source()
            fill = self.perf("b-cap-fill", EGRESSGW, source, self.fresh_names(o.cap), 30, once=True)
            if fill.completed != o.cap or fill.noerror_share < 0.99:
                raise RuntimeError(f"filling the identity to its cap: {fill}")
            self.record("b-cap-fill", "egressgw", r, fill)
            run = partial(self.perf, "b-cap", EGRESSGW, source, self.fresh_names(o.cap),
                          o.seconds, load, once=True)  # fmt: skip
            self.record("b-cap", "egressgw", r, self.on_egressgw("(b-cap) egressgw", run))
        qps = median(self.by_config("b-cap", "qps")["egressgw"])
        forwarder = self.results.summary["b"]["qps"]["dnsmasq-forwarder"]
        self.results.summary["b-cap"] = {"qps": qps, "ratio": qps / forwarder}
        self.events("b-cap")

    # -- (c) ---------------------------------------------------------------------------------
    def latency(self) -> None:
        o, s = self.o, self.results.summary
        self.daemon.start()
        for kind, base, gw in PAIRS:
            scenario = "a" if kind == "cached" else "b"
            if scenario not in s:
                continue
            half = {c: q / 2 for c, q in s[scenario]["qps"].items()}
            if o.latency_load == "same":
                half = dict.fromkeys(half, min(half[base], half[gw]))
            progress(
                f"(c) p99 at half load, {kind} names ({base} {half[base]:.0f} qps, egressgw "
                f"{half[gw]:.0f} qps); {o.latency_rounds} rounds of {o.latency_seconds:g} s"
            )
            for r in range(o.latency_rounds):
                for config in (base, gw) if r % 2 == 0 else (gw, base):
                    server = {"dnsmasq": DIRECT, "dnsmasq-forwarder": FORWARDER}.get(
                        config, EGRESSGW
                    )
                    label, qps = f"c-{kind}-{config}", half[config]
                    if kind == "unique":  # the same count of names for both: equal samples
                        perf = self.unique_run(label, server, o.latency_seconds, o.cap - CAP_MARGIN,
                                               qps=qps, verbose=True)  # fmt: skip
                    else:
                        if server == EGRESSGW:
                            self.warm()
                        perf = self.perf(label, server, CACHED_SOURCE, self.cached_file,
                                         o.latency_seconds, qps=qps, verbose=True)  # fmt: skip
                    self.record(f"c-{kind}", config, r, perf)
            p99 = self.medians(f"c-{kind}", "p99_ms")
            s[f"c-{kind}"] = {"offered_qps": half, "p50_ms": self.medians(f"c-{kind}", "p50_ms"),
                              "p99_ms": p99, "added_p99_ms": p99[gw] - p99[base]}  # fmt: skip
            self.events(f"c-{kind}")

    # -- profiles ----------------------------------------------------------------------------
    def profile(self) -> None:
        if pyspy() is None:
            self.results.notes.append("py-spy is not installed: no profiles")
            return
        o = self.o
        loads = [("cached", "asyncio"), ("unique", "asyncio"), ("at-cap", "asyncio")]
        loads = [load for load in loads if o.only in (None, load[0])]
        loads += [("cached", "uvloop")] if o.uvloop else []
        for kind, loop in loads:
            self.daemon.start(loop)
            progress(f"profile: py-spy on egressgw ({loop}) under {kind}-name load")
            source, load, datafile = CACHED_SOURCE, self.load, self.cached_file
            if kind == "cached":
                self.warm()
            else:
                source, datafile = self.fresh_source(), self.fresh_names(o.cap - CAP_MARGIN)
            if kind == "at-cap":
                self.perf("profile-fill", EGRESSGW, source, self.fresh_names(o.cap), 30, once=True)
                datafile = self.fresh_names(o.cap)
                load = replace(load, outstanding=CAP_OUTSTANDING)
            raw = self.workdir / f"profile-{kind}-{loop}.txt"
            with spying(self.daemon.pid, o.client_cpu, o.profile_seconds, raw, "--rate", "250"):
                perf = self.perf(f"profile-{kind}-{loop}", EGRESSGW, source, datafile,
                                 o.profile_seconds + 1, load, once=kind != "cached")  # fmt: skip
            if raw.exists():
                prof = stack_profile(raw.read_text(), _library)["threads"].get("all", {})
                self.results.profiles.append({"load": f"{kind} names, {loop}", "qps": perf.qps,
                                              **prof})  # fmt: skip
        self.events("profiles")

    def run(self) -> Results:
        self.start_servers()
        if self.o.only != "unique":
            self.cached()
        if self.o.only != "cached":
            self.unique()
        if self.o.only is None:
            self.at_cap()
        self.latency()
        if self.o.profile:
            self.profile()
        self.results.daemon_start_s = self.daemon.start_s
        return self.results


# -- report --------------------------------------------------------------------------------------
def render(results: Results) -> str:
    s, p = results.summary, results.programming
    a, b = s.get("a", {}), s.get("b")
    rows: list[tuple[str, str, str, str, str, bool | None]] = []  # None: no target
    for key, label, base, gw in (
        ("ratio", "(a) cached names, qps", "dnsmasq", "egressgw-asyncio"),
        ("ratio_uvloop", "(a) ... egressgw on uvloop", "dnsmasq-next-to-uvloop", "egressgw-uvloop"),
        ("ratio_compare", "(a) ... egressgw from "
         + str(a.get("compare_src", {}).get("commit", "?")).split(" ")[0],
         "dnsmasq-next-to-compare", "egressgw-compare"),
    ):  # fmt: skip
        if key in a:
            rows.append((label, f"dnsmasq {a['qps'][base]:,.0f}", f"egressgw {a['qps'][gw]:,.0f}",
                         f"{a[key]:.2f}x", ">= 1.0x", a[key] >= 1.0))  # fmt: skip
    if "client_cpu_busy" in a:
        busy, server, cost = a["client_cpu_busy"], a["server_cpu_busy"], a["server_us_per_query"]
        gw = "egressgw-asyncio"
        rows.append(("(a) ... server CPU per query", f"dnsmasq {cost['dnsmasq']:.1f} us",
                     f"egressgw {cost[gw]:.1f} us", f"{cost['dnsmasq'] / cost[gw]:.2f}x", "",
                     None))  # fmt: skip
        parity = ", ".join(f"{g.removeprefix('egressgw-')} {k}/{n}"
                           for g, (k, n) in a.get("rounds_at_parity", {}).items())  # fmt: skip
        if parity:
            rows.append(("(a) ... rounds at >= 1.0x", "", parity, "", "", None))
        rows.append(("(a) ... busy: server / client CPU",
                     f"{server['dnsmasq']:.0%} / {busy['dnsmasq']:.0%}",
                     f"{server[gw]:.0%} / {busy[gw]:.0%}", "", "", None))  # fmt: skip
    if b:
        forwarder = f"forwarder {b['qps']['dnsmasq-forwarder']:,.0f}"
        rows.append(("(b) unique names, qps", forwarder, f"egressgw {b['qps']['egressgw']:,.0f}",
                     f"{b['ratio']:.2f}x", ">= 0.5x", b["ratio"] >= 0.5))  # fmt: skip
        if "b-cap" in s:
            cap = s["b-cap"]
            rows.append(("(b-cap) ... identity at its cap", forwarder,
                         f"egressgw {cap['qps']:,.0f}", f"{cap['ratio']:.3f}x", ">= 0.5x",
                         cap["ratio"] >= 0.5))  # fmt: skip
    for kind, base, gw in PAIRS:
        c = s.get(f"c-{kind}")
        if c:
            offered, added = c["offered_qps"], c["added_p99_ms"]
            load = f"both {offered[gw]:,.0f} qps" if offered[gw] == offered[base] else (
                "half of own max")  # fmt: skip
            rows.append((f"(c) p99, {kind}, {load}",
                         f"{base.split('-')[-1]} {c['p99_ms'][base]:.2f} ms",
                         f"egressgw {c['p99_ms'][gw]:.2f} ms", f"{added:+.2f} ms", "<= +2 ms",
                         added <= 2.0))  # fmt: skip
    if p.get("writes"):
        rows.append(("(d) programming p99, metric", f"{p['writes']:,} writes",
                     f"{p['within_1ms']:.2%} <= 1 ms", f"p99 ~{p['p99_ms']:.2f} ms", "<= 1 ms",
                     p["within_1ms"] >= 0.99))  # fmt: skip
    head = ("scenario", "baseline", "egressgw", "ratio/added", "target", "result")
    out = ["", "egressgw DNS interceptor against dnsmasq, same run (medians; compare ratios only)",
           "", *table(head, [(*row[:5], verdict(row[5])) for row in rows])]  # fmt: skip
    if "uvloop_over_asyncio" in a:
        out += ["", f"event loop, cached names: uvloop / asyncio = {a['uvloop_over_asyncio']:.2f}x"]
    if "this_over_compare" in a:
        out.append(
            f"cached names: this tree / {a['compare_src']['path']} = "
            f"{a['this_over_compare']:.2f}x (each against its own dnsmasq runs)"
        )
    out += ["", "runs (qps; p50/p99/max ms with -v; NOERROR share; lost):"]
    for scenario, runs in results.runs.items():
        for e in runs:
            lat = (
                ""
                if e["p99_ms"] is None
                else (f"  p50 {e['p50_ms']:.2f} p99 {e['p99_ms']:.2f} max {e['max_ms']:.1f}")
            )
            out.append(f"  {scenario:<9} {e['config']:<18} r{e['round']} {e['qps']:>9,.0f}{lat}  "
                       f"NOERROR {e['noerror_share']:.1%}  lost {e['lost']}")  # fmt: skip
    if p.get("writes"):
        out += [
            "",
            f"(d) programming over (b): p50 ~{p['p50_ms']:.3f} ms; cumulative buckets:",
            "  " + "  ".join(f"le {k}: {v:.0f}" for k, v in p["buckets"].items()),
        ]
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
        out += ["", f"profile, {prof['load']} ({prof.get('samples', 0)} samples, "
                f"{prof['qps']:,.0f} qps): own time"]  # fmt: skip
        out += [f"  {share:6.1%}  {f}" for f, share in prof.get("own", [])]
        out.append("  inclusive time (egressgw and library frames):")
        out += [f"  {share:6.1%}  {f}" for f, share in prof.get("inclusive", [])]
    m = results.machine
    out += ["", f"egressgw {describe_git(m['git'])}",
            f"CPUs {m['busy_before_pct']}% busy in the 2 s before the run, "
            f"{m.get('busy_during_pct')}% during; daemon (re)starts: {results.daemon_start_s} s; "
            f"whole run {m.get('duration_s')} s"]  # fmt: skip
    out += notes_section(results.notes)
    return "\n".join(out)


def parse(argv: Sequence[str]) -> Options:
    p = parser("dns", __doc__, Options())
    add = p.add_argument
    add("--rounds", type=int, help="rounds per scenario (%(default)s)")
    add("--seconds", type=float, help="max-qps run length (%(default)s)")
    add("--latency-seconds", type=float, help="(c) run length (%(default)s)")
    add("--latency-rounds", type=int, help="(c) rounds (%(default)s)")
    add("--latency-load", choices=["same", "own"],
        help="(c): half the lower maximum for both, or half of each own (%(default)s)")  # fmt: skip
    add("--clients", type=int, help="dnsperf -c (%(default)s)")
    add("--outstanding", type=int, help="dnsperf -q (%(default)s)")
    add("--cap", type=int, help="egressgw --max-addresses-per-identity (%(default)s)")
    add("--server-cpu", type=int, help="CPU of the servers (%(default)s)")
    add("--client-cpu", type=int, help="CPU of dnsperf (%(default)s)")
    add("--upstream-cpu", type=int, help="CPU of the upstream (default: the client's)")
    add("--no-uvloop", dest="uvloop", action="store_false", help="leave egressgw on uvloop out")
    add("--no-profile", dest="profile", action="store_false", help="leave the profiles out")
    add("--profile-seconds", type=float, help="py-spy duration per load (%(default)s)")
    add("--daemon-arg", dest="daemon_args", action="append", metavar="ARG",
        help="for egressgw run")  # fmt: skip
    add("--gc-threshold", metavar="A,B,C", help="experiment: gc.set_threshold in the daemon")
    add("--keep", action="store_true", help="keep the work directory (logs, dnsperf output)")
    add("--compare-src", metavar="DIR", help="(a): also egressgw from this tree (a git worktree)")
    add("--only", choices=["cached", "unique"],
        help="only the scenarios on these names: (a) and (c), or (b), (c) and (d)")  # fmt: skip
    o = Options(**vars(p.parse_args(argv)))
    if o.cap <= 2 * CAP_MARGIN or o.rounds < 1 or o.latency_rounds < 1:
        p.error(f"--cap must exceed {2 * CAP_MARGIN}, --rounds and --latency-rounds be at least 1")
    identities = 2 * o.rounds + o.latency_rounds + 2  # (b) and (b-cap), (c), two profiles
    if o.only != "cached" and identities > len(UNIQUE_SOURCES):
        p.error(f"2 x --rounds + --latency-rounds + 2 fresh identities are needed ({identities});"
                f" the bench has {len(UNIQUE_SOURCES)} pods")  # fmt: skip
    if o.gc_threshold and not re.fullmatch(r"\d+,\d+,\d+", o.gc_threshold):
        p.error("--gc-threshold takes three whole numbers: A,B,C")
    o.compare_src = str(Path(o.compare_src).resolve()) if o.compare_src else None
    return o


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_daemon"]:
        return daemon_main(args[1:])
    options = parse(args)
    if not preflight(("ip", "nft", "dnsmasq", "dnsperf", "taskset")):
        return 2
    if options.uvloop and importlib.util.find_spec("uvloop") is None:
        progress("uvloop is not installed: egressgw runs on asyncio only")
        options.uvloop = False
    started, ticks = time.monotonic(), cpu_ticks()
    with workspace(options.keep, "egd-dns-") as workdir, dns_net() as net:
        progress(f"work directory {workdir}")
        with Bench(net, workdir, options) as bench:
            results = bench.run()
    results.machine["duration_s"] = round(time.monotonic() - started, 1)
    results.machine["busy_during_pct"] = round(100 * busy_share(ticks), 1)
    return finish(render(results), results, options.json_path)


if __name__ == "__main__":
    sys.exit(main())
