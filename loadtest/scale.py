"""What an operator of a big cluster notices: egressgw on manifests of 1,000 to 100,000 pods.

Per size (``--sizes PODS:POLICIES,...``, default 1000:100, 10000:1000 and 100000:10000) a
manifests directory is generated: one file per namespace (a Namespace, its EgressPolicy and
about PODS / POLICIES pods, IPv6 addresses in 2001:db8:1::/64, the first 200 also IPv4 from
192.0.2.0/24) and ``gateways.yaml`` (``--gateways`` EgressGateways, each selecting a share of
the namespaces by label, egress IPs in 198.51.100.0/24 and 2001:db8:100::/64). Policies mix
``cidr`` rules (203.0.113.0/24 subnets) and ``fqdn``/``fqdnPattern`` rules, 1-3 ports each.

``egressgw run --manifests DIR --uplink up0 --netns G --table scale_<hex>`` then runs in a
gateway namespace G of its own (up0: a veth to a second namespace), and the script measures:
time from process start to ``/readyz`` 200, RSS once ready, the process's CPU over
``--idle-seconds`` with nothing changing, ``--scrapes`` scrapes of ``/metrics`` (median and
max), the time from rewriting one namespace's file (one cidr rule moved) until the kernel holds
the new element, the same for a new pod's address in the workload map (both polled every 10 ms
with a single-element netlink lookup in G, then confirmed with ``nft get element``), and the
time to ready again after SIGTERM and a restart that adopts the table.

Run as root: ``python -m loadtest.scale [--sizes 1000:100] [--json PATH] [--keep]``;
loadtest/README.md explains the manifests and how to read the figures. Every wait has a
deadline (``--ready-timeout``, ``--change-timeout``); a figure whose wait ran out reads
"timeout" and the run goes on. The namespaces are removed afterwards, also on failure.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM

from egressgw.datapath import keys
from egressgw.datapath.netlink import (
    NETLINK_NETFILTER,
    NLMSG_ERROR,
    NLMSGHDR,
    Change,
    Element,
    Op,
    encode_elements,
    messages,
)
from egressgw.datapath.netns import call_in
from loadtest.common import (
    REPO,
    Proc,
    addresses,
    describe_git,
    finish,
    git_state,
    in_ns,
    median,
    namespaces,
    parser,
    preflight,
    process_cpu_s,
    progress,
    table,
    veth,
    workspace,
)

HTTP_PORT = 9462  # inside the gateway namespace: no other process listens there
DOMAIN = "scale.example"
GATEWAY_UP, PEER_UP = "198.51.100.2", "198.51.100.1"
POD_NET6 = ipaddress.IPv6Address("2001:db8:1::")
DUAL_STACK = 200  # pods that also get an IPv4 address, 192.0.2.10 and up
PORTS = (443, 8443, 5432)
APPS = 3  # label values of ``app`` per namespace: each one identity
EDITED_CIDR = "203.0.113.240/28"  # no generated policy uses it
NEW_POD_ADDRESS = "2001:db8:1:0:ffff::1"  # outside the generated pods' addresses
POLL_S = 0.05
PROBE_S = 0.01  # between two KernelProbe lookups
STOP_TIMEOUT_S = 60.0
APPLIED = re.compile(r"applied: (\d+) workloads, (\d+) identities, (\d+) egress IPs; "
                     r"\+(\d+) -(\d+) elements.*\(([0-9.]+) ms\)")  # fmt: skip
ADOPTED = re.compile(r"adopted table \S+: (\d+) identities, (\d+) static and (\d+) learned "
                     r"elements.*\((\d+) ms\)")  # fmt: skip
MARK = re.compile(r":\s*(0x[0-9a-f]+)")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ [\w.]+: (.*)$", re.M)
Figure = float | str | None  # seconds or another unit; "timeout" or "error"; None: not run


# -- manifests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    pods: int
    policies: int
    gateways: int = 4

    @property
    def namespaces(self) -> int:
        return self.policies  # one EgressPolicy per namespace

    def pod_range(self, n: int) -> range:
        """The pods of namespace ``n``, as global pod numbers."""
        each, extra = divmod(self.pods, self.namespaces)
        start = n * each + min(n, extra)
        return range(start, start + each + (n < extra))

    @property
    def label(self) -> str:
        return f"{self.pods}:{self.policies}"


def namespace_name(n: int) -> str:
    return f"ns-{n:05d}"


def pod_addresses(i: int) -> list[str]:
    found = [str(POD_NET6 + i + 1)]
    return found + ([f"192.0.2.{10 + i}"] if i < DUAL_STACK else [])


def cidr_of(n: int) -> str:
    """Namespace ``n``'s subnet of 203.0.113.0/24; 203.0.113.240/28 is left for the edit."""
    return f"203.0.113.{(n % 15) * 16}/28"


