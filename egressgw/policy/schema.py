"""The CRDs' OpenAPI v3 schemas as JSON Schema validators, with errors users can act on.

In: the CRD manifests shipped in ``egressgw/crds/`` (symlinks to ``manifests/crds/``) and one
object as a plain dict. Out: (field path, message) pairs. Reads the two CRD files once; nothing
else.

The conversion mirrors what the API server does with ``kubectl apply`` (strict field
validation): ``x-kubernetes-*`` keys are dropped, ``nullable`` becomes a null type, and an
object that declares ``properties`` rejects unknown fields (the API server cannot express that in
a structural schema; it rejects them through field validation instead). ``format`` is not checked
here: the loader checks CIDRs and IPs more strictly than any format checker would.

A valid object is recognised by a predicate compiled from the same schema (``compiled``);
jsonschema runs only on an object the predicate refuses, to word its problems.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError

CRD_DIR = Path(__file__).resolve().parent.parent / "crds"
CRD_FILES = {"EgressGateway": "egressgateways.yaml", "EgressPolicy": "egresspolicies.yaml"}


def to_json_schema(node: Any) -> Any:
    """Convert one OpenAPI v3 (structural) schema node, recursively."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description", "default"):
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        else:
            out[key] = to_json_schema(value)
    if node.get("nullable") is True and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


# The metadata fields egressgw reads, for every kind (CRD schemas cannot describe metadata).
_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string", "minLength": 1},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "generation": {"type": "integer", "minimum": 0},
    },
}

# Namespace, Pod and Node: only the fields egressgw reads; everything else is allowed and
# ignored.
_CORE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Namespace": {"type": "object", "properties": {}},
    "Pod": {
        "type": "object",
        "properties": {
            "spec": {
                "type": ["object", "null"],
                "properties": {"nodeName": {"type": "string"}},
            },
            "status": {
                "type": "object",
                "properties": {
                    "podIPs": {
                        "type": ["array", "null"],
                        "items": {
                            "type": "object",
                            "required": ["ip"],
                            "properties": {"ip": {"type": "string"}},
                        },
                    }
                },
            },
        },
    },
    "Node": {
        "type": "object",
        "properties": {
            "status": {
                "type": "object",
                "properties": {
                    "addresses": {
                        "type": ["array", "null"],
                        "items": {
                            "type": "object",
                            "required": ["type", "address"],
                            "properties": {
                                "type": {"type": "string"},
                                "address": {"type": "string"},
                            },
                        },
                    }
                },
            }
        },
    },
}


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of ``kind``'s CRD, converted to JSON Schema."""
    with (CRD_DIR / CRD_FILES[kind]).open(encoding="utf-8") as handle:
        crd = yaml.safe_load(handle)
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = to_json_schema(version["schema"]["openAPIV3Schema"])
    return schema


def object_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema a whole ``kind`` document is checked against, metadata included."""
    base = crd_schema(kind) if kind in CRD_FILES else _CORE_SCHEMAS[kind]
    return {
        **base,
        "required": ["metadata", *base.get("required", [])],
        "properties": {**base["properties"], "metadata": _METADATA},
    }


@cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    schema = object_schema(kind)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def field_path(parts: Sequence[str | int]) -> str:
    """``["spec", "egress", 0, "to"]`` -> ``"spec.egress[0].to"``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    # what !!timestamp and !!binary make
    return f"a {type(value).__name__}"


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "a list",
    "object": "a mapping",
}


