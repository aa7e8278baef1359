"""Conformance of the DNS interceptor by ISC's DNS compliance tester, against its own upstream.

One ``genreport`` process tests, with the same flags, the test zone at egressgw's interceptor
(192.0.2.1, asked from the pod 192.0.2.10) and at the upstream it forwards to, reached over a
link of its own (203.0.113.1): the difference is what the interceptor changes. The upstream
(``--upstream dnsmasq`` and/or ``unbound``) is authoritative for the zone. Every test
``genreport -L`` lists but ``icmp``, in ``recursive`` (``-R``) and ``auth`` mode, each run to a
freshly started egressgw; a test the interceptor did worse on runs again alone. Not in CI.

genreport is not part of this repository; build it in /tmp::

    git clone https://github.com/damaestro/DNS-Compliance-Testing /tmp/dct
    apt-get install -y --no-install-recommends autoconf automake pkg-config libssl-dev
    cd /tmp/dct && autoreconf -fi && ./configure LIBS=-lresolv && make

(ISC's own repository: github.com/isc-projects/DNS-Compliance-Testing). ``dig`` (dnsutils) is
needed too. Run as root: ``python -m loadtest.conformance --genreport /tmp/dct/genreport
[--upstream unbound] [--json PATH]``; about 30 s per upstream. Every genreport run is bounded
in time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.common import (
    CACHED_SOURCE,
    EGRESSGW,
    UPSTREAM,
    Daemon,
    Metrics,
    Net,
    Proc,
    addresses,
    commits_measured,
    dns_net,
    dnsmasq_argv,
    finish,
    git_state,
    in_ns,
    notes_section,
    parser,
    preflight,
    progress,
    synth_args,
    table,
    veth,
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
Report = dict[str, dict[str, str]]  # server address -> test -> its tags
INFO_TAGS = frozenset({"ok", "nsid", "expire", "subnet", "proxy", "cookie", "cookie+badcookie",
                       "cookie-mismatch", "cookie-mismatch+badcookie"})  # fmt: skip


def manifests(zone: str) -> str:
    """The pod at CACHED_SOURCE may resolve the zone's names (and the daemon's probe name)."""
    return "---\n".join([
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: conformance, labels: {project: conformance}}\n",
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: conformance}\n"
        "spec:\n  namespaceSelector: {matchLabels: {project: conformance}}\n"
        '  egressIPs: ["198.51.100.10", "2001:db8:100::10"]\n',
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
        "metadata: {name: zone, namespace: conformance}\nspec:\n  podSelector: {}\n  egress:\n"
        f'    - to: [{{fqdn: "{zone}"}}, {{fqdnPattern: "**.{zone}"}},'
        ' {fqdnPattern: "*.bench.example"}]\n      ports: [{protocol: TCP, port: 443}]\n',
        "apiVersion: v1\nkind: Pod\nmetadata: {name: genreport, namespace: conformance, "
        f"labels: {{app: genreport}}}}\nstatus: {{podIPs: [{{ip: {CACHED_SOURCE}}}]}}\n",
    ])  # fmt: skip


# -- the upstream --------------------------------------------------------------------------------
def upstream_argv(kind: str, zone: str, workdir: Path) -> list[str]:
    """dnsmasq or unbound authoritative for ``zone`` on both addresses, also answering the
    daemon's start-up probe name."""
    if kind == "dnsmasq":
        serial, refresh, retry, expire, _minimum = SOA_FIELDS.split()
        return dnsmasq_argv(
            UPSTREAM, f"--listen-address={DIRECT}", f"--auth-server=ns.{zone}",
            f"--auth-zone={zone}",
            f"--auth-soa={serial},hostmaster.{zone},{refresh},{retry},{expire}",
            f"--host-record={zone},{ZONE_A},{ZONE_AAAA}", f"--host-record=ns.{zone},{UPSTREAM}",
            f"--mx-host={zone},mail.{zone},10", f"--txt-record={zone},v=conformance",
            *synth_args())  # fmt: skip
    data = [f"{zone}. 600 IN SOA ns.{zone}. hostmaster.{zone}. {SOA_FIELDS}",
            f"{zone}. 600 IN NS ns.{zone}.", f"{zone}. 600 IN A {ZONE_A}",
            f"{zone}. 600 IN AAAA {ZONE_AAAA}", f"{zone}. 600 IN MX 10 mail.{zone}.",
            f'{zone}. 600 IN TXT "v=conformance"', f"ns.{zone}. 600 IN A {UPSTREAM}",
            "h-203-0-113-1.bench.example. 300 IN A 203.0.113.1"]  # fmt: skip
    conf = [f"  interface: {UPSTREAM}", f"  interface: {DIRECT}", "  port: 53",
            "  do-daemonize: no", "  use-syslog: no", '  logfile: ""', '  chroot: ""',
            '  username: ""', f'  directory: "{workdir}"', '  pidfile: ""', "  do-ip6: no",
            "  num-threads: 1", "  access-control: 0.0.0.0/0 allow",
            '  module-config: "iterator"', f'  local-zone: "{zone}." static',
            '  local-zone: "bench.example." static',
            *(f"  local-data: '{r}'" for r in data)]  # fmt: skip
    path = workdir / "unbound.conf"
    path.write_text("\n".join(["server:", *conf, "remote-control:", "  control-enable: no", ""]))
    return ["unbound", "-d", "-c", str(path)]