def ports_yaml(count: int) -> str:
    return "[" + ", ".join(f"{{protocol: TCP, port: {p}}}" for p in PORTS[:count]) + "]"


def policy_yaml(n: int, cidr: str) -> str:
    """Namespace ``n``'s policy. By ``n % 4``: cidr and fqdn rules, cidr only, fqdn and
    fqdnPattern only, cidr and fqdnPattern; every rule with 1-3 ports. Even policies select
    every pod of the namespace, odd ones the pods labelled ``app: app-0``."""
    ns, kind = namespace_name(n), n % 4
    rules = []
    if kind != 2:
        rules.append(f"    - to: [{{cidr: {cidr}}}]\n      ports: {ports_yaml(1 + n % 3)}\n")
    names = []
    if kind in (0, 2):
        names.append(f"{{fqdn: api-{n}.{DOMAIN}}}")
    if kind in (2, 3):
        names.append(f'{{fqdnPattern: "*.cdn-{n % 50}.{DOMAIN}"}}')
    if names:
        rules.append(
            f"    - to: [{', '.join(names)}]\n      ports: {ports_yaml(1 + (n + 1) % 3)}\n"
        )
    selector = "{}" if n % 2 == 0 else "{matchLabels: {app: app-0}}"
    return (f"apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
            f"metadata: {{name: egress, namespace: {ns}}}\n"
            f"spec:\n  podSelector: {selector}\n  egress:\n" + "".join(rules))  # fmt: skip


def pod_yaml(ns: str, name: str, app: str, ips: Sequence[str]) -> str:
    listed = ", ".join(f"{{ip: '{a}'}}" for a in ips)
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, "
            f"labels: {{app: {app}}}}}\nstatus: {{podIPs: [{listed}]}}\n")  # fmt: skip


def namespace_yaml(size: Size, n: int, cidr: str | None = None, new_pod: bool = False) -> str:
    """The file of namespace ``n``: the Namespace, its policy and its pods (``app: app-K``,
    K = pod number mod 3); ``new_pod`` adds ``w-new`` (app-0, NEW_POD_ADDRESS)."""
    ns = namespace_name(n)
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: "
            f"{{egress: gw-{n % size.gateways}, team: t-{n % 7}}}}}\n",
            policy_yaml(n, cidr or cidr_of(n))]  # fmt: skip
    docs += [pod_yaml(ns, f"w-{i}", f"app-{j % APPS}", pod_addresses(i))
             for j, i in enumerate(size.pod_range(n))]  # fmt: skip
    if new_pod:
        docs.append(pod_yaml(ns, "w-new", "app-0", [NEW_POD_ADDRESS]))
    return "---\n".join(docs)


def gateways_yaml(size: Size) -> str:
    return "---\n".join(
        f"apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {{name: gw-{k}}}\n"
        f"spec:\n  namespaceSelector: {{matchLabels: {{egress: gw-{k}}}}}\n"
        f'  egressIPs: ["198.51.100.{10 + k}", "2001:db8:100::{10 + k:x}"]\n'
        for k in range(size.gateways)
    )


