"""The commands the README and `egressgw lab up` tell an operator to try run as written.

One lab (its own name, so the commands are rewritten from the default lab's names to it) serves
both: the README's "Operators' questions, tried on the lab" block, and every command that
``lab up`` prints. A command whose comment says "exit status N" must end with N, every other one
with 0, and none may print a traceback.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressgw.lab import Lab
from egressgw.lab.cli import usage
from egressgw.lab.services import daemon_available
from egressgw.lab.topology import DEFAULT_LAB_NAME
from tests.conftest import require, require_kernel, unique_name

pytestmark = pytest.mark.kernel

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Operators' questions, tried on the lab"
EGRESSGW = re.compile(r"(^|(?<=\s))(?<!-m )egressgw(?=\s)")
EXIT_STATUS = re.compile(r"exit status (\d+)")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_kernel()
    require(daemon_available(), "`python -m egressgw run` is not available")
    with Lab.up(unique_name("egt")) as built:
        yield built


def readme_commands() -> list[str]:
    """The shell lines of the first ``sh`` block of the section, continuations joined."""
    text = README.read_text()
    block = text[text.index(SECTION) :].split("```sh\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ").splitlines()


def usage_commands(text: str) -> list[str]:
    """The commands of ``lab up``'s usage: the "try:" and "ask:" lines and their continuations."""
    commands: list[str] = []
    label = ""
    for line in text.splitlines():
        head, rest = line[:6], line[6:]
        if head.strip():
            label = head.strip()
        if label in ("try:", "ask:"):
            commands.append(rest)
    return commands


def as_run_here(command: str, lab: Lab) -> tuple[str, int]:
    """``command`` for this lab and this checkout, and the exit status its comment expects."""
    line, _, comment = command.partition("  #")
    expected = EXIT_STATUS.search(comment)
    line = line.replace(f"/run/egressgw-lab/{DEFAULT_LAB_NAME}/", f"{lab.statedir}/")
    line = line.replace(f" {DEFAULT_LAB_NAME}-", f" {lab.names.lab}-")
    line = EGRESSGW.sub(f"{shlex.quote(sys.executable)} -m egressgw", line.strip())
    return line, int(expected[1]) if expected else 0


def run_all(commands: list[str], lab: Lab) -> list[str]:
    ran = []
    for command in commands:
        line, expected = as_run_here(command, lab)
        proc = subprocess.run(
            ["bash", "-c", line],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == expected, f"{command}\n-> {line}\n{output}"
        assert "Traceback" not in output, f"{command}\n{output}"
        ran.append(output)
    return ran


def test_the_readme_operator_examples_run_as_written(lab: Lab) -> None:
    commands = [c for c in readme_commands() if not c.startswith("egressgw lab ")]
    assert len(commands) >= 5
    outputs = run_all(commands, lab)
    joined = "\n".join(outputs)
    verdicts = re.findall(r"^verdict:\s+(\w+)", joined, re.M)
    assert verdicts == ["Allow", "Deny"], joined
    assert "198.51.100.10" in joined  # the CSV of egress IPs to allowlist
    assert '"decisions"' in joined


def test_lab_up_prints_commands_that_run_as_written(lab: Lab) -> None:
    printed = usage(lab.names.lab, lab.statedir)
    commands = usage_commands(printed)
    assert any("explain --url" in c for c in commands)
    assert any("egress-ips --url" in c for c in commands)
    run_all(commands, lab)
