"""egressgw's own VXLAN tunnel between worker and gateway nodes: the device, its FDB and
neighbours, and the routes and policy rules that send packets into it.

In: this node's tunnel address, the tunnel addresses of its peers, the routes wanted in the
routing tables it is given, and the rules wanted at the priorities it is given. Out: one VXLAN
device (its own VNI and UDP port, ``local`` = this node's tunnel address, no learning, no
flooding: it sends only to peers it has an FDB entry for), a permanent FDB entry and permanent
neighbour entries per peer, and those routes and rules. Writes go through pyroute2's IPRoute,
each only where the kernel differs from what is wanted. Reads are plain rtnetlink dumps decoded
with struct: pyroute2's messages are reference cycles the daemon's frozen collector never frees,
so an apply that changes nothing builds none.

Nothing is exchanged between nodes. A node's MAC on the tunnel is derived from its tunnel address
(``mac_for``), and its IPv6 link-local address from that MAC (``link_local_for``), so each side
computes the other's:

- IPv4 inside: ``via <peer tunnel address> dev egw0 onlink``, neighbour entry peer -> MAC(peer);
- IPv6 inside: ``via fe80::<EUI-64 of MAC(peer)> dev egw0``, neighbour entry for that address;
- FDB: MAC(peer) -> dst peer. Unknown and broadcast destinations are dropped, so neither ARP nor
  neighbour discovery is ever needed on the device.

An IPv4 packet is carried only over an IPv4 tunnel address (a peer reached over IPv6 has no
IPv4 next hop: ``next_hop`` says None and the caller fails closed). It may not touch any
device, table or rule priority but the ones it is given.

Kernel facts this relies on, seen on Linux 6.18; tests/kernel/test_tunnel.py fails when the code
does not heed one of them, except the one marked (seen by hand):
- a VXLAN device created without a lower device gets MTU 1500 on Linux 6.18, so the MTU is set
  from the device that holds the local address, less the encapsulation (50 bytes over IPv4, 70
  over IPv6);
- the device's outer route lookup uses the inner packet's skb mark, so a packet that was marked
  to be steered must lose the mark before it enters the device (callers clear it in postrouting);
- (seen by hand) ``via X dev egw0 onlink`` is refused ("Nexthop has invalid gateway") in a
  namespace whose ``local`` routing table does not exist yet (loopback down, no IPv4 address);
- a ``lookup`` rule whose table has no route for the destination lets the lookup go on to the
  next rule, and ``not fwmark 0/MASK blackhole`` matches every packet with a bit of MASK set;
- rp_filter is set per device over netlink (IFLA_AF_SPEC / AF_INET / IFLA_INET_CONF): a
  container without privileges has /proc/sys read-only, but CAP_NET_ADMIN suffices for this;
- rp_filter, loose mode included, drops every packet that arrives on a device with no IPv4
  address (``__fib_validate_source``: no address, then "last resort" refuses), so the device
  holds this node's IPv4 tunnel address as a /32 of scope host (never picked as a source).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyroute2.config
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2Error

from egressgw.datapath.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSGHDR, attributes, messages
from egressgw.datapath.netns import call_in

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEVICE = "egw0"
VNI = 7795  # Flannel uses VNI 1 on port 8472, Calico 4096 on 4789, Cilium port 8472
PORT = 7795
ENCAPSULATION_BYTES = {4: 50, 6: 70}  # outer IP + UDP + VXLAN + inner Ethernet
RP_FILTER_LOOSE = 2
DEFAULT_ROUTE = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}


@dataclass(frozen=True)
class TunnelSettings:
    device: str = DEVICE
    vni: int = VNI
    port: int = PORT  # UDP destination port of the outer packets
    mtu: int | None = None  # None: the MTU of the device holding the local address, less overhead


class TunnelError(RuntimeError):
    """The tunnel cannot be set up or changed as asked."""


# --- pure encodings -------------------------------------------------------------------------


def mac_for(address: IPAddress) -> str:
    """The tunnel MAC of the node at ``address``: locally administered and unicast. An IPv4
    address is embedded whole (02:e7 + its 4 bytes); an IPv6 address is hashed into 4 bytes
    (06:e7 + the first 4 bytes of its SHA-256), so two IPv6 nodes collide with odds 2**-32."""
    if address.version == 4:
        raw = b"\x02\xe7" + address.packed
    else:
        raw = b"\x06\xe7" + hashlib.sha256(address.packed).digest()[:4]
    return ":".join(f"{b:02x}" for b in raw)


def link_local_for(mac: str) -> ipaddress.IPv6Address:
    """The modified EUI-64 link-local address of ``mac`` (RFC 4291 appendix A)."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    eui = bytes([raw[0] ^ 0x02]) + raw[1:3] + b"\xff\xfe" + raw[3:]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def next_hop(peer: IPAddress, family: int) -> IPAddress | None:
    """Where a packet of ``family`` (4 or 6) is routed to reach ``peer`` through the tunnel;
    None when it cannot be (IPv4 over a peer reached only by IPv6)."""
    if family == 6:
        return link_local_for(mac_for(peer))
    return peer if peer.version == 4 else None


