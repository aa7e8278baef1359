"""Conformance of the DNS interceptor by ISC's DNS compliance tester, against its own upstream.

ISC's ``genreport`` (DNS-Compliance-Testing) sends one query per test (plain DNS, header flags,
unknown opcode, unknown type, EDNS versions, options and flags, TCP, TSIG, every query type)
and says per test ``ok`` or what was wrong (``formerr``, ``noopt``, ``nosoa``, ``timeout``, ...).
Here one genreport process tests, with the same flags and at the same time, the test zone at
egressgw's interceptor and at the upstream it forwards to, reached directly: the
difference between the two columns is what the interceptor changes. It is not part of CI.

What runs, in three network namespaces it creates and removes (``egd-<8 hex>-c/-g/-u``, built
by ``loadtest.dns.build_net``), documentation addresses only:

- client ``-c``: genreport. It asks the interceptor from 192.0.2.10, the pod
  ``conformance/genreport`` (the interceptor answers known workloads only), and the upstream
  over a link of its own, ``dir0`` 203.0.113.2/30 to 203.0.113.1;
- gateway ``-g``: ``egressgw run --manifests`` on 192.0.2.1:53 (``loadtest.dns.Daemon``),
  forwarding to 198.51.100.1. The manifests allow the zone's names (``fqdn: <zone>`` and
  ``fqdnPattern: "**.<zone>"``) on TCP 443 to the pod;
- upstream ``-u``: one server on 198.51.100.1 (for the interceptor) and 203.0.113.1 (direct),
  authoritative for the test zone (SOA, NS, A 203.0.113.80, AAAA 2001:db8:80::1, MX, TXT):
  ``--upstream dnsmasq`` (``--auth-zone``, the server of ``loadtest.dns``) and/or
  ``--upstream unbound`` (``local-zone: static``, the Debian package ``unbound``).

Tests: every test ``genreport -L`` lists, each selected with ``-i`` (EDNS, FULL, COMM and TYPE
groups, and the TSIG test ``dnswkk``), but ``icmp``; ``--test NAME`` runs only some. genreport
sends them 113 ms apart in its list's order (``-p``) and reports in input order (``-o``) as
JSON (``-j``). It runs in two modes, each against a freshly started interceptor (empty cache):

- ``recursive`` (``-R``): RD set on every query; expects RD echoed and no AA. That is what a
  workload's stub resolver sends to its resolver, the interceptor's job;
- ``auth`` (genreport's default): expects what an authoritative server does (AA on answers, RD
  not set unless asked). It shows what the interceptor changes in an authoritative upstream's
  answers.

Per test the table gives both results and a column "interceptor worse than upstream": ``WORSE``
when the upstream passed and the interceptor did not, ``WORSE +tag`` when both failed but the
interceptor with a failure the upstream did not have, ``differs +tag -tag`` when each had a
failure the other did not, ``better`` the other way round. Each test that is worse or differs
is run again alone (``-i`` that test) to a freshly started interceptor, against both servers
(``--no-recheck`` skips this): passing alone, its failure came from an answer cached for an
earlier test of the run, which asked the same name and type. For those tests it lists the
dig command that reproduces them (``genreport -D``). It also reports how egressgw counted the
queries (``egressgw_dns_queries_total``), and the commit measured at the start and the end.

Getting genreport (its code is not part of this repository): the repository is
github.com/isc-projects/DNS-Compliance-Testing (also gitlab.isc.org), or the fork
github.com/damaestro/DNS-Compliance-Testing. Clone either (or a local mirror of it) and build
it in /tmp::

    git clone https://github.com/damaestro/DNS-Compliance-Testing /tmp/dct
    apt-get install -y --no-install-recommends autoconf automake pkg-config libssl-dev
    cd /tmp/dct && autoreconf -fi && ./configure LIBS=-lresolv && make

(libresolv comes with libc6-dev; the git tree has no ``configure`` until ``autoreconf``). This
script also needs ``dig`` (Debian package dnsutils), to see the upstream answer before it starts.

Run as root: ``python -m loadtest.conformance --genreport /tmp/dct/genreport [--upstream
unbound] [--json PATH]``; one upstream takes about 30 s, plus 1-2 s per test run again.
Every process started here is stopped by its pid, every genreport run is bounded in time, and
the namespaces are removed afterwards, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.dns import (
    CACHED_SOURCE,
    EGRESSGW,
    UPSTREAM,
    Daemon,
    Net,
    Proc,
    _in,
    _ip,
    build_net,
    dnsmasq_argv,
    progress,
    synth_args,
    workspace,
)

ZONE = "conformance.example"
DIRECT, DIRECT_CLIENT = "203.0.113.1", "203.0.113.2"  # the client's own link to the upstream
ZONE_A, ZONE_AAAA = "203.0.113.80", "2001:db8:80::1"
SOA_FIELDS = "2024010101 1200 180 1209600 600"
MODES = ("recursive", "auth")
UPSTREAMS = ("dnsmasq", "unbound")
SKIPPED_TESTS = ("icmp",)  # pings: genreport needs IP_STRIPHDR for it, which Linux lacks
# tags genreport adds after "ok" (or after a failure) that say what was seen, not what is wrong
INFO_TAGS = frozenset(
    {"ok", "nsid", "expire", "subnet", "proxy", "cookie", "cookie+badcookie"}
    | {"cookie-mismatch", "cookie-mismatch+badcookie"}
)


def manifests(zone: str) -> str:
    """The pod at CACHED_SOURCE may resolve the zone's names (and loadtest.dns's probe name)."""
    return "---\n".join(
        [
            "apiVersion: v1\nkind: Namespace\n"
            "metadata: {name: conformance, labels: {project: conformance}}\n",
            "apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: conformance}\n"
            "spec:\n  namespaceSelector: {matchLabels: {project: conformance}}\n"
            '  egressIPs: ["198.51.100.10", "2001:db8:100::10"]\n',
            "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
            "metadata: {name: zone, namespace: conformance}\nspec:\n  podSelector: {}\n"
            "  egress:\n"
            f'    - to: [{{fqdn: "{zone}"}}, {{fqdnPattern: "**.{zone}"}},'
            ' {fqdnPattern: "*.bench.example"}]\n'
            "      ports: [{protocol: TCP, port: 443}]\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: genreport, namespace: conformance, "
            f"labels: {{app: genreport}}}}\nstatus: {{podIPs: [{{ip: {CACHED_SOURCE}}}]}}\n",
        ]
    )


# -- the upstream --------------------------------------------------------------------------------
def dnsmasq_upstream(zone: str) -> list[str]:
    """dnsmasq authoritative for ``zone`` on both addresses (and synthesizing loadtest.dns's
    names, which the daemon's start-up probe asks)."""
    serial, refresh, retry, expire, _minimum = SOA_FIELDS.split()
    return dnsmasq_argv(
        UPSTREAM,
        f"--listen-address={DIRECT}",
        f"--auth-server=ns.{zone}",
        f"--auth-zone={zone}",
        f"--auth-soa={serial},hostmaster.{zone},{refresh},{retry},{expire}",
        f"--host-record={zone},{ZONE_A},{ZONE_AAAA}",
        f"--host-record=ns.{zone},{UPSTREAM}",
        f"--mx-host={zone},mail.{zone},10",
        f"--txt-record={zone},v=conformance",
        *synth_args(),
    )


def unbound_conf(zone: str, directory: Path) -> str:
    data = [
        f"{zone}. 600 IN SOA ns.{zone}. hostmaster.{zone}. {SOA_FIELDS}",
        f"{zone}. 600 IN NS ns.{zone}.",
        f"{zone}. 600 IN A {ZONE_A}",
        f"{zone}. 600 IN AAAA {ZONE_AAAA}",
        f"{zone}. 600 IN MX 10 mail.{zone}.",
        f'{zone}. 600 IN TXT "v=conformance"',
        f"ns.{zone}. 600 IN A {UPSTREAM}",
        "h-203-0-113-1.bench.example. 300 IN A 203.0.113.1",
    ]
    lines = [
        "server:",
        f"  interface: {UPSTREAM}",
        f"  interface: {DIRECT}",
        "  port: 53",
        "  do-daemonize: no",
        "  use-syslog: no",
        '  logfile: ""',
        '  chroot: ""',
        '  username: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        "  do-ip6: no",
        "  num-threads: 1",
        "  access-control: 0.0.0.0/0 allow",
        '  module-config: "iterator"',
        f'  local-zone: "{zone}." static',
        '  local-zone: "bench.example." static',
        *(f"  local-data: '{record}'" for record in data),
        "remote-control:",
        "  control-enable: no",
    ]
    return "\n".join(lines) + "\n"


def start_upstream(kind: str, net: Net, workdir: Path, zone: str) -> Proc:
    log = workdir / f"{kind}.log"
    if kind == "dnsmasq":
        argv = dnsmasq_upstream(zone)
    else:
        conf = workdir / "unbound.conf"
        conf.write_text(unbound_conf(zone, workdir))
        argv = ["unbound", "-d", "-c", str(conf)]
    proc = Proc(f"{kind} upstream", _in(net.upstream, None, *argv), log)
    deadline = time.monotonic() + 10
    while True:
        proc.check()
        answer = dig(net, DIRECT, "SOA", zone)
        if " SOA " in answer.replace("\t", " "):
            return proc
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} does not answer SOA {zone} on {DIRECT}:\n{answer}")
        time.sleep(0.2)


