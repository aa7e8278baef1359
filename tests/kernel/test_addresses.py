"""Egress IPs on the uplink: added and removed with IPRoute, announced to the link when taken."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import time

from egressgw.datapath.addresses import UplinkAddresses
from egressgw.datapath.netns import call_in
from tests.kernel.topology import NODE4, topology

ETH_P_ALL = 0x0003
EGRESS4 = ipaddress.ip_address("198.51.100.10")
EGRESS6 = ipaddress.ip_address("2001:db8:100::10")


def capture(ns: str, ifname: str) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
        sock.settimeout(0.2)
        return sock

    return call_in(ns, make)


def frames(sock: socket.socket, seconds: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            continue
    return got


def is_gratuitous_arp(frame: bytes, addr: bytes) -> bool:
    # ethertype ARP, sender IP and target IP both the announced address
    return frame[12:14] == b"\x08\x06" and frame[28:32] == addr and frame[38:42] == addr


def is_unsolicited_na(frame: bytes, addr: bytes) -> bool:
    # ethertype IPv6, next header ICMPv6, type 136, Override flag, target address
    return (
        frame[12:14] == b"\x86\xdd"
        and frame[20] == 58
        and frame[54] == 136
        and frame[58] & 0x20 != 0
        and frame[62:78] == addr
    )


def test_taking_an_egress_ip_adds_and_announces_it_and_release_removes_only_ours() -> None:
    with topology() as topo:
        sniffer = capture(topo.server, "eth0")
        addresses = UplinkAddresses("up0", netns=topo.gateway)
        try:
            changes = addresses.sync({EGRESS4, EGRESS6}, previously=set())
            assert set(changes.added) == {EGRESS4, EGRESS6}
            seen = frames(sniffer, 1.0)
            assert any(is_gratuitous_arp(f, EGRESS4.packed) for f in seen)
            assert any(is_unsolicited_na(f, EGRESS6.packed) for f in seen)
            present = addresses.present()
            assert {EGRESS4, EGRESS6} <= present

            # the external side can reach the new address at once
            ping = ["ip", "netns", "exec", topo.server, "ping", "-c1", "-W1", str(EGRESS4)]
            assert subprocess.run(ping, capture_output=True).returncode == 0

            # releasing removes what we added and never the node's own address, even if asked
            node = ipaddress.ip_address(NODE4)
            changes = addresses.sync(set(), previously={EGRESS4, EGRESS6, node})
            assert set(changes.removed) == {EGRESS4, EGRESS6}
            assert node in addresses.present() and EGRESS4 not in addresses.present()
        finally:
            addresses.close()
            sniffer.close()