def host_network(address: IPAddress) -> IPNetwork:
    """``address`` as a /32 or /128 (without parsing it as text again)."""
    if address.version == 4:
        return ipaddress.IPv4Network((int(address), 32))
    return ipaddress.IPv6Network((int(address), 128))


class Route(NamedTuple):
    """A unicast route through the tunnel device in one of our routing tables."""

    table: int
    destination: IPNetwork
    gateway: IPAddress


class Rule(NamedTuple):
    """A policy routing rule: ``fwmark``/``fwmask`` (0/0: every packet), then either look up
    ``table`` or, with ``blackhole``, discard. ``invert`` is ``ip rule add not ...``."""

    family: int  # 4 or 6
    priority: int
    table: int = 0
    fwmark: int = 0
    fwmask: int = 0
    blackhole: bool = False
    invert: bool = False
    iif: str = ""  # only packets that arrived on this device ("lo": this node's own)


class Neighbour(NamedTuple):
    address: IPAddress
    mac: str


class FdbEntry(NamedTuple):
    mac: str
    destination: IPAddress


@dataclass
class Changes:
    """What one sync changed in the kernel, and what it could not do (for one log line)."""

    added: int = 0
    removed: int = 0
    notes: list[str] = field(default_factory=list)

    def __iadd__(self, other: Changes) -> Changes:
        self.added += other.added
        self.removed += other.removed
        self.notes += other.notes
        return self


def peer_entries(
    peers: Iterable[IPAddress], local_version: int
) -> tuple[set[FdbEntry], set[Neighbour], list[str]]:
    """FDB entries and neighbour entries for ``peers`` on a device whose outer family is
    ``local_version``; peers of the other family cannot be reached and are named in notes."""
    fdb: set[FdbEntry] = set()
    neighbours: set[Neighbour] = set()
    notes: list[str] = []
    for peer in sorted(set(peers), key=lambda a: (a.version, a)):
        if peer.version != local_version:
            notes.append(f"peer {peer} is not reachable over an IPv{local_version} tunnel")
            continue
        mac = mac_for(peer)
        fdb.add(FdbEntry(mac, peer))
        neighbours.add(Neighbour(link_local_for(mac), mac))
        if peer.version == 4:
            neighbours.add(Neighbour(peer, mac))
    return fdb, neighbours, notes


# --- rtnetlink, read with struct ------------------------------------------------------------

NETLINK_ROUTE = 0
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_MULTI = 0x2
RTM_GETLINK, RTM_SETLINK, RTM_GETADDR = 18, 19, 22
RTM_GETROUTE, RTM_GETNEIGH, RTM_GETRULE = 26, 30, 34
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_AF_SPEC = 1, 3, 4, 18, 26
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING = 1, 4, 7
IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6 = 15, 17
IFLA_INET_CONF = 1
IPV4_DEVCONF_RP_FILTER = 8
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RT_SCOPE_HOST = 254
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_PERMANENT = 0x80
FRA_IIFNAME, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 3, 6, 10, 15, 16
FR_ACT_BLACKHOLE = 6
FIB_RULE_INVERT = 0x2
NLA_F_NESTED = 0x8000
IFF_UP = 0x1
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
# fib_rule_hdr: family, dst_len, src_len, tos, table, two reserved, action, flags
_FIBRULE = struct.Struct("=BBBBBBBBI")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_BE16 = struct.Struct(">H")
_RECEIVE_BYTES = 1 << 16  # a dump datagram is at most 32 KiB


def nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + bytes(-length % 4)


def link_settings_message(index: int, seq: int) -> bytes:
    """RTM_SETLINK of ``index``: reverse path filter loose (IPv4)."""
    loose = _U32.pack(RP_FILTER_LOOSE)
    conf = nla(IFLA_INET_CONF | NLA_F_NESTED, nla(IPV4_DEVCONF_RP_FILTER, loose))
    spec = nla(IFLA_AF_SPEC | NLA_F_NESTED, nla(socket.AF_INET | NLA_F_NESTED, conf))
    return _message(RTM_SETLINK, seq, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + spec)


def addr_gen_mode_message(index: int, seq: int) -> bytes:
    """RTM_SETLINK of ``index``: no automatic IPv6 addresses (the link-local is added by hand)."""
    mode = nla(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))
    spec = nla(IFLA_AF_SPEC | NLA_F_NESTED, nla(socket.AF_INET6 | NLA_F_NESTED, mode))
    return _message(RTM_SETLINK, seq, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + spec)


def _message(kind: int, seq: int, body: bytes, flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


class Link(NamedTuple):
    ifindex: int
    name: str
    mtu: int
    mac: str
    up: bool
    kind: str | None
    vni: int | None = None
    local: IPAddress | None = None
    port: int | None = None
    learning: bool | None = None


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _address(raw: bytes) -> IPAddress:
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    return ipaddress.IPv4Address(raw)


def decode_link(raw: bytes) -> Link:
    """One RTM_NEWLINK message (header included)."""
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(raw, NLMSGHDR.size)
    name, mtu, mac, kind = "", 0, "", None
    vxlan: dict[int, bytes] = {}
    for attr, first, last in attributes(raw, NLMSGHDR.size + _IFINFOMSG.size, len(raw)):
        if attr == IFLA_IFNAME:
            name = raw[first:last].rstrip(b"\0").decode()
        elif attr == IFLA_MTU:
            (mtu,) = _U32.unpack_from(raw, first)
        elif attr == IFLA_ADDRESS:
            mac = _mac(raw[first:last])
        elif attr == IFLA_LINKINFO:
            for info, ifirst, ilast in attributes(raw, first, last):
                if info == IFLA_INFO_KIND:
                    kind = raw[ifirst:ilast].rstrip(b"\0").decode()
                elif info == IFLA_INFO_DATA:
                    vxlan = {k: raw[f:e] for k, f, e in attributes(raw, ifirst, ilast)}
    local_raw = vxlan.get(IFLA_VXLAN_LOCAL) or vxlan.get(IFLA_VXLAN_LOCAL6)
    return Link(
        ifindex=index,
        name=name,
        mtu=mtu,
        mac=mac,
        up=bool(flags & IFF_UP),
        kind=kind,
        vni=_U32.unpack(vxlan[IFLA_VXLAN_ID])[0] if IFLA_VXLAN_ID in vxlan else None,
        local=_address(local_raw) if local_raw else None,
        port=_BE16.unpack(vxlan[IFLA_VXLAN_PORT])[0] if IFLA_VXLAN_PORT in vxlan else None,
        learning=bool(vxlan[IFLA_VXLAN_LEARNING][0]) if IFLA_VXLAN_LEARNING in vxlan else None,
    )


def decode_address(raw: bytes) -> tuple[int, IPAddress, int] | None:
    """(interface index, address, prefix length) of one RTM_NEWADDR message."""
    _family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(raw, NLMSGHDR.size)
    found: dict[int, bytes] = {}
    for attr, first, last in attributes(raw, NLMSGHDR.size + _IFADDRMSG.size, len(raw)):
        if attr in (IFA_ADDRESS, IFA_LOCAL):
            found[attr] = raw[first:last]
    value = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
    return (index, _address(value), prefixlen) if value else None


class DumpedRoute(NamedTuple):
    """A route as dumped, kept as bytes: a dump of thousands is compared, not converted."""

    table: int
    dst: bytes  # packed network address
    dst_len: int
    gateway: bytes | None  # packed
    oif: int
    type: int
    onlink: bool

    @property
    def destination(self) -> IPNetwork:
        return ipaddress.ip_network((_address(self.dst), self.dst_len))


def decode_route(raw: bytes) -> DumpedRoute:
    family, dst_len, _src, _tos, table, _proto, _scope, kind, flags = _RTMSG.unpack_from(
        raw, NLMSGHDR.size
    )
    dst: bytes | None = None
    gateway: bytes | None = None
    oif = 0
    for attr, first, last in attributes(raw, NLMSGHDR.size + _RTMSG.size, len(raw)):
        if attr == RTA_DST:
            dst = raw[first:last]
        elif attr == RTA_GATEWAY:
            gateway = raw[first:last]
        elif attr == RTA_OIF:
            (oif,) = _U32.unpack_from(raw, first)
        elif attr == RTA_TABLE:
            (table,) = _U32.unpack_from(raw, first)
    if dst is None:
        dst = bytes(4 if family == socket.AF_INET else 16)
    return DumpedRoute(table, dst, dst_len, gateway, oif, kind, bool(flags & RTNH_F_ONLINK))


def decode_rule(raw: bytes) -> Rule:
    family, _d, _s, _tos, table, _r1, _r2, action, flags = _FIBRULE.unpack_from(raw, NLMSGHDR.size)
    values = {FRA_PRIORITY: 0, FRA_FWMARK: 0, FRA_FWMASK: 0, FRA_TABLE: table}
    iif = ""
    for attr, first, last in attributes(raw, NLMSGHDR.size + _FIBRULE.size, len(raw)):
        if attr in values:
            (values[attr],) = _U32.unpack_from(raw, first)
        elif attr == FRA_IIFNAME:
            iif = raw[first:last].split(b"\0", 1)[0].decode("ascii", "replace")
    blackhole = action == FR_ACT_BLACKHOLE
    return Rule(
        family=_VERSION.get(family, 0),
        priority=values[FRA_PRIORITY],
        table=0 if blackhole else values[FRA_TABLE],
        fwmark=values[FRA_FWMARK],
        fwmask=values[FRA_FWMASK],
        blackhole=blackhole,
        invert=bool(flags & FIB_RULE_INVERT),
        iif=iif,
    )


class DumpedNeighbour(NamedTuple):
    ifindex: int
    state: int
    address: IPAddress | None  # NDA_DST: the neighbour, or an FDB entry's remote
    mac: str | None


def decode_neighbour(raw: bytes) -> DumpedNeighbour:
    _family, _p1, _p2, index, state, _flags, _type = _NDMSG.unpack_from(raw, NLMSGHDR.size)
    address: IPAddress | None = None
    mac: str | None = None
    for attr, first, last in attributes(raw, NLMSGHDR.size + _NDMSG.size, len(raw)):
        if attr == NDA_DST:
            address = _address(raw[first:last])
        elif attr == NDA_LLADDR:
            mac = _mac(raw[first:last])
    return DumpedNeighbour(index, state, address, mac)


class RtnlReader:
    """A plain NETLINK_ROUTE socket in one network namespace: dumps, and requests that pyroute2
    cannot encode. Thread-safe (one request at a time)."""

    def __init__(self, netns: str | None = None) -> None:
        self._sock = call_in(
            netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        )
        self._sock.settimeout(10)
        self._sock.bind((0, 0))
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def _exchange(self, kind: int, flags: int, body: bytes, what: str) -> list[bytes]:
        with self._lock:
            seq = self._next_seq()
            self._sock.send(_message(kind, seq, body, flags))
            found: list[bytes] = []
            while True:
                for msg_type, msg_flags, reply_seq, raw in messages(
                    self._sock.recv(_RECEIVE_BYTES)
                ):
                    if reply_seq != seq:
                        continue
                    if msg_type == NLMSG_DONE:
                        return found
                    if msg_type == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", raw, NLMSGHDR.size)
                        if code:
                            raise OSError(-code, f"{what}: {errno.errorcode.get(-code, code)}")
                        return found
                    found.append(raw)
                    if not flags & NLM_F_DUMP and not msg_flags & NLM_F_MULTI:  # one answer
                        return found

    def dump(self, kind: int, body: bytes, what: str) -> list[bytes]:
        return self._exchange(kind, NLM_F_REQUEST | NLM_F_DUMP, body, what)

    def request(self, message: bytes, what: str) -> None:
        """Send one already encoded request (its own sequence number is replaced)."""
        length, kind, flags, _seq, _pid = NLMSGHDR.unpack_from(message)
        self._exchange(kind, flags | NLM_F_ACK, message[NLMSGHDR.size : length], what)

    def link(self, name: str) -> Link | None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + nla(
            IFLA_IFNAME, name.encode() + b"\0"
        )
        try:
            found = self._exchange(RTM_GETLINK, NLM_F_REQUEST, body, f"link {name}")
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return decode_link(found[0]) if found else None

    def link_by_index(self, index: int) -> Link | None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        try:
            found = self._exchange(RTM_GETLINK, NLM_F_REQUEST, body, f"link {index}")
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return decode_link(found[0]) if found else None

    def addresses(self) -> list[tuple[int, IPAddress, int]]:
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        out = []
        for raw in self.dump(RTM_GETADDR, body, "addresses"):
            decoded = decode_address(raw)
            if decoded is not None:
                out.append(decoded)
        return out

    def routes(self, family: int) -> list[DumpedRoute]:
        body = _RTMSG.pack(_FAMILY[family], 0, 0, 0, 0, 0, 0, 0, 0)
        return [decode_route(raw) for raw in self.dump(RTM_GETROUTE, body, f"IPv{family} routes")]

    def rules(self, family: int) -> list[Rule]:
        body = _FIBRULE.pack(_FAMILY[family], 0, 0, 0, 0, 0, 0, 0, 0)
        return [decode_rule(raw) for raw in self.dump(RTM_GETRULE, body, f"IPv{family} rules")]

    def neighbours(self, family: int, index: int) -> list[DumpedNeighbour]:
        body = _NDMSG.pack(_FAMILY[family], 0, 0, 0, 0, 0, 0) + nla(NDA_IFINDEX, _U32.pack(index))
        found = [decode_neighbour(raw) for raw in self.dump(RTM_GETNEIGH, body, "neighbours")]
        return [n for n in found if n.ifindex == index]

    def fdb(self, index: int) -> list[DumpedNeighbour]:
        # an ifinfomsg header (not an ndmsg) names the port whose entries are dumped
        body = _IFINFOMSG.pack(socket.AF_BRIDGE, 0, index, 0, 0)
        found = [decode_neighbour(raw) for raw in self.dump(RTM_GETNEIGH, body, "fdb")]
        return [n for n in found if n.ifindex == index]


# --- the device and what hangs off it -------------------------------------------------------


class Tunnel:
    """The VXLAN device of one node and its peers, routes and rules. Synchronous; one caller at
    a time. ``setup`` first (creates the device or adopts the one a previous run left)."""

    def __init__(self, settings: TunnelSettings, netns: str | None = None) -> None:
        self.settings = settings
        self.netns = netns
        if netns:
            # see addresses.UplinkAddresses: pyroute2's helper process must die of SIGTERM
            pyroute2.config.disable_mp_signal = True
        self._ipr: Any = IPRoute(netns=netns) if netns else IPRoute()
        self.reader = RtnlReader(netns)
        self.local: IPAddress | None = None
        self._index: int | None = None

    @property
    def index(self) -> int:
        if self._index is None:
            raise TunnelError(f"tunnel device {self.settings.device} is not set up")
        return self._index

    def close(self) -> None:
        self.reader.close()
        self._ipr.close()

    def _lower(self, local: IPAddress) -> Link:
        """The device that holds ``local`` (not the tunnel device, which holds it too)."""
        for index, address, _prefix in self.reader.addresses():
            if address == local:
                link = self.reader.link_by_index(index)
                if link is not None and link.name != self.settings.device:
                    return link
        raise TunnelError(f"no device of this node has the tunnel address {local}")

    def setup(self, local: IPAddress) -> Changes:
        """Create the device for ``local``, or adopt the one found if it matches (VNI, port,
        local address, no learning): adopting keeps its FDB, neighbours and routes, so traffic
        through it is not interrupted. A device of that name that differs is replaced."""
        s = self.settings
        changes = Changes()
        mac = mac_for(local)
        mtu = s.mtu or self._lower(local).mtu - ENCAPSULATION_BYTES[local.version]
        link = self.reader.link(s.device)
        if link is not None and (
            link.kind != "vxlan"
            or link.vni != s.vni
            or link.port != s.port
            or link.local != local
            or link.learning
        ):
            log.warning(
                "replacing device %s (%s vni %s port %s local %s): not the tunnel wanted",
                s.device,
                link.kind,
                link.vni,
                link.port,
                link.local,
            )
            self._ipr.link("del", index=link.ifindex)
            changes.removed += 1
            link = None
        if link is None:
            local_attr = "vxlan_local" if local.version == 4 else "vxlan_local6"
            self._ipr.link(
                "add",
                ifname=s.device,
                kind="vxlan",
                vxlan_id=s.vni,
                vxlan_port=s.port,
                vxlan_learning=0,
                address=mac,
                mtu=mtu,
                **{local_attr: str(local)},
            )
            changes.added += 1
            link = self.reader.link(s.device)
            if link is None:
                raise TunnelError(f"device {s.device} vanished right after it was created")
        self._index = link.ifindex
        self.local = local
        self.reader.request(link_settings_message(link.ifindex, 0), f"{s.device} rp_filter")
        try:
            self.reader.request(addr_gen_mode_message(link.ifindex, 0), f"{s.device} IPv6")
        except OSError as exc:  # IPv6 disabled on this node: IPv6 is then simply not carried
            changes.notes.append(f"IPv6 on {s.device}: {exc}")
        if link.mac != mac:
            self._ipr.link("set", index=link.ifindex, address=mac)
        if link.mtu != mtu:
            self._ipr.link("set", index=link.ifindex, mtu=mtu)
        present = {a for i, a, _p in self.reader.addresses() if i == link.ifindex}
        own = link_local_for(mac)
        if own not in present:
            try:
                self._ipr.addr(
                    "add", index=link.ifindex, address=str(own), prefixlen=64, flags=IFA_F_NODAD
                )
            except Pyroute2Error as exc:
                changes.notes.append(f"link-local {own} on {s.device}: {exc}")
        if local.version == 4 and local not in present:
            # rp_filter refuses every packet that arrives on a device without an IPv4
            # address, loose mode included; scope host keeps it out of source selection
            self._ipr.addr(
                "add", index=link.ifindex, address=str(local), prefixlen=32, scope=RT_SCOPE_HOST
            )
        if not link.up:
            self._ipr.link("set", index=link.ifindex, state="up")
        return changes

    def remove(self) -> bool:
        """Delete the device (the kernel drops its FDB, neighbours and routes with it)."""
        link = self.reader.link(self.settings.device)
        self._index = None
        if link is None:
            return False
        self._ipr.link("del", index=link.ifindex)
        return True

    # peers

    def sync_peers(self, peers: Iterable[IPAddress], *, prune: bool = True) -> Changes:
        """A permanent FDB entry and neighbour entries for each peer; with ``prune``, the
        permanent entries of other peers go."""
        if self.local is None:
            raise TunnelError("tunnel not set up")
        index = self.index
        fdb, neighbours, notes = peer_entries(peers, self.local.version)
        changes = Changes(notes=notes)
        have_fdb = {
            FdbEntry(n.mac, n.address)
            for n in self.reader.fdb(index)
            if n.mac and n.address is not None and n.state & NUD_PERMANENT
        }
        have_neigh: dict[IPAddress, DumpedNeighbour] = {}
        for family in (4, 6):
            for n in self.reader.neighbours(family, index):
                if n.address is not None:
                    have_neigh[n.address] = n
        have_macs = {e.mac: e for e in have_fdb}
        for entry in sorted(fdb - have_fdb):
            stale = have_macs.get(entry.mac)
            if stale is not None:  # that MAC toward another address: not ours to keep
                self._ipr.fdb("del", ifindex=index, lladdr=stale.mac, dst=str(stale.destination))
            self._ipr.fdb("append", ifindex=index, lladdr=entry.mac, dst=str(entry.destination))
            changes.added += 1
        for neighbour in sorted(neighbours, key=lambda n: (n.address.version, n.address)):
            found = have_neigh.get(neighbour.address)
            if found is not None and found.mac == neighbour.mac and found.state & NUD_PERMANENT:
                continue
            self._ipr.neigh(
                "replace",
                ifindex=index,
                dst=str(neighbour.address),
                lladdr=neighbour.mac,
                state=NUD_PERMANENT,
            )
            changes.added += 1
        if not prune:
            return changes
        for entry in sorted(have_fdb - fdb):
            self._ipr.fdb("del", ifindex=index, lladdr=entry.mac, dst=str(entry.destination))
            changes.removed += 1
        wanted = {n.address for n in neighbours}
        for address, found in sorted(have_neigh.items(), key=lambda i: (i[0].version, i[0])):
            if address in wanted or not found.state & NUD_PERMANENT:
                continue
            with contextlib.suppress(Pyroute2Error):  # gone meanwhile
                self._ipr.neigh("del", ifindex=index, dst=str(address))
                changes.removed += 1
        return changes

    # routes

    def routes(self, tables: Collection[int]) -> list[DumpedRoute]:
        return [r for f in (4, 6) for r in self.reader.routes(f) if r.table in tables]

    def sync_routes(
        self, tables: Collection[int], wanted: Iterable[Route], *, prune: bool = True
    ) -> Changes:
        """Make the unicast routes through the device in ``tables`` be ``wanted``: missing ones
        added, ones toward another next hop replaced in place (one atomic change each); with
        ``prune``, every other route in those tables removed."""
        want = {
            (r.table, r.destination.network_address.packed, r.destination.prefixlen): r
            for r in wanted
        }
        changes = Changes()
        have = {(d.table, d.dst, d.dst_len): d for d in self.routes(tables)}
        index = self.index if want else 0
        for key, route in sorted(want.items(), key=lambda item: item[0]):
            found = have.get(key)
            if (
                found is not None
                and found.type == RTN_UNICAST
                and found.gateway == route.gateway.packed
                and found.oif == index
            ):
                continue
            self._ipr.route(
                "replace",
                table=route.table,
                dst=str(route.destination),
                gateway=str(route.gateway),
                oif=index,
                flags=RTNH_F_ONLINK if route.gateway.version == 4 else 0,
            )
            changes.added += 1
        if not prune:
            return changes
        for key, found in sorted(have.items(), key=lambda item: item[0]):
            if key in want:
                continue
            destination = found.destination
            with contextlib.suppress(Pyroute2Error):  # gone meanwhile
                self._ipr.route(
                    "del",
                    family=_FAMILY[destination.version],
                    table=found.table,
                    dst=str(destination),
                )
                changes.removed += 1
        return changes

    # rules

    def rules(self, priorities: Collection[int]) -> set[Rule]:
        return {r for f in (4, 6) for r in self.reader.rules(f) if r.priority in priorities}

    def sync_rules(
        self, priorities: Collection[int], wanted: Iterable[Rule], *, prune: bool = True
    ) -> Changes:
        """Add the ``wanted`` rules that are missing; with ``prune``, remove every other rule
        at ``priorities`` (rules at other priorities are never touched)."""
        want = set(wanted)
        changes = Changes()
        have = self.rules(priorities)
        for rule in sorted(want - have):
            self._rule("add", rule)
            changes.added += 1
        if prune:
            for rule in sorted(have - want):
                with contextlib.suppress(Pyroute2Error):
                    self._rule("del", rule)
                    changes.removed += 1
        return changes

    def _rule(self, command: str, rule: Rule) -> None:
        kwargs: dict[str, object] = {
            "family": _FAMILY[rule.family],
            "priority": rule.priority,
            "flags": FIB_RULE_INVERT if rule.invert else 0,
        }
        if rule.fwmark or rule.fwmask:
            kwargs["fwmark"] = rule.fwmark
            kwargs["fwmask"] = rule.fwmask
        if rule.iif:
            kwargs["iifname"] = rule.iif
        if rule.blackhole:
            kwargs["action"] = "FR_ACT_BLACKHOLE"
        else:
            kwargs["table"] = rule.table
        self._ipr.rule(command, **kwargs)