def write_atomically(path: Path, text: str) -> None:
    """Written under a hidden name (no manifest walk reads it), then renamed over ``path``."""
    aside = path.with_name(f".{path.name}.part")
    aside.write_text(text)
    os.replace(aside, path)


def write_manifests(size: Size, directory: Path) -> tuple[int, int]:
    """(files, bytes) written."""
    directory.mkdir(parents=True)
    files, written = 1, (directory / "gateways.yaml").write_text(gateways_yaml(size))
    for n in range(size.namespaces):
        written += (directory / f"{namespace_name(n)}.yaml").write_text(namespace_yaml(size, n))
        files += 1
    return files, written


# -- the gateway namespace -----------------------------------------------------------------------
def http_get(ns: str, path: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) from the daemon's HTTP listener in ``ns``; 0 when it does not answer."""

    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{HTTP_PORT}{path}", timeout=timeout
            ) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except OSError as exc:
            return 0, str(exc).encode()

    return call_in(ns, get)


def nft_element(ns: str, table_name: str, set_name: str, element: str) -> str | None:
    """``nft get element``'s output if the kernel holds ``element`` in the set, else None."""
    argv = in_ns(ns, "nft", "get", "element", "inet", table_name, set_name, f"{{ {element} }}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return done.stdout if done.returncode == 0 else None


class KernelProbe:
    """Whether the kernel holds one set element: a single-element NFT_MSG_GETSETELEM (no dump)
    on a netfilter netlink socket opened in the gateway namespace. It answers in well under a
    millisecond at every size, where ``nft get element`` loads the table's elements first (over
    a second of CPU with 100,000 pods, taken from the daemon being timed)."""

    def __init__(self, ns: str, table_name: str) -> None:
        self.table = table_name
        self.sock = call_in(
            ns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        )
        self.sock.bind((0, 0))
        self.sock.settimeout(10)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def holds(self, set_name: str, element: Element) -> bool:
        self.seq += 1
        encoded = encode_elements(self.table, Change(Op.ADD, set_name, (element,)), [element], 0)
        body = encoded[NLMSGHDR.size :]
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
        flags = NLM_F_REQUEST | NLM_F_ACK  # the element, then an acknowledgement
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, self.seq, 0) + body)
        found = False
        for _ in range(16):  # a reply and an acknowledgement, or an error
            for msg_type, _flags, seq, raw in messages(self.sock.recv(65536)):
                if seq != self.seq:
                    continue
                if msg_type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                    found = True
                elif msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", raw, NLMSGHDR.size)
                    if code == 0:
                        return found
                    if -code == errno.ENOENT:
                        return False
                    raise OSError(-code, f"get element {self.table}/{set_name}")
        raise RuntimeError(f"get element {self.table}/{set_name}: no acknowledgement")


def net_element(identity: int, cidr: str, port: int) -> Element:
    """The element of an interval set keyed ``mark . ipv4_addr . inet_proto . inet_service``
    for a TCP port to a subnet, encoded as the kernel stores it (``egressgw.datapath.keys``)."""
    net = ipaddress.IPv4Network(cidr)
    tail = keys.proto(socket.IPPROTO_TCP) + keys.port(port)
    return Element(
        key=keys.mark_be(identity) + net.network_address.packed + tail,
        key_end=keys.mark_be(identity) + net.broadcast_address.packed + tail,
    )


def workload_element(address: str) -> Element:
    return Element(key=keys.address(ipaddress.IPv6Address(address)))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_until(check: Callable[[], bool], since: float, timeout: float,
               proc: Proc | None = None, interval: float = POLL_S) -> float | None:  # fmt: skip
    """Seconds from ``since`` (monotonic) until ``check`` held; None once ``timeout`` seconds
    from ``since`` went by. Raises if ``proc`` ended meanwhile."""
    deadline = since + timeout
    while True:
        if check():
            return time.monotonic() - since
        if proc is not None:
            proc.check()
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# -- one size ------------------------------------------------------------------------------------
@dataclass
class Options:
    sizes: str = "1000:100,10000:1000,100000:10000"
    idle_seconds: float = 30.0
    scrapes: int = 5
    gateways: int = 4
    ready_timeout: float = 600.0
    change_timeout: float = 120.0
    keep: bool = False
    json_path: str | None = None


