"""``egressgw lab demo --keep`` as an operator runs it, and the commands it tells them to try.

One lab, brought up by ``python -m egressgw.lab demo --keep`` in its own process under a name of
its own, serves the module: the demo's report (every row as expected, the gateway node failed and
brought back), the commands it prints when it leaves the lab up (the same ``lab up`` prints), and
the README's "Operators' questions, tried on the lab" block (rewritten from the default lab's names
to this one's). A command whose comment says "exit status N" must end with N, every other one with
0, and none may print a traceback.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressgw.lab import Lab, down
from egressgw.lab.cli import usage
from egressgw.lab.demo import EXPECTED, FAILOVER, PHASE_BACK, PHASE_DOWN, PHASE_UP, RECOVERED
from egressgw.lab.services import cluster_available
from egressgw.lab.topology import DEFAULT_LAB_NAME, EGRESS_IPS, ROUTER_V4, ROUTER_V6
from tests.conftest import require, require_kernel, unique_name

pytestmark = pytest.mark.kernel

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Operators' questions, tried on the lab"
EGRESSGW = re.compile(r"(^|(?<=\s))(?<!-m )egressgw(?=\s)")
EXIT_STATUS = re.compile(r"exit status (\d+)")
LEFT_UP = "left up"


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[Lab, subprocess.CompletedProcess[str]]]:
    require_kernel()
    missing = cluster_available()
    require(missing is None, missing or "")
    name = unique_name("egt")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "egressgw.lab", "demo", "--name", name, "--keep"],
            capture_output=True,
            text=True,
            timeout=280,
            stdin=subprocess.DEVNULL,
        )
        yield Lab.attach(name), proc
    finally:
        down(name)


@pytest.fixture(scope="module")
def lab(demo: tuple[Lab, subprocess.CompletedProcess[str]]) -> Lab:
    return demo[0]


def readme_commands() -> list[str]:
    """The shell lines of the first ``sh`` block of the section, continuations joined."""
    text = README.read_text()
    block = text[text.index(SECTION) :].split("```sh\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ").splitlines()


def usage_commands(text: str) -> list[str]:
    """The commands of a usage text: the "try:" and "ask:" lines and their continuations."""
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


def test_the_demo_fails_a_gateway_node_reports_every_row_and_keeps_the_lab(
    demo: tuple[Lab, subprocess.CompletedProcess[str]],
) -> None:
    lab, proc = demo
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    rows = len(EXPECTED) + len(FAILOVER) + len(RECOVERED)
    assert f"{rows}/{rows} rows as expected" in out, out
    for phase in (PHASE_UP, PHASE_DOWN, PHASE_BACK):
        assert f"== {phase}" in out, phase
    assert "198.51.100.10 (payments egress IP)" in out
    assert "198.51.100.100 (node router)" in out
    assert "MISMATCH" not in out and "Traceback" not in proc.stderr
    assert f"lab {lab.names.lab!r} {LEFT_UP}" in out
    assert lab.daemon_alive() and lab.state.down_nodes == []


def test_the_readme_operator_examples_run_as_written(lab: Lab) -> None:
    commands = [c for c in readme_commands() if not c.startswith("egressgw lab ")]
    assert len(commands) >= 5
    outputs = run_all(commands, lab)
    joined = "\n".join(outputs)
    verdicts = re.findall(r"^verdict:\s+(\w+)", joined, re.M)
    assert verdicts == ["Allow", "Deny"], joined
    assert "198.51.100.10" in joined  # the CSV of egress IPs to allowlist
    assert '"decisions"' in joined


def test_the_commands_the_demo_prints_run_as_written(
    demo: tuple[Lab, subprocess.CompletedProcess[str]],
) -> None:
    lab, proc = demo
    printed = proc.stdout.split(LEFT_UP, 1)[-1]
    commands = usage_commands(printed)
    assert any("explain --url" in c for c in commands)
    assert any("egress-ips --url" in c for c in commands)
    assert any("getent hosts shell-0.shell.sandbox" in c for c in commands)
    # `lab up` prints the same commands (spelling egressgw as this process would).
    same = usage_commands(usage(lab.names.lab, lab.statedir))
    assert [as_run_here(c, lab) for c in same] == [as_run_here(c, lab) for c in commands]
    outputs = run_all(commands, lab)
    joined = "\n".join(outputs)
    # psql and curl by name: payments' egress IP, the node router's (IPv6 first, as getaddrinfo
    # orders them)
    assert any(f'"source": "{a}"' in joined for a in EGRESS_IPS["payments"]), joined
    assert any(f'"source": "{a}"' in joined for a in (ROUTER_V4, ROUTER_V6)), joined
