"""The tunnel's pure parts: derived addresses, netlink encodings and decodings (checked against
pyroute2's own message classes), mark and table allocation, and the rules the agent and the
gateway load. The kernel side is tests/kernel/test_tunnel.py."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from egressgw.datapath import keys, skeleton
from egressgw.datapath.agent import (
    SteeringSettings,
    assign_slots,
    desired,
    gateway_label,
    render,
)
from egressgw.datapath.kernel import tunnel_elements
from egressgw.datapath.netlink import NLMSGHDR, attributes
from egressgw.datapath.tunnel import (
    NLA_F_NESTED,
    DumpedNeighbour,
    DumpedRoute,
    FdbEntry,
    Neighbour,
    Route,
    Rule,
    TunnelSettings,
    decode_link,
    decode_neighbour,
    decode_route,
    decode_rule,
    link_local_for,
    link_settings_message,
    mac_for,
    next_hop,
    peer_entries,
)
from egressgw.steering import AgentPlan

A = ipaddress.ip_address
N = ipaddress.ip_network
WORKER, HOLDER, OTHER = A("198.51.100.1"), A("198.51.100.11"), A("198.51.100.12")


# --- derived addresses -----------------------------------------------------------------------


def test_an_ipv4_node_mac_embeds_its_address_and_is_local_unicast() -> None:
    assert mac_for(A("198.51.100.1")) == "02:e7:c6:33:64:01"
    for address in (A("198.51.100.1"), A("2001:db8:20::1")):
        first = int(mac_for(address)[:2], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast


def test_ipv6_node_macs_differ_per_address() -> None:
    macs = {mac_for(A(f"2001:db8:20::{n:x}")) for n in range(1, 1001)}
    assert len(macs) == 1000
    assert all(m.startswith("06:e7:") for m in macs)


def test_the_link_local_address_is_the_one_the_kernel_derives_from_the_mac() -> None:
    # what Linux configured on a device with this MAC (addrgenmode eui64)
    assert link_local_for("d6:e6:be:08:bf:28") == A("fe80::d4e6:beff:fe08:bf28")
    assert link_local_for(mac_for(HOLDER)) == A("fe80::e7:c6ff:fe33:640b")
    with pytest.raises(ValueError):
        link_local_for("02:e7")


def test_next_hops_per_family() -> None:
    assert next_hop(HOLDER, 4) == HOLDER
    assert next_hop(HOLDER, 6) == link_local_for(mac_for(HOLDER))
    assert next_hop(A("2001:db8:20::11"), 4) is None  # IPv4 is not carried over IPv6 here


def test_peer_entries_are_an_fdb_entry_and_neighbours_per_reachable_peer() -> None:
    fdb, neighbours, notes = peer_entries([HOLDER, HOLDER, A("2001:db8:20::11")], 4)
    mac = mac_for(HOLDER)
    assert fdb == {FdbEntry(mac, HOLDER)}
    assert neighbours == {Neighbour(HOLDER, mac), Neighbour(link_local_for(mac), mac)}
    assert notes == ["peer 2001:db8:20::11 is not reachable over an IPv4 tunnel"]


# --- rtnetlink: what we send and what we read ------------------------------------------------


def test_the_rp_filter_setting_is_af_spec_inet_conf_rp_filter_loose() -> None:
    raw = link_settings_message(7, 1)
    length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(raw)
    assert (length, kind) == (len(raw), 19)  # RTM_SETLINK
    body = NLMSGHDR.size + 16  # ifinfomsg
    assert int.from_bytes(raw[NLMSGHDR.size + 4 : NLMSGHDR.size + 8], "little") == 7
    [(spec, start, end)] = list(attributes(raw, body, len(raw)))
    assert spec == 26  # IFLA_AF_SPEC
    [(family, start, end)] = list(attributes(raw, start, end))
    assert family == socket.AF_INET
    [(conf, start, end)] = list(attributes(raw, start, end))
    assert conf == 1  # IFLA_INET_CONF
    [(index, start, end)] = list(attributes(raw, start, end))
    assert index == 8 and raw[start:end] == (2).to_bytes(4, "little")  # RP_FILTER = loose
    assert struct.unpack_from("=HH", raw, body)[1] == 26 | NLA_F_NESTED  # nested, flagged


def _encoded(msg: object) -> bytes:
    msg.encode()  # type: ignore[attr-defined]
    return bytes(msg.data)  # type: ignore[attr-defined]


def test_routes_are_read_as_pyroute2_writes_them() -> None:
    msg = rtmsg()
    msg["family"], msg["dst_len"], msg["table"], msg["type"] = socket.AF_INET, 32, 252, 1
    msg["flags"] = 4  # onlink
    msg["attrs"] = [
        ("RTA_TABLE", 7795),
        ("RTA_DST", "192.0.2.10"),
        ("RTA_GATEWAY", "198.51.100.1"),
        ("RTA_OIF", 9),
    ]
    route = decode_route(_encoded(msg))
    assert route == DumpedRoute(
        7795, A("192.0.2.10").packed, 32, A("198.51.100.1").packed, 9, 1, True
    )
    assert route.destination == N("192.0.2.10/32")
    default6 = rtmsg()
    default6["family"], default6["table"], default6["type"] = socket.AF_INET6, 254, 1
    default6["attrs"] = [("RTA_GATEWAY", "fe80::1"), ("RTA_OIF", 3)]
    route = decode_route(_encoded(default6))
    assert route == DumpedRoute(254, bytes(16), 0, A("fe80::1").packed, 3, 1, False)
    assert route.destination == N("::/0")


def test_rules_are_read_as_pyroute2_writes_them() -> None:
    msg = fibmsg()
    msg["family"], msg["table"], msg["action"], msg["flags"] = socket.AF_INET6, 252, 1, 0
    msg["attrs"] = [
        ("FRA_TABLE", 7802),
        ("FRA_PRIORITY", 90),
        ("FRA_FWMARK", 2),
        ("FRA_FWMASK", 0x7F),
    ]
    assert decode_rule(_encoded(msg)) == Rule(6, 90, table=7802, fwmark=2, fwmask=0x7F)
    hole = fibmsg()
    hole["family"], hole["action"], hole["flags"] = socket.AF_INET, 6, 2
    hole["attrs"] = [("FRA_PRIORITY", 91), ("FRA_FWMASK", 0x7F)]
    assert decode_rule(_encoded(hole)) == Rule(4, 91, fwmask=0x7F, blackhole=True, invert=True)


def test_neighbours_and_fdb_entries_are_read_as_pyroute2_writes_them() -> None:
    msg = ndmsg()
    msg["family"], msg["ifindex"], msg["state"] = socket.AF_BRIDGE, 7, 0xC0
    msg["attrs"] = [("NDA_LLADDR", "02:e7:c6:33:64:0b"), ("NDA_DST", "198.51.100.11")]
    assert decode_neighbour(_encoded(msg)) == DumpedNeighbour(
        7, 0xC0, A("198.51.100.11"), "02:e7:c6:33:64:0b"
    )


def test_a_vxlan_link_is_read_as_pyroute2_writes_it() -> None:
    msg = ifinfmsg()
    msg["index"], msg["flags"] = 7, 1
    msg["attrs"] = [
        ("IFLA_IFNAME", "egw0"),
        ("IFLA_MTU", 1450),
        ("IFLA_ADDRESS", "02:e7:c6:33:64:01"),
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_KIND", "vxlan"),
                    (
                        "IFLA_INFO_DATA",
                        {
                            "attrs": [
                                ("IFLA_VXLAN_ID", 7795),
                                ("IFLA_VXLAN_LOCAL", "198.51.100.1"),
                                ("IFLA_VXLAN_LEARNING", 0),
                                ("IFLA_VXLAN_PORT", 7795),
                            ]
                        },
                    ),
                ]
            },
        ),
    ]
    link = decode_link(_encoded(msg))
    assert link.ifindex == 7 and link.name == "egw0" and link.mtu == 1450 and link.up
    assert (link.kind, link.vni, link.local, link.port, link.learning) == (
        "vxlan",
        7795,
        WORKER,
        7795,
        False,
    )
    assert link.mac == "02:e7:c6:33:64:01"


# --- marks, tables, rules --------------------------------------------------------------------


def test_default_marks_leave_other_projects_bits_alone() -> None:
    s = SteeringSettings()
    foreign = 0x4000 | 0x8000 | 0xFFFF0000 | 0x0F00 | 0xF000 | 0x80
    assert s.mark_mask & foreign == 0
    assert (s.capacity, s.drop_mark, s.mark(1), s.table(1)) == (126, 0x7F, 1, 7801)
    shifted = SteeringSettings(mark_mask=0x7F00, table_base=9000)
    assert (shifted.mark(3), shifted.slot(0x0300), shifted.tables) == (0x300, 3, range(9001, 9127))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mark_mask": 0x5}, "contiguous"),
        ({"mark_mask": 0x1}, "no mark"),
        ({"mark_mask": 0}, "32-bit"),
        ({"table_base": 200}, "kernel's own"),
        ({"rule_priority": 32766}, "priority"),
    ],
)
def test_settings_that_would_collide_are_refused(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SteeringSettings(**overrides)


def test_slots_are_kept_and_new_ones_do_not_reuse_a_slot_freed_in_the_same_apply() -> None:
    assigned, left = assign_slots(["b", "c"], {"a": 1, "b": 2}, capacity=4)
    assert assigned == {"b": 2, "c": 3} and left == []  # 1 was a's a moment ago
    assigned, left = assign_slots(["b", "c", "d", "e"], {"a": 1, "b": 2}, capacity=4)
    assert assigned == {"b": 2, "c": 3, "d": 4, "e": 1} and left == []
    assigned, left = assign_slots(["x", "y", "z"], {}, capacity=2)
    assert assigned == {"x": 1, "y": 2} and left == ["z"]


def test_a_long_gateway_name_fits_an_element_comment() -> None:
    assert gateway_label("payments") == "payments"
    long = "g" * 253
    assert gateway_label(long).startswith("sha256:") and len(gateway_label(long)) < 80


def _plan(**next_hops: ipaddress.IPv4Address | ipaddress.IPv6Address) -> AgentPlan:
    return AgentPlan(
        node="wA",
        local=WORKER,
        steered={
            A("192.0.2.10"): "payments",
            A("2001:db8:10:a::10"): "payments",
            A("192.0.2.12"): "nohop",
        },
        next_hops={(name, f): hop for name, hop in next_hops.items() for f in (4, 6)},
    )


def test_the_desired_state_of_a_plan() -> None:
    s = SteeringSettings()
    state = desired(_plan(payments=HOLDER), WORKER, s, current={})
    slots = {e.comment: keys.parse_mark(e.key) for e in state.elements["gateways"]}
    assert slots == {"nohop": 1, "payments": 2}
    steered = {keys.parse_address(e.key): keys.parse_mark(e.data or b"") for e in
               state.elements["steered4"] + state.elements["steered6"]}  # fmt: skip
    assert steered == {A("192.0.2.10"): 2, A("2001:db8:10:a::10"): 2, A("192.0.2.12"): 1}
    # only the gateway with a holder is routable, in both families, through its own table
    assert [keys.parse_mark(e.key) for e in state.elements["routable4"]] == [2]
    assert [keys.parse_mark(e.key) for e in state.elements["routable6"]] == [2]
    assert set(state.routes) == {
        Route(7802, N("0.0.0.0/0"), HOLDER),
        Route(7802, N("::/0"), link_local_for(mac_for(HOLDER))),
    }
    assert [keys.parse_address(e.key) for e in state.elements["peers4"]] == [HOLDER]
    assert Rule(4, 90, table=7801, fwmark=1, fwmask=0x7F) in state.rules
    assert Rule(6, 91, fwmask=0x7F, blackhole=True, invert=True) in state.rules
    assert len(state.rules) == 2 * 2 + 2 and state.notes == []


def test_the_desired_state_keeps_numbers_and_fails_closed() -> None:
    s = SteeringSettings(mark_mask=0x3)  # room for two gateways and the drop mark
    state = desired(_plan(payments=WORKER), WORKER, s, current={"payments": 1, "nohop": 2})
    steered = {keys.parse_address(e.key): keys.parse_mark(e.data or b"") for e in
               state.elements["steered4"]}  # fmt: skip
    assert steered == {A("192.0.2.10"): 1, A("192.0.2.12"): 2}
    assert state.routes == [] and state.elements["routable4"] == []  # a node never to itself
    assert state.notes == ["gateway payments: this node holds it; a node cannot steer to itself"]


def test_pods_of_gateways_beyond_the_marks_get_the_drop_mark() -> None:
    s = SteeringSettings(mark_mask=0x3)  # capacity 2
    plan = AgentPlan(
        node="wA",
        local=WORKER,
        steered={A(f"192.0.2.{n}"): f"gw{n}" for n in (10, 11, 12)},
        next_hops={(f"gw{n}", 4): HOLDER for n in (10, 11, 12)},
    )
    state = desired(plan, WORKER, s, current={})
    marks = {keys.parse_address(e.key): keys.parse_mark(e.data or b"") for e in
             state.elements["steered4"]}  # fmt: skip
    assert marks == {A("192.0.2.10"): 1, A("192.0.2.11"): 2, A("192.0.2.12"): s.drop_mark}
    assert s.drop_mark not in {keys.parse_mark(e.key) for e in state.elements["routable4"]}
    assert any("more gateways than the 2 marks" in note for note in state.notes)


def test_the_agent_ruleset_leaves_the_cluster_and_link_local_traffic_alone() -> None:
    script = render(
        "egressgw_agent",
        TunnelSettings(),
        SteeringSettings(),
        [N("192.0.2.0/25"), N("192.0.2.128/25"), N("2001:db8:10::/48")],
        [A("192.0.2.253")],
    )
    assert "ip daddr { 127.0.0.0/8, 169.254.0.0/16, 192.0.2.0/24, 224.0.0.0/4," in script
    assert "ip6 daddr { ::1/128, 2001:db8:10::/48, fe80::/10, ff00::/8 } goto inside6" in script
    assert script.count("dnat") == 1  # DNS addresses of IPv4 only: no IPv6 DNS rule
    assert "meta mark set meta mark and 0xffffff80" in script
    with pytest.raises(ValueError, match="interface name"):
        render("t", TunnelSettings(device="bad name"), SteeringSettings(), [], [])


def test_tunnel_dns_redirects_need_a_usable_address() -> None:
    ok = skeleton.render_tunnel(
        "egressgw", "up0", "egw0", 7795, [(A("198.51.100.11"), 5353), (A("2001:db8::53"), 53)]
    )
    assert "dnat ip to 198.51.100.11:5353" in ok and "dnat ip6 to [2001:db8::53]:53" in ok
    assert "@ih,160,16 0x0800 ip saddr . @ih,272,32 @tunnel4_pods4 return" in ok
    assert "@ih,160,16 0x86dd ip6 saddr . @ih,240,128 @tunnel6_pods6 return" in ok
    assert skeleton.render("egressgw", "up0").count("tunnel") == 0
    for bad, message in (
        ([(A("0.0.0.0"), 53)], "unicast address"),
        ([(A("::1"), 53)], "unicast address"),
        ([(A("198.51.100.11"), 53), (A("198.51.100.12"), 53)], "more than one IPv4"),
        ([(A("198.51.100.11"), 0)], "not a port"),
    ):
        with pytest.raises(ValueError, match=message):
            skeleton.render_tunnel("egressgw", "up0", "egw0", 7795, bad)


def test_tunnel_elements_pair_the_worker_with_the_pod() -> None:
    wanted, notes = tunnel_elements(
        4,
        {
            A("192.0.2.10"): WORKER,
            A("2001:db8:10:a::10"): WORKER,
            A("192.0.2.20"): A("2001:db8:20::2"),
        },
    )
    assert [e.key for e in wanted["tunnel4_pods4"]] == [WORKER.packed + A("192.0.2.10").packed]
    assert [e.key for e in wanted["tunnel4_pods6"]] == [
        WORKER.packed + A("2001:db8:10:a::10").packed
    ]
    assert wanted["tunnel6_pods4"] == [] and wanted["tunnel6_pods6"] == []
    assert notes == ["pod 192.0.2.20: its node 2001:db8:20::2 is not reachable over this tunnel"]


def test_a_gateway_none_of_the_nodes_pods_uses_is_not_a_peer() -> None:
    plan = AgentPlan(
        node="wA",
        local=WORKER,
        steered={A("192.0.2.10"): "payments"},
        next_hops={("payments", 4): HOLDER, ("other", 4): OTHER},
    )
    state = desired(plan, WORKER, SteeringSettings(), current={})
    assert state.peers == {HOLDER}
    assert [e.comment for e in state.elements["gateways"]] == ["payments"]
