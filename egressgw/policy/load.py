"""Manifests (YAML files or API objects as dicts) -> validated model objects and problems.

In: paths of YAML files and directories, or one object dict (``parse_object``, e.g. from the
Kubernetes API). Out: a ``Snapshot`` of the valid objects, and every ``Problem`` found, each naming
the object, the field, what is wrong and how to fix it. The only I/O is reading the given files
(``-``: standard input, for ``policy check``).

Every object goes through ``parse_object``, so a file and an API object get the same words.
An object with any problem is left out of the snapshot; the caller decides what stays in force.

Choices worth knowing:

- kinds other than EgressGateway, EgressPolicy, Namespace, Pod and Node are reported as
  unsupported (CustomResourceDefinitions too), so running ``policy check`` on the wrong directory
  is obvious;
- in directories, ``*.yaml`` and ``*.yml`` are read recursively in sorted order, skipping names
  that start with "." (editor temporary files, a ConfigMap mount's ``..data`` and generations);
  a ConfigMap mount is read through its visible names, all in one generation, and a file reached
  by two names is read once (``walk``). The daemon's manifest source uses the same walk, reader
  and ``build_snapshot``, so it and ``policy check`` see the same objects and the same problems;
- a ``v1`` ``List`` stands for its items, so what ``kubectl get -o yaml`` prints can be read;
- a Pod without ``metadata.namespace`` is in "default", as with kubectl; an EgressPolicy must name
  its namespace, so a policy never lands in a namespace by accident;
- a Namespace gets the ``kubernetes.io/metadata.name`` label, as the API server sets it;
- of a Pod, ``spec.nodeName`` is read too (empty or absent: not scheduled); of a Node, its labels
  and the addresses of type InternalIP in ``status.addresses``, in order (other types are
  ignored, a repeated address is kept once, and an address that cannot carry the tunnel between
  nodes, such as 127.0.0.1, is a problem);
- an object defined twice keeps its first copy (in sorted file order); the later one is a problem;
- an egress IP listed by two EgressGateways stays with the gateway whose name sorts first.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

import yaml

from egressgw.policy import fqdn
from egressgw.policy.model import (
    API_VERSION,
    Action,
    EgressGateway,
    EgressPolicy,
    EgressRule,
    IPAddress,
    IPNetwork,
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
    Snapshot,
)
from egressgw.policy.schema import schema_problems

try:
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - PyYAML without libyaml
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

_T = TypeVar("_T")
KubeObject = Namespace | Pod | Node | EgressGateway | EgressPolicy
API_SOURCE = "<api>"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# kind -> (apiVersion, namespaced)
KINDS: dict[str, tuple[str, bool]] = {
    "EgressGateway": (API_VERSION, False),
    "EgressPolicy": (API_VERSION, True),
    "Namespace": ("v1", False),
    "Pod": ("v1", True),
    "Node": ("v1", False),
}
NODE_ADDRESS_TYPE = "InternalIP"  # the status.addresses entries a Node is reached at

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(rf"^{_DNS_LABEL}$")
_DNS_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one object (or one file), in words that say how to fix it."""

    file: str  # the path as given, or "<api>"
    kind: str  # "?" if unknown
    namespace: str | None
    name: str  # "?" if unknown
    field: str  # dotted path, e.g. "spec.egress[0].to[1].cidr"; "" for the whole document
    message: str

    def __str__(self) -> str:
        """``file: kind/namespace/name: field: message``; cluster-scoped objects have no
        namespace part, an empty field is left out, and a file-level problem (no object known)
        reads ``file: message``."""
        parts = [self.file]
        if (self.kind, self.name) != ("?", "?"):
            ident = [self.kind, self.namespace, self.name]
            parts.append("/".join(p for p in ident if p is not None))
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


@dataclass
class LoadResult:
    snapshot: Snapshot  # only valid objects
    problems: list[Problem]
    files: dict[str, int] = field(default_factory=dict)  # file -> objects loaded from it


class _Object:
    """Collects the problems of one document while it is being parsed."""

    def __init__(self, source: str, kind: str, namespace: str | None, name: str) -> None:
        self.source, self.kind, self.namespace, self.name = source, kind, namespace, name
        self.problems: list[Problem] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(
            Problem(self.source, self.kind, self.namespace, self.name, where, message)
        )


# --- fields -------------------------------------------------------------------------------


