"""The loader: example policies load as written; each broken manifest gives its exact message."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from egressgw.policy.load import (
    Problem,
    build_snapshot,
    files_in,
    load_paths,
    parse_object,
    walk,
)
from egressgw.policy.model import (
    Action,
    EgressGateway,
    EgressPolicy,
    LabelSelector,
    Mode,
    Namespace,
    Node,
    Peer,
    Pod,
    PortSpec,
    Protocol,
    SelectorOperator,
    SelectorRequirement,
)
from egressgw.policy.schema import CRD_DIR, crd_schema

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
BROKEN = REPO / "tests" / "testdata" / "broken"
BROKEN_FILES = sorted(BROKEN.glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path} must start with '# expect: <message>'"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", BROKEN_FILES, ids=[p.name for p in BROKEN_FILES])
def test_broken_manifest_gives_its_message(path: Path) -> None:
    result = load_paths([path])
    lines = [str(p) for p in result.problems]
    assert any(expectation(path) in line for line in lines), lines
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_there_are_broken_examples() -> None:
    assert len(BROKEN_FILES) >= 20


def test_example_policies_load_exactly() -> None:
    result = load_paths([POLICIES])
    assert result.problems == []
    assert result.files == {
        str(POLICIES / "analytics.yaml"): 1,
        str(POLICIES / "gateways.yaml"): 2,
        str(POLICIES / "payments.yaml"): 1,
    }
    ip = ipaddress.ip_address
    net = ipaddress.ip_network
    assert result.snapshot.gateways == (
        EgressGateway(
            name="analytics",
            namespace_selector=LabelSelector((("project", "analytics"),)),
            egress_ips=(ip("198.51.100.20"), ip("2001:db8:100::20")),
            # held by a gateway node of the project's egress group (the lab's gateway nodes)
            node_selector=LabelSelector(
                (("egressgw.io/egress-group", "analytics"), ("egressgw.io/gateway", "true"))
            ),
            default_action=Action.DENY,
        ),
        EgressGateway(
            name="payments",
            namespace_selector=LabelSelector((("project", "payments"),)),
            egress_ips=(ip("198.51.100.10"), ip("2001:db8:100::10")),
            # held by a gateway node of the project's egress group (the lab's gateway nodes)
            node_selector=LabelSelector(
                (("egressgw.io/egress-group", "payments"), ("egressgw.io/gateway", "true"))
            ),
            default_action=Action.DENY,
        ),
    )
    database_peers = (
        Peer(fqdn="db.lab.example"),
        Peer(cidr=net("203.0.113.10/32")),
        Peer(cidr=net("2001:db8:203::10/128")),
    )
    postgres = (PortSpec(Protocol.TCP, 5432),)
    analytics, payments = result.snapshot.policies
    assert analytics.namespace == "analytics"
    assert analytics.pod_selector == LabelSelector((("app", "etl"),))
    assert analytics.mode is Mode.ENFORCE
    assert [(r.action, r.to, r.ports) for r in analytics.egress] == [
        (Action.ALLOW, database_peers, postgres)
    ]
    assert payments.namespace == "payments"
    assert payments.pod_selector == LabelSelector((("app", "api"),))
    web_peers = (
        Peer(fqdn="web.lab.example"),
        Peer(fqdn_pattern="*.cdn.lab.example"),
        Peer(fqdn="alias.lab.example"),
    )
    test_peers = (
        Peer(fqdn_pattern="*.race.lab.example"),
        Peer(fqdn="many.lab.example"),
        Peer(fqdn="short.lab.example"),
    )
    assert [(r.action, r.to, r.ports) for r in payments.egress] == [
        (Action.ALLOW, database_peers, postgres),
        (Action.ALLOW, web_peers, (PortSpec(Protocol.TCP, 80),)),
        (Action.ALLOW, test_peers, (PortSpec(Protocol.TCP, 9000),)),
    ]


def policy(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "egressgw.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "p", "namespace": "ns", "generation": 3},
        "spec": {"podSelector": {}, **spec},
    }


def gateway(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "egressgw.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": "gw"},
        "spec": {"namespaceSelector": {}, "egressIPs": ["198.51.100.1"], **spec},
    }


def messages(doc: dict[str, Any]) -> list[str]:
    obj, problems = parse_object(doc, source="<api>")
    assert obj is None or not problems
    return [str(p) for p in problems]


def test_defaults_and_full_conversion() -> None:
    doc = policy(
        podSelector={
            "matchLabels": {"app": "api", "example.com/tier": ""},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "staging"]},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        },
        egress=[
            {"to": [{"fqdnPattern": "**.Example.COM."}]},
            {
                "action": "Deny",
                "to": [{"fqdn": "Bad.Example.com."}, {"cidr": "2001:db8::/32"}],
                "ports": [{"port": 8000, "endPort": 8100}, {"protocol": "UDP"}],
            },
        ],
    )
    obj, problems = parse_object(doc, source="<api>")
    assert problems == []
    assert obj == EgressPolicy(
        namespace="ns",
        name="p",
        pod_selector=LabelSelector(
            (("app", "api"), ("example.com/tier", "")),
            (
                SelectorRequirement("env", SelectorOperator.IN, ("prod", "staging")),
                SelectorRequirement("legacy", SelectorOperator.DOES_NOT_EXIST),
            ),
        ),
        mode=Mode.ENFORCE,
        egress=(
            policy_rule(Action.ALLOW, (Peer(fqdn_pattern="**.example.com"),), ()),
            policy_rule(
                Action.DENY,
                (Peer(fqdn="bad.example.com"), Peer(cidr=ipaddress.ip_network("2001:db8::/32"))),
                (PortSpec(Protocol.TCP, 8000, 8100), PortSpec(Protocol.UDP)),
            ),
        ),
        generation=3,
    )


def policy_rule(action: Action, to: tuple[Peer, ...], ports: tuple[PortSpec, ...]) -> Any:
    from egressgw.policy.model import EgressRule

    return EgressRule(action, to, ports)


def test_gateway_defaults() -> None:
    obj, problems = parse_object(gateway(), source="<api>")
    assert problems == []
    assert obj == EgressGateway(
        name="gw",
        namespace_selector=LabelSelector(),
        egress_ips=(ipaddress.ip_address("198.51.100.1"),),
        node_selector=None,
        default_action=Action.DENY,
    )
    obj, _ = parse_object(gateway(nodeSelector={"matchLabels": {"gw": "yes"}}), source="<api>")
    assert isinstance(obj, EgressGateway)
    assert obj.node_selector == LabelSelector((("gw", "yes"),))


def test_namespace_and_pod() -> None:
    ns, problems = parse_object(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments"}},
        source="<api>",
    )
    assert problems == []
    assert ns == Namespace("payments", {"kubernetes.io/metadata.name": "payments"})
    pod_doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api-0", "labels": {"app": "api"}, "uid": "ignored"},
        "spec": {"containers": [{"name": "x", "image": "ignored"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}]},
    }
    pod, problems = parse_object(pod_doc, source="<api>")
    assert problems == []
    assert pod == Pod(
        "default",
        "api-0",
        {"app": "api"},
        (ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("2001:db8::10")),
    )
    pending = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"}}
    assert parse_object(pending, source="<api>") == (Pod("x", "p"), [])


def node(*addresses: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "worker-1", **metadata},
        "status": {"addresses": list(addresses)},
    }


def test_a_pod_is_on_the_node_its_spec_names() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api-0", "namespace": "payments"},
        "spec": {"nodeName": "worker-1", "containers": [{"name": "x", "image": "ignored"}]},
        "status": {"podIPs": [{"ip": "192.0.2.10"}]},
    }
    assert parse_object(doc, source="<api>") == (
        Pod("payments", "api-0", {}, (ipaddress.ip_address("192.0.2.10"),), "worker-1"),
        [],
    )
    for spec in ({}, {"nodeName": ""}, None):
        unscheduled, problems = parse_object({**doc, "spec": spec}, source="<api>")
        assert problems == []
        assert isinstance(unscheduled, Pod) and unscheduled.node_name == ""


def test_a_node_keeps_its_labels_and_internal_ips_in_order() -> None:
    doc = node(
        {"type": "Hostname", "address": "worker-1"},
        {"type": "ExternalIP", "address": "203.0.113.1"},
        {"type": "InternalIP", "address": "2001:db8::11"},
        {"type": "InternalIP", "address": "192.0.2.11"},
        {"type": "InternalIP", "address": "192.0.2.11"},
        labels={"egressgw.io/gateway": "true", "node-role.kubernetes.io/worker": ""},
    )
    doc["spec"] = {"podCIDR": "10.244.1.0/24", "taints": []}
    obj, problems = parse_object(doc, source="<api>")
    assert problems == []
    assert obj == Node(
        "worker-1",
        {"egressgw.io/gateway": "true", "node-role.kubernetes.io/worker": ""},
        (ipaddress.ip_address("2001:db8::11"), ipaddress.ip_address("192.0.2.11")),
    )
    assert isinstance(obj, Node) and obj.tunnel_address == ipaddress.ip_address("192.0.2.11")


def test_a_node_without_status_has_no_address() -> None:
    doc = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker-1"}}
    assert parse_object(doc, source="<api>") == (Node("worker-1"), [])
    doc["status"] = {"addresses": None}
    assert parse_object(doc, source="<api>") == (Node("worker-1"), [])


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            node({"type": "InternalIP", "address": "192.0.2.300"}),
            '<api>: Node/worker-1: status.addresses[0].address: "192.0.2.300" is not an IP'
            " address: write one IPv4 or IPv6 address, e.g. 198.51.100.10 or 2001:db8::10 (no"
            " prefix length)",
        ),
        (
            node({"type": "Hostname", "address": "w"}, {"type": "InternalIP", "address": "::1"}),
            "<api>: Node/worker-1: status.addresses[1].address: ::1 cannot carry the tunnel"
            " between nodes: use the address other nodes reach this node at",
        ),
        (
            node({"type": "InternalIP"}),
            "<api>: Node/worker-1: status.addresses[0].address: required field is missing: add it",
        ),
        (
            node({"type": "InternalIP", "address": 3232235777}),
            "<api>: Node/worker-1: status.addresses[0].address: expected a string, got an"
            ' integer: put the value in quotes, e.g. "3232235777"',
        ),
        (
            {**node(), "status": None},
            "<api>: Node/worker-1: status: expected a mapping, got null",
        ),
        (
            node(name="Worker_1"),
            '<api>: Node/Worker_1: metadata.name: invalid name "Worker_1": use lower-case letters,'
            " digits, '-' and '.' (at most 253), starting and ending with a letter or digit",
        ),
        (
            node(namespace="default"),
            "<api>: Node/worker-1: metadata.namespace: Node is cluster-scoped: remove"
            " metadata.namespace",
        ),
        (
            node(labels={"zone": "a b"}),
            '<api>: Node/worker-1: metadata.labels.zone: invalid label value "a b": use at most 63'
            " letters, digits, '-', '_' or '.', starting and ending with a letter or digit (or an"
            " empty value)",
        ),
        (
            {**node(), "apiVersion": "v2"},
            '<api>: Node/worker-1: apiVersion: apiVersion "v2" is not supported: use apiVersion:'
            " v1",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"nodeName": 7}},
            "<api>: Pod/default/p: spec.nodeName: expected a string, got an integer: put the"
            ' value in quotes, e.g. "7"',
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p"},
                "spec": {"nodeName": "Worker 1"},
            },
            '<api>: Pod/default/p: spec.nodeName: invalid node name "Worker 1": use the name of a'
            " Node, lower-case letters, digits, '-' and '.' (at most 253), starting and ending"
            " with a letter or digit",
        ),
    ],
)
def test_node_problem_messages(doc: dict[str, Any], expected: str) -> None:
    assert messages(doc) == [expected]


def test_nodes_are_sorted_and_a_duplicate_is_a_problem_that_keeps_the_rest(
    tmp_path: Path,
) -> None:
    internal = "status: {addresses: [{type: InternalIP, address: %s}]}\n"
    node_doc = "apiVersion: v1\nkind: Node\nmetadata: {name: %s}\n" + internal
    write(
        tmp_path / "a.yaml",
        node_doc % ("worker-2", "192.0.2.12")
        + "---\n"
        + node_doc % ("worker-1", "192.0.2.11")
        + "---\n"
        + node_doc % ("worker-3", "192.0.2.1300")
        + "---\n"
        + NAMESPACE_DOC % "payments",
    )
    write(tmp_path / "b.yaml", node_doc % ("worker-1", "192.0.2.99"))
    result = load_paths([tmp_path])
    assert [str(p) for p in result.problems] == [
        f'{tmp_path / "a.yaml"}: Node/worker-3: status.addresses[0].address: "192.0.2.1300" is'
        " not an IP address: write one IPv4 or IPv6 address, e.g. 198.51.100.10 or"
        " 2001:db8::10 (no prefix length)",
        f"{tmp_path / 'b.yaml'}: Node/worker-1: already defined in {tmp_path / 'a.yaml'}:"
        " define each object once; this copy is ignored",
    ]
    assert result.snapshot.nodes == (
        Node("worker-1", {}, (ipaddress.ip_address("192.0.2.11"),)),
        Node("worker-2", {}, (ipaddress.ip_address("192.0.2.12"),)),
    )
    assert list(result.snapshot.namespaces) == ["payments"]
    assert result.files == {str(tmp_path / "a.yaml"): 3, str(tmp_path / "b.yaml"): 0}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            policy(egress=[{"to": []}]),
            "<api>: EgressPolicy/ns/p: spec.egress[0].to: needs at least 1 entry: add one",
        ),
        (
            policy(egress=[{"to": [{}]}]),
            "<api>: EgressPolicy/ns/p: spec.egress[0].to[0]: set exactly one of fqdn,"
            " fqdnPattern, cidr (found none); use one list entry per destination",
        ),
        (
            policy(egress=[{"to": [{"fqdn": "a.example", "fqdnPattern": "*.a", "cidr": "::/0"}]}]),
            "<api>: EgressPolicy/ns/p: spec.egress[0].to[0]: set exactly one of fqdn,"
            " fqdnPattern, cidr (found fqdn, fqdnPattern, cidr); use one list entry per"
            " destination",
        ),
        (
            policy(egress=[{"to": [{"cidr": "10.0.0.0/8"}], "ports": [{"protocol": "ICMP"}]}]),
            '<api>: EgressPolicy/ns/p: spec.egress[0].ports[0].protocol: unsupported value "ICMP":'
            ' use one of "TCP", "UDP", "SCTP" (case matters)',
        ),
        (
            policy(egress=[{"to": [{"cidr": "10.0.0.0/8"}], "ports": [{"port": 0}]}]),
            "<api>: EgressPolicy/ns/p: spec.egress[0].ports[0].port: 0 is out of range: use"
            " 1..65535",
        ),
        (
            policy(egress=[{"to": [{"cidr": "10.0.0.0/8"}], "ports": [{"port": "443"}]}]),
            "<api>: EgressPolicy/ns/p: spec.egress[0].ports[0].port: expected an integer, got a"
            " string",
        ),
        (
            policy(egress="everything"),
            "<api>: EgressPolicy/ns/p: spec.egress: expected a list, got a string",
        ),
        (
            policy(podSelector={"matchLabels": {"on": True}}),
            "<api>: EgressPolicy/ns/p: spec.podSelector.matchLabels.on: expected a string, got a"
            ' boolean: put the value in quotes, e.g. "True"',
        ),
        (
            policy(podSelector={"matchLabels": {"app": "has space"}}),
            '<api>: EgressPolicy/ns/p: spec.podSelector.matchLabels.app: invalid label value "has'
            " space\": use at most 63 letters, digits, '-', '_' or '.', starting and ending with a"
            " letter or digit (or an empty value)",
        ),
        (
            policy(colour="blue"),
            '<api>: EgressPolicy/ns/p: spec.colour: unknown field "colour": remove it or fix its'
            " spelling (fields here: egress, mode, podSelector)",
        ),
        (
            {**policy(), "spec": {"egress": []}},
            "<api>: EgressPolicy/ns/p: spec.podSelector: required field is missing: add it",
        ),
        (
            {**policy(), "spec": None},
            "<api>: EgressPolicy/ns/p: spec: expected a mapping, got null",
        ),
        (
            gateway(egressIPs=[]),
            "<api>: EgressGateway/gw: spec.egressIPs: needs at least 1 entry: add one",
        ),
        (
            gateway(egressIPs=["198.51.100.1", "198.51.100.1"]),
            "<api>: EgressGateway/gw: spec.egressIPs[1]: 198.51.100.1 is listed twice: remove the"
            " duplicate",
        ),
        (
            gateway(egressIPs=["0.0.0.0"]),
            "<api>: EgressGateway/gw: spec.egressIPs[0]: 0.0.0.0 cannot be a source address: use"
            " a unicast address",
        ),
        (
            gateway(egressIPs=["198.51.100.0/24"]),
            '<api>: EgressGateway/gw: spec.egressIPs[0]: "198.51.100.0/24" is not an IP address:'
            " write one IPv4 or IPv6 address, e.g. 198.51.100.10 or 2001:db8::10 (no prefix"
            " length)",
        ),
        (
            gateway(egressIPs=["fe80::1"]),
            "<api>: EgressGateway/gw: spec.egressIPs[0]: fe80::1 is link-local and cannot leave"
            " its link: use another",
        ),
        (
            gateway(defaultAction="Reject"),
            '<api>: EgressGateway/gw: spec.defaultAction: unsupported value "Reject": use one of'
            ' "Allow", "Deny" (case matters)',
        ),
        (
            {"apiVersion": "v1", "metadata": {"name": "x"}},
            "<api>: ?/x: kind: kind is missing: set it to one of EgressGateway, EgressPolicy,"
            " Namespace, Pod, Node",
        ),
        (
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {}},
            "<api>: Namespace/?: metadata.name: required field is missing: add it",
        ),
        (
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}},
            '<api>: Namespace/a.b: metadata.name: invalid name "a.b": use lower-case letters,'
            " digits and '-' (at most 63), starting and ending with a letter or digit",
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "A"}},
            '<api>: Pod/A/p: metadata.namespace: invalid namespace "A": use at most 63'
            " lower-case letters, digits and '-', starting and ending with a letter or digit",
        ),
        (
            {"kind": "Pod", "metadata": {"name": "p"}},
            "<api>: Pod/default/p: apiVersion: apiVersion is missing: use apiVersion: v1",
        ),
    ],
)
def test_problem_messages(doc: dict[str, Any], expected: str) -> None:
    assert expected in messages(doc)


def test_all_problems_of_a_document_are_reported_at_once() -> None:
    doc = policy(mode="audit", egress=[{"action": "allow", "to": [{"cidr": "x"}]}])
    assert [p.split(": ", 3)[2] for p in messages(doc)] == ["spec.egress[0].action", "spec.mode"]


def test_not_a_mapping() -> None:
    obj, problems = parse_object(["a", "list"], source="f.yaml")  # type: ignore[arg-type]
    assert obj is None
    assert [str(p) for p in problems] == [
        "f.yaml: a manifest must be a mapping with apiVersion, kind and metadata; got list"
    ]


def test_same_message_from_a_file_and_from_the_api(tmp_path: Path) -> None:
    doc = policy(egress=[{"to": [{"cidr": "203.0.113.1/24"}]}])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    from_file = load_paths([path]).problems
    _, from_api = parse_object(doc, source="<api>")
    assert [(p.field, p.message) for p in from_file] == [(p.field, p.message) for p in from_api]
    assert from_file[0].file == str(path)
    assert from_api[0].file == "<api>"


@pytest.mark.parametrize(
    ("problem", "text"),
    [
        (
            Problem("a.yaml", "EgressPolicy", "ns", "db", "spec.mode", "bad"),
            "a.yaml: EgressPolicy/ns/db: spec.mode: bad",
        ),
        (
            Problem("a.yaml", "EgressGateway", None, "gw", "spec.egressIPs[0]", "bad"),
            "a.yaml: EgressGateway/gw: spec.egressIPs[0]: bad",
        ),
        (Problem("<api>", "EgressGateway", None, "gw", "", "bad"), "<api>: EgressGateway/gw: bad"),
        (Problem("a.yaml", "?", None, "?", "", "invalid YAML"), "a.yaml: invalid YAML"),
    ],
)
def test_problem_format(problem: Problem, text: str) -> None:
    assert str(problem) == text


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


NAMESPACE_DOC = "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n"


def test_directories_are_read_recursively_sorted_and_hidden_names_skipped(tmp_path: Path) -> None:
    write(tmp_path / "b.yaml", NAMESPACE_DOC % "b")
    write(tmp_path / "sub" / "a.yml", NAMESPACE_DOC % "a" + "---\n" + NAMESPACE_DOC % "c")
    write(tmp_path / "notes.txt", "not yaml")
    write(tmp_path / ".b.yaml.swp", NAMESPACE_DOC % "swap")
    write(tmp_path / "..2024_01_01" / "b.yaml", NAMESPACE_DOC % "b")
    result = load_paths([tmp_path])
    assert result.problems == []
    assert result.files == {str(tmp_path / "b.yaml"): 1, str(tmp_path / "sub" / "a.yml"): 2}
    assert sorted(result.snapshot.namespaces) == ["a", "b", "c"]


def test_hidden_names_are_skipped_at_every_level(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", NAMESPACE_DOC % "a")
    write(tmp_path / "sub" / ".hidden" / "b.yaml", NAMESPACE_DOC % "b")
    write(tmp_path / "sub" / ".b.yaml", NAMESPACE_DOC % "b")
    write(tmp_path / "sub" / "..data" / "b.yaml", NAMESPACE_DOC % "b")
    write(tmp_path / "sub" / "c.yml", NAMESPACE_DOC % "c")
    assert files_in(tmp_path) == [tmp_path / "a.yaml", tmp_path / "sub" / "c.yml"]
    # the directory given may itself be hidden: only what is below it counts
    assert files_in(tmp_path / "sub" / ".hidden") == [tmp_path / "sub" / ".hidden" / "b.yaml"]


def test_a_file_reached_by_two_names_is_read_once(tmp_path: Path) -> None:
    write(tmp_path / "b.yaml", NAMESPACE_DOC % "b")
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "c.yaml").hardlink_to(tmp_path / "b.yaml")
    (tmp_path / "same").symlink_to(".", target_is_directory=True)
    (tmp_path / "dangling.yaml").symlink_to("nowhere.yaml")
    assert files_in(tmp_path) == [tmp_path / "a.yaml"]
    for paths in ([tmp_path], [tmp_path, tmp_path], [tmp_path / "b.yaml", tmp_path]):
        result = load_paths(paths)
        assert result.problems == [], paths
        assert sum(result.files.values()) == 1, paths


def test_symlinked_directories_are_followed_only_inside_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    write(root / "real" / "a.yaml", NAMESPACE_DOC % "a")
    write(tmp_path / "elsewhere" / "b.yaml", NAMESPACE_DOC % "b")
    (root / "inside").symlink_to("real", target_is_directory=True)
    (root / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "real" / "loop").symlink_to("..", target_is_directory=True)
    assert files_in(root) == [root / "inside" / "a.yaml"]


def configmap(root: Path, generation: str, files: dict[str, str]) -> None:
    """A ConfigMap volume as the kubelet lays it out (items paths may have directories)."""
    for name, text in files.items():
        write(root / generation / name, text)
    (root / "..data").symlink_to(generation)
    for name in {n.split("/")[0] for n in files}:
        (root / name).symlink_to(f"..data/{name}")


def test_a_configmap_mount_is_read_by_its_visible_names(tmp_path: Path) -> None:
    old = {"a.yaml": NAMESPACE_DOC % "old", "sub/b.yaml": NAMESPACE_DOC % "b"}
    configmap(tmp_path, "..2026_12_01_19_00_00.111111111", old)
    (tmp_path / "..data").unlink()
    (tmp_path / "a.yaml").unlink()
    (tmp_path / "sub").unlink()
    new = {"a.yaml": NAMESPACE_DOC % "a", "sub/b.yaml": NAMESPACE_DOC % "b"}
    configmap(tmp_path, "..2026_12_01_20_00_00.123456789", new)
    result = load_paths([tmp_path])
    assert result.problems == []
    assert result.files == {str(tmp_path / "a.yaml"): 1, str(tmp_path / "sub" / "b.yaml"): 1}
    assert sorted(result.snapshot.namespaces) == ["a", "b"]
    generation = tmp_path / "..2026_12_01_20_00_00.123456789"
    assert [(f.path, f.target, f.pinned) for f in walk(tmp_path)] == [
        (tmp_path / "a.yaml", generation / "a.yaml", True),
        (tmp_path / "sub" / "b.yaml", generation / "sub" / "b.yaml", True),
    ]


def test_empty_documents_are_ignored(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.yaml", "---\n# only a comment\n---\n" + NAMESPACE_DOC % "a" + "---\n"
    )
    result = load_paths([path])
    assert result.problems == []
    assert result.files == {str(path): 1}


def test_missing_path() -> None:
    result = load_paths(["/nonexistent/policies"])
    assert [str(p) for p in result.problems] == ["/nonexistent/policies: no such file or directory"]


def test_a_loop_of_links_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    result = load_paths([tmp_path / "a.yaml"])
    assert [str(p) for p in result.problems] == [
        f"{tmp_path / 'a.yaml'}: cannot read the file: [Errno 40] Too many levels of symbolic"
        f" links: '{tmp_path / 'a.yaml'}'"
    ]


def test_a_bad_document_does_not_hide_the_good_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.yaml",
        NAMESPACE_DOC % "good" + "---\n" + NAMESPACE_DOC % "Bad" + "---\n" + NAMESPACE_DOC % "ok",
    )
    result = load_paths([path])
    assert [p.name for p in result.problems] == ["Bad"]
    assert sorted(result.snapshot.namespaces) == ["good", "ok"]
    assert result.files == {str(path): 2}


def test_duplicates_across_files_keep_the_first(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", NAMESPACE_DOC % "same")
    write(tmp_path / "b.yaml", NAMESPACE_DOC % "same")
    result = load_paths([tmp_path])
    assert [str(p) for p in result.problems] == [
        f"{tmp_path / 'b.yaml'}: Namespace/same: already defined in {tmp_path / 'a.yaml'}: define"
        " each object once; this copy is ignored"
    ]
    assert result.files == {str(tmp_path / "a.yaml"): 1, str(tmp_path / "b.yaml"): 0}


def test_same_name_in_other_namespace_or_kind_is_not_a_duplicate() -> None:
    a = parse_object(policy(), source="x")[0]
    b = parse_object({**policy(), "metadata": {"name": "p", "namespace": "other"}}, source="x")[0]
    c = parse_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}, source="x")[0]
    assert a is not None and b is not None and c is not None
    snapshot, problems = build_snapshot([("x", a), ("x", b), ("x", c)])
    assert problems == []
    assert len(snapshot.policies) == 2
    assert len(snapshot.pods) == 1


def test_crd_files_ship_inside_the_package() -> None:
    for name in ("egressgateways.yaml", "egresspolicies.yaml"):
        packaged = CRD_DIR / name
        assert packaged.is_symlink()
        assert packaged.resolve() == (REPO / "manifests" / "crds" / name).resolve()


def test_crds_reject_unknown_fields_and_keep_enums() -> None:
    policy_schema = crd_schema("EgressPolicy")
    rule = policy_schema["properties"]["spec"]["properties"]["egress"]["items"]
    assert rule["additionalProperties"] is False
    assert rule["properties"]["action"]["enum"] == ["Allow", "Deny"]
    port = rule["properties"]["ports"]["items"]["properties"]["port"]
    assert (port["minimum"], port["maximum"]) == (1, 65535)
    # selectors hold free-form label maps: those must not reject unknown keys
    selector = policy_schema["properties"]["spec"]["properties"]["podSelector"]
    assert selector["properties"]["matchLabels"]["additionalProperties"] == {"type": "string"}


def test_crds_are_structural_enough_for_the_api_server() -> None:
    for name in ("egressgateways.yaml", "egresspolicies.yaml"):
        crd = yaml.safe_load((REPO / "manifests" / "crds" / name).read_text())
        (version,) = crd["spec"]["versions"]
        assert version["subresources"] == {"status": {}}
        assert "status" in version["schema"]["openAPIV3Schema"]["properties"]

        def walk(node: Any, where: str) -> None:
            if isinstance(node, dict):
                # the API server forbids these in structural schemas
                assert "uniqueItems" not in node, where
                assert not ("properties" in node and "additionalProperties" in node), where
                if "properties" in node:
                    assert node.get("type") == "object", where
                for key, value in node.items():
                    walk(value, f"{where}.{key}")
            elif isinstance(node, list):
                for index, value in enumerate(node):
                    walk(value, f"{where}[{index}]")

        walk(version["schema"]["openAPIV3Schema"], name)