def start_upstream(kind: str, net: Net, workdir: Path, zone: str) -> Proc:
    argv = in_ns(net.upstream, *upstream_argv(kind, zone, workdir))
    proc = Proc(f"{kind} upstream", argv, workdir / f"{kind}.log")
    deadline = time.monotonic() + 10
    while " SOA " not in (answer := dig(net, DIRECT, "SOA", zone)).replace("\t", " "):
        proc.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} does not answer SOA {zone} on {DIRECT}:\n{answer}")
        time.sleep(0.2)
    return proc


def dig(net: Net, server: str, qtype: str, name: str) -> str:
    argv = in_ns(net.client, "dig", f"@{server}", qtype, name, "+tries=1", "+time=1", "+noall",
                 "+answer")  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout


# -- genreport -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Test:
    name: str
    groups: str  # EDNS, FULL, COMM, TYPE, or "" for the ungrouped ones
    dig: str


def list_tests(genreport: str) -> list[Test]:
    listed = subprocess.run([genreport, "-L"], capture_output=True, text=True, timeout=10)
    digs = subprocess.run([genreport, "-D"], capture_output=True, text=True, timeout=10)
    lines = (line.partition(" ") for line in digs.stdout.splitlines())
    commands = {name: command.strip().strip("'") for name, _, command in lines}
    tests = [Test(name, " ".join(groups), commands.get(name, ""))
             for name, *groups in map(str.split, listed.stdout.splitlines())]  # fmt: skip
    if not tests:
        raise RuntimeError(f"{genreport} -L listed no tests: {listed.stderr[-500:]}")
    return tests


def parse_report(text: str) -> Report:
    """genreport -j output: server address -> test -> its tags, e.g. "ok" or "noopt,formerr".

    Each server's report is one line (``{ "zone": ... }``), read line by line: the document
    around them is not complete when genreport dies after printing them (see ``genreport``)."""
    found: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if line.startswith('{ "zone"'):
            entry, _end = json.JSONDecoder().raw_decode(line)  # the separator "," follows
            if "tests" in entry:
                found[entry["address"]] = {k: v for k, v in entry["tests"].items() if k != "signed"}
            elif "summary" in entry:
                found[entry["address"]] = {"*": entry["summary"]}
    return found


def passed(tags: str) -> bool:
    return tags.split(",")[0] == "ok"


def verdict(upstream: str, interceptor: str) -> str:
    """The "interceptor worse than upstream" cell."""
    if "skipped" in (upstream, interceptor) or not upstream or not interceptor:
        return "not run"
    if passed(upstream) != passed(interceptor):
        return "better" if passed(interceptor) else "WORSE"
    failures = [frozenset(tags.split(",")) - INFO_TAGS for tags in (upstream, interceptor)]
    added, removed = failures[1] - failures[0], failures[0] - failures[1]
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

    def count(self, column: str) -> int:
        return sum(passed(getattr(row, column)) for row in self.rows)

    @property
    def worse(self) -> list[Row]:
        return [row for row in self.rows if row.worse.startswith("WORSE")]


@dataclass
class Options:
    genreport: str = ""
    upstreams: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    zone: str = ZONE
    tests: list[str] = field(default_factory=list)
    recheck: bool = True
    timeout: float = 120.0
    daemon_args: list[str] = field(default_factory=list)
    json_path: str | None = None
    keep: bool = False


