"""The daemon's manifest source: the walk, loader and duplicate rules of ``policy check``, per-file
"last valid content stays in force", and ConfigMap mounts updated the kubelet's way."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressgw.policy import load
from egressgw.policy.load import load_paths
from egressgw.policy.model import Snapshot
from egressgw.sources import manifests
from egressgw.sources.manifests import ManifestSource

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s, labels: {generation: '%s'}}\n"
POLICY = """\
apiVersion: egressgw.io/v1alpha1
kind: EgressPolicy
metadata: {name: database, namespace: payments}
spec:
  podSelector: {}
  egress:
    - to: [{cidr: 203.0.113.10/32}]
      ports: [{protocol: TCP, port: %d}]
"""


class ConfigMapMount:
    """A directory laid out and updated as the kubelet's atomic writer does for a ConfigMap
    volume: the files of each generation in a new ``..<timestamp>.<random>/`` directory,
    ``..data`` a symlink to the current one, and each visible name a symlink through ``..data``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def generation(self) -> str | None:
        data = self.root / "..data"
        return os.readlink(data) if data.is_symlink() else None

    def steps(self, files: dict[str, str], mtime_ns: int | None = None) -> Iterator[str]:
        """Update the mount to ``files`` one kubelet step at a time, yielding after each; with
        ``mtime_ns``, every new file gets that modification time."""
        old = self.generation()
        old_names = {p.name for p in self.root.iterdir() if not p.name.startswith(".")}
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        generation = Path(tempfile.mkdtemp(prefix=stamp, dir=self.root))
        for name, text in files.items():
            path = generation / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if mtime_ns is not None:
                os.utime(path, ns=(mtime_ns, mtime_ns))
        yield "wrote the new generation"
        os.symlink(generation.name, self.root / "..data_tmp")
        yield "linked ..data_tmp"
        os.rename(self.root / "..data_tmp", self.root / "..data")
        yield "swapped ..data"
        names = {name.split("/")[0] for name in files}
        for name in sorted(names - old_names):
            os.symlink(f"..data/{name}", self.root / name)
        yield "linked the new names"
        for name in sorted(old_names - names):
            (self.root / name).unlink()
        yield "removed the old names"
        if old is not None:
            shutil.rmtree(self.root / old)
        yield "removed the old generation"

    def update(self, files: dict[str, str], mtime_ns: int | None = None) -> None:
        for _ in self.steps(files, mtime_ns):
            pass


def generation(number: int, port: int) -> dict[str, str]:
    return {
        "namespaces.yaml": NAMESPACE % ("payments", number) + "---\n" + NAMESPACE % ("web", number),
        "policy.yaml": POLICY % port,
    }


def content(snapshot: Snapshot) -> tuple[set[str], set[int]]:
    """The generation labels of the namespaces and the ports of the policies."""
    generations = {ns.labels["generation"] for ns in snapshot.namespaces.values()}
    ports = {p.port or 0 for pol in snapshot.policies for r in pol.egress for p in r.ports}
    return generations, ports


def scan(source: ManifestSource) -> Snapshot:
    snapshot = source.scan()
    assert snapshot is not None
    return snapshot


def assert_clean(source: ManifestSource, caplog: pytest.LogCaptureFixture) -> None:
    assert source.problems() == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []


def test_a_configmap_mount_is_read_through_its_visible_names_only(tmp_path: Path) -> None:
    mount = ConfigMapMount(tmp_path / "cm")
    mount.update(generation(1, 5432))
    mount.update(generation(2, 443))
    source = ManifestSource(mount.root)
    snapshot = scan(source)
    assert content(snapshot) == ({"2"}, {443})
    assert source.problems() == []
    assert list(source.files) == [mount.root / "namespaces.yaml", mount.root / "policy.yaml"]
    # ``policy check`` finds the same files and objects
    result = load_paths([mount.root])
    assert result.problems == []
    assert list(result.files) == [str(p) for p in source.files]
    assert result.snapshot == snapshot


def test_a_swap_step_by_step_never_warns_and_never_lets_the_old_generation_win(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=manifests.__name__)
    mount = ConfigMapMount(tmp_path / "cm")
    mount.update(generation(1, 5432))
    source = ManifestSource(mount.root)
    assert content(scan(source)) == ({"1"}, {5432})

    # generation 2 moves the policy into another key and drops policy.yaml
    gen2 = {
        "namespaces.yaml": generation(2, 443)["namespaces.yaml"],
        "more/policy.yaml": POLICY % 443,
    }
    swapped = False
    for step in mount.steps(gen2):
        swapped = swapped or step == "swapped ..data"
        snapshot = source.scan() or source_snapshot(source)
        assert content(snapshot) == (({"2"}, {443}) if swapped else ({"1"}, {5432})), step
        assert_clean(source, caplog)
        assert source.unchanged(), step
    assert list(source.files) == [
        mount.root / "more" / "policy.yaml",
        mount.root / "namespaces.yaml",
    ]
    assert not any("already defined" in r.getMessage() for r in caplog.records)


def source_snapshot(source: ManifestSource) -> Snapshot:
    """The snapshot the source holds now, for a scan that found nothing new."""
    snapshot, problems = load.build_snapshot(
        [obj for state in source.files.values() for obj in state.objects]
    )
    assert problems == []
    return snapshot