def dig(net: Net, server: str, qtype: str, name: str) -> str:
    argv = _in(net.client, None, "dig", f"@{server}", qtype, name, "+tries=1", "+time=1")
    argv += ["+noall", "+answer"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    return done.stdout


def direct_link(net: Net) -> None:
    """A veth between the client and the upstream, so genreport asks the upstream directly."""
    _ip(net.client, "link", "add", "dir0", "type", "veth", "peer", "name", "dir0", "netns",
        net.upstream)  # fmt: skip
    for ns, address in ((net.client, DIRECT_CLIENT), (net.upstream, DIRECT)):
        _ip(ns, "addr", "add", f"{address}/30", "dev", "dir0")
        _ip(ns, "link", "set", "dir0", "up")


# -- genreport -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Test:
    name: str
    groups: str  # EDNS, FULL, COMM, TYPE, or "" for the ungrouped ones
    dig: str


def list_tests(genreport: str) -> list[Test]:
    listed = subprocess.run([genreport, "-L"], capture_output=True, text=True, timeout=10)
    digs = subprocess.run([genreport, "-D"], capture_output=True, text=True, timeout=10)
    commands = {}
    for line in digs.stdout.splitlines():
        name, _, command = line.partition(" ")
        commands[name] = command.strip().strip("'")
    tests = []
    for line in listed.stdout.splitlines():
        name, *groups = line.split()
        tests.append(Test(name, " ".join(groups), commands.get(name, "")))
    if not tests:
        raise RuntimeError(f"{genreport} -L listed no tests: {listed.stderr[-500:]}")
    return tests


def parse_report(text: str) -> dict[str, dict[str, str]]:
    """genreport -j output: server address -> test -> its tags, e.g. "ok" or "noopt,formerr".

    Each server's report is one line (``{ "zone": ... }``), read line by line: the document
    around them is not complete when genreport dies after printing them (see ``run_genreport``).
    """
    found: dict[str, dict[str, str]] = {}
    decoder = json.JSONDecoder()
    for line in text.splitlines():
        if not line.startswith('{ "zone"'):
            continue
        entry, _end = decoder.raw_decode(line)  # the separator "," follows on the same line
        if "tests" in entry:
            found[entry["address"]] = {k: v for k, v in entry["tests"].items() if k != "signed"}
        elif "summary" in entry:
            found[entry["address"]] = {"*": entry["summary"]}
    return found


def failures(tags: str) -> frozenset[str]:
    return frozenset(tags.split(",")) - INFO_TAGS


def passed(tags: str) -> bool:
    return tags.split(",")[0] == "ok"


def verdict(upstream: str, interceptor: str) -> str:
    """The "interceptor worse than upstream" cell."""
    if "skipped" in (upstream, interceptor) or not upstream or not interceptor:
        return "not run"
    if passed(upstream) and not passed(interceptor):
        return "WORSE"
    if passed(interceptor) and not passed(upstream):
        return "better"
    added = failures(interceptor) - failures(upstream)
    removed = failures(upstream) - failures(interceptor)
    if added and removed:
        return f"differs +{','.join(sorted(added))} -{','.join(sorted(removed))}"
    if added:
        return "WORSE +" + ",".join(sorted(added))
    return "better" if removed else ""


@dataclass
class Row:
    test: str
    groups: str
    upstream: str
    interceptor: str
    worse: str
    alone: str = ""  # the interceptor's result for this test alone, to a fresh daemon
    alone_upstream: str = ""

    @property
    def rechecked(self) -> bool:
        return self.worse.startswith(("WORSE", "differs"))


@dataclass
class Run:
    upstream_kind: str
    mode: str
    flags: list[str]
    seconds: float
    rows: list[Row] = field(default_factory=list)
    egressgw_counters: dict[str, float] = field(default_factory=dict)
    stderr: str = ""

    def count(self, column: str) -> int:
        return sum(passed(getattr(row, column)) for row in self.rows)

    @property
    def worse(self) -> list[Row]:
        return [row for row in self.rows if row.worse.startswith("WORSE")]


def run_genreport(
    net: Net,
    genreport: str,
    tests: Sequence[Test],
    mode: str,
    zone: str,
    timeout: float,
) -> tuple[list[str], str, str, int, float]:
    """One genreport process against both servers: (its flags, stdout, stderr, exit status,
    seconds). Given two servers, this genreport aborts (``free(): invalid pointer``, SIGABRT)
    after it has printed both reports; the caller checks that both are there."""
    flags = ["-j", "-o", "-p", *(["-R"] if mode == "recursive" else [])]
    argv = [genreport, *flags]
    for test in tests:
        argv += ["-i", test.name]
    lines = f"{zone} egressgw {EGRESSGW}\n{zone} upstream {DIRECT}\n"
    started = time.monotonic()
    done = subprocess.run(
        _in(net.client, None, *argv),
        input=lines,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - started
    return [*flags, "-i <each test>"], done.stdout, done.stderr, done.returncode, seconds


def queries_counted(daemon: Daemon) -> dict[str, float]:
    return {
        name.removeprefix("egressgw_dns_queries_total"): value
        for name, value in daemon.scrape().counters.items()
        if name.startswith("egressgw_dns_queries_total")
    }


# -- the run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    genreport: str
    upstreams: tuple[str, ...] = ("dnsmasq",)
    modes: tuple[str, ...] = MODES
    zone: str = ZONE
    tests: tuple[str, ...] = ()
    recheck: bool = True
    timeout: float = 120.0
    daemon_args: tuple[str, ...] = ()
    json_path: str | None = None
    keep: bool = False


@dataclass
class Results:
    machine: dict[str, Any]
    options: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def git_state() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "commit": git("log", "-1", "--oneline"),
        "egressgw_status": git("status", "--short", "egressgw/").splitlines(),
    }


class Conformance:
    """The upstreams, the daemon and genreport runs in one set of namespaces."""

    def __init__(self, net: Net, workdir: Path, options: Options, results: Results) -> None:
        self.net, self.workdir, self.options, self.results = net, workdir, options, results
        tests = [t for t in list_tests(options.genreport) if t.name not in SKIPPED_TESTS]
        if options.tests:
            tests = [t for t in tests if t.name in options.tests]
        self.tests = tests
        self.daemon = Daemon(net, workdir, 0, options.daemon_args, None)
        self.runs = 0
        self.aborted: list[int] = []  # exit statuses of genreport runs that died after reporting

    def fresh_daemon(self) -> None:
        """egressgw restarted: an empty cache, nothing remembered."""
        self.daemon.stop()
        self.daemon.start("asyncio")

    def genreport(
        self, label: str, mode: str, tests: Sequence[Test]
    ) -> tuple[list[str], dict[str, dict[str, str]], float]:
        """One genreport run against both servers: (its flags, report per server, seconds)."""
        o = self.options
        flags, out, err, status, seconds = run_genreport(
            self.net, o.genreport, tests, mode, o.zone, o.timeout
        )
        self.runs += 1
        (self.workdir / f"genreport-{self.runs:03d}-{label}.json").write_text(out + err)
        report = parse_report(out)
        if set(report) != {EGRESSGW, DIRECT}:
            raise RuntimeError(
                f"genreport exited with {status} and reported {sorted(report)}:\n"
                f"{out[-1000:]}\n{err[-1000:]}"
            )
        if status != 0:
            self.aborted.append(status)
        return flags, report, seconds

    def run(self) -> None:
        direct_link(self.net)
        (self.workdir / "manifests").mkdir()
        (self.workdir / "manifests" / "conformance.yaml").write_text(manifests(self.options.zone))
        for kind in self.options.upstreams:
            upstream = start_upstream(kind, self.net, self.workdir, self.options.zone)
            try:
                for mode in self.options.modes:
                    self.one(kind, mode)
            finally:
                self.daemon.stop()
                upstream.stop()

    def one(self, kind: str, mode: str) -> None:
        self.aborted = []
        self.fresh_daemon()
        before = queries_counted(self.daemon)
        progress(f"genreport ({mode}) against egressgw and {kind}, {len(self.tests)} tests")
        flags, report, seconds = self.genreport(f"{kind}-{mode}", mode, self.tests)
        after = queries_counted(self.daemon)
        run = Run(kind, mode, flags, round(seconds, 1))
        run.egressgw_counters = {
            k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)
        }
        ours, theirs = report[EGRESSGW], report[DIRECT]
        for test in self.tests:
            up, ic = theirs.get(test.name, ""), ours.get(test.name, "")
            run.rows.append(Row(test.name, test.groups, up, ic, verdict(up, ic)))
        if self.daemon.proc is not None:
            self.daemon.proc.check()  # still alive after the run
        recheck = [row for row in run.rows if row.rechecked] if self.options.recheck else []
        if recheck:
            progress(f"  {len(recheck)} tests again, each alone to a freshly started egressgw")
        by_name = {t.name: t for t in self.tests}
        for row in recheck:
            self.fresh_daemon()
            _flags, alone, _seconds = self.genreport(f"{kind}-{mode}-{row.test}", mode,
                                                     [by_name[row.test]])  # fmt: skip
            row.alone = alone[EGRESSGW].get(row.test, "")
            row.alone_upstream = alone[DIRECT].get(row.test, "")
        if self.aborted:
            self.results.notes.append(
                f"{kind}/{mode}: genreport died with {sorted(set(self.aborted))} after printing "
                f"both reports in {len(self.aborted)} of its runs (its own free(): invalid "
                "pointer when given two servers); every report was complete"
            )
        self.results.runs.append(run)


