"""`egressgw run --manifests DIR` where DIR is a ConfigMap mount that the kubelet swaps atomically.

The policy moves from one port to another in a new generation whose files have the same sizes
and modification times as the old ones: the daemon must see the swap, apply only the new
generation within two seconds, and never warn about objects defined twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_kernel
from tests.kernel.test_daemon import CLUSTER, POLICY, Daemon, source_seen, wait_for
from tests.kernel.topology import SERVER4, SERVER6, Topology, topology
from tests.unit.test_sources_manifests import ConfigMapMount

pytestmark = pytest.mark.kernel

OLD_PORT, NEW_PORT = 5432, 5433  # same width: the policy file keeps its size across the swap
EGRESS_IP = "198.51.100.10"


def files(port: int) -> dict[str, str]:
    return {"cluster.yaml": CLUSTER, "policy.yaml": POLICY % f"{{protocol: TCP, port: {port}}}"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Topology, Daemon, ConfigMapMount]]:
    require_kernel()
    mount = ConfigMapMount(tmp_path / "configmap")
    mount.update(files(OLD_PORT))
    with topology() as topo:
        for port in (OLD_PORT, NEW_PORT):
            topo.listen(SERVER4, port)
            topo.listen(SERVER6, port)
        daemon = Daemon(topo, mount.root, tmp_path / "egressgw.log")
        try:
            daemon.start()
            yield topo, daemon, mount
        finally:
            daemon.stop()


def test_an_atomic_configmap_swap_applies_the_new_generation_within_two_seconds(
    env: tuple[Topology, Daemon, ConfigMapMount],
) -> None:
    topo, daemon, mount = env
    assert source_seen(topo, SERVER4, OLD_PORT) == EGRESS_IP
    assert source_seen(topo, SERVER4, NEW_PORT) is None

    policy = os.stat(mount.root / "policy.yaml")
    swapped_at = 0.0
    for step in mount.steps(files(NEW_PORT), mtime_ns=policy.st_mtime_ns):
        if step == "swapped ..data":
            swapped_at = time.monotonic()
    after = os.stat(mount.root / "policy.yaml")
    assert (after.st_size, after.st_mtime_ns) == (policy.st_size, policy.st_mtime_ns)

    # Timed on the port that closes: until the change its connections succeed, so no ICMP
    # reject is spent, and the first refused one is answered at once. Polling the port that
    # opens would trip the kernel's per-peer ICMP rate limit (a burst of 6, then 1/s), and a
    # reject it swallows costs a probe its whole timeout.
    wait_for(lambda: source_seen(topo, SERVER4, OLD_PORT) is None, f"port {OLD_PORT} to close", 2)
    took = time.monotonic() - swapped_at
    print(f"\nConfigMap swap to a new connection's changed verdict: {took * 1000:.0f} ms")
    assert took < 2
    assert source_seen(topo, SERVER4, NEW_PORT) == EGRESS_IP
    assert source_seen(topo, SERVER6, NEW_PORT) == "2001:db8:100::10"
    assert source_seen(topo, SERVER6, OLD_PORT) is None

    time.sleep(1.5)  # several more polls: nothing is read twice or from the old generation
    log = daemon.log()
    assert "already defined" not in log
    assert "invalid" not in log
    assert "/.." not in log, "a generation directory was read by its hidden name"
    assert f"manifest loaded: {mount.root / 'policy.yaml'}" in log
    assert source_seen(topo, SERVER4, OLD_PORT) is None
    assert source_seen(topo, SERVER4, NEW_PORT) == EGRESS_IP


def test_two_swaps_in_quick_succession_end_at_the_second_generation(
    env: tuple[Topology, Daemon, ConfigMapMount],
) -> None:
    """The kubelet may swap again before the first swap's rescan: the events of both settle
    into rescans that end at the newest generation, followed through inotify, not by polling."""
    topo, daemon, mount = env
    assert source_seen(topo, SERVER4, OLD_PORT) == EGRESS_IP
    mount.update(files(NEW_PORT + 1))  # nothing listens there
    mount.update(files(NEW_PORT))
    wait_for(lambda: source_seen(topo, SERVER4, OLD_PORT) is None, f"port {OLD_PORT} to close", 2)
    assert source_seen(topo, SERVER4, NEW_PORT) == EGRESS_IP
    assert source_seen(topo, SERVER6, NEW_PORT) == "2001:db8:100::10"
    log = daemon.log()
    assert "cannot watch" not in log
    assert "already defined" not in log
    assert "invalid" not in log