@dataclass
class Results:
    machine: dict[str, Any]
    options: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Conformance:
    """The upstreams, the daemon and genreport runs in one set of namespaces."""

    def __init__(self, net: Net, workdir: Path, options: Options, results: Results) -> None:
        self.net, self.workdir, self.o, self.results = net, workdir, options, results
        tests = [t for t in list_tests(options.genreport) if t.name not in SKIPPED_TESTS]
        self.tests = [t for t in tests if not options.tests or t.name in options.tests]
        self.daemon = Daemon(net, workdir, 0, options.daemon_args)
        self.runs = 0
        self.aborted: list[int] = []  # exit statuses of genreport runs that died after reporting

    def fresh_daemon(self) -> Metrics:
        """egressgw restarted, an empty cache: its metrics to start from."""
        self.daemon.stop()
        self.daemon.start()
        return self.daemon.metrics()

    def genreport(
        self, label: str, mode: str, tests: Sequence[Test]
    ) -> tuple[list[str], Report, float]:
        """One genreport process against both servers: (its flags, report per server, seconds).
        Given two servers, genreport aborts (``free(): invalid pointer``) after printing both
        reports; both are checked."""
        flags = ["-j", "-o", "-p", *(["-R"] if mode == "recursive" else [])]
        argv = [self.o.genreport, *flags, *(a for t in tests for a in ("-i", t.name))]
        started = time.monotonic()
        done = subprocess.run(in_ns(self.net.client, *argv), capture_output=True, text=True,
                              input=f"{self.o.zone} egressgw {EGRESSGW}\n{self.o.zone} upstream "
                              f"{DIRECT}\n", timeout=self.o.timeout, check=False)  # fmt: skip
        seconds = time.monotonic() - started
        self.runs += 1
        out = self.workdir / f"genreport-{self.runs:03d}-{label}.json"
        out.write_text(done.stdout + done.stderr)
        report = parse_report(done.stdout)
        if set(report) != {EGRESSGW, DIRECT}:
            raise RuntimeError(
                f"genreport exited with {done.returncode} and reported "
                f"{sorted(report)}:\n{done.stdout[-1000:]}\n{done.stderr[-1000:]}"
            )
        if done.returncode != 0:
            self.aborted.append(done.returncode)
        return [*flags, "-i <each test>"], report, seconds

    def run(self) -> None:
        veth(self.net.client, "dir0", self.net.upstream, "dir0")
        addresses(self.net.client, ("dir0", f"{DIRECT_CLIENT}/30"))
        addresses(self.net.upstream, ("dir0", f"{DIRECT}/30"))
        (self.workdir / "manifests").mkdir()
        (self.workdir / "manifests" / "conformance.yaml").write_text(manifests(self.o.zone))
        for kind in self.o.upstreams:
            upstream = start_upstream(kind, self.net, self.workdir, self.o.zone)
            try:
                for mode in self.o.modes:
                    self.one(kind, mode)
            finally:
                self.daemon.stop()
                upstream.stop()

    def one(self, kind: str, mode: str) -> None:
        self.aborted = []
        before = self.fresh_daemon()
        progress(f"genreport ({mode}) against egressgw and {kind}, {len(self.tests)} tests")
        flags, report, seconds = self.genreport(f"{kind}-{mode}", mode, self.tests)
        counted = self.daemon.metrics().minus(before).matching("egressgw_dns_queries_total")
        run = Run(kind, mode, flags, round(seconds, 1))
        run.egressgw_counters = {k.removeprefix("egressgw_dns_queries_total"): v
                                 for k, v in counted.items()}  # fmt: skip
        ours, theirs = report[EGRESSGW], report[DIRECT]
        for test in self.tests:
            up, ic = theirs.get(test.name, ""), ours.get(test.name, "")
            run.rows.append(Row(test.name, test.groups, up, ic, verdict(up, ic)))
        assert self.daemon.proc is not None
        self.daemon.proc.check()  # still alive after the run
        recheck = [row for row in run.rows if row.rechecked] if self.o.recheck else []
        if recheck:
            progress(f"  {len(recheck)} tests again, each alone to a freshly started egressgw")
        by_name = {t.name: t for t in self.tests}
        for row in recheck:
            self.fresh_daemon()
            alone = self.genreport(f"{kind}-{mode}-{row.test}", mode, [by_name[row.test]])[1]
            row.alone = alone[EGRESSGW].get(row.test, "")
            row.alone_upstream = alone[DIRECT].get(row.test, "")
        if self.aborted:
            self.results.notes.append(
                f"{kind}/{mode}: genreport died with {sorted(set(self.aborted))} after printing "
                f"both reports in {len(self.aborted)} of its runs (its own free(): invalid "
                "pointer when given two servers); every report was complete")  # fmt: skip
        self.results.runs.append(run)


