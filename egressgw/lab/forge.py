"""Put a forged TCP segment on the wire: what a compromised worker node or pod could send.

In: the segment (source and destination address and port, SYN or RST) and how to send it:
``tunnel`` wraps it in IP, Ethernet (``--src-mac``/``--dst-mac``) and VXLAN (``--vni``) and sends
it over UDP from ``--outer-src`` to ``--outer-dst``:``--port``; ``direct`` sends it from a raw
TCP socket bound to its source address, so the kernel adds the IP header and routes it as any of
its own packets. Out: the segment sent ``--count`` times; one JSON line saying what was sent. It
changes no state, and sends nothing else.

The end-to-end tests run it inside a worker's namespace to show that a gateway node accepts a
tunnelled packet only when its inner source is a pod of the node it came from (once with a pod of
that node: it must go out; once with a pod of another node: it must not), and inside a pod to
show that a segment conntrack calls invalid (a lone RST) never leaves untranslated.

Run inside a node: ``python -m egressgw.lab.forge --outer-src 192.0.2.201 --outer-dst
192.0.2.211 --dst-mac 02:e7:c0:00:02:d3 --inner-src 192.0.2.70 --inner-dst 203.0.113.10
--dport 5432 --sport 61000``; inside a pod: ``python -m egressgw.lab.forge --via direct --flags
rst --inner-src 192.0.2.70 --inner-dst 203.0.113.20 --dport 80 --sport 61000``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import struct
import sys
import time

VXLAN_FLAGS = 0x08000000  # "I" flag: the VNI is valid
TCP_FLAGS = {"syn": 0x02, "rst": 0x04}
ETHERTYPE = {4: 0x0800, 6: 0x86DD}
IPPROTO_TCP = 6


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


def tcp_segment(
    source: str, destination: str, sport: int, dport: int, seq: int, flags: int
) -> bytes:
    """A TCP header without options, its checksum over the pseudo-header of the addresses."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if src.version != dst.version:
        raise ValueError(f"{source} and {destination} are of different families")
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 64240, 0, 0)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, IPPROTO_TCP, len(header))
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(header), IPPROTO_TCP)
    return header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]


def ip_packet(source: str, destination: str, segment: bytes) -> bytes:
    """``segment`` in an IPv4 (don't fragment) or IPv6 header, TTL / hop limit 64."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if src.version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(segment),
            0,
            0x4000,
            64,
            IPPROTO_TCP,
            0,
            src.packed,
            dst.packed,
        )
        return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + segment
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(segment), IPPROTO_TCP, 64, src.packed, dst.packed
    )
    return header + segment


def vxlan_frame(vni: int, src_mac: str, dst_mac: str, inner: bytes) -> bytes:
    """The UDP payload of a VXLAN packet carrying the IP packet ``inner`` in Ethernet."""
    version = inner[0] >> 4
    ethernet = _mac(dst_mac) + _mac(src_mac) + struct.pack("!H", ETHERTYPE[version])
    return struct.pack("!II", VXLAN_FLAGS, vni << 8) + ethernet + inner


def send_tunnelled(
    outer_src: str,
    outer_dst: str,
    port: int,
    payload: bytes,
    count: int,
    interval_s: float,
) -> int:
    """Send ``payload`` ``count`` times over UDP from ``outer_src`` to ``outer_dst``:``port``."""
    family = socket.AF_INET6 if ":" in outer_dst else socket.AF_INET
    sent = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((outer_src, 0))
        for index in range(count):
            if index:
                time.sleep(interval_s)
            sent += 1 if sock.sendto(payload, (outer_dst, port)) == len(payload) else 0
    return sent


def send_direct(
    source: str, destination: str, segment: bytes, count: int, interval_s: float
) -> int:
    """Send the TCP ``segment`` ``count`` times from a raw socket bound to ``source``."""
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    sent = 0
    with socket.socket(family, socket.SOCK_RAW, IPPROTO_TCP) as sock:
        sock.bind((source, 0))
        for index in range(count):
            if index:
                time.sleep(interval_s)
            sent += 1 if sock.sendto(segment, (destination, 0)) == len(segment) else 0
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egressgw.lab.forge", description=__doc__)
    parser.add_argument("--via", choices=["tunnel", "direct"], default="tunnel")
    parser.add_argument("--outer-src", help="this node's address (tunnel)")
    parser.add_argument("--outer-dst", help="the gateway node's address (tunnel)")
    parser.add_argument("--vni", type=int, default=7795)
    parser.add_argument("--port", type=int, default=7795, help="the tunnel's UDP port")
    parser.add_argument("--src-mac", default="02:00:00:00:00:01")
    parser.add_argument("--dst-mac", help="the gateway's tunnel device's MAC (tunnel)")
    parser.add_argument("--inner-src", required=True)
    parser.add_argument("--inner-dst", required=True)
    parser.add_argument("--sport", type=int, required=True)
    parser.add_argument("--dport", type=int, required=True)
    parser.add_argument("--flags", choices=sorted(TCP_FLAGS), default="syn")
    parser.add_argument("--count", type=int, default=3, help="at most 100")
    parser.add_argument("--interval-s", type=float, default=0.2)
    args = parser.parse_args(argv)
    count = max(1, min(args.count, 100))
    segment = tcp_segment(
        args.inner_src, args.inner_dst, args.sport, args.dport, args.sport, TCP_FLAGS[args.flags]
    )
    if args.via == "direct":
        sent = send_direct(args.inner_src, args.inner_dst, segment, count, args.interval_s)
        size = len(segment)
    else:
        if not (args.outer_src and args.outer_dst and args.dst_mac):
            parser.error("--via tunnel needs --outer-src, --outer-dst and --dst-mac")
        inner = ip_packet(args.inner_src, args.inner_dst, segment)
        payload = vxlan_frame(args.vni, args.src_mac, args.dst_mac, inner)
        size = len(payload)
        sent = send_tunnelled(
            args.outer_src, args.outer_dst, args.port, payload, count, args.interval_s
        )
    print(json.dumps({"sent": sent, "bytes": size, "via": args.via}), flush=True)
    return 0 if sent == count else 1


if __name__ == "__main__":
    sys.exit(main())