def _check_label_key(obj: _Object, where: str, key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    ok = bool(_LABEL_NAME_RE.match(name)) and len(name) <= 63
    if slash:
        ok = ok and bool(_DNS_SUBDOMAIN_RE.match(prefix)) and len(prefix) <= 253
    if not ok:
        obj.problem(
            where,
            f"invalid label key {fqdn.quoted(key)}: use an optional DNS-subdomain prefix and '/',"
            " then 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or"
            " digit (e.g. app or example.com/app)",
        )


def _check_label_value(obj: _Object, where: str, value: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE_RE.match(value):
        obj.problem(
            where,
            f"invalid label value {fqdn.quoted(value)}: use at most 63 letters, digits, '-', '_'"
            " or '.', starting and ending with a letter or digit (or an empty value)",
        )


def _labels(obj: _Object, where: str, raw: Mapping[str, str] | None) -> dict[str, str]:
    labels = dict(raw or {})
    for key, value in labels.items():
        _check_label_key(obj, where, key)
        _check_label_value(obj, f"{where}.{key}", value)
    return labels


def _selector(obj: _Object, where: str, raw: Mapping[str, Any] | None) -> LabelSelector:
    raw = raw or {}
    match_labels = _labels(obj, f"{where}.matchLabels", raw.get("matchLabels"))
    requirements = []
    for index, expr in enumerate(raw.get("matchExpressions") or ()):
        here = f"{where}.matchExpressions[{index}]"
        operator = SelectorOperator(expr["operator"])
        values = tuple(expr.get("values") or ())
        _check_label_key(obj, f"{here}.key", expr["key"])
        if operator in (SelectorOperator.IN, SelectorOperator.NOT_IN) and not values:
            obj.problem(
                f"{here}.values",
                f"operator {operator} needs a non-empty values list: add values, or use Exists"
                " / DoesNotExist to test only the key",
            )
        elif operator in (SelectorOperator.EXISTS, SelectorOperator.DOES_NOT_EXIST) and values:
            obj.problem(
                f"{here}.values",
                f"operator {operator} tests only the key and must not have values: remove them,"
                " or use In / NotIn",
            )
        for value_index, value in enumerate(values):
            _check_label_value(obj, f"{here}.values[{value_index}]", value)
        requirements.append(SelectorRequirement(expr["key"], operator, values))
    return LabelSelector(tuple(sorted(match_labels.items())), tuple(requirements))


def parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _ip(obj: _Object, where: str, text: str) -> IPAddress | None:
    address = parse_ip(text) if "%" not in text else None
    if address is None:
        obj.problem(
            where,
            f"{fqdn.quoted(text)} is not an IP address: write one IPv4 or IPv6 address,"
            " e.g. 198.51.100.10 or 2001:db8::10 (no prefix length)",
        )
    return address


def cidr_problem(text: str) -> str | None:
    """Why ``text`` is not a strict CIDR, with the fix; None if it is one."""
    if "%" in text:
        return f"{fqdn.quoted(text)} is not a CIDR: remove the zone index after '%'"
    if "/" not in text:
        address = parse_ip(text)
        if address is not None:
            return f"{text} has no prefix length: write {text}/{address.max_prefixlen}"
    try:
        ipaddress.ip_network(text, strict=True)
        return None
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return (
            f"{fqdn.quoted(text)} is not a CIDR: write an IPv4 or IPv6 network such as"
            " 203.0.113.0/24 or 2001:db8::/32"
        )
    host = text.split("/", 1)[0]
    return (
        f"{text} has host bits set: write {loose} for the whole network, or"
        f" {host}/{loose.max_prefixlen} for the single address"
    )


def _peer(obj: _Object, where: str, raw: Mapping[str, Any]) -> Peer:
    if "fqdn" in raw:
        name: str = raw["fqdn"]
        if "*" in name:
            obj.problem(f"{where}.fqdn", "fqdn is an exact name: use fqdnPattern for wildcards")
            return Peer(fqdn=name)
        if parse_ip(name.rstrip(".")) is not None:
            bits = 32 if ":" not in name else 128
            obj.problem(
                f"{where}.fqdn", f"{name} is an IP address, not a name: use cidr: {name}/{bits}"
            )
            return Peer(fqdn=name)
        try:
            return Peer(fqdn=fqdn.canonical_name(name))
        except fqdn.InvalidName as exc:
            obj.problem(f"{where}.fqdn", f"not a valid DNS name: {exc}")
            return Peer(fqdn=name)
    if "fqdnPattern" in raw:
        try:
            return Peer(fqdn_pattern=fqdn.compile_pattern(raw["fqdnPattern"]).text)
        except fqdn.InvalidPattern as exc:
            obj.problem(f"{where}.fqdnPattern", str(exc))
            return Peer(fqdn_pattern=raw["fqdnPattern"])
    problem = cidr_problem(raw["cidr"])
    if problem is not None:
        obj.problem(f"{where}.cidr", problem)
        return Peer()
    network: IPNetwork = ipaddress.ip_network(raw["cidr"])
    return Peer(cidr=network)


def _port(obj: _Object, where: str, raw: Mapping[str, Any]) -> PortSpec:
    port: int | None = raw.get("port")
    end_port: int | None = raw.get("endPort")
    if end_port is not None and port is None:
        obj.problem(
            f"{where}.endPort",
            "endPort needs port: add port (the first port of the range) or remove endPort",
        )
    elif end_port is not None and port is not None and end_port < port:
        obj.problem(
            f"{where}.endPort",
            f"endPort {end_port} is below port {port}: endPort is the last port of the range"
            f" and must be >= port (swap them, or remove endPort for the single port {port})",
        )
    return PortSpec(Protocol(raw.get("protocol", "TCP")), port, end_port)


# --- kinds --------------------------------------------------------------------------------


def _gateway(obj: _Object, doc: Mapping[str, Any]) -> EgressGateway:
    spec = doc["spec"]
    egress_ips: list[IPAddress] = []
    for index, text in enumerate(spec["egressIPs"]):
        where = f"spec.egressIPs[{index}]"
        address = _ip(obj, where, text)
        if address is None:
            continue
        if address.is_unspecified or address.is_multicast or address.is_loopback:
            obj.problem(where, f"{address} cannot be a source address: use a unicast address")
        elif address.is_link_local:
            obj.problem(where, f"{address} is link-local and cannot leave its link: use another")
        elif address in egress_ips:
            obj.problem(where, f"{address} is listed twice: remove the duplicate")
        else:
            egress_ips.append(address)
    node_selector = spec.get("nodeSelector")
    return EgressGateway(
        name=obj.name,
        namespace_selector=_selector(obj, "spec.namespaceSelector", spec["namespaceSelector"]),
        pod_selector=_selector(obj, "spec.podSelector", spec.get("podSelector")),
        egress_ips=tuple(egress_ips),
        node_selector=(
            None if node_selector is None else _selector(obj, "spec.nodeSelector", node_selector)
        ),
        default_action=Action(spec.get("defaultAction", "Deny")),
        generation=doc["metadata"].get("generation", 0),
    )


def _policy(obj: _Object, doc: Mapping[str, Any]) -> EgressPolicy:
    spec = doc["spec"]
    rules = []
    for index, raw in enumerate(spec.get("egress") or ()):
        where = f"spec.egress[{index}]"
        peers = tuple(_peer(obj, f"{where}.to[{i}]", p) for i, p in enumerate(raw["to"]))
        ports = tuple(
            _port(obj, f"{where}.ports[{i}]", p) for i, p in enumerate(raw.get("ports") or ())
        )
        rules.append(EgressRule(Action(raw.get("action", "Allow")), peers, ports))
    assert obj.namespace is not None  # checked by parse_object
    return EgressPolicy(
        namespace=obj.namespace,
        name=obj.name,
        pod_selector=_selector(obj, "spec.podSelector", spec["podSelector"]),
        mode=Mode(spec.get("mode", "Enforce")),
        egress=tuple(rules),
        generation=doc["metadata"].get("generation", 0),
    )


def _namespace(obj: _Object, doc: Mapping[str, Any]) -> Namespace:
    labels = _labels(obj, "metadata.labels", doc["metadata"].get("labels"))
    labels[NAMESPACE_NAME_LABEL] = obj.name
    return Namespace(obj.name, labels)


def _node_name(obj: _Object, where: str, name: str) -> None:
    if len(name) > 253 or not _DNS_SUBDOMAIN_RE.match(name):
        obj.problem(
            where,
            f"invalid node name {fqdn.quoted(name)}: use the name of a Node, lower-case letters,"
            " digits, '-' and '.' (at most 253), starting and ending with a letter or digit",
        )


def _pod(obj: _Object, doc: Mapping[str, Any]) -> Pod:
    labels = _labels(obj, "metadata.labels", doc["metadata"].get("labels"))
    ips: list[IPAddress] = []
    for index, entry in enumerate((doc.get("status") or {}).get("podIPs") or ()):
        address = _ip(obj, f"status.podIPs[{index}].ip", entry["ip"])
        if address is not None and address not in ips:
            ips.append(address)
    node_name: str = (doc.get("spec") or {}).get("nodeName") or ""
    if node_name:
        _node_name(obj, "spec.nodeName", node_name)
    assert obj.namespace is not None
    return Pod(obj.namespace, obj.name, labels, tuple(ips), node_name)


def _node(obj: _Object, doc: Mapping[str, Any]) -> Node:
    labels = _labels(obj, "metadata.labels", doc["metadata"].get("labels"))
    addresses: list[IPAddress] = []
    for index, entry in enumerate((doc.get("status") or {}).get("addresses") or ()):
        if entry["type"] != NODE_ADDRESS_TYPE:
            continue
        where = f"status.addresses[{index}].address"
        address = _ip(obj, where, entry["address"])
        if address is None:
            continue
        if (
            address.is_unspecified
            or address.is_multicast
            or address.is_loopback
            or address.is_link_local
        ):
            obj.problem(
                where,
                f"{address} cannot carry the tunnel between nodes: use the address other nodes"
                " reach this node at",
            )
        elif address not in addresses:
            addresses.append(address)
    return Node(obj.name, labels, tuple(addresses))


_BUILDERS: dict[str, Callable[[_Object, Mapping[str, Any]], KubeObject]] = {
    "EgressGateway": _gateway,
    "EgressPolicy": _policy,
    "Namespace": _namespace,
    "Pod": _pod,
    "Node": _node,
}


# --- one object ---------------------------------------------------------------------------


def _identity(doc: Mapping[str, Any]) -> tuple[str, str | None, str]:
    kind = doc.get("kind")
    metadata = doc.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    name, namespace = metadata.get("name"), metadata.get("namespace")
    kind = kind if isinstance(kind, str) and kind else "?"
    namespace = namespace if isinstance(namespace, str) and namespace else None
    if kind == "Pod" and namespace is None:
        namespace = "default"
    if kind in KINDS and not KINDS[kind][1]:
        namespace = None  # cluster-scoped: a stray metadata.namespace is reported, not shown
    return kind, namespace, name if isinstance(name, str) and name else "?"


def _check_envelope(obj: _Object, doc: Mapping[str, Any]) -> None:
    """apiVersion, kind, names and scope; schema-level problems are not repeated here."""
    if obj.kind == "?":
        obj.problem("kind", f"kind is missing: set it to one of {', '.join(KINDS)}")
        return
    if obj.kind not in KINDS:
        obj.problem(
            "kind",
            f'unsupported kind "{obj.kind}": egressgw reads EgressGateway and EgressPolicy'
            f" ({API_VERSION}), Namespace, Pod and Node (v1); keep other manifests out of the"
            " paths it reads",
        )
        return
    api_version, namespaced = KINDS[obj.kind]
    if doc.get("apiVersion") != api_version:
        got = doc.get("apiVersion")
        what = "is missing" if got is None else f"{fqdn.quoted(str(got))} is not supported"
        obj.problem("apiVersion", f"apiVersion {what}: use apiVersion: {api_version}")
    metadata = doc.get("metadata")
    if not isinstance(metadata, Mapping):
        return
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if isinstance(name, str) and name:
        pattern, limit = (
            (_DNS_LABEL_RE, 63) if obj.kind == "Namespace" else (_DNS_SUBDOMAIN_RE, 253)
        )
        if len(name) > limit or not pattern.match(name):
            chars = "digits and '-'" if limit == 63 else "digits, '-' and '.'"
            obj.problem(
                "metadata.name",
                f"invalid name {fqdn.quoted(name)}: use lower-case letters, {chars} (at most"
                f" {limit}), starting and ending with a letter or digit",
            )
    if namespaced and isinstance(namespace, str) and namespace:
        if len(namespace) > 63 or not _DNS_LABEL_RE.match(namespace):
            obj.problem(
                "metadata.namespace",
                f"invalid namespace {fqdn.quoted(namespace)}: use at most 63 lower-case letters,"
                " digits and '-', starting and ending with a letter or digit",
            )
    elif namespaced and obj.kind == "EgressPolicy" and namespace is None:
        obj.problem(
            "metadata.namespace",
            "an EgressPolicy is namespaced: add metadata.namespace (the project's namespace)",
        )
    elif not namespaced and namespace is not None:
        obj.problem(
            "metadata.namespace",
            f"{obj.kind} is cluster-scoped: remove metadata.namespace",
        )


def parse_object(doc: Mapping[str, Any], *, source: str) -> tuple[KubeObject | None, list[Problem]]:
    """Validate and convert one object dict; the object is None if there is any problem."""
    if not isinstance(doc, Mapping):
        problem = Problem(
            source,
            "?",
            None,
            "?",
            "",
            "a manifest must be a mapping with apiVersion, kind and metadata;"
            f" got {type(doc).__name__}",
        )
        return None, [problem]
    obj = _Object(source, *_identity(doc))
    _check_envelope(obj, doc)
    if obj.kind not in KINDS:
        return None, obj.problems
    for where, message in schema_problems(obj.kind, doc):
        obj.problem(where, message)
    if obj.problems:
        return None, obj.problems
    built = _BUILDERS[obj.kind](obj, doc)
    return (None if obj.problems else built), obj.problems


# --- many objects -------------------------------------------------------------------------


def object_key(obj: KubeObject) -> tuple[str, str, str]:
    """(kind, namespace or "", name): what makes an object unique."""
    kind = type(obj).__name__
    namespace = obj.namespace if isinstance(obj, (Pod, EgressPolicy)) else ""
    return kind, namespace, obj.name


def _problem_for(obj: KubeObject, source: str, where: str, message: str) -> Problem:
    kind, namespace, name = object_key(obj)
    return Problem(source, kind, namespace or None, name, where, message)


def build_snapshot(objects: Iterable[tuple[str, KubeObject]]) -> tuple[Snapshot, list[Problem]]:
    """A Snapshot from (source, object) pairs, with the checks that span objects: duplicates,
    and egress IPs claimed by two gateways. Objects with such a problem are left out."""
    problems: list[Problem] = []
    first: dict[tuple[str, str, str], str] = {}
    kept: list[KubeObject] = []
    for source, obj in objects:
        key = object_key(obj)
        if key in first:
            problems.append(
                _problem_for(
                    obj,
                    source,
                    "",
                    f"already defined in {first[key]}: define each object once; this copy is"
                    " ignored",
                )
            )
            continue
        first[key] = source
        kept.append(obj)

    gateways: list[EgressGateway] = []
    ip_owner: dict[IPAddress, str] = {}
    for gateway in sorted((o for o in kept if isinstance(o, EgressGateway)), key=lambda g: g.name):
        clashes = [(i, ip) for i, ip in enumerate(gateway.egress_ips) if ip in ip_owner]
        for index, ip in clashes:
            problems.append(
                _problem_for(
                    gateway,
                    first[object_key(gateway)],
                    f"spec.egressIPs[{index}]",
                    f'{ip} is already an egress IP of EgressGateway "{ip_owner[ip]}": give each'
                    " gateway its own egress IPs",
                )
            )
        if not clashes:
            ip_owner.update((ip, gateway.name) for ip in gateway.egress_ips)
            gateways.append(gateway)

    snapshot = Snapshot(
        namespaces={o.name: o for o in sorted(_of(kept, Namespace), key=lambda n: n.name)},
        pods=tuple(sorted(_of(kept, Pod), key=lambda p: (p.namespace, p.name))),
        gateways=tuple(gateways),
        policies=tuple(sorted(_of(kept, EgressPolicy), key=lambda p: (p.namespace, p.name))),
        nodes=tuple(sorted(_of(kept, Node), key=lambda n: n.name)),
    )
    return snapshot, problems


def _of(objects: Iterable[KubeObject], cls: type[_T]) -> list[_T]:
    return [o for o in objects if isinstance(o, cls)]


# --- files --------------------------------------------------------------------------------


_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_DEEPEST = 100  # collections nested deeper are built by PyYAML's constructor, without recursion
# the tags whose constructors build a value from a scalar node alone
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "binary", "timestamp")
)