@dataclass
class SizeResult:
    pods: int
    policies: int
    namespaces: int
    gateways: int
    files: int = 0
    manifest_mib: float = 0.0
    generate_s: float = 0.0
    ready_s: Figure = None
    rss_mib: Figure = None
    rss_after_idle_mib: Figure = None
    idle_cpu_pct: Figure = None
    scrape_median_s: Figure = None
    scrape_max_s: Figure = None
    scrape_s: list[float] = field(default_factory=list)
    metrics_kib: Figure = None
    edit_s: Figure = None
    new_pod_s: Figure = None
    stop_s: Figure = None
    restart_s: Figure = None
    rss_after_restart_mib: Figure = None
    probe_ms: Figure = None  # one KernelProbe lookup
    nft_get_s: Figure = None  # one ``nft get element``, for comparison
    # the daemon's "applied:" lines: the first one, the edit's and the new pod's
    first_apply: dict[str, float] = field(default_factory=dict)
    edit_apply: dict[str, float] = field(default_factory=dict)
    new_pod_apply: dict[str, float] = field(default_factory=dict)
    adopted: dict[str, float] = field(default_factory=dict)  # the restart's "adopted" line
    # s from the process start (or the write) to its log lines: see ``timeline``
    ready_timeline: dict[str, float] = field(default_factory=dict)
    edit_timeline: dict[str, float] = field(default_factory=dict)
    new_pod_timeline: dict[str, float] = field(default_factory=dict)
    restart_timeline: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Results:
    setup: dict[str, Any]
    options: dict[str, Any]
    sizes: list[SizeResult] = field(default_factory=list)


def applied_line(text: str) -> dict[str, float]:
    found = APPLIED.findall(text)
    if not found:
        return {}
    names = ("workloads", "identities", "egress_ips", "added", "removed", "ms")
    return dict(zip(names, map(float, found[-1]), strict=True))


def timeline(text: str, since: float) -> dict[str, float]:
    """Seconds from ``since`` (epoch) to the daemon's log lines up to its first apply:
    ``adopted`` (the table read back), ``read`` (the last "manifest loaded" line, logged once
    a scan ends) and ``applied``."""
    out: dict[str, float] = {}
    for found in LOG_LINE.finditer(text):
        at = round(datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - since, 2)
        message = found[2]
        if message.startswith("adopted table") and "adopted" not in out:
            out["adopted"] = at
        elif message.startswith("manifest loaded"):
            out["read"] = at
        elif message.startswith("applied:"):
            out["applied"] = at
            break
    return out


