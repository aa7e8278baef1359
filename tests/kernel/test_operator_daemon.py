"""`egressgw run` and `egressgw cleanup` as a new operator meets them, in a namespace of their own.

Mistakes (a missing uplink, an address in use, no CAP_NET_ADMIN) end in one line and exit
status 2 before the kernel is touched; an unreachable upstream among several does not stop the
start; the "applied" line names the egress IPs taken and released; cleanup removes the table and
those egress IPs, and keeps the node's own address.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from egressgw.datapath.netns import call_in
from tests.conftest import require, unique_name

pytestmark = pytest.mark.kernel

NODE4 = "198.51.100.2"
POD4 = "192.0.2.10"
DNS4 = "192.0.2.53"  # the interceptor listens here (on lo)
UPSTREAM = ("127.0.0.1", 5300)  # a small resolver that answers every A query
ANSWER4 = "203.0.113.10"
HTTP = ("127.0.0.1", 9460)
CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {project: payments}}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: payments, labels: {app: api}}
status: {podIPs: [{ip: 192.0.2.10}]}
---
apiVersion: egressgw.io/v1alpha1
kind: EgressPolicy
metadata: {name: database, namespace: payments}
spec:
  podSelector: {}
  egress:
    - to: [{fqdn: db.example.com}]
      ports: [{protocol: TCP, port: 5432}]
"""
GATEWAY = """\
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: payments}
spec:
  namespaceSelector: {matchLabels: {project: payments}}
  egressIPs: [%s]
"""


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture
def node(netns: str) -> str:
    """A gateway node: the namespace with an uplink ``up0`` (a veth pair) holding the node's own
    address, and the pod's and the interceptor's addresses on lo."""
    ip(netns, "link", "add", "up0", "type", "veth", "peer", "name", "up0p")
    ip(netns, "addr", "add", f"{NODE4}/24", "dev", "up0")
    for link in ("up0", "up0p"):
        ip(netns, "link", "set", link, "up")
    for address in (POD4, DNS4):
        ip(netns, "addr", "add", f"{address}/32", "dev", "lo")
    return netns