class _Unusual(Exception):
    """A document with a merge key, a non-scalar key, a tagged collection or a collection's tag
    on a scalar: built (or refused) by PyYAML's own constructor instead."""


class _StrictLoader(_BaseLoader):
    """Safe YAML that rejects duplicate keys: PyYAML would silently keep the last one, and a
    second ``to:`` or ``ports:`` in one rule must not quietly replace the first.

    A plain scalar that looks like a date (``2024-12-01``) is text, as kubectl reads it (its
    YAML library keeps such values strings); only ``!!timestamp`` makes a date.

    Plain documents (all that Kubernetes manifests are) are built by one recursive walk over
    the composed nodes, a third of the time PyYAML's general constructor takes; any other is
    left to that constructor. Both give the same objects, aliases included."""

    yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag != _TIMESTAMP]
        for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
    }

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            return self._build(node, {}, 0)
        except _Unusual:
            return super().construct_document(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's scalar constructors raise plain errors
            raise _unfit(node, exc) from None

    def _build(self, node: yaml.Node, built: dict[int, Any], depth: int) -> Any:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR:
                return node.value
            if node.tag not in _SCALAR_TAGS:
                raise _Unusual
            try:
                return self.yaml_constructors[node.tag](self, node)
            except Exception as exc:
                raise _unfit(node, exc) from None
        if id(node) in built:  # an alias: the object built for its anchor
            return built[id(node)]
        if depth > _DEEPEST:
            raise _Unusual
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
            items: list[Any] = []
            built[id(node)] = items
            for item in node.value:
                items.append(self._build(item, built, depth + 1))
            return items
        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP:
            raise _Unusual
        mapping: dict[Any, Any] = {}
        built[id(node)] = mapping
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                raise _Unusual
            if key_node.tag != _STR:  # refused where it first stands, before any repeat
                raise _not_text(key_node)
            if key_node.value in mapping:
                raise _twice(node, key_node)
            mapping[key_node.value] = self._build(value_node, built, depth + 1)
        return mapping

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):  # PyYAML words it if not (!!map on a scalar)
            _written_once(node, set())
        mapping = super().construct_mapping(node, deep)
        for key_node, _ in node.value:  # merged in by now
            if key_node.tag != _STR:
                raise _not_text(key_node)
        return mapping


