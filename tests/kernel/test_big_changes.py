"""A change larger than one netlink transaction reaches the kernel; a failed apply is retried.

The daemon runs with its netlink socket buffer capped at a stock host's ``wmem_max`` (212,992
bytes), so the kernel takes at most about 416 KiB in one transaction. Its manifests hold 16,000
workloads in 1,000 namespaces with long names (1,000 identities) and 2,000 IPv6 CIDR rules: the
first start and a change of all of them are far larger than that. A workload of the small test
topology stays in the manifests throughout, so every step also shows the gateway still enforcing.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.test_daemon import CLUSTER, POLICY, Daemon, source_seen, wait_for
from tests.kernel.topology import SERVER4, Topology, topology

STOCK_WMEM_MAX = 212_992
NAMESPACES = 1000
PODS_PER_NAMESPACE = 16


def namespace(index: int) -> str:
    return f"team-{index:04d}-" + "a" * 50  # 60 characters: long identity comments


def big_cluster(generation: int) -> str:
    """1,000 namespaces of 16 pods each, and a policy per namespace with two IPv6 CIDR rules.
    Every address and every CIDR depends on ``generation``: a new one changes all of them."""
    docs: list[str] = [
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: big}\n"
        "spec:\n  namespaceSelector: {matchLabels: {project: big}}\n"
        '  egressIPs: ["198.51.100.30", "2001:db8:100::30"]\n'
    ]
    base = ipaddress.IPv6Address(f"2001:db8:1:{0x100 + generation:x}::")
    for n in range(NAMESPACES):
        name = namespace(n)
        meta = f"{{name: {name}, labels: {{project: big}}}}"
        docs.append(f"apiVersion: v1\nkind: Namespace\nmetadata: {meta}\n")
        for p in range(PODS_PER_NAMESPACE):
            address = base + n * PODS_PER_NAMESPACE + p + 1
            docs.append(
                f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p{p}, namespace: {name}, "
                f'labels: {{app: worker}}}}\nstatus:\n  podIPs: [{{ip: "{address}"}}]\n'
            )
        nets = [f"2001:db8:{2 + generation}:{n:x}::/64", f"2001:db8:{20 + generation}:{n:x}::/64"]
        docs.append(
            "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
            f"metadata: {{name: services, namespace: {name}}}\nspec:\n  podSelector: {{}}\n"
            "  egress:\n"
            + "".join(
                f'    - {{to: [{{cidr: "{net}"}}], ports: [{{protocol: TCP, port: 443}}]}}\n'
                for net in nets
            )
        )
    return "---\n".join(docs)


def elements(topo: Topology, set_name: str) -> list[object]:
    kind = "map" if set_name.startswith("workloads") else "set"
    listed = json.loads(topo.nft("-j", "list", kind, "inet", "egressgw", set_name))
    for item in listed["nftables"]:
        if "set" in item or "map" in item:
            found: list[object] = (item.get("set") or item["map"]).get("elem", [])
            return found
    return []


def nft(topo: Topology, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", topo.gateway, "nft", *args], check=True)


@pytest.fixture
def big(tmp_path: Path) -> Iterator[tuple[Topology, Daemon]]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(CLUSTER)
    (manifests / "policy.yaml").write_text(POLICY % "{protocol: TCP, port: 5432}")
    (manifests / "big.yaml").write_text(big_cluster(0))
    with topology() as topo:
        topo.listen(SERVER4, 5432)
        extra = ["--netlink-buffer-bytes", str(STOCK_WMEM_MAX)]
        daemon = Daemon(topo, manifests, tmp_path / "egressgw.log", extra)
        try:
            took = daemon.start(timeout=120)
            print(f"\n16,000 workloads: ready {took:.1f} s after start")
            yield topo, daemon
        finally:
            daemon.stop()


def test_a_change_larger_than_a_transaction_goes_in_whole_and_a_failed_apply_is_retried(
    big: tuple[Topology, Daemon],
) -> None:
    topo, daemon = big
    # one start brought everything in, in steps, under a stock socket buffer
    assert "larger than one transaction; applying it in steps" in daemon.log()
    assert len(elements(topo, "workloads6")) == NAMESPACES * PODS_PER_NAMESPACE + 1
    assert len(elements(topo, "allow6_net")) == 2 * NAMESPACES + 1
    assert len(elements(topo, "identities")) == NAMESPACES + 1
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"

    # a change of all of them applies
    offset = len(daemon.log())
    started = time.monotonic()
    (daemon.manifests / "big.yaml").write_text(big_cluster(1))
    took = wait_for(lambda: "applied:" in daemon.log()[offset:], "the change to apply", 120)
    print(f"a change of all of them: applied {took:.1f} s after the file changed")
    workloads = json.dumps(elements(topo, "workloads6"))
    assert "2001:db8:1:101::1" in workloads and "2001:db8:1:100::1" not in workloads
    assert len(elements(topo, "workloads6")) == NAMESPACES * PODS_PER_NAMESPACE + 1
    boxes = json.dumps(elements(topo, "allow6_net"))
    assert "2001:db8:3:" in boxes and "2001:db8:2:" not in boxes
    assert daemon.readyz()[0] == 200
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"
    assert time.monotonic() - started < 120

    # a failed apply: the kernel already maps an address of the next change elsewhere
    clash = "2001:db8:1:102::1"
    nft(topo, "add", "element", "inet", "egressgw", "workloads6", f"{{ {clash} : 0x00777777 }}")
    retries = daemon.metric("egressgw_apply_retries_total")
    offset = len(daemon.log())
    (daemon.manifests / "big.yaml").write_text(big_cluster(2))
    wait_for(lambda: daemon.readyz()[0] == 503, "/readyz to report the failed apply", 120)
    status, reason = daemon.readyz()
    print(f"/readyz while the apply fails: {status} {reason.strip()}")
    assert "could not be applied" in reason and "File exists" in reason, reason
    wait_for(
        lambda: daemon.metric("egressgw_apply_retries_total") > retries,
        "a retry",
        10,
    )
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"  # the old state is in force

    nft(topo, "delete", "element", "inet", "egressgw", "workloads6", f"{{ {clash} }}")
    took = wait_for(lambda: daemon.readyz()[0] == 200, "the retried apply to succeed", 60)
    print(f"ready again {took:.1f} s after the clash was removed")
    assert "could not apply the new state; retrying with backoff" in daemon.log()[offset:]
    assert clash in json.dumps(elements(topo, "workloads6"))
    assert source_seen(topo, SERVER4, 5432) == "198.51.100.10"