# -- report --------------------------------------------------------------------------------------
def render(results: Results, tests: dict[str, Test]) -> str:
    out: list[str] = []
    zone = results.options["zone"]
    for run in results.runs:
        kind = run.upstream_kind
        out += ["", f"genreport {run.mode} ({' '.join(run.flags)}), zone {zone}: egressgw "
                f"{EGRESSGW} in front of {kind}, and {kind} {DIRECT} directly ({run.seconds:g} s)",
                ""]  # fmt: skip
        head = ("test", "group", f"upstream ({kind})", "interceptor (egressgw)",
                "interceptor worse than upstream",
                "alone, fresh egressgw" if any(r.alone for r in run.rows) else "")  # fmt: skip
        out += table(head, [
            (r.test, r.groups, r.upstream or "-", r.interceptor or "-", r.worse, r.alone
             + (f" (upstream alone: {r.alone_upstream})"
                if r.alone and r.alone_upstream != r.upstream else ""))
            for r in run.rows])  # fmt: skip
        better = [r.test for r in run.rows if r.worse == "better"]
        differs = [r.test for r in run.rows if r.worse.startswith("differs")]
        rechecked = [r for r in run.rows if r.alone]
        fine_alone = [r.test for r in rechecked
                      if verdict(r.alone_upstream, r.alone) in ("", "better")]  # fmt: skip
        out += ["", f"summary ({kind}, {run.mode}): {len(run.rows)} tests; ok at the upstream "
                f"{run.count('upstream')}, at the interceptor {run.count('interceptor')}; "
                f"interceptor worse on {len(run.worse)}"
                + (f" ({', '.join(r.test for r in run.worse)})" if run.worse else "")
                + (f"; better on {len(better)} ({', '.join(better)})" if better else "")
                + (f"; differs on {len(differs)} ({', '.join(differs)})" if differs else
                   "")]  # fmt: skip
        if rechecked:
            out.append(f"run alone to a fresh egressgw, {len(fine_alone)} of those "
                       f"{len(rechecked)} are no worse than the upstream: their failure was an "
                       "answer cached for an earlier test"
                       + (f" ({', '.join(fine_alone)})" if fine_alone else ""))  # fmt: skip
        if any(r.rechecked for r in run.rows):
            out.append("reproduce (from the client namespace, @192.0.2.1 vs @203.0.113.1):")
            for row in filter(lambda r: r.rechecked, run.rows):
                command = tests[row.test].dig.replace("<zone>", zone)
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
        verdicts = {r.test: verdict(r.alone_upstream, r.alone) for r in rechecked}
        still = [t for t, v in verdicts.items() if v.startswith(("WORSE", "differs"))]
        alone = f"; alone, worse on {len(still)} of {len(rechecked)}" if rechecked else ""
        alone += f" ({', '.join(still)})" if still else ""
        out.append(f"  {run.upstream_kind:<8} {run.mode:<10} ok upstream "
                   f"{run.count('upstream'):>3}/{len(run.rows)}, interceptor "
                   f"{run.count('interceptor'):>3}/{len(run.rows)}, interceptor worse on "
                   f"{len(run.worse)}{alone}")  # fmt: skip
    out += commits_measured(results.machine) + notes_section(results.notes)
    return "\n".join(out)


def parse(argv: Sequence[str]) -> Options:
    p = parser("conformance", __doc__, Options())
    add = p.add_argument
    add("--genreport", required=True, metavar="PATH", help="the built genreport binary")
    add("--upstream", dest="upstreams", action="append", choices=UPSTREAMS,
        help="server behind the interceptor, repeatable (default: dnsmasq)")  # fmt: skip
    add("--mode", dest="modes", action="append", choices=MODES,
        help="genreport mode, repeatable (default: both)")  # fmt: skip
    add("--zone", help="the test zone (%(default)s)")
    add("--test", dest="tests", action="append", metavar="NAME", help="only these tests")
    add("--no-recheck", dest="recheck", action="store_false",
        help="do not run the tests the interceptor did worse on again, each alone")  # fmt: skip
    add("--timeout", type=float, help="seconds per genreport run (%(default)s)")
    add("--daemon-arg", dest="daemon_args", action="append", metavar="ARG", help="for egressgw run")
    add("--keep", action="store_true", help="keep the work directory (logs, genreport output)")
    o = Options(**vars(p.parse_args(argv)))
    genreport = shutil.which(o.genreport) or o.genreport
    if not os.access(genreport, os.X_OK):
        p.error(f"--genreport {o.genreport}: not an executable (see the build steps in --help)")
    o.genreport = str(Path(genreport).resolve())
    o.upstreams = list(dict.fromkeys(o.upstreams or ["dnsmasq"]))
    o.modes = list(dict.fromkeys(o.modes or MODES))
    o.zone = o.zone.strip(".").lower()
    return o


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    if not preflight(("ip", "nft", "dig", "taskset", *options.upstreams)):
        return 2
    results = Results(machine={"start": git_state()}, options=asdict(options))
    with workspace(options.keep) as workdir, dns_net() as net:
        progress(f"work directory {workdir}")
        Conformance(net, workdir, options, results).run()
    results.machine["end"] = git_state()
    tests = {t.name: t for t in list_tests(options.genreport)}
    return finish(render(results, tests), results, options.json_path)


if __name__ == "__main__":
    sys.exit(main())