def _written_once(node: yaml.MappingNode, checked: set[int]) -> None:
    """Refuse a key written twice in one mapping, or in a mapping merged into it (``<<``).
    Giving again a key that a merge brought in is what merging is for: the mapping's own wins."""
    checked.add(id(node))
    seen: set[tuple[str, str]] = set()
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        if key_node.tag == _MERGE:
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in merged:
                if isinstance(source, yaml.MappingNode) and id(source) not in checked:
                    _written_once(source, checked)
        ident = (key_node.tag, key_node.value)
        if ident in seen:
            raise _twice(node, key_node)
        seen.add(ident)


def _unfit(node: yaml.Node, exc: Exception) -> yaml.constructor.ConstructorError:
    """A scalar whose written tag does not fit its text: ``!!int abc``, ``!!timestamp
    2024-13-01`` (an implied tag always fits: it was chosen because the text matched)."""
    kind = str(node.tag).rsplit(":", 1)[-1]
    detail = f" ({exc})" if type(exc) is ValueError else ""  # e.g. "month must be in 1..12"
    return yaml.constructor.ConstructorError(
        None,
        None,
        f'cannot read "{node.value}" as {_SCALAR_NAMES.get(kind, kind)}{detail}: fix the value,'
        f" or drop its !!{kind} tag",
        node.start_mark,
    )