class SizeRun:
    """One size in namespaces ``gateway`` and ``peer``: the daemon started, measured, stopped."""

    def __init__(self, size: Size, o: Options, workdir: Path, gateway: str) -> None:
        self.size, self.o, self.gateway = size, o, gateway
        self.dir = workdir / f"size-{size.pods}-{size.policies}"
        self.manifests = self.dir / "manifests"
        self.log = self.dir / "egressgw.log"
        self.table = f"scale_{uuid.uuid4().hex[:8]}"
        self.proc: Proc | None = None
        self.probe: KernelProbe | None = None
        self.started_at = 0.0  # the daemon's start, epoch
        self.r = SizeResult(size.pods, size.policies, size.namespaces, size.gateways)

    def log_text(self, offset: int = 0) -> str:
        return self.log.read_text(errors="replace")[offset:] if self.log.exists() else ""

    def note(self, text: str) -> None:
        self.r.notes.append(text)
        progress(f"{self.size.label}: {text}")

    def start(self) -> tuple[Proc, float]:
        argv = [sys.executable, "-m", "egressgw", "run", "--manifests", str(self.manifests),
                "--uplink", "up0", "--netns", self.gateway, "--http-listen",
                f"127.0.0.1:{HTTP_PORT}", "--table", self.table]  # fmt: skip
        started, self.started_at = time.monotonic(), time.time()
        self.proc = Proc(f"egressgw ({self.size.label})", in_ns(self.gateway, *argv), self.log,
                         cwd=REPO)  # fmt: skip
        return self.proc, started

    def wait_ready(self, proc: Proc, started: float) -> Figure:
        def ready() -> bool:
            return http_get(self.gateway, "/readyz", 5)[0] == 200

        took = wait_until(ready, started, self.o.ready_timeout, proc, interval=0.2)
        if took is None:
            self.note(f"not ready within {self.o.ready_timeout:g} s")
            return "timeout"
        return round(took, 2)

    def stop(self) -> Figure:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the seconds it took to exit."""
        proc, self.proc = self.proc, None
        if proc is None or not proc.alive():
            return None
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=10)
            self.note(f"no exit within {STOP_TIMEOUT_S:g} s of SIGTERM: killed")
            return "timeout"
        return round(time.monotonic() - started, 2)

    def run(self) -> SizeResult:
        started = time.monotonic()
        try:
            self._run()
        except Exception as exc:  # the size is reported as far as it got; the next one runs
            tail = self.log_text()[-1500:]
            self.note(f"stopped: {type(exc).__name__}: {str(exc)[:1500]}\nlog tail:\n{tail}")
        finally:
            if self.probe is not None:
                self.probe.close()
            if self.proc is not None:
                self.proc.stop()
                self.proc = None
            self.r.duration_s = round(time.monotonic() - started, 1)
        return self.r

    def _run(self) -> None:
        r, o = self.r, self.o
        t0 = time.monotonic()
        r.files, written = write_manifests(self.size, self.manifests)
        r.generate_s, r.manifest_mib = round(time.monotonic() - t0, 2), round(written / 2**20, 1)
        progress(f"{self.size.label}: {r.files:,} files ({r.manifest_mib} MiB) in "
                 f"{r.generate_s} s; starting egressgw, table {self.table}")  # fmt: skip
        proc, t0 = self.start()
        r.ready_s = self.wait_ready(proc, t0)
        if not isinstance(r.ready_s, float):
            return
        r.rss_mib = round(rss_mib(proc.pid), 1)
        r.first_apply = applied_line(self.log_text())
        r.ready_timeline = timeline(self.log_text(), self.started_at)
        progress(f"{self.size.label}: ready in {r.ready_s} s, RSS {r.rss_mib} MiB")

        cpu0, t0 = process_cpu_s(proc.pid), time.monotonic()
        time.sleep(o.idle_seconds)
        proc.check()
        cpu1, wall = process_cpu_s(proc.pid), time.monotonic() - t0
        r.idle_cpu_pct = round(100 * (cpu1 - cpu0) / wall, 2)
        r.rss_after_idle_mib = round(rss_mib(proc.pid), 1)
        progress(f"{self.size.label}: idle CPU {r.idle_cpu_pct}% over {wall:.0f} s")

        self.scrape(proc)
        self.probe = KernelProbe(self.gateway, self.table)
        self.edit(proc)
        self.new_pod(proc)

        r.stop_s = self.stop()
        offset = len(self.log_text())
        proc, t0 = self.start()
        r.restart_s = self.wait_ready(proc, t0)
        if isinstance(r.restart_s, float):
            r.rss_after_restart_mib = round(rss_mib(proc.pid), 1)
            r.restart_timeline = timeline(self.log_text(offset), self.started_at)
            found = ADOPTED.findall(self.log_text(offset))
            if found:
                names = ("identities", "static", "learned", "ms")
                r.adopted = dict(zip(names, map(float, found[-1]), strict=True))
            progress(f"{self.size.label}: restarted and ready in {r.restart_s} s")
        self.stop()

    def scrape(self, proc: Proc) -> None:
        r = self.r
        for _ in range(self.o.scrapes):
            t0 = time.monotonic()
            status, body = http_get(self.gateway, "/metrics", self.o.change_timeout)
            took = time.monotonic() - t0
            if status != 200:
                self.note(f"/metrics answered {status}: {body[:200]!r}")
                r.scrape_median_s = r.scrape_max_s = "timeout" if status == 0 else "error"
                return
            r.scrape_s.append(round(took, 4))
            r.metrics_kib = round(len(body) / 1024, 1)
            proc.check()
        if r.scrape_s:
            r.scrape_median_s, r.scrape_max_s = median(r.scrape_s), max(r.scrape_s)
        progress(f"{self.size.label}: /metrics {r.metrics_kib} KiB in {r.scrape_median_s} s")

    def mark_of(self, address: str) -> int:
        """The identity (meta mark) the kernel's workload map gives ``address``."""
        found = nft_element(self.gateway, self.table, "workloads6", address)
        mark = MARK.search(found or "")
        if mark is None:
            raise RuntimeError(f"{address} is not in workloads6: {found!r}")
        return int(mark[1], 16)

    def until_held(self, proc: Proc, since: float, set_name: str, element: Element) -> Figure:
        assert self.probe is not None
        probe = self.probe
        took = wait_until(lambda: probe.holds(set_name, element), since, self.o.change_timeout,
                          proc, interval=PROBE_S)  # fmt: skip
        return "timeout" if took is None else round(took, 3)

    def apply_logged(
        self, offset: int, written: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """The "applied:" line after ``offset`` in the log (it follows the kernel's transaction:
        waited for up to ``--change-timeout``), and the timeline from ``written`` (epoch)."""

        def logged() -> bool:
            return APPLIED.search(self.log_text(offset)) is not None

        wait_until(logged, time.monotonic(), self.o.change_timeout)
        text = self.log_text(offset)
        return applied_line(text), timeline(text, written)

    def edit(self, proc: Proc) -> None:
        """Namespace 0's cidr rule (every pod, port 443) moved to EDITED_CIDR."""
        assert self.probe is not None
        mark = self.mark_of(pod_addresses(self.size.pod_range(0)[0])[0])
        before, after = (
            net_element(mark, cidr_of(0), PORTS[0]),
            net_element(mark, EDITED_CIDR, PORTS[0]),
        )
        nft_after = f"{mark:#x} . {EDITED_CIDR} . tcp . {PORTS[0]}"
        t0 = time.monotonic()
        held = nft_element(
            self.gateway, self.table, "allow4_net", f"{mark:#x} . {cidr_of(0)} . tcp . {PORTS[0]}"
        )
        self.r.nft_get_s = round(time.monotonic() - t0, 3)
        t0 = time.monotonic()
        if held is None or not self.probe.holds("allow4_net", before):
            raise RuntimeError(f"allow4_net lacks namespace 0's generated element ({held!r})")
        self.r.probe_ms = round((time.monotonic() - t0) * 1000, 2)
        offset = len(self.log_text())
        path = self.manifests / f"{namespace_name(0)}.yaml"
        text = namespace_yaml(self.size, 0, cidr=EDITED_CIDR)
        t0, written = time.monotonic(), time.time()
        write_atomically(path, text)
        self.r.edit_s = self.until_held(proc, t0, "allow4_net", after)
        if self.r.edit_s == "timeout":
            self.note(f"edit: {nft_after} not in allow4_net within {self.o.change_timeout:g} s")
        elif nft_element(self.gateway, self.table, "allow4_net", nft_after) is None:
            self.note(f"edit: the probe saw {nft_after}, nft get element does not")
        elif self.probe.holds("allow4_net", before):
            self.note("edit: the replaced element is still in allow4_net")
        self.r.edit_apply, self.r.edit_timeline = self.apply_logged(offset, written)
        progress(f"{self.size.label}: one edit in the kernel after {self.r.edit_s} s")

    def new_pod(self, proc: Proc) -> None:
        """Pod ``w-new`` (NEW_POD_ADDRESS) added to namespace 1's file."""
        offset = len(self.log_text())
        path = self.manifests / f"{namespace_name(1)}.yaml"
        text = namespace_yaml(self.size, 1, new_pod=True)
        t0, written = time.monotonic(), time.time()
        write_atomically(path, text)
        self.r.new_pod_s = self.until_held(
            proc, t0, "workloads6", workload_element(NEW_POD_ADDRESS)
        )
        if self.r.new_pod_s == "timeout":
            self.note(f"new pod: not in workloads6 within {self.o.change_timeout:g} s")
        elif nft_element(self.gateway, self.table, "workloads6", NEW_POD_ADDRESS) is None:
            self.note("new pod: the probe saw it in workloads6, nft get element does not")
        self.r.new_pod_apply, self.r.new_pod_timeline = self.apply_logged(offset, written)
        progress(f"{self.size.label}: a new pod in the kernel after {self.r.new_pod_s} s")


def run_size(size: Size, o: Options, workdir: Path) -> SizeResult:
    """Fresh namespaces ``egs-<8 hex>-{g,u}``: the gateway (up0) and its uplink peer."""
    with namespaces("egs", "gu") as (gateway, peer):
        veth(gateway, "up0", peer)
        addresses(gateway, ("up0", f"{GATEWAY_UP}/24"), ("up0", "2001:db8:100::2/64"))
        addresses(peer, ("eth0", f"{PEER_UP}/24"), ("eth0", "2001:db8:100::1/64"))
        return SizeRun(size, o, workdir, gateway).run()


# -- report --------------------------------------------------------------------------------------
def fig(value: Figure, digits: int = 2) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:,.{digits}f}"


