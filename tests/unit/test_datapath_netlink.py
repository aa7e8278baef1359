"""The fast element encoder writes exactly the bytes pyroute2's message classes write."""

from __future__ import annotations

import ipaddress

import pytest

from egressgw.datapath.netlink import (
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    Change,
    Element,
    Op,
    _control,
    control_with_pyroute2,
    encode_elements,
    encode_with_pyroute2,
)
from egressgw.datapath.state import Box, Learned

ADDR = ipaddress.ip_address("198.51.100.7")
CASES = [
    Change(Op.ADD, "allow4", tuple(Learned(7, ADDR, 6, (p, p)).element(60_000) for p in range(8))),
    Change(Op.DESTROY, "allow4", (Learned(7, ADDR, 6, (443, 443)).element(),)),
    Change(Op.ADD, "allow4_range", (Learned(7, ADDR, 6, (1000, 2000)).element(5_000),)),
    Change(Op.ADD, "allow4_any", (Learned(9, ADDR).element(2**40),)),
    Change(Op.DELETE, "workloads4", (Element(key=ADDR.packed, data=bytes([0, 0, 3, 232])),)),
    Change(Op.ADD, "allow6_net", (Box.of(3, ipaddress.ip_network("2001:db8::/64")).element(),)),
]


@pytest.mark.parametrize("change", CASES, ids=[f"{c.op.name}-{c.set_name}" for c in CASES])
def test_fast_encoder_matches_pyroute2_byte_for_byte(change: Change) -> None:
    fast = encode_elements("egressgw", change, change.elements, 4242)
    assert fast == encode_with_pyroute2("egressgw", change, change.elements, 4242)


@pytest.mark.parametrize("kind", [NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END])
def test_batch_control_messages_match_pyroute2(kind: int) -> None:
    assert _control(kind, 77) == control_with_pyroute2(kind, 77)
