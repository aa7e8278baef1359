"""DNS names and wildcard patterns: canonical form, compiled matching, many-pattern lookup.

In: names (from policies or from DNS queries) and ``fqdnPattern`` strings. Out: canonical names,
compiled patterns, and which keys of a ``FqdnMatcher`` match a name. Pure: no I/O, no clock.

Canonical form: lower case, no trailing dot, non-ASCII labels converted to their ``xn--`` form
(Python's IDNA 2003 codec, no extra dependency). A name is at most 253 characters (255 octets on
the wire) and every label 1..63 octets of ``a-z 0-9 - _``, not starting or ending with ``-``.
``_`` is allowed because real names use it (``_dmarc.example.com``, SRV names).

Pattern semantics:

- a label that is exactly ``*`` matches exactly one whole label: ``*.example.com`` matches
  ``a.example.com`` but neither ``example.com`` nor ``a.b.example.com``;
- ``*`` inside a label matches zero or more characters of that one label, never a dot:
  ``api-*.example.com`` matches ``api-eu.example.com`` but not ``api-eu.x.example.com``;
- ``**`` is allowed only as the whole leftmost label and matches one or more labels:
  ``**.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``;
- the rightmost label must be literal, so bare ``*``/``**`` and ``*.*`` are rejected: a pattern
  that matches every name is a mistake in an egress firewall (use defaultAction Allow instead).
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Generic, TypeVar

MAX_NAME_LENGTH = 253  # characters without the trailing dot: 255 octets in wire format
MAX_LABEL_LENGTH = 63
_LABEL_CHARS = r"a-z0-9_\-"
_LABEL_RE = re.compile(rf"[{_LABEL_CHARS}]+")  # fullmatch only: "$" would let "a\n" through
_WILDCARD_LABEL_RE = re.compile(rf"[{_LABEL_CHARS}*]+")
_CANONICAL_LABEL = rf"[a-z0-9_](?:[{_LABEL_CHARS}]{{0,61}}[a-z0-9_])?"
# a whole name already in canonical form once lower-cased: the common case, checked in one step
_CANONICAL_NAME_RE = re.compile(rf"{_CANONICAL_LABEL}(?:\.{_CANONICAL_LABEL})*")


class InvalidName(ValueError):
    """A DNS name that cannot be canonicalised; the message names the problem."""


class InvalidPattern(ValueError):
    """An ``fqdnPattern`` that cannot be compiled; the message names the problem and the fix."""


def quoted(text: str) -> str:
    """Double-quoted like YAML/JSON, so control characters in a bad name stay visible."""
    return json.dumps(text, ensure_ascii=False)


def _canonical_label(label: str, name: str) -> str:
    if not label:
        raise InvalidName(
            f"{quoted(name)} has an empty label (two dots in a row, or a leading dot)"
        )
    if not label.isascii():
        try:
            label = label.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidName(f"{quoted(name)}: label {quoted(label)} is not valid IDNA") from exc
    label = label.lower()
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidName(
            f"{quoted(name)}: label {quoted(label[:20] + '...')} is {len(label)} octets long;"
            f" the limit is {MAX_LABEL_LENGTH}"
        )
    if not _LABEL_RE.fullmatch(label):
        bad = "".join(sorted({c for c in label if not _LABEL_RE.fullmatch(c)}))
        raise InvalidName(
            f"{quoted(name)}: label {quoted(label)} has invalid characters {quoted(bad)};"
            " use letters, digits, '-' and '_'"
        )
    if label.startswith("-") or label.endswith("-"):
        raise InvalidName(f"{quoted(name)}: label {quoted(label)} starts or ends with '-'")
    return label


def canonical_name(name: str) -> str:
    """Lower case, trailing dot removed, IDNA-encoded; raise InvalidName if it is not a name."""
    if not isinstance(name, str):
        raise InvalidName(f"a DNS name must be a string, got {type(name).__name__}")
    text = name[:-1] if name.endswith(".") else name
    if text.isascii():
        lowered = text.lower()
        if len(lowered) <= MAX_NAME_LENGTH and _CANONICAL_NAME_RE.fullmatch(lowered):
            return lowered
    if not text:
        raise InvalidName("the DNS name is empty")
    # A cheap bound before IDNA work; the exact limit applies to the encoded form below.
    if len(text) > 4 * MAX_NAME_LENGTH:
        raise InvalidName(
            f"{quoted(name[:40] + '...')} is longer than {MAX_NAME_LENGTH} characters"
        )
    result = ".".join(_canonical_label(label, name) for label in text.split("."))
    if len(result) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"{quoted(name[:40] + '...')} is {len(result)} characters long;"
            f" the limit is {MAX_NAME_LENGTH}"
        )
    return result


@dataclass(frozen=True)
class FqdnPattern:
    """A compiled ``fqdnPattern``. ``text`` is canonical (lower case, no trailing dot)."""

    text: str
    regex: re.Pattern[str] = field(repr=False, compare=False)
    suffix: str  # the literal labels right of the last wildcard, e.g. "example.com"

    def matches(self, name: str) -> bool:
        """``name`` must already be canonical (see ``canonical_name``)."""
        return self.regex.fullmatch(name) is not None


def _wildcard_label_regex(label: str, pattern: str) -> str:
    if "**" in label:
        raise InvalidPattern(
            f"{quoted(pattern)}: '**' is only allowed as the whole leftmost label,"
            " as in **.example.com"
        )
    if not _WILDCARD_LABEL_RE.fullmatch(label):
        raise InvalidPattern(
            f"{quoted(pattern)}: label {quoted(label)} has invalid characters;"
            " use letters, digits, '-', '_' and '*'"
        )
    if label == "*":
        return f"[{_LABEL_CHARS}]+"
    return f"[{_LABEL_CHARS}]*".join(re.escape(part) for part in label.split("*"))


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> FqdnPattern:
    """Compile an ``fqdnPattern`` once into an anchored regex; raise InvalidPattern if invalid."""
    text = pattern[:-1] if pattern.endswith(".") else pattern
    text = text.lower()
    if text in ("", "*", "**"):
        raise InvalidPattern(
            f"{quoted(pattern)} would match every name: name the domain, as in *.example.com,"
            " or set the EgressGateway's defaultAction to Allow"
        )
    labels = text.split(".")
    if "" in labels:
        raise InvalidPattern(
            f"{quoted(pattern)} has an empty label (two dots in a row, or a leading dot)"
        )
    if "*" in labels[-1]:
        raise InvalidPattern(
            f"{quoted(pattern)}: the rightmost label must be literal (a wildcard there matches"
            " whole top-level domains); write e.g. *.example.com"
        )
    parts: list[str] = []
    literal: list[str] = []
    last_wildcard = -1
    for index, label in enumerate(labels):
        if label == "**" and index == 0:
            parts.append(f"(?:[{_LABEL_CHARS}]+\\.)*[{_LABEL_CHARS}]+")
            last_wildcard = index
            literal.append(label)
        elif "*" in label:
            parts.append(_wildcard_label_regex(label, pattern))
            last_wildcard = index
            literal.append(label)
        else:
            try:
                canonical_label = _canonical_label(label, pattern)
            except InvalidName as exc:
                raise InvalidPattern(str(exc)) from exc
            parts.append(re.escape(canonical_label))
            literal.append(canonical_label)
    canonical = ".".join(literal)
    if len(canonical) > MAX_NAME_LENGTH:
        raise InvalidPattern(f"{quoted(pattern)} is longer than {MAX_NAME_LENGTH} characters")
    suffix = ".".join(literal[last_wildcard + 1 :])
    return FqdnPattern(canonical, re.compile("\\.".join(parts)), suffix)


K = TypeVar("K", bound=Hashable)


class FqdnMatcher(Generic[K]):
    """Many exact names and patterns, each with a key; answers which keys match a name.

    Exact names are one dict lookup. Patterns are grouped by their literal suffix, so a lookup
    tries only the patterns whose suffix is one of the name's own suffixes: O(labels), not
    O(patterns).
    """

    def __init__(self) -> None:
        self._exact: dict[str, list[K]] = {}
        self._by_suffix: dict[str, list[tuple[FqdnPattern, K]]] = {}

    def add_name(self, name: str, key: K) -> None:
        self._exact.setdefault(canonical_name(name), []).append(key)

    def add_pattern(self, pattern: str | FqdnPattern, key: K) -> None:
        compiled = pattern if isinstance(pattern, FqdnPattern) else compile_pattern(pattern)
        self._by_suffix.setdefault(compiled.suffix, []).append((compiled, key))

    def add_all(self, names: Iterable[tuple[str, K]], patterns: Iterable[tuple[str, K]]) -> None:
        for name, key in names:
            self.add_name(name, key)
        for pattern, key in patterns:
            self.add_pattern(pattern, key)

    def match(self, name: str) -> list[K]:
        """Keys of every exact name and pattern matching ``name`` (canonicalised here), exact
        names first, then patterns from the most specific suffix; raises InvalidName."""
        return self.match_canonical(canonical_name(name))

    def match_canonical(self, canonical: str) -> list[K]:
        """``match`` for a name already passed through ``canonical_name``."""
        found = list(self._exact.get(canonical, ()))
        labels = canonical.split(".")
        for start in range(len(labels)):
            for compiled, key in self._by_suffix.get(".".join(labels[start:]), ()):
                if compiled.matches(canonical):
                    found.append(key)
        return found