def steps(line: dict[str, float]) -> str:
    labels = {"adopted": "adopted", "read": "manifests read", "applied": "applied"}
    found = [f"{label} +{line[key]:.1f} s" for key, label in labels.items() if key in line]
    return ", ".join(found) or "no log lines"


def render(results: Results) -> str:
    setup = results.setup
    out = [
        f"egressgw {describe_git(setup)}",
        f"python {setup['python']}, {setup['cpus']} CPUs; idle window "
        f"{results.options['idle_seconds']:g} s, {results.options['scrapes']} scrapes",
        "",
    ]
    rows = [
        (f"{s.pods:,}", f"{s.policies:,}", f"{s.files:,}", fig(s.ready_s, 1), fig(s.rss_mib, 0),
         fig(s.idle_cpu_pct, 2),
         f"{fig(s.scrape_median_s, 3)}/{fig(s.scrape_max_s, 3)}", fig(s.edit_s, 2),
         fig(s.new_pod_s, 2), fig(s.restart_s, 1))
        for s in results.sizes
    ]  # fmt: skip
    out += table(("pods", "policies", "files", "ready s", "RSS MiB", "idle CPU %",
                  "scrape s (median/max)", "edit s", "new pod s", "restart s"),
                 rows, right=True)  # fmt: skip
    out += ["", "per size: seconds from the process start (or the file's write) to the daemon's "
            "log lines; the apply's own ms as it logged them"]  # fmt: skip
    for s in results.sizes:
        first, edit, pod, adopted = s.first_apply, s.edit_apply, s.new_pod_apply, s.adopted
        out.append(
            f"{s.pods:,} pods: {s.namespaces:,} namespaces, {s.gateways} gateways, "
            f"{s.files:,} files, {s.manifest_mib} MiB of YAML; took {s.duration_s:,.0f} s"
        )
        out += [] if not isinstance(s.ready_s, float) else [
            f"  start    {steps(s.ready_timeline)}; {int(first.get('identities', 0)):,} "
            f"identities, {int(first.get('workloads', 0)):,} workload addresses, "
            f"+{int(first.get('added', 0)):,} elements in {fig(first.get('ms'), 0)} ms",
            f"  memory   RSS {fig(s.rss_mib, 0)} MiB ready, {fig(s.rss_after_idle_mib, 0)} after "
            f"the idle window, {fig(s.rss_after_restart_mib, 0)} after the restart; /metrics "
            f"{fig(s.metrics_kib, 0)} KiB",
            f"  edit     {steps(s.edit_timeline)}; apply {fig(edit.get('ms'), 0)} ms "
            f"(+{int(edit.get('added', 0))} -{int(edit.get('removed', 0))}); one lookup "
            f"{fig(s.probe_ms, 2)} ms (nft get element {fig(s.nft_get_s, 2)} s)",
            f"  new pod  {steps(s.new_pod_timeline)}; apply {fig(pod.get('ms'), 0)} ms "
            f"(+{int(pod.get('added', 0))} -{int(pod.get('removed', 0))})",
            f"  restart  SIGTERM to exit {fig(s.stop_s, 1)} s; {steps(s.restart_timeline)}; "
            f"adopt {fig(adopted.get('ms'), 0)} ms ({int(adopted.get('static', 0)):,} elements)",
        ]  # fmt: skip
        out += [f"  note: {n}" for n in s.notes]
    return "\n".join(out)


