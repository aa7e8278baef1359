"""Benchmark of the kernel datapath against plain SNAT, each figure a ratio within the same run.

Namespaces ``egb-<8 hex>-{c,g,s}``: client 192.0.2.10 -> gateway (up0 holds the egress IPs
198.51.100.10 and 2001:db8:100::10) -> server 203.0.113.10, which has no route back: only
SNATed traffic returns. Two configurations of the gateway, alternated p e, e p, ...: *plain*
(table ``inet plainsnat``, SNAT only) and *egressgw* (``NftDatapath`` with ``--identities``
identities and ``--elements`` learned elements).

1. TCP connections/s with CPU per connection, iperf3, and with ``perf`` the CPU per connection
   in kernel, netfilter and nft ruleset. Target: egressgw >= 0.9 x plain connections/s.
2. ``program()`` of ``--batch-size`` fresh addresses against an ``nft add element`` subprocess
   per batch, where the time goes, and egressgw's struct encoder against pyroute2's message
   classes. Target: p99 <= 1 ms.

Run as root: ``python -m loadtest.datapath [--json PATH]`` (``make bench``, about two minutes);
loadtest/README.md explains the figures. Every load loop is bounded in count and time; worker
processes stop when their stdin closes.
"""

from __future__ import annotations

import cProfile
import gc
import ipaddress
import json
import os
import platform
import pstats
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from egressgw.datapath.kernel import NftDatapath
from egressgw.datapath.netlink import Change, Element, Op, encode_with_pyroute2
from egressgw.datapath.netns import call_in
from egressgw.datapath.state import DesiredState, Learned
from loadtest.common import (
    REPO,
    addresses,
    cpu_ticks,
    finish,
    in_ns,
    ip,
    median,
    namespaces,
    parser,
    percentile,
    preflight,
    progress,
    reap,
    run,
    sysctl,
    table,
    verdict,
    veth,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

TABLE, PLAIN_TABLE, UPLINK = "egressgw", "plainsnat", "up0"
CLIENT4, CLIENT6 = "192.0.2.10", "2001:db8:1::10"
SERVER4 = "203.0.113.10"
EGRESS4, EGRESS6 = "198.51.100.10", "2001:db8:100::10"
CPS_PORT, IPERF_PORT = 7000, 5201
CLOSED_PORT = 7001  # nothing listens: plain SNAT gets a RST, egressgw rejects (no element)
TCP = 6
FIRST_IDENTITY = 1000
LOAD_LIFETIME_S, BATCH_LIFETIME_S = 3600.0, 600.0
MODES = ("plain", "egressgw")
QUIET = 0.10  # a round is quiet when other processes used less than this share of the CPUs
BULK = 1024  # elements per message when NftSocket.apply loads in bulk
PERF_HZ = 2999
NETFILTER = re.compile(r"(nft_|nf_|__nf_|ipv4_conntrack|ipv6_conntrack|hash_conntrack|"
                       r"init_conntrack|__nft_)")  # fmt: skip
PERF_LINE = re.compile(r"\s*[\d.]+%\s+(\d+)\s+(\d+):\S+\s+\[(.)\]\s+(\S+)")
SOCKET_IO = tuple(f"<method '{m}' of '_socket.socket' objects>" for m in ("send", "recv_into"))


@dataclass(frozen=True)
class Hosts:
    client: str
    gateway: str
    server: str


@contextmanager
def topology() -> Iterator[Hosts]:
    with namespaces("egb", "cgs") as (client, gateway, server):
        veth(client, "eth0", gateway)
        veth(gateway, UPLINK, server)
        addresses(client, ("eth0", f"{CLIENT4}/24"), ("eth0", f"{CLIENT6}/64"))
        addresses(gateway, ("eth0", "192.0.2.1/24"), ("eth0", "2001:db8:1::1/64"),
                  (UPLINK, "198.51.100.2/24"), (UPLINK, "2001:db8:100::2/64"),
                  (UPLINK, f"{EGRESS4}/32"), (UPLINK, f"{EGRESS6}/128"))  # fmt: skip
        addresses(server, ("eth0", "198.51.100.1/24"), ("eth0", "2001:db8:100::1/64"),
                  ("lo", f"{SERVER4}/24"), ("lo", "2001:db8:203::10/64"))  # fmt: skip
        ip(client, "route", "add", "default", "via", "192.0.2.1")
        ip(client, "-6", "route", "add", "default", "via", "2001:db8:1::1")
        ip(gateway, "route", "add", "203.0.113.0/24", "via", "198.51.100.1")
        ip(gateway, "-6", "route", "add", "2001:db8:203::/64", "via", "2001:db8:100::1")
        sysctl(gateway, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # The client closes second (it waits for the server's FIN), so TIME_WAIT stays on the
        # server; a wide port range keeps the client's 4-tuples from repeating within a round.
        sysctl(client, "net.ipv4.ip_local_port_range=10000 65000")
        yield Hosts(client, gateway, server)


# -- the two gateway configurations --------------------------------------------------------------
def nft(ns: str, script: str) -> None:
    done = subprocess.run(in_ns(ns, "nft", "-f", "-"), input=script, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"nft refused:\n{script}\n{done.stderr.strip()}")


def plain_snat(hosts: Hosts) -> None:
    rule = f'add rule inet {PLAIN_TABLE} postrouting oifname "{UPLINK}" meta nfproto'
    nft(hosts.gateway, f"add table inet {PLAIN_TABLE}\nadd chain inet {PLAIN_TABLE} postrouting"
        " { type nat hook postrouting priority srcnat; policy accept; }\n"
        f"{rule} ipv4 snat ip to {EGRESS4}\n{rule} ipv6 snat ip6 to {EGRESS6}\n")  # fmt: skip


def activate(hosts: Hosts, mode: str) -> None:
    """One configuration's table active, the other dormant (one transaction); then conntrack
    flushed and a probe of a closed port: a RST through plain SNAT, an ICMP reject from
    egressgw. (nft 1.0.6 prints garbage for table flags in JSON: the probe proves the switch.)"""
    active, dormant = (PLAIN_TABLE, TABLE) if mode == "plain" else (TABLE, PLAIN_TABLE)
    nft(hosts.gateway, f"add table inet {dormant} {{ flags dormant; }}\nadd table inet {active}\n")
    flush_conntrack(hosts)

    def attempt() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(3.0)
            try:
                sock.connect((SERVER4, CLOSED_PORT))
            except OSError as exc:
                return exc.errno or 0
            return 0

    code, expected = call_in(hosts.client, attempt), {"plain": 111, "egressgw": 113}[mode]
    if code != expected:  # ECONNREFUSED, EHOSTUNREACH
        raise RuntimeError(f"{mode}: closed port gave errno {code}, expected {expected}")


def flush_conntrack(hosts: Hosts) -> None:
    subprocess.run(in_ns(hosts.gateway, "conntrack", "-F"), check=False, capture_output=True)


def account(dp: NftDatapath, client: int) -> dict[str, int]:
    """The datapath's per-identity counters after the traffic: the client's accepted and
    rejected packets, and anything counted for another identity (should be nothing)."""
    counted = dp.counters()
    mine = counted.get(client)
    return {
        "client_accepted_packets": mine.accepted_packets if mine else 0,
        "client_rejected_packets": mine.rejected_packets if mine else 0,
        "other_identities_packets": sum(t.accepted_packets + t.rejected_packets
                                        for i, t in counted.items() if i != client),
    }  # fmt: skip


def identities(count: int) -> list[int]:
    return list(range(FIRST_IDENTITY, FIRST_IDENTITY + count))


def client_identity(ids: Sequence[int]) -> int:
    return ids[len(ids) // 2]


def desired_state(ids: Sequence[int]) -> DesiredState:
    """Every identity has a workload (IPv6; IPv4 as far as 192.0.2.0/24 goes) and SNAT entries."""
    me, addr = client_identity(ids), ipaddress.ip_address
    egress4, egress6 = addr(EGRESS4), addr(EGRESS6)
    state = DesiredState(egress_ips={egress4, egress6})
    state.identities = {i: f"bench-{i // 100}/workload-{i}" for i in ids}
    state.workloads[addr(CLIENT4)] = state.workloads[addr(CLIENT6)] = me
    v4 = [addr(f"192.0.2.{n}") for n in range(11, 255)]
    state.workloads.update(zip(v4, (i for i in ids if i != me), strict=False))
    base6 = int(addr("2001:db8:1:0:1::"))
    state.workloads.update((addr(base6 + n), identity) for n, identity in enumerate(ids))
    state.snat[4], state.snat[6] = dict.fromkeys(ids, egress4), dict.fromkeys(ids, egress6)
    return state


def learned_load(ids: Sequence[int], total: int) -> list[Learned]:
    """The client's two elements (the benchmark's ports), then distinct allow4 elements spread
    evenly over ``ids`` (203.0.113.0/24 x TCP port), ``total`` in all."""
    server, me = ipaddress.ip_address(SERVER4), client_identity(ids)
    out = [Learned(me, server, TCP, (port, port)) for port in (CPS_PORT, IPERF_PORT)]
    for n in range(total - len(out)):
        i, j = n % len(ids), n // len(ids)  # the j-th element of the i-th identity
        address = ipaddress.ip_address(f"203.0.113.{(i * 7 + j) % 256}")
        out.append(Learned(ids[i], address, TCP, (443 + j // 256, 443 + j // 256)))
    return out


def load_egressgw(hosts: Hosts, ids: Sequence[int], elements: int,
                  batch: int) -> tuple[NftDatapath, dict[str, Any]]:  # fmt: skip
    dp = NftDatapath(TABLE, UPLINK, netns=hosts.gateway)
    try:
        started = time.perf_counter()
        dp.adopt()
        adopted = time.perf_counter()
        state = desired_state(ids)
        result = dp.reconcile(state)
        reconciled = time.perf_counter()
        learned, batch_s, written = learned_load(ids, elements), [], 0
        for start in range(0, len(learned), batch):
            t0 = time.perf_counter()
            written += dp.program(learned[start : start + batch], LOAD_LIFETIME_S)
            batch_s.append(time.perf_counter() - t0)
        done = time.perf_counter()
        if written != len(learned):
            raise RuntimeError(f"programmed {written} of {len(learned)} learned elements")
    except BaseException:
        dp.close()
        raise
    return dp, {
        "identities": len(ids), "learned_allow4": len(learned), "client_elements": 2,
        "workloads": len(state.workloads), "snat_entries": len(state.snat[4]) + len(state.snat[6]),
        "static_elements": result.added, "batch_size": batch, "batches": len(batch_s),
        "adopt_s": adopted - started, "reconcile_s": reconciled - adopted,
        "program_s": done - reconciled, "program_batch_s": batch_s, "total_s": done - started,
    }  # fmt: skip


# -- worker processes (in a namespace, spoken to with JSON lines over stdin and stdout) ----------
def _line(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve_worker(address: str, port: int, max_seconds: float) -> None:
    """Accept loop: read the client's byte, echo it, close (the server closes first). Runs
    until stdin closes or ``max_seconds`` pass."""
    socket.setdefaulttimeout(2.0)  # accepted sockets: a silent client cannot stall the loop
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # accept() returns a connection only once its first byte is there: no wakeup in between
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    listener.bind((address, port))
    listener.listen(4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    handled = errors = 0
    deadline, running = time.monotonic() + max_seconds, True
    _line({"ready": True})
    while running and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is not listener:
                running = bool(os.read(sys.stdin.fileno(), 4096))
                continue
            while True:
                try:
                    conn, _peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError:
                    errors += 1
                    break
                try:
                    data = conn.recv(64)
                    if data:
                        conn.sendall(data)
                    handled += 1
                except OSError:
                    errors += 1
                finally:
                    conn.close()
    listener.close()
    _line({"handled": handled, "errors": errors})


def connect_loop(address: str, port: int, seconds: float, limit: int,
                 reset: bool) -> dict[str, float]:  # fmt: skip
    """New connections until ``limit`` attempts or ``seconds`` pass: connect, send a byte, read
    the echo, close. ``reset``: close with a RST (no TIME_WAIT anywhere); otherwise read the
    server's FIN first, so TIME_WAIT stays on the server and never blocks a client port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    abort = struct.pack("ii", 1, 0)
    connections = errors = 0
    started = time.perf_counter()
    deadline = started + seconds
    while connections + errors < limit and time.perf_counter() < deadline:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(2.0)
            sock.connect((address, port))
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                errors += 1
            elif reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, abort)
                connections += 1
            elif sock.recv(1) == b"":
                connections += 1
            else:
                errors += 1
        except OSError:
            errors += 1
            if errors > 100 and errors > connections:
                break  # the path is broken: stop instead of spinning on errors
        finally:
            sock.close()
    return {"connections": connections, "errors": errors,
            "elapsed": time.perf_counter() - started}  # fmt: skip


def client_worker(address: str, port: int) -> None:
    """One bounded ``connect_loop`` per command line read from stdin; exits on EOF."""
    _line({"ready": True})
    for line in sys.stdin:
        c = json.loads(line)
        _line(connect_loop(address, port, float(c["seconds"]), int(c["max"]), bool(c["reset"])))


class Worker:
    """``python -m loadtest.datapath ROLE ARGS`` in a namespace."""

    def __init__(self, ns: str, cpus: str, role: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), *sys.path])))
        argv = in_ns(ns, sys.executable, "-m", "loadtest.datapath", role, *args, cpu=cpus)
        self.role = role
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO, env=env)  # fmt: skip

    def send(self, obj: object) -> None:
        self._stdin().write(json.dumps(obj) + "\n")
        self._stdin().flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        stdout = self.proc.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"{self.role} worker sent nothing within {timeout} s")
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} worker exited with {self.proc.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop(self) -> None:
        """Its stdin closed (it exits by itself, after a last line), killed if it hangs."""
        with suppress(OSError):
            self._stdin().close()
        with suppress(Exception):
            self.receive(timeout=5.0)
        reap(self.proc, 5.0)

    def _stdin(self) -> IO[str]:
        assert self.proc.stdin is not None
        return self.proc.stdin


# -- traffic -------------------------------------------------------------------------------------
@dataclass
class CpsRound:
    mode: str
    pair: int
    cps: float
    connections: int
    errors: int
    cpu_us_per_connection: float  # run time of the workers and ksoftirqd threads / connections
    foreign_cpu: float  # share of all CPUs used by processes not of this benchmark


@dataclass
class IperfRound:
    mode: str
    pair: int
    gbps: float
    retransmits: int
    machine_busy: float  # share of all CPUs busy (anything) during the run


@dataclass
class PerfRound:
    mode: str
    connections: int
    symbols: dict[str, int]  # samples of the benchmark's own tasks per symbol


def pair_order(pair: int) -> tuple[str, str]:
    """p e, e p, p e, ...: a drift of the machine over the run weighs on both alike."""
    return MODES if pair % 2 == 0 else (MODES[1], MODES[0])


def run_time_ns(pid: int) -> int:
    """Time the task has spent on a CPU, softirq work done in its context included."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def softirq_threads() -> list[int]:
    def comm(pid: str) -> str:
        with suppress(OSError):
            return Path(f"/proc/{pid}/comm").read_text()
        return ""

    return [int(p) for p in os.listdir("/proc") if p.isdigit() and comm(p).startswith("ksoftirqd/")]


class CpuMeter:
    """Run time of some tasks, and how much of the machine everything else used meanwhile."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids, self.started = list(pids), time.perf_counter()
        self.mine, self.busy = sum(map(run_time_ns, self.pids)), self.busy_ns()

    @staticmethod
    def busy_ns() -> int:
        return cpu_ticks()["cpu"][0] * 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    def stop(self) -> tuple[int, float]:
        """(run time of the tasks in ns, share of all CPUs used by anything else)."""
        mine = sum(map(run_time_ns, self.pids)) - self.mine
        busy = self.busy_ns() - self.busy
        wall_ns = (time.perf_counter() - self.started) * 1e9 * (os.cpu_count() or 1)
        return mine, max(0.0, (busy - mine) / wall_ns) if wall_ns else 0.0


class Fleet:
    """Connection servers in one namespace and clients in another (``Worker`` processes),
    started together (each has answered once before any round) and stopped together."""

    def __init__(
        self,
        servers: tuple[str, str, int],  # (namespace, CPU list, how many)
        clients: tuple[str, str, int],
        address: str,
        port: int,
        budget_s: float,  # how long a server may live
    ) -> None:
        self.servers: list[Worker] = []
        self.clients: list[Worker] = []
        (server_ns, server_cpus, server_count), (client_ns, client_cpus, client_count) = (
            servers,
            clients,
        )
        try:
            for _ in range(server_count):
                self.servers.append(
                    Worker(server_ns, server_cpus, "_serve", address, str(port), str(budget_s))
                )
            for _ in range(client_count):
                self.clients.append(Worker(client_ns, client_cpus, "_connect", address, str(port)))
            for worker in self.servers + self.clients:
                worker.receive(timeout=30.0)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for worker in self.clients + self.servers:
            worker.stop()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.clients + self.servers]

    def connections(self, seconds: float, attempts: int, reset: bool) -> tuple[float, int, int]:
        """(connections/s, connections, errors) of all clients together, bounded by ``seconds``
        and ``attempts`` (shared among the clients)."""
        per_client = max(1, attempts // len(self.clients))
        for client in self.clients:
            client.send({"seconds": seconds, "max": per_client, "reset": reset})
        done = [client.receive(timeout=seconds + 30.0) for client in self.clients]
        rate = sum(r["connections"] / r["elapsed"] for r in done if r["elapsed"] > 0)
        return rate, sum(int(r["connections"]) for r in done), sum(int(r["errors"]) for r in done)


class TrafficBench:
    """The server and client workers, the same for every round of both configurations."""

    def __init__(self, hosts: Hosts, options: Options) -> None:
        self.hosts, self.o = hosts, options
        self.fleet: Fleet | None = None
        self.softirq = softirq_threads()

    def __enter__(self) -> TrafficBench:
        o = self.o
        self.fleet = Fleet(
            (self.hosts.server, o.server_cpus, o.servers),
            (self.hosts.client, o.client_cpus, o.clients),
            SERVER4,
            CPS_PORT,
            600 + o.cps_pairs * 2 * (o.cps_seconds + o.warmup_seconds + 30),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fleet is not None:
            self.fleet.stop()

    def pids(self) -> list[int]:
        assert self.fleet is not None
        return self.fleet.pids() + self.softirq

    def connections(self, seconds: float) -> tuple[float, int, int]:
        """(connections/s, connections, errors) of all clients together for one round."""
        assert self.fleet is not None
        return self.fleet.connections(seconds, self.o.cps_max, self.o.close == "rst")

    def prepare(self, mode: str) -> None:
        activate(self.hosts, mode)
        if self.o.warmup_seconds > 0:
            self.connections(self.o.warmup_seconds)
        flush_conntrack(self.hosts)

    def cps_round(self, mode: str, pair: int) -> CpsRound:
        self.prepare(mode)
        meter = CpuMeter(self.pids())
        cps, count, errors = self.connections(self.o.cps_seconds)
        mine_ns, foreign = meter.stop()
        return CpsRound(mode, pair, cps, count, errors, mine_ns / 1000 / max(1, count), foreign)

    def iperf_round(self, mode: str, pair: int) -> IperfRound:
        """One iperf3 run: Gbit/s received, retransmits, how busy the machine was."""
        activate(self.hosts, mode)
        meter, o = CpuMeter([]), self.o
        server = subprocess.Popen(
            in_ns(self.hosts.server, "iperf3", "-s", "-1", "-B", SERVER4, "-p", str(IPERF_PORT),
                  cpu=o.server_cpus),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 10.0
            listening = in_ns(self.hosts.server, "ss", "-Hltn", f"sport = :{IPERF_PORT}")
            while not run(listening).stdout.strip():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"iperf3 does not listen on {IPERF_PORT} after 10 s")
                time.sleep(0.05)
            argv = [
                "iperf3",
                "-c",
                SERVER4,
                "-p",
                str(IPERF_PORT),
                "-t",
                str(o.iperf_seconds),
                "-J",
            ]
            out = run(in_ns(self.hosts.client, *argv, cpu=o.client_cpus), o.iperf_seconds + 30)
            report = json.loads(out.stdout)["end"]
        finally:
            reap(server, 10.0)
        gbps = float(report["sum_received"]["bits_per_second"]) / 1e9
        retransmits = int(report["sum_sent"].get("retransmits", 0))
        return IperfRound(mode, pair, gbps, retransmits, meter.stop()[1])

    def perf_round(self, mode: str) -> PerfRound:
        """One connection round under ``perf record -a``, samples kept for the benchmark's
        tasks. The recording starts first and the round once perf has written its header, so
        every sample of the round's work is counted."""
        self.prepare(mode)
        pids, seconds = set(self.pids()), self.o.cps_seconds
        fd, data = tempfile.mkstemp(prefix="egb-perf-", suffix=".data")
        os.close(fd)
        try:
            recorder = subprocess.Popen(
                ["perf", "record", "-a", "-F", str(PERF_HZ), "-o", data, "--", "sleep",
                 f"{seconds + 2.0:.2f}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                deadline = time.monotonic() + 10.0
                while os.path.getsize(data) == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.2)
                count = self.connections(seconds)[1]
            finally:
                reap(recorder, seconds + 30.0)
            report = ["perf", "report", "-i", data, "--sort", "pid,symbol", "--stdio", "-n"]
            listed = run(report, timeout=120.0).stdout
        finally:
            os.unlink(data)
        symbols: dict[str, int] = {}
        for found in filter(None, map(PERF_LINE.match, listed.splitlines())):
            if int(found[2]) in pids:
                name = f"[{found[3]}] {found[4]}"
                symbols[name] = symbols.get(name, 0) + int(found[1])
        return PerfRound(mode, count, symbols)


def perf_summary(rounds: Sequence[PerfRound]) -> dict[str, Any]:
    """CPU per connection by configuration (all, kernel, netfilter, nft ruleset) and the symbols
    that grew most from plain to egressgw."""
    per: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in rounds if r.mode == mode]
        connections = sum(r.connections for r in mine) or 1
        totals: dict[str, int] = {}
        for r in mine:
            for name, n in r.symbols.items():
                totals[name] = totals.get(name, 0) + n
        per[mode] = {name: n * 1e6 / PERF_HZ / connections for name, n in totals.items()}
    groups: dict[str, Callable[[str], bool]] = {
        "all": lambda name: True,
        "kernel": lambda name: name.startswith("[k]"),
        "netfilter": lambda name: bool(NETFILTER.match(name[4:])),
        "nft ruleset": lambda name: name[4:].startswith("nft_"),
    }
    out: dict[str, Any] = {
        label: {m: sum(v for n, v in per[m].items() if test(n)) for m in MODES}
        for label, test in groups.items()
    }
    names = set(per["plain"]) | set(per["egressgw"])
    grew = sorted(((per["egressgw"].get(n, 0.0) - per["plain"].get(n, 0.0), n) for n in names),
                  reverse=True)  # fmt: skip
    out["grew_most_us"] = [(n, round(d, 3)) for d, n in grew[:8]]
    # What the ruleset's own work (nft_* symbols: stable run to run, unlike the totals, which
    # move with the neighbours' load) would do to a CPU-bound connection rate.
    base = (out["all"]["plain"] + out["all"]["egressgw"]) / 2
    added = out["nft ruleset"]["egressgw"] - out["nft ruleset"]["plain"]
    out["projected_cps_ratio"] = base / (base + added) if base else None
    out["connections"] = {m: sum(r.connections for r in rounds if r.mode == m) for m in MODES}
    return out


# -- element programming latency -----------------------------------------------------------------
class FreshDestinations:
    """Batches of learned allow4 elements in no set yet: (identity, port) never repeats."""

    def __init__(self, ids: Sequence[int], size: int) -> None:
        if not 1 <= size <= 250:
            raise ValueError("batch size must be 1..250")
        self.ids, self.n = ids, 0
        self.addresses = [ipaddress.ip_address(f"198.51.100.{k + 1}") for k in range(size)]

    def batch(self) -> list[Learned]:
        n, self.n = self.n, self.n + 1
        port = 10000 + n // len(self.ids)
        if port > 65535:
            raise RuntimeError("out of fresh destinations")
        return [Learned(self.ids[n % len(self.ids)], a, TCP, (port, port)) for a in self.addresses]


class TimedSocket(socket.socket):
    """The datapath's netlink socket, timing ``send`` (where the kernel runs the whole batch
    transaction) and ``recv_into`` (collecting the acknowledgements)."""

    def __init__(self, original: socket.socket) -> None:
        timeout = original.gettimeout()
        super().__init__(original.family, original.type, original.proto, original.detach())
        self.settimeout(timeout)
        self.send_s = self.recv_s = 0.0

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        t0 = time.perf_counter()
        try:
            return super().send(data, flags)
        finally:
            self.send_s += time.perf_counter() - t0

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        t0 = time.perf_counter()
        try:
            return super().recv_into(buffer, nbytes, flags)
        finally:
            self.recv_s += time.perf_counter() - t0


@dataclass
class Percentiles:
    n: int
    p50_us: float
    p99_us: float
    max_us: float
    mean_us: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        us = [s * 1e6 for s in seconds]
        return cls(len(us), percentile(us, 50), percentile(us, 99), max(us), sum(us) / len(us))


@dataclass
class ProgramRun:
    total: Percentiles
    kernel: Percentiles  # time in send(): the kernel's batch transaction
    acks: Percentiles  # time in recv_into()
    python: Percentiles  # the rest: building elements, encoding messages
    gc_pauses: dict[int, list[float]]  # generation -> pauses (s) of Python's collector meanwhile
    foreign_cpu: float  # share of all CPUs used by other processes meanwhile
    slowest_with_gc: int  # of the slowest 1% of batches, how many had a collection inside


class GcPauses:
    """Every collection of Python's cyclic garbage collector while installed."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.last_end = self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
        else:
            self.pauses[info["generation"]].append(now - self._started)
            self.last_end = now

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def time_program(dp: NftDatapath, fresh: FreshDestinations, batches: int,
                 max_seconds: float) -> ProgramRun:  # fmt: skip
    """``program()`` of fresh batches, its socket timed meanwhile (and plain again after)."""
    sock = dp.sock
    timed = sock._sock = TimedSocket(sock._sock)
    times: list[tuple[float, float, float]] = []  # (total, send, recv_into) per batch
    collected: list[bool] = []
    deadline = time.perf_counter() + max_seconds
    meter = CpuMeter([os.getpid(), *softirq_threads()])
    with GcPauses() as pauses:
        for _ in range(batches):
            if time.perf_counter() > deadline:
                break
            learned = fresh.batch()
            timed.send_s = timed.recv_s = 0.0
            t0 = time.perf_counter()
            written = dp.program(learned, BATCH_LIFETIME_S)
            times.append((time.perf_counter() - t0, timed.send_s, timed.recv_s))
            if written != len(learned):
                raise RuntimeError(f"program() wrote {written} of {len(learned)} fresh elements")
            collected.append(pauses.last_end >= t0)
    sock._sock = socket.socket(timed.family, timed.type, timed.proto, timed.detach())
    slowest = sorted(range(len(times)), key=lambda i: -times[i][0])[: max(1, len(times) // 100)]
    total, kernel, acks = zip(*times, strict=True)
    return ProgramRun(
        Percentiles.of(total), Percentiles.of(kernel), Percentiles.of(acks),
        Percentiles.of([t - s - r for t, s, r in times]), pauses.pauses, meter.stop()[1],
        sum(collected[i] for i in slowest),
    )  # fmt: skip


def time_nft(gateway: str, fresh: FreshDestinations, updates: int,
             max_seconds: float) -> list[float]:  # fmt: skip
    """One ``ip netns exec GW nft add element ...`` per batch: the baseline."""
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(updates):
        if time.perf_counter() > deadline:
            break
        elements = ", ".join(f"{e.identity} . {e.address} . tcp . {e.ports[0]} timeout 600s"
                             for e in fresh.batch())  # fmt: skip
        argv = in_ns(gateway, "nft", "add", "element", "inet", TABLE, "allow4", f"{{ {elements} }}")
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=30.0)
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class GcReport:
    """One full collection with the datapath loaded, and one after ``gc.freeze()`` (what is
    loaded by then is never scanned again)."""

    tracked_objects: int
    full_ms: float
    frozen_full_ms: float


def measure_gc() -> GcReport:
    def full_ms() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - t0) * 1000

    gc.collect()
    tracked, full = len(gc.get_objects()), full_ms()
    gc.freeze()
    try:
        return GcReport(tracked, full, full_ms())
    finally:
        gc.unfreeze()


@dataclass
class ProfileLine:
    function: str
    calls: int
    tottime_us_per_batch: float
    cumtime_us_per_batch: float


@dataclass
class ProfileReport:
    batches: int
    us_per_batch: float
    share: dict[str, float]  # own time: pyroute2 / egressgw / kernel (send, recv_into) / other
    top: list[ProfileLine]


def profile_program(dp: NftDatapath, fresh: FreshDestinations, batches: int) -> ProfileReport:
    learned = [fresh.batch() for _ in range(batches)]
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for batch in learned:
        dp.program(batch, BATCH_LIFETIME_S)
    profiler.disable()
    elapsed = time.perf_counter() - t0
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    groups = dict.fromkeys(("pyroute2", "egressgw", "kernel (send/recv)", "other"), 0.0)
    lines: list[ProfileLine] = []
    for (filename, lineno, name), (_cc, calls, tottime, cumtime, _callers) in raw.items():
        group = ("pyroute2" if "pyroute2" in filename else "egressgw" if "egressgw" in filename
                 else "kernel (send/recv)" if name in SOCKET_IO else "other")  # fmt: skip
        groups[group] += tottime
        where = filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
        label = f"{where}:{lineno}({name})" if lineno else name
        lines.append(ProfileLine(label, calls, tottime / batches * 1e6, cumtime / batches * 1e6))
    total = sum(groups.values()) or 1.0
    lines.sort(key=lambda line: -line.tottime_us_per_batch)
    return ProfileReport(batches, elapsed / batches * 1e6,
                         {k: v / total for k, v in groups.items()}, lines[:10])  # fmt: skip


@dataclass
class EncodeReport:
    identical: bool  # the two encoders' bytes, for adds, deletes, intervals and map elements
    pyroute2_us: float  # one 8-element NEWSETELEM message
    egressgw_us: float
    bulk_pyroute2_ms: float  # one 1024-element message, as in bulk loading
    bulk_egressgw_ms: float


def compare_encoders(dp: NftDatapath, fresh: FreshDestinations) -> EncodeReport:
    """egressgw's element-list encoder (``NftSocket._encode``: the struct code ``program()``
    builds its messages with) against pyroute2's message classes, per message."""
    sample = tuple(item.element(600_000) for item in fresh.batch())
    interval = Learned(FIRST_IDENTITY, ipaddress.ip_address(SERVER4), TCP, (1000, 2000))
    mapped = Element(key=bytes(4), data=bytes([0, 0, 3, 232]))
    cases = [Change(Op.ADD, "allow4", sample), Change(Op.DESTROY, "allow4", sample),
             Change(Op.ADD, "allow4_range", (interval.element(60_000),)),
             Change(Op.DELETE, "workloads4", (mapped, mapped))]  # fmt: skip
    ours = dp.sock._encode
    identical = all(ours(c, c.elements, 77) == encode_with_pyroute2(TABLE, c, c.elements, 77)
                    for c in cases)  # fmt: skip

    def per_call_us(encode: Callable[[Change, Sequence[Element], int], bytes], change: Change,
                    rounds: int) -> float:  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(rounds):
            encode(change, change.elements, 1)
        return (time.perf_counter() - t0) / rounds * 1e6

    def pyroute2(change: Change, elements: Sequence[Element], seq: int) -> bytes:
        return encode_with_pyroute2(TABLE, change, elements, seq)

    bulk_items = [b for _ in range(BULK // len(sample)) for b in fresh.batch()]
    bulk = Change(Op.ADD, "allow4", tuple(b.element(600_000) for b in bulk_items))
    return EncodeReport(identical, per_call_us(pyroute2, cases[0], 200),
                        per_call_us(ours, cases[0], 2000), per_call_us(pyroute2, bulk, 5) / 1000,
                        per_call_us(ours, bulk, 20) / 1000)  # fmt: skip


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Options:
    identities: int = 10_000
    elements: int = 100_000
    load_batch: int = 10_000
    cps_pairs: int = 12
    cps_seconds: float = 1.5
    cps_max: int = 200_000
    warmup_seconds: float = 0.25
    iperf_pairs: int = 3
    iperf_seconds: int = 5
    clients: int = 2
    servers: int = 1
    close: str = "fin"
    client_cpus: str = ""
    server_cpus: str = ""
    perf_pairs: int = 1
    batch_size: int = 8
    batches: int = 2000
    nft_updates: int = 200
    profile_batches: int = 300
    latency_seconds: float = 30.0
    json_path: str | None = None


@dataclass
class Results:
    machine: dict[str, Any]
    options: dict[str, Any]
    load: dict[str, Any] = field(default_factory=dict)
    cps: list[CpsRound] = field(default_factory=list)
    iperf: list[IperfRound] = field(default_factory=list)
    perf: list[PerfRound] = field(default_factory=list)
    accounting: dict[str, int] = field(default_factory=dict)  # egressgw's counters, account()
    mode_checks: int = 0  # connections rejected on purpose by activate() in egressgw rounds
    summary: dict[str, Any] = field(default_factory=dict)
    program: ProgramRun | None = None
    nft: Percentiles | None = None
    profile: ProfileReport | None = None
    gc: GcReport | None = None
    encoders: EncodeReport | None = None
    wall_s: float = 0.0


def compare(
    values: Sequence[tuple[str, int, float]], quiet: set[int] | None = None
) -> dict[str, Any]:
    """Medians per configuration, their ratio, and the ratio within each plain/egressgw pair
    (also over the ``quiet`` pairs alone, when given)."""
    by_pair: dict[int, dict[str, float]] = {}
    for mode, pair, value in values:
        by_pair.setdefault(pair, {})[mode] = value
    ratios = {
        n: p["egressgw"] / p["plain"] for n, p in by_pair.items() if len(p) == 2 and p["plain"]
    }
    pairs = list(ratios.values())
    calm = [r for n, r in ratios.items() if quiet is not None and n in quiet]
    plain, egw = (median([v for m, _, v in values if m == mode] or [0.0]) for mode in MODES)
    return {
        "plain_median": plain, "egressgw_median": egw, "ratio": egw / plain if plain else None,
        "ratio_per_pair": pairs, "median_pair_ratio": median(pairs) if pairs else None,
        "quiet_pairs": len(calm), "median_quiet_pair_ratio": median(calm) if calm else None,
    }  # fmt: skip


def summarize(results: Results) -> None:
    s, cps = results.summary, results.cps
    if cps:
        quiet = {r.pair for r in cps} - {r.pair for r in cps if r.foreign_cpu >= QUIET}
        s["cps"] = compare([(r.mode, r.pair, r.cps) for r in cps], quiet)
        s["cps"]["target"] = 0.9
        s["cps"]["met"] = all((s["cps"][k] or 0.0) >= 0.9 for k in ("ratio", "median_pair_ratio"))
        s["cpu_us_per_connection"] = compare(
            [(r.mode, r.pair, r.cpu_us_per_connection) for r in cps], quiet
        )
        s["foreign_cpu_median"] = median(r.foreign_cpu for r in cps)
    if results.perf:
        s["perf"] = perf_summary(results.perf)
    if results.iperf:
        s["gbps"] = compare([(r.mode, r.pair, r.gbps) for r in results.iperf])
    if results.program is not None and results.nft is not None:
        p, n = results.program.total, results.nft
        s["program"] = {"p50_ratio_netlink_over_nft": p.p50_us / n.p50_us,
                        "p99_ratio_netlink_over_nft": p.p99_us / n.p99_us,
                        "target_p99_us": 1000.0, "met": p.p99_us <= 1000.0}  # fmt: skip


def traffic(hosts: Hosts, dp: NftDatapath, client: int, o: Options, results: Results) -> None:
    """Connection rounds, iperf3 rounds and perf rounds, each in pairs p e, e p, p e, ..."""
    if o.cps_pairs <= 0 and o.iperf_pairs <= 0 and o.perf_pairs <= 0:
        return
    with TrafficBench(hosts, o) as bench:
        for pair in range(o.cps_pairs):
            for mode in pair_order(pair):
                c = bench.cps_round(mode, pair)
                results.cps.append(c)
                progress(f"pair {pair} {mode:8}: {c.cps:8.0f} conn/s, {c.errors} errors")
        for pair in range(o.iperf_pairs if o.iperf_seconds > 0 else 0):
            for mode in pair_order(pair):
                i = bench.iperf_round(mode, pair)
                results.iperf.append(i)
                progress(f"pair {pair} {mode:8}: {i.gbps:6.2f} Gbit/s")
        for pair in range(o.perf_pairs):
            for mode in pair_order(pair):
                results.perf.append(bench.perf_round(mode))
                progress(f"perf {pair} {mode:8}: {results.perf[-1].connections} connections")
    results.accounting = account(dp, client)
    rounds: list[CpsRound | IperfRound | PerfRound] = [*results.cps, *results.iperf, *results.perf]
    results.mode_checks = sum(r.mode == "egressgw" for r in rounds)


def measure(o: Options) -> Results:
    started = time.perf_counter()
    results = Results(
        machine={"kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version(),
                 "nft": run(["nft", "--version"]).stdout.strip(),
                 "iperf3": run(["iperf3", "--version"]).stdout.splitlines()[0]},
        options=asdict(o),
    )  # fmt: skip
    ids = identities(o.identities)
    with topology() as hosts:
        plain_snat(hosts)
        progress("loading the egressgw datapath")
        dp, results.load = load_egressgw(hosts, ids, o.elements, o.load_batch)
        try:
            load = results.load
            progress(f"loaded {load['learned_allow4']} learned elements in {load['total_s']:.1f} s")
            traffic(hosts, dp, client_identity(ids), o, results)
            activate(hosts, "egressgw")
            fresh = FreshDestinations(ids, o.batch_size)
            if o.batches > 0:
                progress(f"timing {o.batches} program() batches of {o.batch_size}")
                results.program = time_program(dp, fresh, o.batches, o.latency_seconds)
            if o.nft_updates > 0:
                progress(f"timing {o.nft_updates} nft add element subprocesses")
                times = time_nft(hosts.gateway, fresh, o.nft_updates, o.latency_seconds)
                results.nft = Percentiles.of(times)
            if o.profile_batches > 0:
                progress(f"profiling {o.profile_batches} program() batches")
                results.profile = profile_program(dp, fresh, o.profile_batches)
            results.gc = measure_gc()
            if o.batches > 0:
                progress("timing egressgw's element encoding against pyroute2's")
                results.encoders = compare_encoders(dp, fresh)
        finally:
            dp.close()
    summarize(results)
    results.wall_s = time.perf_counter() - started
    return results


# -- report --------------------------------------------------------------------------------------
def _us(value: float) -> str:
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(results: Results) -> str:
    m, load, s = results.machine, results.load, results.summary
    rate = load["learned_allow4"] / load["program_s"] if load["program_s"] else 0.0
    out = [
        f"egressgw datapath benchmark: kernel {m['kernel']}, {m['cpus']} CPUs, {m['nft']},"
        f" {m['iperf3']}, wall {results.wall_s:.0f} s", "",
        f"load: {load['identities']:,} identities; {load['learned_allow4']:,} learned allow4"
        f" elements ({load['client_elements']} of them the client's); {load['workloads']:,}"
        f" workloads; {load['snat_entries']:,} SNAT entries",
        f"  adopt {load['adopt_s']:.2f} s; reconcile {load['static_elements']:,} static elements"
        f" {load['reconcile_s']:.2f} s; program() {load['batches']} x {load['batch_size']:,}"
        f" learned {load['program_s']:.2f} s ({rate:,.0f} elements/s, slowest call"
        f" {max(load['program_batch_s']):.2f} s); total {load['total_s']:.2f} s",
    ]  # fmt: skip
    rows = [(label, fmt.format(s[key]["plain_median"]), fmt.format(s[key]["egressgw_median"]),
             _ratio(s[key]["ratio"]), _ratio(s[key]["median_pair_ratio"]),
             _ratio(s[key]["median_quiet_pair_ratio"]),
             " ".join(f"{x:.2f}" for x in s[key]["ratio_per_pair"]))
            for label, key, fmt in (("TCP connections/s", "cps", "{:,.0f}"),
                                    ("CPU us/connection", "cpu_us_per_connection", "{:.1f}"),
                                    ("iperf3 Gbit/s", "gbps", "{:.2f}")) if key in s]  # fmt: skip
    if rows:
        out += ["", "traffic through the gateway, alternating rounds p e e p p e ...: medians,"
                " egressgw/plain ratios"]  # fmt: skip
        head = ("", "plain", "egressgw", "median", "pairs", "quiet", "ratio of each pair")
        out += ["  " + line for line in table(head, rows, right=True)]
    if "cps" in s:
        cps = s["cps"]
        out.append(
            f"  target connections/s egressgw/plain >= 0.90 (median and pairs): "
            f"{verdict(cps['met'])}; quiet pairs (other processes < {QUIET:.0%} of the CPUs in"
            f" both rounds): {cps['quiet_pairs']} of {len(cps['ratio_per_pair'])}; other"
            f" processes' median CPU share {s['foreign_cpu_median']:.0%}")  # fmt: skip
    if results.cps:
        out.append("  connection rounds (conn/s, CPU us/conn, others' CPU share):")
        for start in range(0, len(results.cps), 4):
            out.append("    " + "   ".join(
                f"{r.mode[0]} {r.cps:>6,.0f} {r.cpu_us_per_connection:>4.0f}us"
                f" {r.foreign_cpu:>3.0%}" + (f" {r.errors} err" if r.errors else "")
                for r in results.cps[start : start + 4]))  # fmt: skip
    if results.accounting:
        a = results.accounting
        out.append(
            f"  egressgw's accounting after the traffic: client identity accepted"
            f" {a['client_accepted_packets']:,} packets, rejected {a['client_rejected_packets']}"
            f" ({results.mode_checks} expected: one probe of a closed port per egressgw round);"
            f" other identities {a['other_identities_packets']} packets")  # fmt: skip
    if "perf" in s:
        pf, counted = s["perf"], s["perf"]["connections"]
        out.append("  perf: CPU of the benchmark's own tasks per connection"
                   f" ({counted['plain']:,} + {counted['egressgw']:,} connections under perf"
                   " record)")  # fmt: skip
        for label in ("all", "kernel", "netfilter", "nft ruleset"):
            plain, egw = pf[label]["plain"], pf[label]["egressgw"]
            out.append(
                f"    {label:14}{plain:8.1f} us {egw:8.1f} us   egressgw {egw - plain:+6.1f} us"
            )
        if pf["projected_cps_ratio"] is not None:
            out.append(
                f"    the nft ruleset's difference alone would make connections/s"
                f" {pf['projected_cps_ratio']:.3f} x plain (CPU-bound, no neighbours)"
            )
        out.append(
            "    grew most (us/connection): "
            + ", ".join(f"{name[4:]} {d:+.2f}" for name, d in pf["grew_most_us"][:6])
        )
    if results.iperf:
        out.append("  iperf3 rounds: " + ", ".join(
            f"{r.mode[0]} {r.gbps:.2f} ({r.retransmits} retr, busy {r.machine_busy:.0%})"
            for r in results.iperf))  # fmt: skip
    if results.program is not None:
        out += programming(results)
    if results.profile is not None:
        prof = results.profile
        shares = ", ".join(f"{k} {v:.0%}" for k, v in prof.share.items())
        out.append(f"  cProfile of {prof.batches} program() calls ({prof.us_per_batch:.0f} us/call"
                   f" under the profiler), own time: {shares}")  # fmt: skip
        out += [
            f"    {line.tottime_us_per_batch:7.1f} us/call own"
            f" {line.cumtime_us_per_batch:7.1f} cum  {line.function}"
            for line in prof.top[:6]
        ]
    return "\n".join(out)


def programming(results: Results) -> list[str]:
    p, n, e, size = results.program, results.nft, results.encoders, results.options["batch_size"]
    assert p is not None
    out = ["", f"element programming: batches of {size} fresh addresses into allow4 holding "
           f"{results.load['learned_allow4']:,}+"]  # fmt: skip
    rows = [
        ("NftDatapath.program()", p.total),
        ("  kernel (sendmsg: the batch)", p.kernel),
        ("  acknowledgements (recv)", p.acks),
        ("  Python (elements, encoding)", p.python),
    ]
    rows += [("nft add element subprocess", n)] if n is not None else []
    out += ["  " + line for line in table(
        ("", "p50", "p99", "max", "n"),
        [(label, _us(pc.p50_us), _us(pc.p99_us), _us(pc.max_us), str(pc.n)) for label, pc in rows],
        right=True)]  # fmt: skip
    if n is not None:
        sp = results.summary["program"]
        out.append(f"  ratio program()/nft: p50 {sp['p50_ratio_netlink_over_nft']:.3f}, p99 "
                   f"{sp['p99_ratio_netlink_over_nft']:.3f} (program() "
                   f"{n.p50_us / p.total.p50_us:.1f}x faster at p50)")  # fmt: skip
    out.append(f"  target program() p99 <= 1 ms: {verdict(p.total.p99_us <= 1000)}")
    gen2, young = p.gc_pauses.get(2, []), p.gc_pauses.get(0, []) + p.gc_pauses.get(1, [])
    out.append(
        f"  meanwhile: other processes used {p.foreign_cpu:.0%} of the CPUs; Python's collector"
        f" ran {len(young)} young collections (max {_us(max(young, default=0.0) * 1e6)}) and"
        f" {len(gen2)} full ones (max {_us(max(gen2, default=0.0) * 1e6)}); {p.slowest_with_gc}"
        " of the slowest 1% of batches contained a collection")  # fmt: skip
    if results.gc is not None:
        g = results.gc
        out.append(
            f"  one full collection with the datapath loaded ({g.tracked_objects:,} tracked"
            f" objects): {g.full_ms:.0f} ms; after gc.freeze(): {g.frozen_full_ms:.1f} ms"
        )
    if e is not None:
        out.append(
            f"  encoding one {size}-element NEWSETELEM message: pyroute2 {e.pyroute2_us:.0f} us,"
            f" egressgw {e.egressgw_us:.1f} us (bytes identical: {e.identical}); a {BULK}-element"
            f" one (bulk loading): pyroute2 {e.bulk_pyroute2_ms:.1f} ms, egressgw"
            f" {e.bulk_egressgw_ms:.2f} ms")  # fmt: skip
    return out


# -- command line --------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> Options:
    p = parser("datapath", "egressgw datapath vs plain SNAT, and netlink batches vs nft "
               "subprocesses", Options())  # fmt: skip
    add = p.add_argument
    add("--identities", type=int, help="identities (%(default)s)")
    add("--elements", type=int, help="learned allow4 elements (%(default)s)")
    add("--load-batch", type=int, help="learned elements per program() call (%(default)s)")
    add("--cps-pairs", type=int, help="plain + egressgw connection rounds (%(default)s)")
    add("--cps-seconds", type=float, help="duration of a connection round (%(default)s s)")
    add("--cps-max", type=int, help="connection attempts per round at most (%(default)s)")
    add("--warmup-seconds", type=float, help="connections before each round (%(default)s s)")
    add("--iperf-pairs", type=int, help="plain + egressgw iperf3 runs (%(default)s)")
    add("--iperf-seconds", type=int, help="iperf3 -t (%(default)s; 0: no iperf3)")
    add("--clients", type=int, help="client processes (%(default)s)")
    add("--servers", type=int, help="server processes (%(default)s)")
    add("--close", choices=("fin", "rst"), help="how clients close (%(default)s)")
    add("--client-cpus", help="taskset CPU list of the client side (default none)")
    add("--server-cpus", help="taskset CPU list of the server side (default none)")
    add("--perf-pairs", type=int, help="connection rounds under perf (%(default)s)")
    add("--batch-size", type=int, help="addresses per program() batch (%(default)s)")
    add("--batches", type=int, help="timed program() batches (%(default)s)")
    add("--nft-updates", type=int, help="timed nft subprocesses (%(default)s)")
    add("--profile-batches", type=int, help="program() batches under cProfile (%(default)s)")
    add("--latency-seconds", type=float, help="time bound of each latency loop (%(default)s s)")
    o = Options(**vars(p.parse_args(argv)))
    if o.elements < 2 or o.identities < 1 or o.clients < 1 or o.servers < 1:
        p.error("need at least 2 elements, 1 identity, 1 client and 1 server")
    o.perf_pairs = o.perf_pairs if shutil.which("perf") else 0
    return o


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_serve"]:
        serve_worker(args[1], int(args[2]), float(args[3]))
        return 0
    if args[:1] == ["_connect"]:
        client_worker(args[1], int(args[2]))
        return 0
    options = parse(args)
    if not preflight(("ip", "nft", "iperf3", "conntrack", "ss", "taskset")):
        return 2
    results = measure(options)
    return finish(render(results), results, options.json_path)


if __name__ == "__main__":
    sys.exit(main())