def egressgw(
    ns: str | None, *args: str, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``egressgw ARGS`` (inside ``ns`` when given), bounded in time."""
    argv = [*prefix, sys.executable, "-m", "egressgw", *args]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def tables(ns: str) -> str:
    cmd = ["ip", "netns", "exec", ns, "nft", "list", "tables"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def held_in(ns: str, what: Callable[[], socket.socket]) -> socket.socket:
    return call_in(ns, what)


def tcp_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    sock.listen(1)
    return sock


def udp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    return sock


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s:g} s")
        time.sleep(0.05)


@contextmanager
def daemon(ns: str, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``egressgw run ARGS`` inside ``ns``, its output in ``log``; killed afterwards if still up."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "egressgw", "run", *args]
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}  # as on a node
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environ)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def ready(ns: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the daemon exited {proc.returncode}:\n{log.read_text()}")

    def ask() -> bool:
        try:
            url = f"http://{HTTP[0]}:{HTTP[1]}/readyz"
            with urllib.request.urlopen(url, timeout=1) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return call_in(ns, ask)


def log_lines(log: Path, text: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if text in line]


# -- mistakes ---------------------------------------------------------------------------------


def test_start_up_mistakes_are_one_line_exit_2_and_leave_the_kernel_alone(
    node: str, tmp_path: Path
) -> None:
    table = unique_name("egw").replace("-", "_")
    base = ["run", "--manifests", str(tmp_path), "--table", table]

    missing = egressgw(None, *base, "--uplink", "nope0", "--netns", node)
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr.splitlines() == [
        f"egressgw run: --uplink nope0: no such interface in network namespace {node} "
        "(`ip link` lists them)"
    ]

    http = held_in(node, lambda: tcp_listener(*HTTP))
    dns = held_in(node, lambda: udp_socket(DNS4, 53))
    try:
        taken = egressgw(node, *base, "--uplink", "up0", "--http-listen", "127.0.0.1:9460")
        assert (taken.returncode, taken.stdout) == (2, "")
        assert taken.stderr.splitlines() == [
            "egressgw run: --http-listen 127.0.0.1:9460: address already in use (another "
            "process listens there)"
        ]
        argv = ["--uplink", "up0", "--dns-listen", f"{DNS4}:53", "--upstream", "127.0.0.1:53"]
        taken = egressgw(node, *base, *argv)
        assert (taken.returncode, taken.stdout) == (2, "")
        assert taken.stderr.splitlines() == [
            f"egressgw run: --dns-listen {DNS4}:53: address already in use (another process "
            "listens there)"
        ]
    finally:
        http.close()
        dns.close()

    no_nft = egressgw(node, *base, "--uplink", "up0", prefix=["env", "PATH=/nonexistent"])
    assert (no_nft.returncode, no_nft.stdout) == (2, "")
    assert no_nft.stderr.splitlines() == [
        "egressgw run: nftables not available: the nft command is not installed "
        "(Debian: apt-get install nftables)"
    ]

    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    denied = egressgw(node, *base, "--uplink", "up0", prefix=drop)
    assert (denied.returncode, denied.stdout) == (2, "")
    assert denied.stderr.splitlines() == [
        "egressgw run: not permitted: nftables and the uplink's addresses need CAP_NET_ADMIN "
        "(run as root, or grant the NET_ADMIN and NET_RAW capabilities)"
    ]
    assert table not in tables(node)  # nothing was adopted on the way to any of these errors


# -- an unreachable upstream ------------------------------------------------------------------


def _answer_every_a_query(sock: socket.socket) -> None:
    for _ in range(1000):  # bounded; ends when the test closes the socket
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:
            return
        request = DNSRecord.parse(data)
        reply = request.reply()
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ANSWER4), ttl=60))
        sock.sendto(reply.pack(), peer)


def _ask(ns: str, name: str) -> DNSRecord:
    def exchange() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.bind((POD4, 0))  # the pod asks
            sock.sendto(DNSRecord.question(name, "A").pack(), (DNS4, 53))
            return sock.recv(4096)

    return DNSRecord.parse(call_in(ns, exchange))


def _metrics(ns: str) -> str:
    def ask() -> str:
        with urllib.request.urlopen(f"http://{HTTP[0]}:{HTTP[1]}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    return call_in(ns, ask)


def _dns_gateway(node: str, tmp_path: Path) -> tuple[Path, socket.socket, list[str]]:
    """The manifests directory (the payments cluster), a resolver that answers every A query
    (close it), and the arguments of a daemon that intercepts DNS with them."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(CLUSTER + "---\n" + GATEWAY % '"198.51.100.10"')
    resolver = held_in(node, lambda: udp_socket(*UPSTREAM))
    threading.Thread(target=_answer_every_a_query, args=(resolver,), daemon=True).start()
    table = unique_name("egw").replace("-", "_")
    args = ["--manifests", str(manifests), "--uplink", "up0", "--table", table]
    args += ["--http-listen", f"{HTTP[0]}:{HTTP[1]}", "--dns-listen", f"{DNS4}:53"]
    return manifests, resolver, args


def test_an_unreachable_upstream_is_demoted_and_the_others_answer(
    node: str, tmp_path: Path
) -> None:
    _, resolver, args = _dns_gateway(node, tmp_path)
    log = tmp_path / "egressgw.log"
    # no route to either of the first two: a UDP socket cannot even be connected to them
    for upstream in ("192.0.2.99:53", "[2001:db8:ffff::53]:53", f"{UPSTREAM[0]}:{UPSTREAM[1]}"):
        args += ["--upstream", upstream]
    try:
        with daemon(node, log, *args) as proc:
            wait_for(lambda: ready(node, proc, log), "readiness")
            reply = _ask(node, "db.example.com")
            assert [str(rr.rdata) for rr in reply.rr] == [ANSWER4], f"{reply}\n{log.read_text()}"
            # it intercepts DNS: it started over, same process, on the allocator that gives a
            # burst's memory back
            assert b"PYTHONMALLOC=malloc" in Path(f"/proc/{proc.pid}/environ").read_bytes()
            assert 'python_allocator="malloc"' in _metrics(node)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    finally:
        resolver.close()
    demoted = log_lines(log, "demoted for 5 s (unreachable)")
    assert [line.split(" WARNING ")[1] for line in demoted] == [
        "egressgw.dns.upstream: dns: upstream 192.0.2.99:53 demoted for 5 s (unreachable): "
        "192.0.2.99:53: Network is unreachable",
        "egressgw.dns.upstream: dns: upstream [2001:db8:ffff::53]:53 demoted for 5 s "
        "(unreachable): [2001:db8:ffff::53]:53: Network is unreachable",
    ]
    # the allowed decision shows at INFO, and no DEBUG line came with it
    allowed = log_lines(log, "verdict=allow")
    assert (
        len(allowed) == 1
        and " INFO egressgw.dns: dns decision identity=payments/api-0 " in (allowed[0])
    )
    assert "name=db.example.com type=A verdict=allow" in allowed[0]
    assert log_lines(log, " DEBUG ") == []
    assert "Traceback" not in log.read_text()


def test_queries_asked_while_the_daemon_starts_wait_for_its_plan_instead_of_being_refused(
    node: str, tmp_path: Path
) -> None:
    manifests, resolver, args = _dns_gateway(node, tmp_path)
    # 20,000 more pods: reading and applying them keeps the first plan a second or so away
    crowd = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: crowd}\n"]
    crowd += [
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: c-{i}, namespace: crowd}}\n"
        f"status: {{podIPs: [{{ip: '2001:db8:1::{i:x}'}}]}}\n"
        for i in range(1, 20_001)
    ]
    (manifests / "crowd.yaml").write_text("---\n".join(crowd))
    log = tmp_path / "egressgw.log"
    args += ["--upstream", f"{UPSTREAM[0]}:{UPSTREAM[1]}"]

    def first_answer() -> tuple[DNSRecord, int]:
        """The pod asks again and again until it gets an answer; that answer, and how many
        times it asked."""
        for attempt in range(1, 301):  # bounded: 300 tries of at most 0.1 s
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0.1)
                sock.bind((POD4, 0))
                sock.sendto(DNSRecord.question("db.example.com", "A").pack(), (DNS4, 53))
                try:
                    return DNSRecord.parse(sock.recv(4096)), attempt
                except OSError:  # not bound yet (port unreachable), or no answer yet
                    continue
        raise AssertionError("no answer in 300 tries")

    try:
        with daemon(node, log, *args) as proc:
            reply, attempts = call_in(node, first_answer)
            wait_for(lambda: ready(node, proc, log), "readiness")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    finally:
        resolver.close()
    assert (reply.header.rcode, [str(rr.rdata) for rr in reply.rr]) == (0, [ANSWER4]), reply
    assert log_lines(log, "verdict=refused") == []
    # the port was bound seconds before the plan, and the pod asked meanwhile
    (bound,) = log_lines(log, "dns: listening on")
    applied = log_lines(log, "applied:")[0]
    waited = _seconds(applied) - _seconds(bound)
    assert waited > 0.1 and attempts > 1, (waited, attempts)


