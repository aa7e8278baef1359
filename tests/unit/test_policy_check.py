"""``egressgw policy check``: one line per problem, a summary, and the exit status."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from egressgw.policy.check import check_paths

REPO = Path(__file__).resolve().parents[2]


def run(paths: list[str]) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = check_paths(paths, out)
    return status, out.getvalue().splitlines()


def test_example_policies_are_valid() -> None:
    status, lines = run([str(REPO / "policies")])
    assert (status, lines) == (0, [f"{REPO / 'policies'}: 4 objects, all valid"])


def test_problems_are_listed_then_summarised(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: good}\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad}\n"
    )
    (tmp_path / "b.yaml").write_text("kind: [\n")
    status, lines = run([str(tmp_path)])
    assert status == 1
    assert lines == [
        f'{tmp_path / "a.yaml"}: Namespace/Bad: metadata.name: invalid name "Bad": use'
        " lower-case letters, digits and '-' (at most 63), starting and ending with a letter or"
        " digit",
        f"{tmp_path / 'b.yaml'}: invalid YAML at line 2, column 1: while parsing a flow node,"
        " did not find expected node content",
        f"{tmp_path}: 1 valid object, 2 problems",
    ]


def test_a_directory_given_twice_is_read_once() -> None:
    policies = str(REPO / "policies")
    status, lines = run([policies, policies, f"{policies}/payments.yaml"])
    assert (status, lines) == (
        0,
        [f"{policies}, {policies}, {policies}/payments.yaml: 4 objects, all valid"],
    )


def test_nothing_to_check_is_a_failure(tmp_path: Path) -> None:
    assert run([str(tmp_path)]) == (1, [f"{tmp_path}: no *.yaml or *.yml files found"])


def test_broken_testdata_fails() -> None:
    status, lines = run([str(REPO / "tests" / "testdata" / "broken")])
    assert status == 1
    assert lines[-1].endswith("problems")


NODES = """\
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {project: payments}}
---
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: payments}
spec:
  namespaceSelector: {matchLabels: {project: payments}}
  egressIPs: ["198.51.100.10", "2001:db8:100::10"]
  nodeSelector: {matchLabels: {egressgw.io/gateway: "true"}}
---
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: anywhere}
spec:
  namespaceSelector: {matchLabels: {project: analytics}}
  egressIPs: ["198.51.100.20"]
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: payments}
spec: {nodeName: worker-1}
status: {podIPs: [{ip: 192.0.2.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: payments}
spec: {nodeName: worker-9}
status: {podIPs: [{ip: 192.0.2.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: payments}
status: {podIPs: [{ip: 192.0.2.12}]}
---
apiVersion: v1
kind: Node
metadata: {name: worker-1}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}, {type: Hostname, address: w1}]}
---
apiVersion: v1
kind: Node
metadata: {name: worker-2}
status:
  addresses:
    - {type: InternalIP, address: "2001:db8::2"}
    - {type: InternalIP, address: 192.0.2.1}
---
apiVersion: v1
kind: Node
metadata: {name: worker-3}
"""


def test_nodes_that_leave_traffic_nowhere_are_warnings_and_errors_when_strict(
    tmp_path: Path,
) -> None:
    (tmp_path / "cluster.yaml").write_text(NODES)
    status, lines = run([str(tmp_path)])
    assert status == 0
    assert lines == [
        f"{tmp_path}: warning: Pod payments/api-1: spec.nodeName worker-9 names no Node in the"
        " manifests: add that Node, or fix the name",
        f"{tmp_path}: warning: EgressGateway payments: spec.nodeSelector matches no Node, so no"
        " node holds 198.51.100.10, 2001:db8:100::10 and the traffic of its pods is dropped:"
        " label a Node to match",
        f"{tmp_path}: warning: Node worker-3: status.addresses has no InternalIP, so the tunnel"
        " cannot reach it: add the address other nodes reach it at",
        f"{tmp_path}: warning: Nodes worker-1, worker-2 share the InternalIP 192.0.2.1: the"
        " tunnel cannot tell them apart; give each Node its own address",
        f"{tmp_path}: 9 objects, all valid, 4 conflicts (warnings)",
    ]
    out = io.StringIO()
    assert check_paths([str(tmp_path)], out, strict=True) == 1
    assert out.getvalue().splitlines()[0].startswith(f"{tmp_path}: error: Pod payments/api-1")
    assert out.getvalue().splitlines()[-1] == f"{tmp_path}: 9 objects, all valid, 4 conflicts"


def test_nodes_that_reach_everything_give_no_warning(tmp_path: Path) -> None:
    fixed = NODES.replace("worker-9", "worker-1").replace(
        "address: 192.0.2.1}\n", "address: 192.0.2.2}\n"
    )
    fixed = fixed.replace(
        "metadata: {name: worker-3}",
        "metadata: {name: worker-3, labels: {egressgw.io/gateway: 'true'}}\n"
        "status: {addresses: [{type: InternalIP, address: 192.0.2.3}]}",
    )
    (tmp_path / "cluster.yaml").write_text(fixed)
    assert run([str(tmp_path)]) == (0, [f"{tmp_path}: 9 objects, all valid"])


def test_without_nodes_nothing_is_said_about_them(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text(NODES.split("---\napiVersion: v1\nkind: Node")[0])
    assert run([str(tmp_path)]) == (0, [f"{tmp_path}: 6 objects, all valid"])


def test_a_broken_node_is_a_problem_and_the_rest_stays_valid(tmp_path: Path) -> None:
    (tmp_path / "nodes.yaml").write_text(
        "apiVersion: v1\nkind: Node\nmetadata: {name: worker-1}\n"
        "status: {addresses: [{type: InternalIP, address: worker-1.example}]}\n---\n"
        "apiVersion: v1\nkind: Node\nmetadata: {name: worker-2}\n"
        "status: {addresses: [{type: InternalIP, address: 192.0.2.2}]}\n"
    )
    status, lines = run([str(tmp_path)])
    assert (status, lines) == (
        1,
        [
            f"{tmp_path / 'nodes.yaml'}: Node/worker-1: status.addresses[0].address:"
            ' "worker-1.example" is not an IP address: write one IPv4 or IPv6 address, e.g.'
            " 198.51.100.10 or 2001:db8::10 (no prefix length)",
            f"{tmp_path}: 1 valid object, 1 problem",
        ],
    )


def test_what_kubectl_get_prints_is_checked_from_standard_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # kubectl get egresspolicies -A -o yaml: a v1 List, with the API server's metadata and status
    piped = (REPO / "tests" / "testdata" / "kubectl-get.yaml").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped)))
    assert run(["-", str(REPO / "policies"), "-"]) == (
        1,
        [
            f"{REPO / 'policies' / 'payments.yaml'}: EgressPolicy/payments/database: already"
            " defined in -: define each object once; this copy is ignored",
            f"-, {REPO / 'policies'}, -: 4 valid objects, 1 problem",
        ],
    )