_SCALAR_NAMES = {"int": "an integer", "float": "a number", "bool": "a boolean",
                 "timestamp": "a date", "binary": "base64", "null": "null"}  # fmt: skip


def _not_text(key_node: yaml.Node) -> yaml.constructor.ConstructorError:
    """A key that YAML reads as something other than text (``1:``, ``true:``, an empty ``?``):
    every key of a Kubernetes object is a string."""
    kind = str(key_node.tag).rsplit(":", 1)[-1]
    what = "an empty key" if kind == "null" else f'the key "{key_node.value}"'
    return yaml.constructor.ConstructorError(
        None,
        None,
        f"{what} reads as {_SCALAR_NAMES.get(kind, 'a ' + kind)}; keys must be text: quote it",
        key_node.start_mark,
    )


def _twice(node: yaml.Node, key_node: yaml.Node) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(
        "while reading a mapping",
        node.start_mark,
        f'found the key "{key_node.value}" twice: keep one',
        key_node.start_mark,
    )


def _yaml_problem(source: str, exc: yaml.YAMLError) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = exc.context or ""
        start = exc.context_mark
        if context and start is not None and start.line != mark.line:
            context += f" (started at line {start.line + 1})"
        what = ", ".join(p for p in (context, exc.problem) if p)
        message = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"
    else:
        message = f"invalid YAML: {exc}"
    return Problem(source, "?", None, "?", "", message)


