"""The kernel reads an apply and a /metrics scrape make leave no reference cycles (see
tests/unit/test_reference_cycles.py for why the daemon cannot afford any)."""

from __future__ import annotations

import ipaddress

from egressgw.datapath.addresses import UplinkAddresses
from egressgw.datapath.kernel import NftDatapath
from egressgw.datapath.state import DesiredState
from tests.conftest import require_kernel
from tests.kernel.topology import topology
from tests.unit.test_reference_cycles import cyclic_garbage


def test_listing_the_uplink_addresses_leaves_no_cyclic_garbage() -> None:
    require_kernel()
    with topology() as topo:
        addresses = UplinkAddresses("up0", netns=topo.gateway)
        try:
            addresses.sync({ipaddress.ip_address("198.51.100.10")}, set())
            found = cyclic_garbage(lambda: [addresses.present() for _ in range(3)])
            assert not found, "\n".join(found)
        finally:
            addresses.close()


def test_dumps_and_counters_leave_no_cyclic_garbage() -> None:
    require_kernel()
    with topology() as topo:
        dp = NftDatapath("egressgw", "up0", netns=topo.gateway)
        try:
            dp.adopt()
            desired = DesiredState()
            for identity in range(1, 501):
                desired.identities[identity] = f"payments/{identity:020x}"
                desired.workloads[ipaddress.ip_address(f"2001:db8:1:5::{identity:x}")] = identity
            dp.reconcile(desired)
            for action in (dp.counters, dp.adopt):  # every /metrics scrape; a restart
                found = cyclic_garbage(action)
                assert not found, f"{action.__name__}:\n" + "\n".join(found)
        finally:
            dp.close()