def test_a_swap_is_seen_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    mount = ConfigMapMount(tmp_path / "cm")
    mount.update(generation(1, 5432))
    source = ManifestSource(mount.root)
    scan(source)
    before = os.stat(mount.root / "policy.yaml")
    mount.update(generation(2, 5433), mtime_ns=before.st_mtime_ns)
    after = os.stat(mount.root / "policy.yaml")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert not source.unchanged()
    assert content(scan(source)) == ({"2"}, {5433})
    assert source.unchanged()


def test_a_swap_that_leaves_the_bytes_alone_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=manifests.__name__)
    mount = ConfigMapMount(tmp_path / "cm")
    mount.update(generation(1, 5432))
    source = ManifestSource(mount.root)
    scan(source)
    caplog.clear()
    mount.update(generation(1, 5432))
    assert not source.unchanged()
    assert source.scan() is None
    assert source.unchanged()
    assert caplog.records == []


def test_a_scan_racing_a_swap_reads_one_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet swaps while a scan is between two files: the scan must not mix them."""
    mount = ConfigMapMount(tmp_path / "cm")
    mount.update(generation(1, 5432))
    source = ManifestSource(mount.root)
    scan(source)
    mount.update(generation(2, 443))  # both files change: the next scan reads both
    real_read = load.read_manifest
    swaps = iter([generation(3, 8443)])

    def read_then_swap(found: load.ManifestFile) -> tuple[load.Stamp, bytes]:
        result = real_read(found)
        files = next(swaps, None)
        if files is not None:
            mount.update(files)  # all of it, old generation removed, before the next file
        return result

    monkeypatch.setattr(manifests, "read_manifest", read_then_swap)
    assert content(scan(source)) == ({"3"}, {8443})
    assert source.problems() == []


def test_a_swap_that_has_not_removed_the_old_generation_yet_keeps_the_scan_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = ConfigMapMount(tmp_path / "cm")
    mount.update(generation(1, 5432))
    source = ManifestSource(mount.root)
    scan(source)
    mount.update(generation(2, 443))
    steps = mount.steps(generation(3, 8443))
    real_read = load.read_manifest

    def read_then_swap(found: load.ManifestFile) -> tuple[load.Stamp, bytes]:
        result = real_read(found)
        for step in steps:
            if step == "removed the old names":
                break  # generation 3 is in force, generation 2 still on disk
        return result

    monkeypatch.setattr(manifests, "read_manifest", read_then_swap)
    assert content(scan(source)) == ({"2"}, {443})  # not generation 2 and 3 mixed
    monkeypatch.undo()
    assert not source.unchanged()
    assert content(scan(source)) == ({"3"}, {8443})
    list(steps)
    assert content(source_snapshot(source)) == ({"3"}, {8443})
    assert source.unchanged()


def test_an_old_generation_left_in_a_plain_directory_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "..2026_12_01_20_00_00.123456789").mkdir()
    (tmp_path / "..2026_12_01_20_00_00.123456789" / "policy.yaml").write_text(POLICY % 5432)
    (tmp_path / "policy.yaml").write_text(POLICY % 443)
    (tmp_path / ".policy.yaml.swp").write_text(POLICY % 22)
    source = ManifestSource(tmp_path)
    assert content(scan(source)) == (set(), {443})
    assert source.problems() == []


def test_duplicates_follow_the_rules_and_words_of_policy_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.yaml").write_text(POLICY % 5432)
    (tmp_path / "b.yaml").write_text(POLICY % 443)
    (tmp_path / "c.yaml").write_text(NAMESPACE % ("web", 1) + "---\n" + NAMESPACE % ("web", 2))
    source = ManifestSource(tmp_path)
    snapshot = scan(source)
    expected = load_paths([tmp_path])
    assert snapshot == expected.snapshot
    assert content(snapshot) == ({"1"}, {5432})
    assert [str(p) for p in source.problems()] == [str(p) for p in expected.problems]
    assert [str(p) for p in source.problems()] == [
        f"{tmp_path / 'b.yaml'}: EgressPolicy/payments/database: already defined in"
        f" {tmp_path / 'a.yaml'}: define each object once; this copy is ignored",
        f"{tmp_path / 'c.yaml'}: Namespace/web: already defined in {tmp_path / 'c.yaml'}:"
        " define each object once; this copy is ignored",
    ]
    assert sum("already defined" in r.getMessage() for r in caplog.records) == 2

    (tmp_path / "a.yaml").unlink()  # the copy in b.yaml is now the only one
    assert content(scan(source)) == ({"1"}, {443})
    assert len(source.problems()) == 1


def test_a_bad_edit_keeps_the_file_s_last_valid_content(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % 5432)
    source = ManifestSource(tmp_path)
    assert content(scan(source)) == (set(), {5432})
    policy.write_text(POLICY.replace("203.0.113.10/32", "203.0.113.10/33") % 443)
    assert content(scan(source)) == (set(), {5432})
    assert ["203.0.113.10/33" in str(p) for p in source.problems()] == [True]
    policy.write_text(POLICY % 443)
    assert content(scan(source)) == (set(), {443})
    assert source.problems() == []
    policy.unlink()
    assert content(scan(source)) == (set(), set())


def test_an_edit_in_place_with_the_same_size_and_mtime_is_seen(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % 5432)
    source = ManifestSource(tmp_path)
    scan(source)
    before = policy.stat()
    time.sleep(0.02)  # past the clock tick of the first write, so ctime moves
    policy.write_text(POLICY % 5433)
    os.utime(policy, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p or touch -r do
    after = policy.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert not source.unchanged()
    assert content(scan(source)) == (set(), {5433})


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ManifestSource(tmp_path / "nowhere").scan()
