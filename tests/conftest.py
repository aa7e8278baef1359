"""Shared fixtures. Privileged tests skip without root; with CI=true they fail instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, why: str) -> None:
    """Skip a privileged test whose precondition is missing; under CI, fail it instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a privileged test cannot run: {why}")
    pytest.skip(why)


def require_kernel() -> None:
    require(os.geteuid() == 0, "needs root for network namespaces and nftables")
    for tool in ("ip", "nft"):
        require(shutil.which(tool) is not None, f"needs the {tool} command")


def unique_name(prefix: str = "egt") -> str:
    """A network namespace name no other test or lab uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace with loopback up; removed afterwards, also on failure."""
    require_kernel()
    name = unique_name()
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``egressgw ARGV...`` in this process: (exit status, stdout, stderr)."""
    from egressgw.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
