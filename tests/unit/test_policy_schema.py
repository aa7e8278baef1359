"""The fast schema check: it accepts exactly what jsonschema accepts, so a manifest is never let
through unchecked nor refused without a message."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.policy.load import parse_object
from egressgw.policy.schema import compiled, object_schema

REPO = Path(__file__).resolve().parents[2]
KINDS = ["EgressGateway", "EgressPolicy", "Namespace", "Pod", "Node"]

CORE: list[dict[str, Any]] = [
    {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "payments", "labels": {"project": "payments"}},
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api-0", "namespace": "payments", "labels": {"app": "api"}},
        "spec": {"nodeName": "worker-1", "containers": [{"name": "api"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}]},
    },
    {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "gw-1", "labels": {"egressgw.io/gateway": "true"}, "generation": 3},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.2"}]},
    },
]  # fmt: skip


def examples() -> list[dict[str, Any]]:
    """The shipped example policies and gateways, one with a status and one with selector
    expressions, and a Namespace, Pod and Node."""
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO / "policies").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    held = copy.deepcopy(next(doc for doc in docs if doc["kind"] == "EgressGateway"))
    held["status"] = {
        "observedGeneration": 2,
        "egressIPs": [{"ip": "198.51.100.10", "node": "gw-1"}],
        "conditions": [
            {
                "type": "egressgw.io/Ready",
                "status": "True",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "reason": "Held",
                "message": "",
            }
        ],
    }
    chosen = copy.deepcopy(next(doc for doc in docs if doc["kind"] == "EgressPolicy"))
    chosen["spec"]["podSelector"] = {
        "matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["api"]}]
    }
    return [*docs, held, chosen, *copy.deepcopy(CORE)]


def words(node: Any) -> set[str]:
    """Every property name and enum member in a schema."""
    found: set[str] = set()
    if isinstance(node, dict):
        found |= set(node.get("properties", {})) | {str(e) for e in node.get("enum", [])}
        for value in node.values():
            found |= words(value)
    elif isinstance(node, list):
        for value in node:
            found |= words(value)
    return found


EXAMPLES = examples()
CHECKS = {kind: compiled(object_schema(kind)) for kind in KINDS}
VALIDATORS = {kind: jsonschema.Draft7Validator(object_schema(kind)) for kind in KINDS}

# values a mutation puts in: JSON of every type, the words of the schemas, and strings near
# their patterns, so that a mutated document is often still valid, or only just not
ODD = ["", "a/b", "-a", "a_", "x:y", "1a", "A" * 317, "\u00e9"]
WORDS = st.sampled_from(sorted(set().union(*(words(object_schema(k)) for k in KINDS))) + ODD)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | WORDS
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | WORDS, inner, max_size=3)
    ),
    max_leaves=6,
)


def places(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``node`` (dict keys and list indexes)."""
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += places(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += places(value, (*path, index))
    return found


def mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(places(doc)[1:]))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        how = data.draw(st.sampled_from(["replace", "word", "delete", "add", "copy"]))
        if how == "replace":
            parent[path[-1]] = data.draw(VALUES)
        elif how == "word":
            parent[path[-1]] = data.draw(WORDS)
        elif how == "delete":
            del parent[path[-1]]
        elif how == "add" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][data.draw(WORDS)] = data.draw(VALUES | WORDS)
        elif how == "add" and isinstance(parent[path[-1]], list):
            parent[path[-1]].append(data.draw(VALUES))
        elif how == "copy":  # a sibling's value, of the right shape for somewhere else
            parent[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(EXAMPLES))["metadata"])
    return doc


def test_every_example_is_accepted_by_the_fast_check() -> None:
    for doc in EXAMPLES:
        assert CHECKS[doc["kind"]](doc), doc["metadata"]["name"]
        assert parse_object(doc, source="example")[1] == []


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_the_fast_check_accepts_exactly_what_jsonschema_accepts(data: st.DataObject) -> None:
    doc = mutate(data.draw(st.sampled_from(EXAMPLES)), data)
    kind = doc.get("kind")
    for checked in KINDS if kind not in KINDS else [kind]:
        assert CHECKS[checked](doc) == VALIDATORS[checked].is_valid(doc), (checked, doc)


