"""Raw key encodings of the skeleton's sets, as the kernel stores them.

Concatenated keys are not encoded by pyroute2: each field is padded to a 4-byte register. ``mark``
is host byte order in hash sets, but nft converts it to big endian in interval (pipapo) sets so
ranges compare correctly; addresses and ports are network byte order everywhere. These layouts
were read back from elements added by ``nft`` itself (see tests/kernel/test_datapath_netlink.py).
"""

from __future__ import annotations

import ipaddress
import struct

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MARK_HOST = struct.Struct("=I")
_MARK_BE = struct.Struct(">I")
_PROTO = struct.Struct("B3x")
_PORT = struct.Struct(">H2x")


def mark(identity: int) -> bytes:
    """A ``mark`` value on its own or in a hash-set concatenation."""
    return _MARK_HOST.pack(identity)


def mark_be(identity: int) -> bytes:
    """A ``mark`` field inside an interval-set concatenation."""
    return _MARK_BE.pack(identity)


def parse_mark(raw: bytes) -> int:
    return int(_MARK_HOST.unpack_from(raw)[0])


def parse_mark_be(raw: bytes) -> int:
    return int(_MARK_BE.unpack_from(raw)[0])


def address(addr: IPAddress) -> bytes:
    return addr.packed


def parse_address(raw: bytes) -> IPAddress:
    """The address of 4 or 16 packed bytes. (``ipaddress.ip_address`` tries IPv4 first and
    builds an exception to reject 16 bytes: five times the cost, once per learned AAAA.)"""
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    raise ValueError(f"a packed address is 4 or 16 bytes, not {len(raw)}")


def proto(number: int) -> bytes:
    return _PROTO.pack(number)


def port(number: int) -> bytes:
    return _PORT.pack(number)