# -- report --------------------------------------------------------------------------------------
def render(results: Results, tests: dict[str, Test]) -> str:
    out: list[str] = []
    for run in results.runs:
        out += [
            "",
            f"genreport {run.mode} ({' '.join(run.flags)}), zone {results.options['zone']}: "
            f"egressgw {EGRESSGW} in front of {run.upstream_kind}, and {run.upstream_kind} "
            f"{DIRECT} directly ({run.seconds:g} s)",
            "",
        ]
        head = ("test", "group", f"upstream ({run.upstream_kind})", "interceptor (egressgw)",
                "interceptor worse than upstream")  # fmt: skip
        cells = [
            (r.test, r.groups, r.upstream or "-", r.interceptor or "-", r.worse) for r in run.rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        alone_head = "alone, fresh egressgw" if any(r.alone for r in run.rows) else ""
        titles = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
        out.append(f"{titles}  {alone_head}".rstrip())
        for texts, row in zip(cells, run.rows, strict=True):
            line = "  ".join(c.ljust(w) for c, w in zip(texts, widths, strict=True))
            alone = row.alone
            if alone and row.alone_upstream != row.upstream:
                alone += f" (upstream alone: {row.alone_upstream})"
            out.append(f"{line}  {alone}".rstrip())
        worse = run.worse
        better = [r.test for r in run.rows if r.worse == "better"]
        differs = [r.test for r in run.rows if r.worse.startswith("differs")]
        rechecked = [r for r in run.rows if r.alone]
        fine_alone = [r.test for r in rechecked if not verdict(r.alone_upstream, r.alone)
                      or verdict(r.alone_upstream, r.alone) == "better"]  # fmt: skip
        out += [
            "",
            f"summary ({run.upstream_kind}, {run.mode}): {len(run.rows)} tests; ok at the "
            f"upstream {run.count('upstream')}, at the interceptor {run.count('interceptor')}; "
            f"interceptor worse on {len(worse)}"
            + (f" ({', '.join(r.test for r in worse)})" if worse else "")
            + (f"; better on {len(better)} ({', '.join(better)})" if better else "")
            + (f"; differs on {len(differs)} ({', '.join(differs)})" if differs else ""),
        ]
        if rechecked:
            out.append(
                f"run alone to a fresh egressgw, {len(fine_alone)} of those {len(rechecked)} "
                "are no worse than the upstream: their failure was an answer cached for an "
                "earlier test" + (f" ({', '.join(fine_alone)})" if fine_alone else "")
            )
        if any(r.rechecked for r in run.rows):
            out.append("reproduce (from the client namespace, @192.0.2.1 vs @203.0.113.1):")
            for row in run.rows:
                if not row.rechecked:
                    continue
                command = tests[row.test].dig.replace("<zone>", results.options["zone"])
                if command.startswith("###"):
                    command += "  (genreport: dig cannot send this one)"
                elif run.mode == "recursive" and "+rec" not in command:
                    command = command.replace("+norec", "+rec")
                out.append(f"  {row.test:<12} {command}")
        if run.egressgw_counters:
            counted = ", ".join(f"{k} {v:g}" for k, v in sorted(run.egressgw_counters.items()))
            out.append(f"egressgw counted: {counted}")
    out += ["", "summary (worse: not counting tests the interceptor merely differs on):"]
    for run in results.runs:
        rechecked = [r for r in run.rows if r.alone]
        still = [r.test for r in rechecked if verdict(r.alone_upstream, r.alone).startswith(
            ("WORSE", "differs"))]  # fmt: skip
        alone = f"; alone, worse on {len(still)} of {len(rechecked)}" if rechecked else ""
        if still:
            alone += f" ({', '.join(still)})"
        out.append(
            f"  {run.upstream_kind:<8} {run.mode:<10} ok upstream {run.count('upstream'):>3}/"
            f"{len(run.rows)}, interceptor {run.count('interceptor'):>3}/{len(run.rows)}, "
            f"interceptor worse on {len(run.worse)}{alone}"
        )
    m = results.machine
    for when in ("start", "end"):
        state = m.get(when)
        if not state:
            continue
        status = ", ".join(s.strip() for s in state["egressgw_status"]) or "none"
        out.append(f"egressgw at the {when}: {state['commit']}; uncommitted in egressgw/: {status}")
    if results.notes:
        out += ["", "notes:"] + [f"  {n}" for n in results.notes]
    return "\n".join(out)


def parse(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.conformance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--genreport", required=True, metavar="PATH", help="the built genreport binary")
    add("--upstream", action="append", choices=UPSTREAMS,
        help="server behind the interceptor, repeatable (default: dnsmasq)")  # fmt: skip
    add("--mode", action="append", choices=MODES, help="genreport mode, repeatable (both)")
    add("--zone", default=ZONE, help="the test zone (%(default)s)")
    add("--test", action="append", default=[], metavar="NAME", help="only these tests")
    add("--no-recheck", action="store_true",
        help="do not run the tests the interceptor did worse on again, each alone")  # fmt: skip
    add("--timeout", type=float, default=120.0, help="seconds per genreport run (%(default)s)")
    add("--daemon-arg", action="append", default=[], metavar="ARG", help="for egressgw run")
    add("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    add("--keep", action="store_true", help="keep the work directory (logs, genreport output)")
    a = p.parse_args(argv)
    genreport = shutil.which(a.genreport) or a.genreport
    if not os.access(genreport, os.X_OK):
        p.error(f"--genreport {a.genreport}: not an executable (see the build steps in --help)")
    return Options(
        genreport=str(Path(genreport).resolve()),
        upstreams=tuple(dict.fromkeys(a.upstream or ["dnsmasq"])),
        modes=tuple(dict.fromkeys(a.mode or MODES)),
        zone=a.zone.strip(".").lower(),
        tests=tuple(a.test),
        recheck=not a.no_recheck,
        timeout=a.timeout,
        daemon_args=tuple(a.daemon_arg),
        json_path=a.json_path,
        keep=a.keep,
    )


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def namespaces() -> Iterator[Net]:
    net = build_net()
    try:
        yield net
    finally:
        net.close()


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    needed = ["ip", "nft", "dig", "taskset", *options.upstreams]
    missing = [t for t in needed if not shutil.which(t)]
    if missing:
        print(f"missing commands: {', '.join(missing)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    results = Results(machine={"start": git_state()}, options=asdict(options))
    with workspace(options.keep) as workdir, namespaces() as net:
        progress(f"namespaces {net.tag}-{{c,g,u}}, work directory {workdir}")
        Conformance(net, workdir, options, results).run()
    results.machine["end"] = git_state()
    tests = {t.name: t for t in list_tests(options.genreport)}
    print(render(results, tests))
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(asdict(results), indent=2) + "\n")
        progress(f"results written to {options.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