POLICY, GATEWAY, HELD, CHOSEN, NAMESPACE = 0, 1, -5, -4, -3  # indexes in EXAMPLES
BOTH = {"fqdn": "a.example", "cidr": "203.0.113.0/24"}
EDITS = [  # (example, path, new value, valid?): each keyword, just broken and just kept
    (POLICY, ("spec", "mode"), "Audit", True),
    (POLICY, ("spec", "mode"), "Sometimes", False),  # enum
    (POLICY, ("spec", "egress", 0, "ports", 0, "port"), 65535, True),
    (POLICY, ("spec", "egress", 0, "ports", 0, "port"), 65536, False),  # maximum
    (POLICY, ("spec", "egress", 0, "ports", 0, "port"), 0, False),  # minimum
    (POLICY, ("spec", "egress", 0, "ports", 0, "port"), 80.0, True),  # an integer, for JSON
    (POLICY, ("spec", "egress", 0, "ports", 0, "port"), 80.5, False),  # type
    (POLICY, ("spec", "egress", 0, "ports", 0, "port"), True, False),  # not an integer
    (POLICY, ("spec", "egress", 0, "to"), [], False),  # minItems
    (POLICY, ("spec", "egress", 0, "to", 0), BOTH, False),  # oneOf: two
    (POLICY, ("spec", "egress", 0, "to", 0), {}, False),  # oneOf: none
    (POLICY, ("spec", "egress", 0, "action"), None, False),  # not nullable
    (POLICY, ("spec", "egress", 0, "extra"), 1, False),  # additionalProperties
    (POLICY, ("metadata", "name"), "", False),  # minLength
    (NAMESPACE, ("metadata", "labels", "project"), 1, False),  # a label value's type
    (GATEWAY, ("spec", "egressIPs"), ["198.51.100.1"] * 16, True),
    (GATEWAY, ("spec", "egressIPs"), ["198.51.100.1"] * 17, False),  # maxItems
    (GATEWAY, ("spec", "egressIPs", 0), 7, False),  # items
    (HELD, ("status", "conditions", 0, "reason"), "Held:Since_1", True),
    (HELD, ("status", "conditions", 0, "reason"), "-Held", False),  # pattern
    (HELD, ("status", "conditions", 0, "type"), "A" * 317, False),  # maxLength
    (HELD, ("status", "conditions", 0, "status"), "Unknown", True),
    (HELD, ("status", "conditions", 0, "type"), "/Ready", False),  # pattern
    (CHOSEN, ("spec", "podSelector", "matchExpressions", 0, "operator"), "Exists", True),
    (CHOSEN, ("spec", "podSelector", "matchExpressions", 0, "operator"), "in", False),
]  # fmt: skip


@pytest.mark.parametrize(("example", "path", "value", "valid"), EDITS)
def test_each_keyword_is_held_to_what_jsonschema_holds_it(
    example: int, path: tuple[Any, ...], value: Any, valid: bool
) -> None:
    doc = copy.deepcopy(EXAMPLES[example])
    parent: Any = doc
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    assert VALIDATORS[doc["kind"]].is_valid(doc) is valid
    assert CHECKS[doc["kind"]](doc) is valid


def test_a_refused_manifest_still_gets_every_message() -> None:
    pod = copy.deepcopy(CORE[1])
    pod["status"]["podIPs"] = [{"address": "192.0.2.10"}, "192.0.2.11"]
    pod["spec"]["nodeName"] = 7
    assert not CHECKS["Pod"](pod)
    _, problems = parse_object(pod, source="pod.yaml")
    assert sorted(f"{p.field}: {p.message}" for p in problems) == [
        'spec.nodeName: expected a string, got an integer: put the value in quotes, e.g. "7"',
        "status.podIPs[0].ip: required field is missing: add it",
        "status.podIPs[1]: expected a mapping, got a string",
    ]


def test_what_the_fast_check_cannot_be_sure_of_goes_to_jsonschema() -> None:
    # NaN is not below any minimum for jsonschema; the fast check defers rather than guess
    check = compiled({"type": "number", "minimum": 0})
    assert not check(math.nan) and jsonschema.Draft7Validator({"minimum": 0}).is_valid(math.nan)
    with pytest.raises(ValueError, match="patternProperties"):
        compiled({"type": "object", "patternProperties": {"^a": {"type": "string"}}})
    with pytest.raises(ValueError, match="items as a list"):
        compiled({"type": "array", "items": [{"type": "string"}]})