def _quote(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _type_message(error: ValidationError) -> str:
    expected: Any = error.validator_value
    names = [
        _TYPE_NAMES.get(str(t), str(t))
        for t in (expected if isinstance(expected, list) else [expected])
    ]
    message = f"expected {' or '.join(names)}, got {_json_type(error.instance)}"
    if expected == "string" and not isinstance(error.instance, (dict, list)):
        # YAML reads 1, true, on as non-strings
        message += f': put the value in quotes, e.g. "{error.instance}"'
    return message


def _messages(error: ValidationError) -> Iterator[tuple[str, str]]:
    """(field, message) for one jsonschema error, in the loader's words."""
    path = list(error.absolute_path)
    here = field_path(path)
    validator = error.validator
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    instance: Any = error.instance
    value: Any = error.validator_value
    if validator == "required":
        present = instance if isinstance(instance, Mapping) else {}
        for name in value:
            if name not in present:
                yield field_path([*path, name]), "required field is missing: add it"
    elif validator == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        for name in sorted(set(instance) - set(known)):
            yield (
                field_path([*path, str(name)]),
                f'unknown field "{name}": remove it or fix its spelling'
                f" (fields here: {', '.join(known)})",
            )
    elif validator == "enum":
        allowed = ", ".join(_quote(v) for v in value)
        yield here, f"unsupported value {_quote(instance)}: use one of {allowed} (case matters)"
    elif validator == "type":
        yield here, _type_message(error)
    elif validator in ("minimum", "maximum"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            yield here, f"{instance} is out of range: use {low}..{high}"
        elif low is not None:
            yield here, f"{instance} is too small: the minimum is {low}"
        else:
            yield here, f"{instance} is too large: the maximum is {high}"
    elif validator == "minItems":
        yield here, f"needs at least {value} entry: add one"
    elif validator == "maxItems":
        yield here, f"has {len(instance)} entries; the limit is {value}"
    elif validator == "minLength":
        yield here, "must not be empty"
    elif validator == "maxLength":
        yield here, f"is {len(instance)} characters long; the limit is {value}"
    elif validator == "oneOf" and _one_of_required(value):
        choices = _one_of_required(value)
        found = [name for name in choices if isinstance(instance, Mapping) and name in instance]
        what = f"found {', '.join(found)}" if found else "found none"
        yield (
            here,
            f"set exactly one of {', '.join(choices)} ({what}); use one list entry per destination",
        )
    else:
        yield here, error.message


def _one_of_required(branches: Any) -> list[str]:
    """For ``oneOf: [{required: [a]}, {required: [b]}]`` return ``[a, b]``, else []."""
    names: list[str] = []
    for branch in branches if isinstance(branches, list) else []:
        if not isinstance(branch, Mapping) or set(branch) != {"required"}:
            return []
        names.extend(branch["required"])
    return names


# --- the valid case, fast ----------------------------------------------------------------
#
# Almost every object is valid, and jsonschema spends 0.2 ms on a Pod to find that out. The
# schemas above use a handful of keywords; ``compiled`` turns one into a predicate of closures
# that answers "valid?" about ten times faster, and jsonschema runs only where it says no, to
# word the problems. It may say no to a valid object (then jsonschema finds nothing), never yes
# to an invalid one: a keyword it does not know makes the whole schema jsonschema's alone.

Check = Callable[[Any], bool]

_IGNORED = frozenset({"format", "title", "$schema"})  # Draft 7 checks no format by default
_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _same(value: Any, member: Any) -> bool:
    """``value`` equals the enum ``member`` (only scalars of one type; otherwise not known)."""
    if type(value) is not type(member) or isinstance(value, (dict, list, float)):
        return False
    return bool(value == member)


def compiled(schema: Mapping[str, Any]) -> Check:
    """A predicate that is true only of instances ``schema`` accepts; ValueError for a
    keyword it does not know."""
    unknown = set(schema) - _IGNORED - _KEYWORDS.keys()
    if unknown:
        raise ValueError(f"not compiled: {', '.join(sorted(unknown))}")
    checks: list[Check] = []
    for key, value in schema.items():
        check = _KEYWORDS[key](schema, value) if key in _KEYWORDS else None
        if check is not None:
            checks.append(check)
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda v: first(v) and second(v)

    def every(v: Any) -> bool:
        for check in checks:  # noqa: SIM110 (all() of a generator takes twice as long here)
            if not check(v):
                return False
        return True

    return every


def _type(_schema: Mapping[str, Any], value: Any) -> Check:
    names = value if isinstance(value, list) else [value]
    if not all(name in _TYPES for name in names):
        raise ValueError(f"not compiled: type {value}")
    tests = [_TYPES[name] for name in names]
    if len(tests) == 1:
        return tests[0]
    return lambda v: any(test(v) for test in tests)


def _properties(schema: Mapping[str, Any], value: Any) -> Check | None:
    inside = {name: compiled(sub) for name, sub in value.items()}
    extra = schema.get("additionalProperties", True)
    if extra is True:
        rest: Check | None = None
    elif extra is False:
        rest = _never
    else:
        rest = compiled(extra)

    def check(v: Any) -> bool:
        if not isinstance(v, dict):
            return True
        for key, item in v.items():
            test = inside.get(key, rest)
            if test is not None and not test(item):
                return False
        return True

    return check


def _additional(schema: Mapping[str, Any], value: Any) -> Check | None:
    if "properties" in schema:
        return None  # checked with the properties
    return _properties({"additionalProperties": value}, {})


def _never(_v: Any) -> bool:
    return False


def _required(_schema: Mapping[str, Any], value: Any) -> Check:
    names = tuple(value)
    return lambda v: not isinstance(v, dict) or all(name in v for name in names)


def _items(_schema: Mapping[str, Any], value: Any) -> Check:
    if not isinstance(value, Mapping):
        raise ValueError("not compiled: items as a list")
    each = compiled(value)
    return lambda v: not isinstance(v, list) or all(each(item) for item in v)


def _one_of(_schema: Mapping[str, Any], value: Any) -> Check:
    branches = [compiled(branch) for branch in value]
    return lambda v: sum(1 for branch in branches if branch(v)) == 1


def _enum(_schema: Mapping[str, Any], value: Any) -> Check:
    members = list(value)
    return lambda v: any(_same(v, member) for member in members)


def _pattern(_schema: Mapping[str, Any], value: Any) -> Check:
    search = re.compile(value).search
    return lambda v: not isinstance(v, str) or search(v) is not None


def _bound(
    kind: Check, size: Callable[[Any], Any], ok: Callable[[Any, Any], bool]
) -> Callable[[Mapping[str, Any], Any], Check]:
    """A keyword that holds ``size`` of an instance of ``kind`` to a limit (``ok(size, limit)``);
    instances of other kinds pass, as in JSON Schema."""

    def keyword(_schema: Mapping[str, Any], limit: Any) -> Check:
        return lambda v: not kind(v) or ok(size(v), limit)

    return keyword


def _itself(value: Any) -> Any:
    return value


_KEYWORDS: dict[str, Callable[[Mapping[str, Any], Any], Check | None]] = {
    "type": _type,
    "properties": _properties,
    "additionalProperties": _additional,
    "required": _required,
    "items": _items,
    "oneOf": _one_of,
    "enum": _enum,
    "pattern": _pattern,
    "minLength": _bound(_TYPES["string"], len, operator.ge),
    "maxLength": _bound(_TYPES["string"], len, operator.le),
    "minItems": _bound(_TYPES["array"], len, operator.ge),
    "maxItems": _bound(_TYPES["array"], len, operator.le),
    "minimum": _bound(_TYPES["number"], _itself, operator.ge),
    "maximum": _bound(_TYPES["number"], _itself, operator.le),
}


@cache
def _valid(kind: str) -> Check:
    """``kind``'s fast predicate, or one that always defers to jsonschema."""
    try:
        return compiled(object_schema(kind))
    except ValueError:
        return _never


def schema_problems(kind: str, doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every schema violation of ``doc`` as (field, message), sorted by field."""
    if _valid(kind)(doc):
        return []
    found: list[tuple[str, str]] = []
    for error in _validator(kind).iter_errors(doc):
        for item in _messages(error):
            if item not in found:
                found.append(item)
    return sorted(found)
