"""A minimal routed topology for datapath tests: client -> gateway (up0) -> server.

client 192.0.2.10/24, 2001:db8:1::10/64 (the workload)
gateway eth0 192.0.2.1/24, 2001:db8:1::1/64; up0 198.51.100.2/24, 2001:db8:100::2/64
server eth0 198.51.100.1/24, 2001:db8:100::1/64, plus 203.0.113.10/24, 2001:db8:203::10/64 on lo.
The server has no route back to 192.0.2.0/24: only SNATed traffic gets an answer.
Everything lives in namespaces with unique names, removed by ``close`` (also on failure).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from egressgw.datapath.netns import call_in
from tests.conftest import require_kernel, unique_name

CLIENT4, CLIENT6 = "192.0.2.10", "2001:db8:1::10"
SERVER4, SERVER6 = "203.0.113.10", "2001:db8:203::10"
NODE4 = "198.51.100.2"


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True)


@dataclass
class Topology:
    client: str
    gateway: str
    server: str
    servers: list[socket.socket] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)  # source addresses the server saw

    def close(self) -> None:
        for sock in self.servers:
            sock.close()
        for ns in (self.client, self.gateway, self.server):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def nft(self, *args: str) -> str:
        cmd = ["ip", "netns", "exec", self.gateway, "nft", *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def listen(self, address: str, port: int) -> None:
        """A TCP server in the server namespace that records each peer and echoes a line."""
        self.servers.append(tcp_listener(self.server, address, port, self.peers, _echo))

    def connect(self, address: str, port: int, timeout: float = 2.0) -> socket.socket:
        """A TCP connection from the client namespace; raises OSError if it fails."""
        return call_in(self.client, lambda: socket.create_connection((address, port), timeout))


def tcp_listener(
    ns: str,
    address: str,
    port: int,
    peers: list[str],
    handle: Callable[[socket.socket], None],
) -> socket.socket:
    """A TCP server inside ``ns``: each peer's address is appended to ``peers`` and the connection
    handed to ``handle`` on a thread of its own. Closing the returned socket stops it."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
        return sock

    sock = call_in(ns, make)

    def serve() -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            peers.append(peer[0])
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return sock


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def wait_up(ns: str, dev: str, timeout_s: float = 10.0) -> None:
    """Wait until ``dev`` in ``ns`` is operationally up. Until then its queue discards every
    packet, and the kernel takes up to a second after ``link set up`` to get there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        show = ["ip", "-n", ns, "-j", "link", "show", "dev", dev]
        shown = subprocess.run(show, check=True, capture_output=True, text=True).stdout
        if json.loads(shown)[0].get("operstate") in ("UP", "UNKNOWN"):  # UNKNOWN: lo, dummy
            return
        time.sleep(0.02)
    raise AssertionError(f"{dev} in {ns} is not up after {timeout_s:.0f} s")


def links_up(*namespaces: str) -> None:
    """``wait_up`` for every link set up in each of ``namespaces``."""
    for ns in namespaces:
        show = ["ip", "-n", ns, "-j", "link", "show"]
        listed = subprocess.run(show, check=True, capture_output=True, text=True).stdout
        for link in json.loads(listed):
            if "UP" in link.get("flags", []):
                wait_up(ns, link["ifname"])


def build() -> Topology:
    require_kernel()
    tag = unique_name("egt")
    topo = Topology(client=f"{tag}-c", gateway=f"{tag}-g", server=f"{tag}-s")
    try:
        for ns in (topo.client, topo.gateway, topo.server):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            ip(ns, "link", "set", "lo", "up")
            sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
            sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
        ip(
            topo.client,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            topo.gateway,
        )
        ip(
            topo.gateway,
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            topo.server,
        )
        addrs = {
            topo.client: [("eth0", "192.0.2.10/24"), ("eth0", "2001:db8:1::10/64")],
            topo.gateway: [
                ("eth0", "192.0.2.1/24"),
                ("eth0", "2001:db8:1::1/64"),
                ("up0", "198.51.100.2/24"),
                ("up0", "2001:db8:100::2/64"),
            ],
            topo.server: [
                ("eth0", "198.51.100.1/24"),
                ("eth0", "2001:db8:100::1/64"),
                ("lo", "203.0.113.10/24"),
                ("lo", "2001:db8:203::10/64"),
            ],
        }
        for ns, entries in addrs.items():
            for dev, cidr in entries:
                ip(ns, "addr", "add", cidr, "dev", dev, "nodad") if ":" in cidr else ip(
                    ns, "addr", "add", cidr, "dev", dev
                )
            for dev in {d for d, _ in entries} - {"lo"}:
                ip(ns, "link", "set", dev, "up")
        ip(topo.client, "route", "add", "default", "via", "192.0.2.1")
        ip(topo.client, "-6", "route", "add", "default", "via", "2001:db8:1::1")
        ip(topo.gateway, "route", "add", "203.0.113.0/24", "via", "198.51.100.1")
        ip(topo.gateway, "-6", "route", "add", "2001:db8:203::/64", "via", "2001:db8:100::1")
        sysctl(topo.gateway, "net.ipv4.ip_forward", "1")
        sysctl(topo.gateway, "net.ipv6.conf.all.forwarding", "1")
        for ns, dev in ((topo.client, "eth0"), (topo.gateway, "eth0"), (topo.gateway, "up0")):
            wait_up(ns, dev)
        wait_up(topo.server, "eth0")
        # Settle neighbour discovery on both links before a test times its first packet.
        for ns, peer in ((topo.client, "2001:db8:1::1"), (topo.gateway, "2001:db8:100::1")):
            ping = ["ip", "netns", "exec", ns, "ping", "-6", "-c1", "-W2", peer]
            subprocess.run(ping, check=True, capture_output=True)
    except BaseException:
        topo.close()
        raise
    return topo


@contextmanager
def topology() -> Iterator[Topology]:
    topo = build()
    try:
        yield topo
    finally:
        topo.close()
