"""``egressgw policy check``: one line per problem, a summary, and the exit status."""

from __future__ import annotations

import io
from pathlib import Path

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