MANIFEST_SUFFIXES = (".yaml", ".yml")
CONFIGMAP_DATA = "..data"  # the kubelet's symlink to the current generation of a mount
_ATTEMPTS = 5  # walks restarted because the kubelet swapped generations meanwhile


class Stamp(NamedTuple):
    """Which file a manifest is read from and how it was then, to notice a change by ``stat``.

    The target (for a ConfigMap mount it names the generation's directory) and the inode change
    whenever the file is replaced, even by one of the same size and times; size and times change
    when it is written in place (ctime too when ``touch`` or ``cp -p`` puts the mtime back)."""

    target: str
    device: int
    inode: int
    mtime_ns: int
    ctime_ns: int
    size: int


def _stamp(target: Path, st: os.stat_result) -> Stamp:
    return Stamp(str(target), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@dataclass(frozen=True)
class ManifestFile:
    """One manifest file found by ``walk``."""

    path: Path  # the visible name: what problems and duplicate notes name
    target: Path  # what is opened: in a ConfigMap mount, the file in the walk's generation
    stamp: Stamp
    pinned: bool  # target lies in a generation the walk pinned (see ``GenerationMoved``)


class GenerationMoved(Exception):
    """The ConfigMap generation a walk pinned was removed before its files were read: the
    kubelet swapped in a newer one. Walk again."""


class _Walk:
    def __init__(self, root: Path) -> None:
        self.root_real = os.path.realpath(root)
        self.visited: set[tuple[int, int]] = set()
        self.found: list[ManifestFile] = []

    def directory(self, visible: Path, actual: Path, generation: Path | None) -> None:
        """Collect the manifests under ``actual``, named as under ``visible``. ``generation`` is
        the pinned ConfigMap generation ``actual`` lies in, if any: the kubelet never changes a
        generation's files, it only removes the whole generation, so a file missing from it
        means the walk must start again."""
        try:
            with os.scandir(actual) as scan:
                listed = [(e.name, e.is_symlink()) for e in scan]
        except FileNotFoundError:
            if generation is not None:
                raise GenerationMoved(str(actual)) from None
            return  # removed while walking
        except OSError:
            return  # not a directory any more, or no permission: nothing we could read
        entries = {name: (actual / name, generation) for name, _ in listed}
        links = {name for name, is_link in listed if is_link}
        if CONFIGMAP_DATA in links:
            pinned = self.configmap(actual, links)
            if pinned is not None:
                entries = {n: e for n, e in entries.items() if n not in pinned[1]}
                entries.update((n, (pinned[0] / n, pinned[0])) for n in pinned[2])
        for name in sorted(entries):
            if name.startswith("."):
                continue
            target, in_generation = entries[name]
            self.entry(visible / name, target, in_generation, name in links)

    def configmap(self, directory: Path, links: set[str]) -> tuple[Path, set[str], set[str]] | None:
        """For a ConfigMap mount: the generation ``..data`` points at, read once so that a walk
        racing a swap sees the old generation or the new one, never files of both; the visible
        names that link through ``..data``; and the names the generation holds.

        The names come from the generation, not from those links: the kubelet adds and removes
        the links only after the swap, and a key moved to a new name would otherwise be missing
        (or its stale link dangling) for a moment."""
        try:
            generation = directory / os.readlink(directory / CONFIGMAP_DATA)
            with os.scandir(generation) as scan:
                held = {e.name for e in scan if not e.name.startswith(".")}
        except FileNotFoundError:
            raise GenerationMoved(str(directory)) from None
        except OSError:
            return None  # not a mount the kubelet writes: read the directory as it is
        through_data = set()
        for name in links:
            try:
                if os.readlink(directory / name).startswith(CONFIGMAP_DATA + "/"):
                    through_data.add(name)
            except OSError:
                continue  # removed meanwhile
        return generation, through_data, held

    def entry(self, visible: Path, target: Path, generation: Path | None, is_link: bool) -> None:
        try:
            st = os.stat(target)
        except FileNotFoundError:
            if generation is not None:
                raise GenerationMoved(str(target)) from None
            return  # a dangling symlink, or removed while walking
        except OSError:
            return  # a symlink loop, no permission: not a file we could read
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in self.visited:
                return
            if is_link and not self.inside(target):
                return  # following links out of the directory could walk the whole host
            self.visited.add((st.st_dev, st.st_ino))
            self.directory(visible, target, generation)
        elif stat.S_ISREG(st.st_mode) and visible.name.endswith(MANIFEST_SUFFIXES):
            pinned = generation is not None
            self.found.append(ManifestFile(visible, target, _stamp(target, st), pinned))

    def inside(self, target: Path) -> bool:
        real = os.path.realpath(target)
        return real == self.root_real or real.startswith(self.root_real.rstrip("/") + "/")


def walk(path: Path) -> list[ManifestFile]:
    """The ``*.yaml``/``*.yml`` files under a directory, sorted by name, each file once.

    Names starting with "." are skipped at every level below ``path``: editor temporary files,
    and a ConfigMap mount's ``..<timestamp>/`` generations and ``..data``. A ConfigMap mount's
    files go by their visible names (``DIR/x.yaml``, which links to ``..data/x.yaml``) and are all
    read from the one generation ``..data`` pointed at when the walk looked (see
    ``_Walk.configmap``). A file reached by two names (a symlink, a hard link) is listed once,
    under the name that sorts first. Symlinked directories are followed while they stay inside
    ``path``.
    """
    for attempt in range(_ATTEMPTS):
        walker = _Walk(path)
        try:
            st = os.stat(path)
            walker.visited.add((st.st_dev, st.st_ino))
            walker.directory(path, path, None)
        except FileNotFoundError:
            return []
        except GenerationMoved:
            if attempt == _ATTEMPTS - 1:
                raise
            continue
        unique: dict[tuple[int, int], ManifestFile] = {}
        for found in sorted(walker.found, key=lambda f: f.path):
            unique.setdefault((found.stamp.device, found.stamp.inode), found)
        return list(unique.values())
    raise AssertionError("unreachable")


def files_in(path: Path) -> list[Path]:
    """``path`` itself, or the manifest files under it as ``walk`` finds them."""
    if not path.is_dir():
        return [path]
    return [found.path for found in walk(path)]


def read_manifest(found: ManifestFile) -> tuple[Stamp, bytes]:
    """The bytes of a file and the stamp of what was read. The stamp is taken before reading,
    so a write during the read shows as a change the next time the file is looked at.

    Raises GenerationMoved if the file's pinned generation is gone, FileNotFoundError if the file
    is, and OSError if it cannot be read."""
    try:
        with open(found.target, "rb") as file:
            st = os.fstat(file.fileno())
            data = file.read()
    except FileNotFoundError:
        if found.pinned:
            raise GenerationMoved(str(found.target)) from None
        raise
    return _stamp(found.target, st), data


def parse_manifest(source: str, data: bytes) -> tuple[list[tuple[str, KubeObject]], list[Problem]]:
    """Every valid object of one file's content with its source, and every problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [Problem(source, "?", None, "?", "", f"cannot read the file: {exc}")]
    objects: list[tuple[str, KubeObject]] = []
    problems: list[Problem] = []
    try:
        for doc in yaml.load_all(text, Loader=_StrictLoader):
            for item in _listed(source, doc, problems):
                obj, found = parse_object(item, source=source)
                problems.extend(found)
                if obj is not None:
                    objects.append((source, obj))
    except yaml.YAMLError as exc:
        problems.append(_yaml_problem(source, exc))
    return objects, problems


def _listed(source: str, doc: Any, problems: list[Problem]) -> list[Any]:
    """The objects a document stands for: those of a ``v1`` ``List`` (what ``kubectl get -o
    yaml`` prints), else the document itself; none for an empty document."""
    if doc is None:
        return []
    if not isinstance(doc, Mapping) or (doc.get("apiVersion"), doc.get("kind")) != ("v1", "List"):
        return [doc]
    items = doc.get("items")
    if items is None:
        return []
    if not isinstance(items, list):
        got = type(items).__name__
        problems.append(Problem(source, "List", None, "?", "items", f"expected a list, got {got}"))
        return []
    return [item for item in items if item is not None]


def _unreadable(source: str, exc: OSError) -> Problem:
    if isinstance(exc, FileNotFoundError):
        return Problem(source, "?", None, "?", "", "no such file or directory")
    return Problem(source, "?", None, "?", "", f"cannot read the file: {exc}")


STDIN = "-"


def load_paths(paths: Sequence[str | Path], stdin: BinaryIO | None = None) -> LoadResult:
    """Load files and directories (recursively) into one Snapshot of the valid objects; ``-``
    reads ``stdin`` (standard input by default), once.

    A file reached twice (a directory given twice, or a file and its directory) is read once."""
    piped: bytes | None = None
    if STDIN in [str(path) for path in paths]:
        piped = (stdin or sys.stdin.buffer).read()
    for attempt in range(_ATTEMPTS):
        try:
            return _load_paths(paths, piped)
        except GenerationMoved:
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _given(path: Path) -> list[ManifestFile]:
    """The manifest files of one path given on the command line."""
    if path.is_dir():
        return walk(path)
    return [ManifestFile(path, path, _stamp(path, os.stat(path)), pinned=False)]


def _load_paths(paths: Sequence[str | Path], piped: bytes | None) -> LoadResult:
    objects: list[tuple[str, KubeObject]] = []
    problems: list[Problem] = []
    files: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    for given in paths:
        if str(given) == STDIN:
            if piped is not None and STDIN not in files:
                piped_objects, piped_problems = parse_manifest(STDIN, piped)
                objects.extend(piped_objects)
                problems.extend(piped_problems)
                files[STDIN] = len(piped_objects)
            continue
        path = Path(given)
        try:
            os.stat(path)
        except OSError as exc:  # missing, or a loop of symbolic links
            problems.append(_unreadable(str(given), exc))
            continue
        try:
            given_files = _given(path)
        except OSError as exc:  # removed since the check above
            problems.append(_unreadable(str(given), exc))
            continue
        for found in given_files:
            identity = (found.stamp.device, found.stamp.inode)
            if identity in seen:
                continue
            seen.add(identity)
            source = str(found.path)
            try:
                _, data = read_manifest(found)
            except OSError as exc:
                problems.append(_unreadable(source, exc))
                files[source] = 0
                continue
            file_objects, file_problems = parse_manifest(source, data)
            objects.extend(file_objects)
            problems.extend(file_problems)
            files[source] = len(file_objects)
    snapshot, cross = build_snapshot(objects)
    problems.extend(cross)
    # a duplicate or a clash removes an object: keep the per-file counts honest
    for problem in cross:
        if problem.file in files:
            files[problem.file] -= 1
    return LoadResult(snapshot, problems, files)