# -- command line --------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[Size]:
    sizes = []
    for item in text.split(","):
        pods, sep, policies = item.strip().partition(":")
        if not sep or not pods.isdigit() or not policies.isdigit():
            raise ValueError(f"{item!r}: expected PODS:POLICIES")
        sizes.append(Size(int(pods), int(policies)))
    return sizes


def parse(argv: Sequence[str]) -> tuple[Options, list[Size]]:
    p = parser("scale", __doc__, Options())
    add = p.add_argument
    add("--sizes", metavar="PODS:POLICIES,...", help="sizes to run, in order (%(default)s)")
    add("--idle-seconds", type=float, help="idle window for the CPU figure (%(default)s)")
    add("--scrapes", type=int, help="/metrics scrapes (%(default)s)")
    add("--gateways", type=int, help="EgressGateways sharing the namespaces (%(default)s)")
    add("--ready-timeout", type=float, help="s to wait for /readyz 200 (%(default)s)")
    add("--change-timeout", type=float,
        help="s to wait for an edit or a new pod, or for one scrape (%(default)s)")  # fmt: skip
    add("--keep", action="store_true", help="keep the work directory (manifests, logs)")
    o = Options(**vars(p.parse_args(argv)))
    try:
        sizes = [Size(s.pods, s.policies, o.gateways) for s in parse_sizes(o.sizes)]
    except ValueError as exc:
        p.error(f"--sizes: {exc}")
    for s in sizes:
        if not 2 <= s.policies <= s.pods or s.policies > 99_999 or s.pods > 0xFFFF * 0xFFFF:
            p.error(f"--sizes {s.label}: 2 <= POLICIES <= PODS, POLICIES <= 99999")
    if not 1 <= o.gateways <= 200 or o.scrapes < 1 or o.idle_seconds <= 0:
        p.error("--gateways 1..200, --scrapes >= 1, --idle-seconds > 0")
    if o.ready_timeout <= 0 or o.change_timeout <= 0:
        p.error("timeouts must be positive")
    return o, sizes


def main(argv: Sequence[str] | None = None) -> int:
    options, sizes = parse(list(sys.argv[1:] if argv is None else argv))
    if not preflight(("ip", "nft")):
        return 2
    setup = {**git_state(), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    results = Results(setup=setup, options=asdict(options))
    with workspace(options.keep, "egs-scale-") as workdir:
        progress(f"work directory {workdir}")
        for size in sizes:
            results.sizes.append(run_size(size, options, workdir))
    return finish(render(results), results, options.json_path)


if __name__ == "__main__":
    sys.exit(main())
