"""``egressgw policy check PATH...``: validate manifests and say what is wrong.

In: files and directories of manifests. Out: one line per problem (see ``Problem.__str__``) and a
summary line on ``out``; exit status 1 if anything is wrong or nothing was found, else 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from egressgw.policy.load import load_paths


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def check_paths(paths: Sequence[str], out: TextIO = sys.stdout) -> int:
    result = load_paths(paths)
    for problem in result.problems:
        print(problem, file=out)
    where = ", ".join(str(p) for p in paths)
    loaded = sum(result.files.values())
    if result.problems:
        problems = _plural(len(result.problems), "problem")
        print(f"{where}: {_plural(loaded, 'valid object')}, {problems}", file=out)
        return 1
    if not result.files:
        # a typo in the path is likelier than an intentionally empty directory
        print(f"{where}: no *.yaml or *.yml files found", file=out)
        return 1
    print(f"{where}: {_plural(loaded, 'object')}, all valid", file=out)
    return 0
