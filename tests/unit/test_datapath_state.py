"""Pure datapath state: disjoint boxes for interval sets, and the element encodings."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.datapath import keys
from egressgw.datapath.state import ANY_PORT, Box, DesiredState, Learned, disjoint

NET = ipaddress.ip_network


def covered(boxes: list[Box], point: tuple[int, int, int, int]) -> int:
    identity, addr, proto, port = point
    return sum(
        1
        for b in boxes
        if b.identity == identity
        and b.addr[0] <= addr <= b.addr[1]
        and b.proto[0] <= proto <= b.proto[1]
        and b.port[0] <= port <= b.port[1]
    )


def test_overlapping_cidr_rules_become_disjoint_with_the_same_coverage() -> None:
    wide = Box.of(1, NET("203.0.113.0/24"), (6, 6), (5432, 5432))
    host_any = Box.of(1, NET("203.0.113.10/32"))
    result = disjoint([wide, host_any])
    for a, b in itertools.combinations(result, 2):
        assert not a.intersects(b)
    host = int(ipaddress.ip_address("203.0.113.10"))
    other = int(ipaddress.ip_address("203.0.113.11"))
    assert covered(result, (1, host, 6, 5432)) == 1
    assert covered(result, (1, host, 17, 53)) == 1
    assert covered(result, (1, other, 6, 5432)) == 1
    assert covered(result, (1, other, 6, 5433)) == 0


def test_boxes_of_different_identities_never_merge() -> None:
    a = Box.of(1, NET("203.0.113.0/24"))
    b = Box.of(2, NET("203.0.113.0/24"))
    assert disjoint([a, b]) == [a, b]


boxes = st.builds(
    lambda ident, lo, span, plo, pspan: Box(ident, 4, (lo, lo + span), (6, 6), (plo, plo + pspan)),
    st.integers(1, 2),
    st.integers(0, 40),
    st.integers(0, 10),
    st.integers(0, 30),
    st.integers(0, 10),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(boxes, max_size=6), st.integers(1, 2), st.integers(0, 50), st.integers(0, 40))
def test_disjoint_keeps_exact_coverage(items: list[Box], ident: int, addr: int, port: int) -> None:
    result = disjoint(items)
    for a, b in itertools.combinations(result, 2):
        assert not a.intersects(b)
    point = (ident, addr, 6, port)
    assert covered(result, point) == min(1, covered(items, point))


def test_learned_elements_go_to_the_set_matching_their_ports() -> None:
    addr = ipaddress.ip_address("198.51.100.7")
    assert Learned(1, addr, 6, (443, 443)).set_name == "allow4"
    assert Learned(1, addr).set_name == "allow4_any"
    assert Learned(1, addr, 6, (8000, 8100)).set_name == "allow4_range"
    assert Learned(1, ipaddress.ip_address("2001:db8::1"), 17, (53, 53)).set_name == "allow6"
    # exact-port keys: host-endian mark, address, protocol and port padded to 4 bytes
    key = Learned(0x01020304, addr, 6, (443, 443)).element().key
    assert key[4:8] == addr.packed and key[8] == 6 and key[12:14] == b"\x01\xbb"
    assert Learned(1, addr, 6, ANY_PORT).element().key_end is not None


def test_static_elements_cover_every_control_plane_set() -> None:
    state = DesiredState(identities={1: "payments/x"}, audit={1})
    state.workloads[ipaddress.ip_address("192.0.2.10")] = 1
    state.snat[4][1] = ipaddress.ip_address("198.51.100.10")
    elements = state.static_elements()
    assert len(elements["identities"]) == 1
    assert len(elements["workloads4"]) == 1 and len(elements["workloads6"]) == 0
    assert len(elements["snat4"]) == 1 and len(elements["audit"]) == 1


@given(st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16))
def test_packed_addresses_read_back_as_the_standard_library_reads_them(raw: bytes) -> None:
    assert keys.parse_address(raw) == ipaddress.ip_address(raw)
    assert type(keys.parse_address(raw)) is type(ipaddress.ip_address(raw))


def test_a_packed_address_of_another_length_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="4 or 16 bytes, not 5"):
        keys.parse_address(b"\x00" * 5)
