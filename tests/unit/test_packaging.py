"""What ships: the wheel (and so the image, which installs it) holds the product and never the
lab or the test doubles, and the commands import no test double, even lazily."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported(module: str, path: Path) -> set[str]:
    """The egressgw modules ``module`` imports anywhere in its body (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "egressgw" and _module_file(name)}


def import_graph(*roots: str) -> set[str]:
    """Every egressgw module reachable from ``roots`` through import statements, including the
    parent packages each import runs."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]
        path = _module_file(module)
        if path is not None:
            todo += _imported(module, path)
    return seen


def test_the_commands_import_no_test_double() -> None:
    graph = import_graph("egressgw.__main__", "egressgw.cli", "egressgw.app")
    # the walk reaches the daemon's parts, the Kubernetes adapters and the operator tools
    assert {"egressgw.runtime", "egressgw.dns.interceptor", "egressgw.kube.leases"} <= graph
    assert {"egressgw.datapath.kernel", "egressgw.tools"} <= graph
    assert sorted(m for m in graph if m.startswith("egressgw.testing")) == []


def test_the_wheel_holds_neither_the_lab_nor_the_test_doubles(tmp_path: Path) -> None:
    source = tmp_path / "src"  # what the image's build stage copies
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "egressgw", source / "egressgw", symlinks=True)
    shutil.copytree(ROOT / "manifests" / "crds", source / "manifests" / "crds")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(source)],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    (wheel,) = wheels.glob("egressgw-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"egressgw/app.py", "egressgw/cli.py", "egressgw/contracts.py"} <= set(names)
    assert any(n.startswith("egressgw/crds/") and n.endswith(".yaml") for n in names)
    shipped = [n for n in names if n.startswith(("egressgw/testing/", "egressgw/lab/"))]
    assert shipped == []
