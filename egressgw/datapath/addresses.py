"""Egress IP addresses on the uplink, with pyroute2's IPRoute.

In: the set of egress IPs this node should hold. Out: those addresses on the uplink (IPv4 /32,
IPv6 /128 without duplicate address detection), and for each one taken a gratuitous ARP or an
unsolicited neighbour advertisement so the upstream router learns the new holder at once.
Addresses it did not add (the node's own) are never touched: the caller passes what it added
before (recorded in the kernel's ``egress_ips`` sets) as ``previously``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyroute2.config
from pyroute2 import IPRoute

from egressgw.datapath.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSGHDR, attributes, messages
from egressgw.datapath.netns import call_in

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IFA_F_NODAD = 0x02
ETH_P_ARP = 0x0806
_BROADCAST = b"\xff" * 6
RTM_NEWADDR, RTM_GETADDR = 20, 22
IFA_ADDRESS = 1
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index


@dataclass
class AddressChanges:
    added: list[IPAddress]
    removed: list[IPAddress]


class UplinkAddresses:
    def __init__(self, uplink: str, netns: str | None = None) -> None:
        self.uplink = uplink
        self.netns = netns
        if netns:
            # pyroute2 opens the socket from a forked helper and stops it with SIGTERM; that
            # helper inherits the daemon's signal handling, and its SIGTERM would reach our
            # event loop through the wakeup fd. Let the helper die of SIGTERM by default.
            pyroute2.config.disable_mp_signal = True
        self._ipr: Any = IPRoute(netns=netns) if netns else IPRoute()
        found = self._ipr.link_lookup(ifname=uplink)
        if not found:
            self._ipr.close()
            raise LookupError(f"uplink interface {uplink!r} does not exist")
        self.index: int = found[0]
        # Reading the addresses (twice per apply) goes through a plain socket decoded with
        # struct: pyroute2 builds every message as a reference cycle (``chain = [self]``), which
        # the daemon's gc.freeze() keeps forever.
        self._route = call_in(
            netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        )
        self._route.settimeout(10)
        self._route.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._route.close()
        self._ipr.close()

    def present(self) -> set[IPAddress]:
        """Every address on the uplink right now."""
        return set(self._prefixes())

    def _prefixes(self) -> dict[IPAddress, int]:
        """Address -> prefix length on the uplink: one RTM_GETADDR dump."""
        self._seq = seq = (self._seq + 1) & 0x7FFFFFFF
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        flags = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
        header = NLMSGHDR.pack(NLMSGHDR.size + len(request), RTM_GETADDR, flags, seq, 0)
        self._route.send(header + request)
        found: dict[IPAddress, int] = {}
        while True:
            for kind, _flags, reply_seq, raw in messages(self._route.recv(1 << 16)):
                if reply_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", raw, NLMSGHDR.size)
                    if code:
                        raise OSError(-code, f"listing the addresses of {self.uplink}")
                    return found
                if kind != RTM_NEWADDR:
                    continue
                _family, prefixlen, _f, _scope, index = _IFADDRMSG.unpack_from(raw, NLMSGHDR.size)
                if index != self.index:
                    continue
                start = NLMSGHDR.size + _IFADDRMSG.size
                for attr, first, last in attributes(raw, start, len(raw)):
                    if attr == IFA_ADDRESS:
                        found[ipaddress.ip_address(raw[first:last])] = prefixlen

    def sync(self, wanted: Iterable[IPAddress], previously: Iterable[IPAddress]) -> AddressChanges:
        """Add what is wanted and missing; remove what we added before and is no longer wanted."""
        want = set(wanted)
        prefixes = self._prefixes()
        have = set(prefixes)
        # An egress IP is always a host address; one with another prefix is the node's own.
        ours = {a for a, length in prefixes.items() if length == a.max_prefixlen}
        changes = AddressChanges(added=[], removed=[])
        for addr in sorted(want - have, key=lambda a: (a.version, a)):
            self._ipr.addr(
                "add",
                index=self.index,
                address=str(addr),
                prefixlen=addr.max_prefixlen,
                flags=IFA_F_NODAD if addr.version == 6 else 0,
            )
            changes.added.append(addr)
        for addr in sorted((set(previously) - want) & ours, key=lambda a: (a.version, a)):
            self._ipr.addr("del", index=self.index, address=str(addr), prefixlen=addr.max_prefixlen)
            changes.removed.append(addr)
        for addr in changes.added:
            try:
                self.announce(addr)
            except OSError as exc:  # the address works without it; neighbours learn it later
                log.warning("could not announce %s on %s: %s", addr, self.uplink, exc)
        return changes

    def _mac(self) -> bytes:
        link = self._ipr.get_links(self.index)[0]
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))

    def announce(self, addr: IPAddress) -> None:
        """Tell the link that this node now holds ``addr``."""
        mac = self._mac()
        if addr.version == 4:
            call_in(self.netns, lambda: _send_gratuitous_arp(self.uplink, mac, addr.packed))
        else:
            call_in(self.netns, lambda: _send_unsolicited_na(self.uplink, mac, addr))


def _send_gratuitous_arp(ifname: str, mac: bytes, ip: bytes) -> None:
    # Ethernet header, then an ARP request whose sender and target are both the new address.
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\x00" * 6, ip)
    frame = _BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        sock.send(frame)


def _send_unsolicited_na(ifname: str, mac: bytes, addr: IPAddress) -> None:
    # ICMPv6 type 136, Override flag, target = the address, option 2 = our link-layer address.
    # The kernel fills in the checksum of raw ICMPv6 sockets.
    message = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000, addr.packed)
    message += struct.pack("!BB6s", 2, 1, mac)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.bind((str(addr), 0))
        sock.sendto(message, ("ff02::1", 0, 0, socket.if_nametoindex(ifname)))
