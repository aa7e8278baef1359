"""The datapath against the real kernel: traffic through a gateway namespace, and nft's own view.

Each test builds client -> gateway -> server namespaces (tests/kernel/topology.py), programs the
gateway with NftDatapath directly and checks what a user would notice: who connects, with which
source address the server sees, how fast a rejected client fails, and what ``nft list`` shows.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import threading
import time
from collections.abc import Iterator

import pytest

from egressgw.datapath import skeleton
from egressgw.datapath.kernel import NftDatapath, StalePolicy, UnknownIdentity
from egressgw.datapath.netlink import BatchError, Change, Element, Op
from egressgw.datapath.state import Box, DesiredState, Learned
from tests.kernel.topology import CLIENT4, CLIENT6, NODE4, SERVER4, SERVER6, Topology, topology

EGRESS4 = ipaddress.ip_address("198.51.100.10")
EGRESS6 = ipaddress.ip_address("2001:db8:100::10")
PAYMENTS = 7


def desired(**overrides: object) -> DesiredState:
    """The client is identity 7 of a gateway holding EGRESS4/EGRESS6, allowed to SERVER:5432."""
    state = DesiredState(
        identities={PAYMENTS: "payments/test"},
        workloads={
            ipaddress.ip_address(CLIENT4): PAYMENTS,
            ipaddress.ip_address(CLIENT6): PAYMENTS,
        },
        egress_ips={EGRESS4, EGRESS6},
        allow_net={
            Box.of(PAYMENTS, ipaddress.ip_network(f"{SERVER4}/32"), (6, 6), (5432, 5432)),
            Box.of(PAYMENTS, ipaddress.ip_network(f"{SERVER6}/128"), (6, 6), (5432, 5432)),
        },
    )
    state.snat[4][PAYMENTS] = EGRESS4
    state.snat[6][PAYMENTS] = EGRESS6
    for key, value in overrides.items():
        setattr(state, key, value)
    return state


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology() as t:
        for port in (5432, 443, 8080):
            t.listen(SERVER4, port)
            t.listen(SERVER6, port)
        yield t


@pytest.fixture
def datapath(topo: Topology) -> Iterator[NftDatapath]:
    from egressgw.datapath.addresses import UplinkAddresses

    dp = NftDatapath("egressgw", "up0", netns=topo.gateway)
    dp.adopt()
    addresses = UplinkAddresses("up0", netns=topo.gateway)
    addresses.sync({EGRESS4, EGRESS6}, set())
    addresses.close()
    yield dp
    dp.close()


def roundtrip(topo: Topology, address: str, port: int) -> str:
    with topo.connect(address, port) as conn:
        conn.sendall(b"ping\n")
        assert conn.recv(16) == b"ping\n"
    return topo.peers[-1]


def refused(topo: Topology, address: str, port: int, timeout: float = 2.0) -> tuple[int, float]:
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        topo.connect(address, port, timeout).close()
    code = failure.value.errno if failure.value.errno is not None else errno.ETIMEDOUT
    return code, time.monotonic() - started


def test_allowed_traffic_leaves_with_the_egress_ip_on_both_families(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired())
    assert roundtrip(topo, SERVER4, 5432) == str(EGRESS4)
    assert roundtrip(topo, SERVER6, 5432) == str(EGRESS6)


def test_port_outside_the_policy_is_rejected_at_once(topo: Topology, datapath: NftDatapath) -> None:
    datapath.reconcile(desired())
    code, elapsed = refused(topo, SERVER4, 8080)
    assert code == errno.EHOSTUNREACH and elapsed < 1.0
    # The ICMPv6 admin-prohibited reaches the client at once too (seen with tcpdump), but Linux
    # TCP only gives up on the retransmitted SYN: about one second, never a connect timeout.
    code, elapsed = refused(topo, SERVER6, 8080, timeout=5.0)
    assert code == errno.EACCES and elapsed < 1.5


def test_unknown_source_is_rejected(topo: Topology, datapath: NftDatapath) -> None:
    datapath.reconcile(desired(workloads={}))
    code, _ = refused(topo, SERVER4, 5432)
    assert code == errno.EHOSTUNREACH
    assert topo.peers == []


def test_identity_without_held_egress_ip_is_dropped_never_masqueraded(
    topo: Topology, datapath: NftDatapath
) -> None:
    state = desired()
    state.snat = {4: {}, 6: {}}
    datapath.reconcile(state)
    code, _ = refused(topo, SERVER4, 5432, timeout=1.0)
    assert code == errno.ETIMEDOUT
    assert NODE4 not in topo.peers and topo.peers == []


def test_learned_destination_opens_its_port_until_it_expires(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired(allow_net=set()))
    assert refused(topo, SERVER4, 443)[0] == errno.EHOSTUNREACH
    learned = Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443))
    assert datapath.program([learned], lifetime_s=1) == 1
    established = topo.connect(SERVER4, 443)
    assert roundtrip(topo, SERVER4, 443) == str(EGRESS4)
    time.sleep(2.2)
    assert refused(topo, SERVER4, 443)[0] == errno.EHOSTUNREACH
    # the connection opened before the element expired keeps working (conntrack)
    established.sendall(b"still here\n")
    assert established.recv(32) == b"still here\n"
    established.close()


def test_learned_address_opens_nothing_for_another_identity(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired(allow_net=set(), identities={PAYMENTS: "a", 8: "b"}))
    datapath.program([Learned(8, ipaddress.ip_address(SERVER4), 6, (443, 443))], lifetime_s=30)
    assert refused(topo, SERVER4, 443)[0] == errno.EHOSTUNREACH


def test_learned_elements_for_an_identity_the_datapath_does_not_hold_are_refused(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired(allow_net=set()))
    with pytest.raises(UnknownIdentity):
        datapath.program([Learned(99, ipaddress.ip_address(SERVER4), 6, (443, 443))], 30)
    assert SERVER4 not in topo.nft("list", "set", "inet", "egressgw", "allow4")


def test_deny_rule_wins_and_audit_accepts_would_deny(topo: Topology, datapath: NftDatapath) -> None:
    deny = {Box.of(PAYMENTS, ipaddress.ip_network(f"{SERVER4}/32"), (6, 6), (5432, 5432))}
    datapath.reconcile(desired(deny_net=deny))
    assert refused(topo, SERVER4, 5432)[0] == errno.EHOSTUNREACH
    datapath.reconcile(desired(deny_net=deny, audit={PAYMENTS}))
    assert roundtrip(topo, SERVER4, 5432) == str(EGRESS4)
    assert roundtrip(topo, SERVER4, 8080) == str(EGRESS4)
    assert "counter packets 2" in topo.nft("list", "chain", "inet", "egressgw", "audited")


def test_default_allow_gateway_accepts_everything(topo: Topology, datapath: NftDatapath) -> None:
    datapath.reconcile(desired(allow_net=set(), default_allow={PAYMENTS}))
    assert roundtrip(topo, SERVER4, 8080) == str(EGRESS4)


def test_refresh_extends_an_element_the_kernel_would_not_refresh(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired(allow_net=set()))
    learned = Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443))
    datapath.program([learned], lifetime_s=5)
    # Plain re-add with the same timeout: the kernel keeps the old expiry (checked here so the
    # refresh path below is known to be needed on this kernel, or harmless where it is not).
    time.sleep(1.5)
    element = learned.element(timeout_ms=5000)
    datapath.sock.apply([Change(Op.ADD, "allow4", (element,))])
    listed = json.loads(topo.nft("-j", "list", "set", "inet", "egressgw", "allow4"))
    entry = next(i for i in listed["nftables"] if "set" in i)["set"]["elem"][0]["elem"]
    assert entry["expires"] <= 4
    datapath.program([learned], lifetime_s=60)
    listed = json.loads(topo.nft("-j", "list", "set", "inet", "egressgw", "allow4"))
    entry = next(i for i in listed["nftables"] if "set" in i)["set"]["elem"][0]["elem"]
    assert entry["expires"] > 55


def test_the_mirror_forgets_what_expired_and_keeps_what_was_extended(topo: Topology) -> None:
    now = [1000.0]
    dp = NftDatapath("egressgw", "up0", netns=topo.gateway, clock=lambda: now[0])
    try:
        dp.adopt()
        dp.reconcile(desired(allow_net=set()))
        short = Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443))
        extended = Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (8080, 8080))
        long = Learned(PAYMENTS, ipaddress.ip_address(SERVER6), 6, (443, 443))
        assert dp.program([short, extended], lifetime_s=5) == 2
        assert dp.program([long], lifetime_s=60) == 1
        now[0] += 3
        assert dp.program([extended], lifetime_s=60) == 1
        now[0] += 4  # past the first expiry of short and extended
        assert dp.forget_expired() == 1
        assert dp.learned_by_identity() == {PAYMENTS: 2}
        # still in force in the mirror: asking again for less writes nothing
        assert dp.program([extended, long], lifetime_s=30) == 0
        now[0] += 100
        assert dp.forget_expired() == 2
        assert dp.learned_by_identity() == {}
    finally:
        dp.close()


def test_failed_batch_leaves_previous_state(topo: Topology, datapath: NftDatapath) -> None:
    datapath.reconcile(desired())
    good = Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443)).element(30000)
    with pytest.raises(BatchError) as failure:
        datapath.sock.apply(
            [
                Change(Op.ADD, "allow4", (good,)),
                Change(Op.DELETE, "workloads4", (Element(key=bytes(4)),)),  # absent: ENOENT
            ]
        )
    assert failure.value.errno == errno.ENOENT
    assert "workloads4" in str(failure.value)
    assert SERVER4 not in topo.nft("list", "set", "inet", "egressgw", "allow4")
    assert roundtrip(topo, SERVER4, 5432) == str(EGRESS4)


def test_adoption_keeps_elements_and_changes_nothing(topo: Topology, datapath: NftDatapath) -> None:
    state = desired()
    datapath.reconcile(state)
    datapath.program([Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443))], 60)
    established = topo.connect(SERVER4, 5432)
    datapath.close()

    again = NftDatapath("egressgw", "up0", netns=topo.gateway)
    adopted = again.adopt()
    assert adopted.identities == {PAYMENTS: "payments/test"}
    assert adopted.learned == 1
    assert adopted.egress_ips == {EGRESS4, EGRESS6}
    result = again.reconcile(state)
    assert (result.added, result.removed, result.learned_removed) == (0, 0, 0)
    assert roundtrip(topo, SERVER4, 443) == str(EGRESS4)
    established.sendall(b"x\n")
    assert established.recv(8) == b"x\n"
    established.close()
    again.close()


def test_ruleset_size_does_not_grow_with_workloads(topo: Topology, datapath: NftDatapath) -> None:
    def rules() -> int:
        listed = json.loads(topo.nft("-j", "list", "table", "inet", "egressgw"))
        return sum(1 for item in listed["nftables"] if "rule" in item)

    datapath.reconcile(desired())
    with_one = rules()
    big = desired()
    base = int(ipaddress.ip_address("192.0.2.0"))
    for n in range(100_000):
        identity = 100 + n % 10_000
        big.identities[identity] = f"ns/{identity}"
        big.workloads[ipaddress.ip_address((base + 0x100000 + n) % 2**32)] = identity
    datapath.reconcile(big)
    assert rules() == with_one == skeleton.rule_count("egressgw", "up0")
    assert datapath.static_count("workloads4") == 100_001


def test_traffic_is_counted_per_identity_accepted_and_rejected(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired())
    roundtrip(topo, SERVER4, 5432)
    roundtrip(topo, SERVER6, 5432)
    refused(topo, SERVER4, 8080)
    counts = datapath.counters()[PAYMENTS]
    # two connections (SYN, ACK, data, FIN, ... toward the server): several packets each
    assert counts.accepted_packets >= 6 and counts.accepted_bytes > 300
    assert counts.rejected_packets == 1 and counts.rejected_bytes >= 40


def test_a_scrape_is_answered_while_an_apply_holds_the_datapath(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired())
    roundtrip(topo, SERVER4, 5432)
    scraped: list[int] = []
    scrape = threading.Thread(
        target=lambda: scraped.append(datapath.counters()[PAYMENTS].accepted_packets)
    )
    with datapath.sock._lock:  # what a long apply holds while it writes
        scrape.start()
        scrape.join(timeout=30)  # a bound for a failing run, not a measure of speed
        assert not scrape.is_alive(), "the scrape waited for the apply"
    assert scraped and scraped[0] >= 3


def test_skeleton_upgrade_keeps_the_elements_of_an_older_table(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired())
    datapath.program([Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443))], 60)
    established = topo.connect(SERVER4, 5432)
    # reload the skeleton over the live table, as a daemon of a newer version does at start
    skeleton.load("egressgw", "up0", topo.gateway)
    again = NftDatapath("egressgw", "up0", netns=topo.gateway)
    assert again.adopt().learned == 1
    assert again.reconcile(desired()).changed is False
    established.sendall(b"x\n")
    assert established.recv(8) == b"x\n"
    assert roundtrip(topo, SERVER4, 443) == str(EGRESS4)
    again.close()


def test_a_learned_element_keeps_every_name_that_opened_it_across_refreshes(
    topo: Topology, datapath: NftDatapath
) -> None:
    datapath.reconcile(desired(allow_net=set()))
    learned = Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443))
    assert datapath.program([learned], 30, name="a.example") == 1
    assert datapath.program([learned], 30, name="b.example") == 1  # a new reason: rewritten
    assert datapath.program([learned], 10, name="a.example") == 0  # known and covered
    assert datapath.program([learned], 300, name="a.example") == 1  # a refresh
    listed = topo.nft("list", "set", "inet", "egressgw", "allow4")
    assert 'comment "a.example,b.example"' in listed, listed
    # a restart reads the names back
    assert datapath.adopt().learned == 1
    assert roundtrip(topo, SERVER4, 443) == str(EGRESS4)


class _OnlyName:
    """A policy under which one name opens TCP 443 for every identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def ports_of(self, identity: int, name: str) -> tuple[tuple[int | None, int, int], ...]:
        return ((6, 443, 443),) if name == self.name else ()

    def decides_alike(self, identity: int, other: object) -> bool:
        return isinstance(other, _OnlyName) and other.name == self.name


def test_a_reconcile_under_a_new_policy_removes_what_it_no_longer_allows_at_once(
    topo: Topology, datapath: NftDatapath
) -> None:
    old = _OnlyName("a.example")
    datapath.reconcile(desired(allow_net=set()), old)
    learned = Learned(PAYMENTS, ipaddress.ip_address(SERVER4), 6, (443, 443))
    datapath.program([learned], 600, name="a.example", policy=old)
    established = topo.connect(SERVER4, 443)
    assert roundtrip(topo, SERVER4, 443) == str(EGRESS4)

    new = _OnlyName("b.example")
    result = datapath.reconcile(desired(allow_net=set()), new)
    assert result.learned_removed == 1
    assert refused(topo, SERVER4, 443)[0] == errno.EHOSTUNREACH
    established.sendall(b"still here\n")  # conntrack keeps what was established
    assert established.recv(32) == b"still here\n"
    established.close()
    # and the old policy can no longer program anything
    with pytest.raises(StalePolicy):
        datapath.program([learned], 600, name="a.example", policy=old)
