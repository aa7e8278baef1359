"""A fake cluster for Kubernetes-mode tests: the fake API server, gateway namespaces, daemons.

Network (IPv4 only; every namespace has a unique name and is removed by ``close``):

    client-a 192.0.2.10 -- eth0 gw-a up0 198.51.100.2 --+
                                                        br0 198.51.100.1 (server, 203.0.113.10)
    client-b 192.0.2.10 -- eth0 gw-b up0 198.51.100.3 --+

Both clients carry the same pod address: the pod's traffic can reach either gateway, as with a
real route to the gateway nodes. The server has no route back to 192.0.2.0/24, so only SNATed
traffic is answered. Daemons run in the root namespace as processes (they reach the API server on
127.0.0.1) and program their gateway namespace through ``--netns``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressgw.datapath.netns import call_in
from egressgw.testing.apiserver import FakeApiServer, kubeconfig
from tests.conftest import require_kernel, unique_name
from tests.kernel.topology import links_up, tcp_listener
from tests.ports import free_port

SERVER = "203.0.113.10"
POD_IP = "192.0.2.10"
PAYMENTS_IP, ANALYTICS_IP = "198.51.100.10", "198.51.100.20"
Obj = dict[str, Any]


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def wait_for(check: Callable[[], bool], what: str, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``check`` held; AssertionError after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- objects ---------------------------------------------------------------------------------


def namespace(name: str, project: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"project": project}},
    }


def node(name: str, gateway: bool = True) -> Obj:
    labels = {"egressgw.io/gateway": "true"} if gateway else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def pod(ns: str, name: str, address: str, phase: str = "Running") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "api"}},
        "spec": {"containers": [{"name": "app", "image": "example"}]},
        "status": {"phase": phase, "podIP": address, "podIPs": [{"ip": address}]},
    }


def gateway(name: str, project: str, egress_ip: str) -> Obj:
    return {
        "apiVersion": "egressgw.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"project": project}},
            "egressIPs": [egress_ip],
            "nodeSelector": {"matchLabels": {"egressgw.io/gateway": "true"}},
        },
    }


def policy(ns: str, name: str, ports: list[int], cidr: str = f"{SERVER}/32") -> Obj:
    return {
        "apiVersion": "egressgw.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"app": "api"}},
            "egress": [
                {"to": [{"cidr": cidr}], "ports": [{"protocol": "TCP", "port": p} for p in ports]}
            ],
        },
    }


def condition(obj: Obj, type_: str) -> Obj | None:
    for found in (obj.get("status") or {}).get("conditions") or ():
        if found.get("type") == type_:
            return dict(found)
    return None


# -- network ---------------------------------------------------------------------------------


@dataclass
class Network:
    server: str
    gateways: dict[str, str]  # node name -> gateway namespace
    clients: dict[str, str]  # node name -> client namespace behind it
    listeners: list[socket.socket] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()
        for ns in (self.server, *self.gateways.values(), *self.clients.values()):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def egress_ips_on(self, node_name: str) -> set[str]:
        """The /32 addresses on a gateway's uplink (what the daemon added)."""
        out = subprocess.run(
            ["ip", "-n", self.gateways[node_name], "-4", "-o", "addr", "show", "dev", "up0"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return {word.split("/")[0] for word in out.split() if word.endswith("/32")}

    def listen(self, port: int) -> None:
        """A TCP server on SERVER that records each peer and answers "ok"."""
        self.listeners.append(tcp_listener(self.server, SERVER, port, self.peers, _say_ok))

    def source_seen(self, via: str, port: int, timeout: float = 1.0) -> str | None:
        """The source address the server saw for a connection through ``via``; None if none."""
        try:
            with call_in(
                self.clients[via], lambda: socket.create_connection((SERVER, port), timeout)
            ) as conn:
                conn.settimeout(timeout)
                conn.recv(8)
        except OSError:
            return None
        return self.peers[-1]


def build_network(nodes: list[str]) -> Network:
    require_kernel()
    tag = unique_name("egk")
    net = Network(
        server=f"{tag}-s",
        gateways={n: f"{tag}-g{i}" for i, n in enumerate(nodes)},
        clients={n: f"{tag}-c{i}" for i, n in enumerate(nodes)},
    )
    try:
        for ns in (net.server, *net.gateways.values(), *net.clients.values()):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            ip(ns, "link", "set", "lo", "up")
        ip(net.server, "link", "add", "br0", "type", "bridge")
        ip(net.server, "addr", "add", "198.51.100.1/24", "dev", "br0")
        ip(net.server, "addr", "add", f"{SERVER}/24", "dev", "lo")
        ip(net.server, "link", "set", "br0", "up")
        for index, name in enumerate(nodes):
            gw, client = net.gateways[name], net.clients[name]
            ip(client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", gw)
            ip(
                gw,
                "link",
                "add",
                "up0",
                "type",
                "veth",
                "peer",
                "name",
                f"p{index}",
                "netns",
                net.server,
            )
            ip(net.server, "link", "set", f"p{index}", "master", "br0", "up")
            ip(client, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
            ip(gw, "addr", "add", "192.0.2.1/24", "dev", "eth0")
            ip(gw, "addr", "add", f"198.51.100.{2 + index}/24", "dev", "up0")
            for ns, dev in ((client, "eth0"), (gw, "eth0"), (gw, "up0")):
                ip(ns, "link", "set", dev, "up")
            ip(client, "route", "add", "default", "via", "192.0.2.1")
            ip(gw, "route", "add", "203.0.113.0/24", "via", "198.51.100.1")
            subprocess.run(
                ["ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
            )
        links_up(net.server, *net.gateways.values(), *net.clients.values())
    except BaseException:
        net.close()
        raise
    return net


# -- daemons ---------------------------------------------------------------------------------


class GatewayDaemon:
    """``egressgw run --kubernetes`` for one node, datapath in that node's gateway namespace."""

    def __init__(
        self, net: Network, node_name: str, api: FakeApiServer, workdir: Path, lease_s: int
    ):
        self.net, self.node_name, self.api = net, node_name, api
        self.http_port = free_port()
        self.kubeconfig = workdir / f"kubeconfig-{node_name}"
        self.kubeconfig.write_text(kubeconfig(api.url))
        self.log_path = workdir / f"egressgw-{node_name}.log"
        self.lease_s = lease_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "egressgw", "run", "--kubernetes"]
        argv += ["--kubeconfig", str(self.kubeconfig), "--node-name", self.node_name]
        argv += ["--netns", self.net.gateways[self.node_name], "--uplink", "up0"]
        argv += ["--http-listen", f"127.0.0.1:{self.http_port}"]
        argv += ["--lease-duration", str(self.lease_s)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def readyz(self) -> tuple[int, str]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(lambda: self.readyz()[0] == 200, f"{self.node_name} to be ready", timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _say_ok(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        conn.sendall(b"ok\n")
