"""`egressgw run --manifests` in a gateway namespace: live edits, bad edits, kill -9, SIGTERM."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from egressgw.datapath.netns import call_in
from tests.kernel.topology import SERVER4, SERVER6, Topology, topology

HTTP = "127.0.0.1:9460"

CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {project: payments}}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: payments, labels: {app: api}}
status:
  podIPs: [{ip: 192.0.2.10}, {ip: "2001:db8:1::10"}]
---
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: payments}
spec:
  namespaceSelector: {matchLabels: {project: payments}}
  egressIPs: ["198.51.100.10", "2001:db8:100::10"]
"""

POLICY = """\
apiVersion: egressgw.io/v1alpha1
kind: EgressPolicy
metadata: {name: database, namespace: payments}
spec:
  podSelector: {matchLabels: {app: api}}
  egress:
    - to: [{cidr: 203.0.113.10/32}, {cidr: "2001:db8:203::10/128"}]
      ports: [%s]
"""


class Daemon:
    def __init__(
        self, topo: Topology, manifests: Path, log: Path, extra: Sequence[str] = ()
    ) -> None:
        self.topo, self.manifests, self.log_path = topo, manifests, log
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> float:
        """Start it; returns the seconds until /readyz said 200."""
        argv = ["ip", "netns", "exec", self.topo.gateway, sys.executable, "-m", "egressgw", "run"]
        argv += ["--manifests", str(self.manifests), "--uplink", "up0", "--http-listen", HTTP]
        argv += self.extra
        environ = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}  # as on a node
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environ)
        return wait_for(lambda: self.ready(), "the daemon to be ready", timeout=timeout)

    def readyz(self) -> tuple[int, str]:
        """/readyz's status and body, asked from inside the gateway namespace."""

        def ask() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://{HTTP}/readyz", timeout=2) as reply:
                    return int(reply.status), reply.read().decode()
            except urllib.error.HTTPError as error:
                return int(error.code), error.read().decode()

        return call_in(self.topo.gateway, ask)

    def metrics(self) -> str:
        def ask() -> str:
            with urllib.request.urlopen(f"http://{HTTP}/metrics", timeout=5) as reply:
                return str(reply.read().decode())

        return call_in(self.topo.gateway, ask)

    def metric(self, name: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")

        def ask() -> bool:
            try:
                with urllib.request.urlopen(f"http://{HTTP}/readyz", timeout=1) as reply:
                    return bool(reply.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        return call_in(self.topo.gateway, ask)

    def signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_for(check: Callable[[], bool], what: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def source_seen(topo: Topology, address: str, port: int) -> str | None:
    """The source address the server saw, or None if the connection failed."""
    try:
        with topo.connect(address, port, timeout=1.0) as conn:
            conn.sendall(b"hi\n")
            conn.recv(8)
    except OSError:
        return None
    return topo.peers[-1]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Topology, Daemon]]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(CLUSTER)
    (manifests / "policy.yaml").write_text(POLICY % "{protocol: TCP, port: 5432}")
    with topology() as topo:
        for port in (5432, 443):
            topo.listen(SERVER4, port)
            topo.listen(SERVER6, port)
        daemon = Daemon(topo, manifests, tmp_path / "egressgw.log")
        try:
            daemon.start()
            yield topo, daemon
        finally:
            daemon.stop()


def test_policy_edits_apply_within_two_seconds_and_bad_edits_change_nothing(
    env: tuple[Topology, Daemon],
) -> None:
    topo, daemon = env
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"
    assert source_seen(topo, SERVER6, 5432) == "2001:db8:100::10"
    assert source_seen(topo, SERVER4, 443) is None

    policy = daemon.manifests / "policy.yaml"
    policy.write_text(POLICY % "{protocol: TCP, port: 5432}, {protocol: TCP, port: 443}")
    took = wait_for(lambda: source_seen(topo, SERVER4, 443) is not None, "port 443 to open", 2)
    assert took < 2

    policy.write_text(POLICY.replace("203.0.113.10/32", "203.0.113.10/33") % "")
    time.sleep(1.5)  # several polls of the directory
    assert "203.0.113.10/33" in daemon.log()
    assert source_seen(topo, SERVER4, 443) == "198.51.100.10"
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"

    policy.unlink()
    wait_for(lambda: source_seen(topo, SERVER4, 5432) is None, "the removed policy to close", 2)


def test_a_gateway_without_dns_interception_keeps_pythons_own_allocator(
    env: tuple[Topology, Daemon],
) -> None:
    """No DNS bursts to give back: it starts once, on the allocator that applies fastest."""
    _, daemon = env
    assert daemon.proc is not None
    assert b"PYTHONMALLOC" not in Path(f"/proc/{daemon.proc.pid}/environ").read_bytes()
    assert re.search(r'^egressgw_build_info\{.*python_allocator="pymalloc"', daemon.metrics(), re.M)


def test_established_flow_survives_kill_9_and_restart_adopts(env: tuple[Topology, Daemon]) -> None:
    topo, daemon = env
    conn = topo.connect(SERVER4, 5432)
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    conn.sendall(b"after kill\n")
    assert conn.recv(32) == b"after kill\n"
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"  # enforcing while down
    assert source_seen(topo, SERVER4, 443) is None

    daemon.start()
    assert "adopted table egressgw: 1 identities" in daemon.log()
    assert "+0 -0 elements" in daemon.log().splitlines()[-1] or "+0 -0" in daemon.log()
    conn.sendall(b"after restart\n")
    assert conn.recv(32) == b"after restart\n"
    conn.close()


def test_sigterm_exits_cleanly_and_leaves_the_datapath_enforcing(
    env: tuple[Topology, Daemon],
) -> None:
    topo, daemon = env
    assert daemon.signal(signal.SIGTERM) == 0
    assert "the datapath keeps enforcing" in daemon.log()
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        topo.connect(SERVER4, 443, timeout=2).close()
    assert failure.value.errno == errno.EHOSTUNREACH and time.monotonic() - started < 1
