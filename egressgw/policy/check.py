"""``egressgw policy check PATH...``: validate manifests and say what is wrong.

In: files and directories of manifests, and optionally ``conflicts``: what the daemon would note
about the valid objects taken together (two gateways selecting the same pods, an address claimed
by two pods, an egress IP in two gateways; the command line hands in ``plan.build``'s notes, as
this layer may not import the plan). Out: one line per problem (see ``Problem.__str__``), one
line per conflict (``warning:``, or ``error:`` with ``strict``), and a summary line on ``out``.
Exit status 1 if anything is wrong, nothing was found, or (``strict``) there is a conflict;
else 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from egressgw.policy.load import load_paths
from egressgw.policy.model import Snapshot

Conflicts = Callable[[Snapshot], Sequence[str]]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def check_paths(
    paths: Sequence[str],
    out: TextIO | None = None,
    *,
    strict: bool = False,
    conflicts: Conflicts | None = None,
) -> int:
    out = out or sys.stdout
    result = load_paths(paths)
    for problem in result.problems:
        print(problem, file=out)
    where = ", ".join(str(p) for p in paths)
    noted = list(conflicts(result.snapshot)) if conflicts is not None and result.files else []
    severity = "error" if strict else "warning"
    for note in noted:
        print(f"{where}: {severity}: {note}", file=out)
    loaded = sum(result.files.values())
    if not result.files and not result.problems:
        # a typo in the path is likelier than an intentionally empty directory
        print(f"{where}: no *.yaml or *.yml files found", file=out)
        return 1
    counts = []
    if result.problems:
        counts.append(_plural(len(result.problems), "problem"))
    if noted:
        counts.append(_plural(len(noted), "conflict") + ("" if strict else " (warnings)"))
    if not result.problems:
        summary = f"{_plural(loaded, 'object')}, all valid"
    else:
        summary = _plural(loaded, "valid object")
    print(f"{where}: {', '.join([summary, *counts])}", file=out)
    return 1 if result.problems or (strict and noted) else 0