def _seconds(line: str) -> float:
    """The time of day of a log line (``2026-12-02 07:16:12,345 ...``), in seconds."""
    clock = line.split()[1].replace(",", ".")
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


# -- the applied line and cleanup -------------------------------------------------------------


def test_applied_names_the_egress_ips_and_cleanup_removes_them(node: str, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    cluster = manifests / "cluster.yaml"
    cluster.write_text(CLUSTER + "---\n" + GATEWAY % '"198.51.100.10", "2001:db8:100::10"')
    table = unique_name("egw").replace("-", "_")
    log = tmp_path / "egressgw.log"
    args = ["--manifests", str(manifests), "--uplink", "up0", "--table", table]
    with daemon(node, log, *args) as proc:
        wait_for(lambda: bool(log_lines(log, "applied:")), "applied line")
        first = log_lines(log, "applied:")[0]
        assert "egress IPs +[198.51.100.10,2001:db8:100::10] -[]" in first, first
        cluster.write_text(CLUSTER + "---\n" + GATEWAY % '"198.51.100.10"')
        wait_for(lambda: len(log_lines(log, "applied:")) > 1, "second applied line")
        second = log_lines(log, "applied:")[1]
        assert "egress IPs +[] -[2001:db8:100::10]" in second, second
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert table in tables(node)  # the kernel keeps enforcing after the daemon stopped

    done = egressgw(None, "cleanup", "--table", table, "--netns", node)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.splitlines() == [
        f"removed nftables table inet {table} in network namespace {node}",
        "removed egress IP 198.51.100.10 from up0",
    ]
    assert table not in tables(node)
    addresses = subprocess.run(
        ["ip", "-n", node, "-br", "addr", "show", "up0"], capture_output=True, text=True
    ).stdout
    assert f"{NODE4}/24" in addresses and "198.51.100.10" not in addresses

    again = egressgw(None, "cleanup", "--table", table, "--netns", node)
    assert again.returncode == 0
    assert again.stdout.splitlines() == [
        f"no nftables table inet {table} in network namespace {node}: nothing to remove"
    ]
