"""The manifest reader's YAML: the same objects PyYAML's safe loader gives, for every shape of
document, and a duplicate key refused wherever it is."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.policy.load import _StrictLoader, parse_manifest

REPO = Path(__file__).resolve().parents[2]


def strict(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=_StrictLoader))


SAFE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the parser the reader uses, too


def safe(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=SAFE))


def test_every_yaml_file_of_the_project_reads_as_the_safe_loader_reads_it() -> None:
    files = [p for p in REPO.rglob("*.yaml") if ".venv" not in p.parts and ".git" not in p.parts]
    files = [p for p in files if not (p.parent.name == "broken" and p.name.startswith("yaml-"))]
    assert len(files) > 40
    for path in files:
        text = path.read_text()
        assert strict(text) == safe(text), path


SHAPES = """\
plain: {a: 1, b: [1, 2.5, .inf, -.inf, 0x1f, 0o17, 1_000, +12], c: null, d: ~, e: true, f: No}
when: !!timestamp 2026-12-02
stamp: !!timestamp 2026-12-02T07:16:12Z
bytes: !!binary aGVsbG8=
quoted: ["1", 'true', "null", !!str 12]
text: |
  two
  lines
anchored: &shared {x: [1, 2]}
aliased: *shared
list: &items [a, b]
again: *items
? complex
: key
"": empty key
"1": a quoted number as a key
---
- just
- a list
---
a scalar document
---
"""


def test_every_scalar_and_collection_shape_reads_the_same() -> None:
    ours, theirs = strict(SHAPES), safe(SHAPES)
    assert ours == theirs
    first = ours[0]
    assert first["when"] == datetime.date(2026, 12, 2) and first["bytes"] == b"hello"
    assert first["aliased"] is first["anchored"] and first["again"] is first["list"]
    assert math.isinf(first["plain"]["b"][2]) and first["plain"]["f"] is False


@pytest.mark.parametrize(
    "text",
    [
        "base: &b {a: 1, b: 2}\nmerged:\n  <<: *b\n  c: 3\n",  # a merge key
        "!!set {a, b}\n",
        "!!omap [a: 1, b: 2]\n",
        "? [a, b]\n: a list as a key\n",
        "nan: .nan\n",
        "a: !!map x\n",  # a collection's tag on a scalar: refused by both
        "a: !!seq x\n",
        "a: !!set x\n",
        "a: !!omap x\n",
        "a: !!python/name:os.system x\n",
    ],
)
def test_documents_beyond_plain_ones_read_the_same(text: str) -> None:
    assert outcome(strict, text) == outcome(safe, text)


def outcome(load: Any, text: str) -> str:
    """What ``load`` makes of ``text``, or the error it raises, as text."""
    try:
        return repr(load(text))
    except yaml.YAMLError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_a_plain_date_is_text_as_kubectl_reads_it() -> None:
    # kubectl's YAML library keeps date-like values strings; PyYAML would make them dates, so a
    # label "since: 2024-12-01" that the API server admits would be refused here, and a
    # "2024-13-01" would not be read at all
    text = "since: 2024-12-01\nwhen: 2024-12-01 07:16:12\nodd: 2024-13-01\n"
    assert strict(text) == [
        {"since": "2024-12-01", "when": "2024-12-01 07:16:12", "odd": "2024-13-01"}
    ]
    assert strict("since: !!timestamp 2024-12-01\n") == [{"since": datetime.date(2024, 12, 1)}]
    namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {since: 2024-12-01}}"
    assert parse_manifest("ns.yaml", namespace.encode())[1] == []


def test_a_key_a_merge_brought_in_may_be_given_again() -> None:
    text = "defaults: &d {protocol: TCP, port: 443}\nport:\n  <<: *d\n  port: 8443\n"
    assert (
        strict(text)
        == safe(text)
        == [
            {
                "defaults": {"protocol": "TCP", "port": 443},
                "port": {"protocol": "TCP", "port": 8443},
            }
        ]
    )


def test_a_document_that_holds_itself_is_built_once() -> None:
    (doc,) = strict("&me [1, *me]\n")
    assert doc[1] is doc
    (mapping,) = strict("&me {self: *me}\n")
    assert mapping["self"] is mapping


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "spec:\n  to: [a]\n  ports: []\n  to: [b]\n",
            "at line 4, column 3: while reading a mapping (started at line 2), found the key"
            ' "to" twice',
        ),
        (  # with a merge key the document is built by PyYAML's constructor; the same words
            "base: &b {a: 1}\nspec:\n  <<: *b\n  c: 1\n  c: 2\n",
            "at line 5, column 3: while reading a mapping (started at line 3), found the key"
            ' "c" twice',
        ),
        (  # in a mapping that is merged
            "spec:\n  <<: [{a: 1}, {c: 1, c: 2}]\n",
            'at line 2, column 23: while reading a mapping, found the key "c" twice',
        ),
    ],
)
def test_a_key_given_twice_is_refused_with_where_it_is(text: str, message: str) -> None:
    objects, problems = parse_manifest("m.yaml", text.encode())
    assert objects == []
    assert [p.message for p in problems] == [f"invalid YAML {message}: keep one"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("labels: {1: a}\n", 'line 1, column 10: the key "1" reads as an integer; keys must be'),
        ("true: 1\n", 'line 1, column 1: the key "true" reads as a boolean; keys must be'),
        ("a: 1\n?\n", "line 2, column 2: an empty key reads as null; keys must be text"),
        ("a: {!!timestamp 2024-01-01: x}\n", 'the key "2024-01-01" reads as a date; keys must'),
        ("b: &b {1.5: c}\na:\n  <<: *b\n", 'the key "1.5" reads as a number; keys must be'),
    ],
)
def test_a_key_that_is_not_text_is_one_problem(text: str, message: str) -> None:
    # Kubernetes objects are JSON: every key is a string (a label "1" is written "1": x)
    objects, problems = parse_manifest("m.yaml", text.encode())
    assert objects == []
    assert len(problems) == 1 and message in problems[0].message, problems
    assert problems[0].message.endswith("keys must be text: quote it")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: !!timestamp 2024-13-01\n", 'cannot read "2024-13-01" as a date (month must be'),
        ("a: !!int abc\n", 'cannot read "abc" as an integer (invalid literal for int() with'),
        ("a: !!int\n", 'cannot read "" as an integer: fix the value, or drop its !!int tag'),
        ("a: !!float\n", 'cannot read "" as a number: fix the value, or drop its !!float tag'),
        ("a: !!bool maybe\n", 'cannot read "maybe" as a boolean: fix the value, or drop its'),
        ("a: !!timestamp soon\n", 'cannot read "soon" as a date: fix the value, or drop its'),
        ("a: !!map x\n", "expected a mapping node, but found scalar"),
        ("b: &b {c: 1}\na:\n  <<: *b\n  d: !!int x\n", 'cannot read "x" as an integer'),
    ],
)
def test_a_value_that_does_not_fit_its_type_is_one_problem(text: str, message: str) -> None:
    objects, problems = parse_manifest("m.yaml", text.encode())
    assert objects == []
    assert len(problems) == 1 and problems[0].message.startswith("invalid YAML at line")
    assert message in problems[0].message


def test_nesting_as_deep_as_libyaml_allows_is_read() -> None:
    for depth in (99, 101, 999):  # built by the walk, by PyYAML's constructor past 100 levels
        text = "a: " + "[" * depth + "1" + "]" * depth + "\n"
        for (doc,) in (strict(text), safe(text)):
            inner, levels = doc["a"], 0
            while isinstance(inner, list):  # (== on such a list would exceed Python's recursion)
                (inner,), levels = inner, levels + 1
            assert (levels, inner) == (depth, 1)
        _, problems = parse_manifest("m.yaml", text.encode())
        assert [p.message for p in problems] == [
            "kind is missing: set it to one of EgressGateway, EgressPolicy, Namespace, Pod, Node"
        ]


KEYS = st.text(max_size=6)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(VALUES, st.booleans(), st.sampled_from([None, '"', "'"]))
def test_any_dumped_value_reads_back_as_the_safe_loader_reads_it(
    value: Any, flow: bool, quote: str | None
) -> None:
    text = yaml.safe_dump(value, default_flow_style=flow, default_style=quote)
    assert strict(text) == safe(text)


TOKENS = [
    "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!map ", "!!set ", "!!omap ",
    "!!python/object ", "&a ", "*a ", "<<: ", "? ", "[", "]", "{", "}", "- ", ": ", "\t", "\x00",
    "2024-13-01", "0x", ".nan", "~", "|", "%YAML 1.1\n", "---\n", '"', "'", "1e999", "!", "\n  ",
]  # fmt: skip
MANIFESTS = sorted((REPO / "policies").glob("*.yaml")) + sorted(
    (REPO / "tests" / "testdata" / "broken").glob("*.yaml")
)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_no_damaged_manifest_escapes_the_reader_as_an_error(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(MANIFESTS)).read_bytes()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 5))
        put = data.draw(st.sampled_from(TOKENS).map(str.encode) | st.binary(max_size=2))
        text = text[:at] + put + text[at + cut :]
    _, problems = parse_manifest("m.yaml", text)  # problems, never an exception
    assert all(p.message for p in problems)


def test_a_list_stands_for_its_items() -> None:
    listed = (
        "apiVersion: v1\nkind: List\nmetadata: {resourceVersion: ''}\nitems:\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: payments}}\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: Bad}}\n"
        "---\napiVersion: v1\nkind: List\nitems: []\n"
        "---\napiVersion: v1\nkind: List\nitems: {a: 1}\n"
    )
    objects, problems = parse_manifest("list.yaml", listed.encode())
    assert [obj.name for _, obj in objects] == ["payments"]
    assert [str(p) for p in problems] == [
        'list.yaml: Namespace/Bad: metadata.name: invalid name "Bad": use lower-case letters,'
        " digits and '-' (at most 63), starting and ending with a letter or digit",
        "list.yaml: List/?: items: expected a list, got dict",
    ]
