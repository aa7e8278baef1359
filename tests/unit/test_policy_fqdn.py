"""DNS name canonicalisation and wildcard patterns: what matches, what is rejected, and why."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.policy.fqdn import (
    FqdnMatcher,
    InvalidName,
    InvalidPattern,
    canonical_name,
    compile_pattern,
)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("db.example.com", "db.example.com"),
        ("DB.Example.COM.", "db.example.com"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
    ],
)
def test_canonical_name(name: str, canonical: str) -> None:
    assert canonical_name(name) == canonical


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "the DNS name is empty"),
        (".", "the DNS name is empty"),
        ("db..example.com", '"db..example.com" has an empty label'),
        (".example.com", '".example.com" has an empty label'),
        ("a" * 64 + ".com", "is 64 octets long; the limit is 63"),
        ("-db.example.com", '"-db.example.com": label "-db" starts or ends with \'-\''),
        ("db .example.com", 'label "db " has invalid characters " "'),
        ("db/x.example.com", 'label "db/x" has invalid characters "/"'),
        ("db.example.com\n", 'label "com\\n" has invalid characters "\\n"'),
        ("db\n.example.com", 'label "db\\n" has invalid characters "\\n"'),
        (".".join(["a" * 50] * 5), "is 254 characters long; the limit is 253"),
    ],
)
def test_canonical_name_rejects(name: str, message: str) -> None:
    with pytest.raises(InvalidName) as caught:
        canonical_name(name)
    assert message in str(caught.value)


def test_longest_name_is_accepted() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert canonical_name(name + ".") == name


# pattern, names it matches, names it does not
PATTERN_TABLE: list[tuple[str, list[str], list[str]]] = [
    (
        "*.example.com",
        ["a.example.com", "api-1.example.com", "_x.example.com"],
        ["example.com", "a.b.example.com", "a.example.org", "aexample.com"],
    ),
    (
        "**.example.com",
        ["a.example.com", "a.b.example.com", "a.b.c.d.example.com"],
        ["example.com", "a.example.org", "badexample.com"],
    ),
    (
        "api-*.example.com",
        ["api-eu.example.com", "api-1.example.com", "api-x_y.example.com"],
        ["api.example.com", "web-eu.example.com", "api-eu.x.example.com", "x.api-eu.example.com"],
    ),
    (
        "*-api.example.com",
        ["eu-api.example.com"],
        ["api.example.com", "eu-api.x.example.com"],
    ),
    (
        "a.*.example.com",
        ["a.b.example.com", "a.zz.example.com"],
        ["a.example.com", "a.b.c.example.com", "b.b.example.com"],
    ),
    (
        "*.S3.Example.COM.",
        ["bucket.s3.example.com"],
        ["s3.example.com", "bucket.s3.example.com.evil.com"],
    ),
    ("db.example.com", ["db.example.com"], ["xdb.example.com", "a.db.example.com"]),
    ("*.bücher.example", ["x.xn--bcher-kva.example"], ["x.bucher.example"]),
    # regex metacharacters in the literal part are literal
    ("*.a-b.example", ["x.a-b.example"], ["x.aab.example"]),
]


@pytest.mark.parametrize(("pattern", "accept", "reject"), PATTERN_TABLE)
def test_pattern_table(pattern: str, accept: list[str], reject: list[str]) -> None:
    compiled = compile_pattern(pattern)
    for name in accept:
        assert compiled.matches(canonical_name(name)), name
    for name in reject:
        assert not compiled.matches(canonical_name(name)), name


def test_pattern_is_canonical_text() -> None:
    compiled = compile_pattern("*.S3.Example.COM.")
    assert compiled.text == "*.s3.example.com"
    assert compiled.suffix == "s3.example.com"
    assert compile_pattern("**.a.*.b.example").suffix == "b.example"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            "*",
            '"*" would match every name: name the domain, as in *.example.com, or set the'
            " EgressGateway's defaultAction to Allow",
        ),
        ("**", '"**" would match every name'),
        ("*.", '"*." would match every name'),
        ("", '"" would match every name'),
        (
            "*.*",
            '"*.*": the rightmost label must be literal (a wildcard there matches whole top-level'
            " domains); write e.g. *.example.com",
        ),
        ("example.*", '"example.*": the rightmost label must be literal'),
        (
            "a.**.example.com",
            "\"a.**.example.com\": '**' is only allowed as the whole leftmost label,"
            " as in **.example.com",
        ),
        ("x**.example.com", "'**' is only allowed as the whole leftmost label"),
        ("*..example.com", '"*..example.com" has an empty label'),
        ("a?.example.com", '"a?.example.com": label "a?" has invalid characters "?"'),
        ("a?*.example.com", 'label "a?*" has invalid characters; use letters, digits'),
        ("*." + "a" * 64 + ".com", "is 64 octets long; the limit is 63"),
    ],
)
def test_invalid_patterns(pattern: str, message: str) -> None:
    with pytest.raises(InvalidPattern) as caught:
        compile_pattern(pattern)
    assert message in str(caught.value)


def test_matcher_returns_exact_names_then_patterns() -> None:
    matcher: FqdnMatcher[str] = FqdnMatcher()
    matcher.add_all(
        names=[("DB.lab.example.", "exact"), ("other.example", "other")],
        patterns=[
            ("*.lab.example", "one-label"),
            ("**.example", "any-depth"),
            ("db.lab.example", "literal-pattern"),
            ("*.cdn.lab.example", "cdn"),
        ],
    )
    assert matcher.match("db.lab.example") == ["exact", "literal-pattern", "one-label", "any-depth"]
    assert matcher.match("x.cdn.lab.example.") == ["cdn", "any-depth"]
    assert matcher.match("lab.example") == ["any-depth"]
    assert matcher.match("example") == []
    assert matcher.match("db.lab.example.org") == []


def test_matcher_agrees_with_patterns_one_by_one() -> None:
    patterns = [p for p, _, _ in PATTERN_TABLE]
    matcher: FqdnMatcher[int] = FqdnMatcher()
    for index, pattern in enumerate(patterns):
        matcher.add_pattern(pattern, index)
    names = {name for _, accept, reject in PATTERN_TABLE for name in accept + reject}
    for name in sorted(names):
        canonical = canonical_name(name)
        expected = {i for i, p in enumerate(patterns) if compile_pattern(p).matches(canonical)}
        assert set(matcher.match(name)) == expected, name


def test_matcher_raises_for_invalid_names() -> None:
    matcher: FqdnMatcher[str] = FqdnMatcher()
    with pytest.raises(InvalidName):
        matcher.match("a..b")


@given(st.text(max_size=300))
def test_canonical_name_fails_only_with_invalid_name(text: str) -> None:
    try:
        result = canonical_name(text)
    except InvalidName:
        return
    assert len(result) <= 253
    assert result == result.lower()
    assert canonical_name(result) == result  # idempotent
    assert all(0 < len(label) <= 63 for label in result.split("."))


@given(st.text(alphabet="aZ09_-.\n", max_size=80))
def test_canonical_name_accepts_exactly_the_valid_names(text: str) -> None:
    labels = (text[:-1] if text.endswith(".") else text).lower().split(".")
    valid = (
        len(".".join(labels)) <= 253
        and all(0 < len(label) <= 63 for label in labels)
        and all(set(label) <= set("az09_-") for label in labels)
        and not any(label.startswith("-") or label.endswith("-") for label in labels)
    )
    try:
        result = canonical_name(text)
    except InvalidName:
        assert not valid
        return
    assert valid
    assert result == ".".join(labels)


@given(st.text(max_size=80))
def test_compile_pattern_fails_only_with_invalid_pattern(text: str) -> None:
    try:
        compiled = compile_pattern(text)
    except InvalidPattern:
        return
    # a compiled pattern matches its own text with every wildcard filled in
    assert compiled.matches(compiled.text.replace("**", "x").replace("*", "x"))


_LABEL = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?", fullmatch=True)


@given(st.lists(_LABEL, min_size=1, max_size=5), st.lists(_LABEL, min_size=1, max_size=3))
def test_matching_is_case_and_trailing_dot_insensitive(
    prefix: list[str], suffix: list[str]
) -> None:
    name = ".".join(prefix + suffix)
    pattern = "**." + ".".join(suffix)
    variants = [name, name.upper() + ".", name.title()]
    for variant in variants:
        assert compile_pattern(pattern).matches(canonical_name(variant))
        assert compile_pattern(pattern.upper() + ".").matches(canonical_name(variant))
    one_label = compile_pattern("*." + ".".join(suffix))
    assert one_label.matches(canonical_name(name.upper())) == (len(prefix) == 1)
