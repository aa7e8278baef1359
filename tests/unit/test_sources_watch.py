"""The manifest source follows a directory through inotify: every change a user or the kubelet
makes gives a new Snapshot, nothing is read while nothing changes, and without inotify it polls."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from egressgw.policy import load
from egressgw.policy.model import Snapshot
from egressgw.sources import manifests, watch
from egressgw.sources.manifests import ManifestSource
from egressgw.sources.watch import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    NONE,
    RESCAN,
    RESYNC,
    DirectoryWatcher,
    Watched,
    classify,
)
from tests.unit.test_sources_manifests import NAMESPACE, POLICY, ConfigMapMount, content, generation

WAIT_S = 5.0  # a change must give its snapshot within this; a settled batch takes ~0.1 s
IDLE_S = 1.5  # long enough for three polls of the old twice-a-second loop
NEVER_S = 3600.0  # a safety poll that does not run during a test


class CountingSource(ManifestSource):
    """Counts scans (they run in a worker thread)."""

    def __init__(self, directory: Path, **kwargs: float) -> None:
        super().__init__(directory, **kwargs)
        self.scans = 0
        self._lock = threading.Lock()

    def scan(self) -> Snapshot | None:
        with self._lock:
            self.scans += 1
        return super().scan()


@contextlib.asynccontextmanager
async def following(source: ManifestSource) -> AsyncIterator[Callable[[], Awaitable[Snapshot]]]:
    """The source running in a task, as the daemon runs it; yields a function that awaits its
    next Snapshot, bounded. The task is cancelled at the end."""
    received: asyncio.Queue[Snapshot] = asyncio.Queue()

    async def run() -> None:
        async for snapshot in source.snapshots():
            received.put_nowait(snapshot)

    async def next_snapshot() -> Snapshot:
        return await asyncio.wait_for(received.get(), WAIT_S)

    task = asyncio.create_task(run())
    try:
        yield next_snapshot
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def scanned_more_than(source: CountingSource, count: int) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if source.scans > count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no scan after {count} within {WAIT_S} s")


def namespaces(snapshot: Snapshot) -> set[str]:
    return set(snapshot.namespaces)


def test_writing_a_file_gives_a_snapshot_with_its_content(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % 5432)

    async def scenario() -> None:
        async with following(ManifestSource(tmp_path, safety_poll_s=NEVER_S)) as next_snapshot:
            assert content(await next_snapshot()) == (set(), {5432})
            policy.write_text(POLICY % 443)
            assert content(await next_snapshot()) == (set(), {443})
            (tmp_path / "web.yaml").write_text(NAMESPACE % ("web", 1))
            assert namespaces(await next_snapshot()) == {"web"}

    asyncio.run(scenario())


def test_an_editor_s_rename_over_is_seen(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % 5432)

    async def scenario() -> None:
        async with following(ManifestSource(tmp_path, safety_poll_s=NEVER_S)) as next_snapshot:
            assert content(await next_snapshot()) == (set(), {5432})
            temporary = tmp_path / ".policy.yaml.swp"
            temporary.write_text(POLICY % 443)
            os.rename(temporary, policy)
            assert content(await next_snapshot()) == (set(), {443})

    asyncio.run(scenario())


def test_removing_a_file_is_seen(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY % 5432)
    (tmp_path / "web.yaml").write_text(NAMESPACE % ("web", 1))

    async def scenario() -> None:
        async with following(ManifestSource(tmp_path, safety_poll_s=NEVER_S)) as next_snapshot:
            assert content(await next_snapshot()) == ({"1"}, {5432})
            (tmp_path / "policy.yaml").unlink()
            assert content(await next_snapshot()) == ({"1"}, set())

    asyncio.run(scenario())


def test_a_new_subdirectory_is_watched_and_so_are_the_files_written_into_it_later(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        source = CountingSource(tmp_path, safety_poll_s=NEVER_S)
        async with following(source) as next_snapshot:
            assert namespaces(await next_snapshot()) == set()
            scans = source.scans
            (tmp_path / "team" / "deeper").mkdir(parents=True)
            await scanned_more_than(source, scans)  # the rescan that added the watches
            (tmp_path / "team" / "deeper" / "web.yaml").write_text(NAMESPACE % ("web", 1))
            assert namespaces(await next_snapshot()) == {"web"}
            (tmp_path / "team" / "deeper" / "web.yaml").write_text(NAMESPACE % ("web", 2))
            assert content(await next_snapshot()) == ({"2"}, set())

    asyncio.run(scenario())


def test_a_subdirectory_created_with_its_files_at_once_is_read(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with following(ManifestSource(tmp_path, safety_poll_s=NEVER_S)) as next_snapshot:
            assert namespaces(await next_snapshot()) == set()
            staged = tmp_path / ".staged"  # as ``cp -r`` to a hidden name, then ``mv``
            (staged / "deeper").mkdir(parents=True)
            (staged / "deeper" / "web.yaml").write_text(NAMESPACE % ("web", 1))
            (staged / "api.yaml").write_text(NAMESPACE % ("api", 1))
            os.rename(staged, tmp_path / "team")
            assert namespaces(await next_snapshot()) == {"api", "web"}
            (tmp_path / "team" / "deeper" / "web.yaml").unlink()
            assert namespaces(await next_snapshot()) == {"api"}

    asyncio.run(scenario())


def test_removing_a_subdirectory_is_seen(tmp_path: Path) -> None:
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "web.yaml").write_text(NAMESPACE % ("web", 1))
    (tmp_path / "api.yaml").write_text(NAMESPACE % ("api", 1))

    async def scenario() -> None:
        async with following(ManifestSource(tmp_path, safety_poll_s=NEVER_S)) as next_snapshot:
            assert namespaces(await next_snapshot()) == {"api", "web"}
            shutil.rmtree(tmp_path / "team")
            assert namespaces(await next_snapshot()) == {"api"}

    asyncio.run(scenario())


def test_an_atomic_configmap_swap_gives_one_snapshot_of_the_new_generation(tmp_path: Path) -> None:
    mount = ConfigMapMount(tmp_path / "cm")
    mount.update(generation(1, 5432))

    async def scenario() -> None:
        source = CountingSource(mount.root, safety_poll_s=NEVER_S)
        async with following(source) as next_snapshot:
            assert content(await next_snapshot()) == ({"1"}, {5432})
            policy = os.stat(mount.root / "policy.yaml")
            mount.update(generation(2, 5433), mtime_ns=policy.st_mtime_ns)  # same size, mtime
            assert content(await next_snapshot()) == ({"2"}, {5433})
            # a key moved into a subdirectory of the generation, another removed
            moved = {"more/policy.yaml": POLICY % 443}
            mount.update(moved)
            assert content(await next_snapshot()) == (set(), {443})
            mount.update(generation(3, 8443))
            assert content(await next_snapshot()) == ({"3"}, {8443})

    asyncio.run(scenario())


def test_a_symlinked_file_edited_where_it_lies_is_seen(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "policy.yaml").write_text(POLICY % 5432)
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "policy.yaml").symlink_to(elsewhere / "policy.yaml")

    async def scenario() -> None:
        source = ManifestSource(tmp_path / "manifests", safety_poll_s=NEVER_S)
        async with following(source) as next_snapshot:
            assert content(await next_snapshot()) == (set(), {5432})
            (elsewhere / "policy.yaml").write_text(POLICY % 443)
            assert content(await next_snapshot()) == (set(), {443})

    asyncio.run(scenario())


def test_a_symlinked_directory_flipped_to_another_tree_is_seen(tmp_path: Path) -> None:
    """As git-sync publishes: a new worktree, then the link renamed over the old one."""
    for version in (1, 2):
        (tmp_path / f"worktree-{version}" / "team").mkdir(parents=True)
        (tmp_path / f"worktree-{version}" / "team" / "web.yaml").write_text(
            NAMESPACE % ("web", version)
        )
    (tmp_path / "current").symlink_to("worktree-1")

    async def scenario() -> None:
        source = ManifestSource(tmp_path / "current", safety_poll_s=NEVER_S)
        async with following(source) as next_snapshot:
            assert content(await next_snapshot()) == ({"1"}, set())
            (tmp_path / "current.tmp").symlink_to("worktree-2")
            os.rename(tmp_path / "current.tmp", tmp_path / "current")
            assert content(await next_snapshot()) == ({"2"}, set())
            (tmp_path / "worktree-2" / "team" / "web.yaml").write_text(NAMESPACE % ("web", 3))
            assert content(await next_snapshot()) == ({"3"}, set())

    asyncio.run(scenario())


def test_nothing_is_read_while_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for number in range(20):
        (tmp_path / f"ns-{number}.yaml").write_text(NAMESPACE % (f"ns-{number}", 1))
    walks = [0]
    real_walk = load.walk

    def counted(path: Path) -> list[load.ManifestFile]:
        walks[0] += 1
        return real_walk(path)

    monkeypatch.setattr(manifests, "walk", counted)

    async def scenario() -> None:
        source = CountingSource(tmp_path, safety_poll_s=NEVER_S)
        async with following(source) as next_snapshot:
            assert len((await next_snapshot()).namespaces) == 20
            walks[0], scans = 0, source.scans
            await asyncio.sleep(IDLE_S)
            assert (walks[0], source.scans) == (0, scans)
            (tmp_path / "ns-0.yaml").write_text(NAMESPACE % ("ns-0", 2))
            await next_snapshot()
            assert walks[0] >= 1  # the counter does see the rescan

    asyncio.run(scenario())


def test_the_safety_poll_rescans_without_an_event(tmp_path: Path) -> None:
    async def scenario() -> None:
        source = CountingSource(tmp_path, safety_poll_s=0.05)
        async with following(source) as next_snapshot:
            await next_snapshot()
            await scanned_more_than(source, source.scans)

    asyncio.run(scenario())


def test_without_inotify_it_says_so_once_and_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_inotify() -> int:
        raise OSError(errno.ENOSYS, "inotify_init1: Function not implemented")

    monkeypatch.setattr(watch, "inotify_init", no_inotify)
    caplog.set_level(logging.INFO, logger=manifests.__name__)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % 5432)

    async def scenario() -> None:
        source = ManifestSource(tmp_path, poll_interval_s=0.02)
        async with following(source) as next_snapshot:
            assert content(await next_snapshot()) == (set(), {5432})
            policy.write_text(POLICY % 443)
            assert content(await next_snapshot()) == (set(), {443})

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"cannot watch {tmp_path} for changes (this kernel has no inotify"
        " (inotify_init1: Function not implemented)); polling it every 0.02 s instead"
    ]


def test_when_the_watch_limit_is_reached_it_says_so_once_and_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_more_watches(fd: int, path: str, mask: int) -> int:
        raise OSError(errno.ENOSPC, "inotify_add_watch: No space left on device")

    monkeypatch.setattr(watch, "inotify_add_watch", no_more_watches)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % 5432)

    async def scenario() -> None:
        source = ManifestSource(tmp_path, poll_interval_s=0.02)
        async with following(source) as next_snapshot:
            assert content(await next_snapshot()) == (set(), {5432})
            policy.write_text(POLICY % 443)
            assert content(await next_snapshot()) == (set(), {443})
            assert inotify_descriptors() == 0  # the failed watcher was closed at once

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "raise fs.inotify.max_user_watches" in warnings[0]
    assert warnings[0].endswith("polling it every 0.02 s instead")


def test_a_directory_removed_and_made_again_is_watched_again(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "web.yaml").write_text(NAMESPACE % ("web", 1))

    async def scenario() -> None:
        source = CountingSource(root, poll_interval_s=0.02, safety_poll_s=NEVER_S)
        async with following(source) as next_snapshot:
            assert namespaces(await next_snapshot()) == {"web"}
            scans = source.scans
            shutil.rmtree(root)
            await scanned_more_than(source, scans + 1)  # looking for it
            root.mkdir()
            (root / "api.yaml").write_text(NAMESPACE % ("api", 1))
            assert namespaces(await next_snapshot()) == {"api"}
            (root / "api.yaml").write_text(NAMESPACE % ("api", 2))  # seen by the new watch
            assert content(await next_snapshot()) == ({"2"}, set())

    asyncio.run(scenario())


def inotify_descriptors() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own descriptor, closed by now
            count += "inotify" in os.readlink(f"/proc/self/fd/{fd}")
    return count


def test_stopping_the_source_releases_its_descriptor(tmp_path: Path) -> None:
    (tmp_path / "team").mkdir()
    before = inotify_descriptors()

    async def cancelled() -> None:
        async with following(ManifestSource(tmp_path)) as next_snapshot:
            await next_snapshot()
            assert inotify_descriptors() == before + 1

    async def closed() -> None:
        snapshots = ManifestSource(tmp_path).snapshots()
        await asyncio.wait_for(anext(snapshots), WAIT_S)
        assert inotify_descriptors() == before + 1
        await snapshots.aclose()

    asyncio.run(closed())
    assert inotify_descriptors() == before
    asyncio.run(cancelled())
    assert inotify_descriptors() == before


def test_a_burst_of_events_settles_into_one_change(tmp_path: Path) -> None:
    async def scenario() -> None:
        watcher = DirectoryWatcher(tmp_path, quiet_s=0.5, max_delay_s=WAIT_S)
        watcher.start()
        try:
            watcher.sync()
            for number in range(200):
                (tmp_path / f"ns-{number}.yaml").write_text(NAMESPACE % (f"ns-{number}", 1))
            assert await watcher.wait(WAIT_S)
            assert not await watcher.wait(0.6)  # no second batch from the same burst
        finally:
            watcher.close()

    asyncio.run(scenario())


def test_a_steady_trickle_still_settles_after_the_maximum_delay(tmp_path: Path) -> None:
    async def scenario() -> None:
        watcher = DirectoryWatcher(tmp_path, quiet_s=NEVER_S, max_delay_s=0.2)
        watcher.start()
        try:
            watcher.sync()
            (tmp_path / "web.yaml").write_text(NAMESPACE % ("web", 1))
            assert await watcher.wait(WAIT_S)  # long before quiet_s
        finally:
            watcher.close()

    asyncio.run(scenario())


def test_a_cancel_that_arrives_as_a_batch_settles_is_not_lost(tmp_path: Path) -> None:
    """The daemon stops the source by cancelling it; a wait that swallowed that cancel (as
    ``asyncio.wait_for`` does on 3.11 when its awaitable is done in the same loop step) would
    keep the source, and the daemon's shutdown, running."""

    async def scenario() -> None:
        watcher = DirectoryWatcher(tmp_path)
        waiting = asyncio.create_task(watcher.wait(NEVER_S))
        await asyncio.sleep(0)  # the task now waits
        watcher._changed.set()  # a batch settles ...
        waiting.cancel()  # ... in the same loop step as the cancel
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, WAIT_S)

    asyncio.run(scenario())


def test_what_is_watched_follows_the_walk(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    (root / "team" / "deeper").mkdir(parents=True)
    (root / ".git" / "objects").mkdir(parents=True)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.yaml").write_text(NAMESPACE % ("a", 1))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "link.yaml").symlink_to("../real/a.yaml")
    (root / "a.yaml").symlink_to("../store/link.yaml")  # a chain of two links
    (root / "team-again").symlink_to("team")  # the same directory again
    (root / "outside").symlink_to(tmp_path / "real")  # the walk does not leave the directory
    (root / "notes.txt").symlink_to("../real/a.yaml")  # not a manifest name
    assert watch.directories(root) == [
        (str(root), TREE),
        (str(root / "team"), TREE),
        (str(root / "team" / "deeper"), TREE),
        (str(tmp_path / "real"), Watched(False, frozenset({"a.yaml"}))),
        (str(tmp_path), Watched(False, frozenset({"manifests"}))),
    ]
    shutil.rmtree(root)
    assert watch.directories(root) == [(str(tmp_path), Watched(False, frozenset({"manifests"})))]


TREE = Watched(tree=True)
TARGETS = Watched(tree=False, names=frozenset({"policy.yaml"}))


@pytest.mark.parametrize(
    ("watched", "mask", "name", "wanted"),
    [
        (TREE, IN_CLOSE_WRITE, "policy.yaml", RESCAN),
        (TREE, IN_ATTRIB, "policy.yml", RESCAN),
        (TREE, IN_CLOSE_WRITE, "README.md", NONE),
        (TREE, IN_CLOSE_WRITE, ".policy.yaml.swp", NONE),
        (TREE, IN_MOVED_TO, "policy.yaml", RESYNC),  # a rename over, or a new symlink
        (TREE, IN_MOVED_FROM, "policy.yaml", RESYNC),
        (TREE, IN_CREATE, "conf", RESYNC),  # may be a symlink to a directory
        (TREE, IN_DELETE, "policy.yaml", RESYNC),
        (TREE, IN_CREATE | IN_ISDIR, "team", RESYNC),
        (TREE, IN_ATTRIB | IN_ISDIR, "team", RESYNC),  # made readable
        (TREE, IN_MOVED_TO, "..data", RESYNC),  # the kubelet's swap
        (TREE, IN_CREATE, "..data", RESYNC),
        (TREE, IN_CREATE, "..data_tmp", NONE),
        (TREE, IN_CREATE | IN_ISDIR, "..2026_01_01_00_00_00.1", NONE),
        (TREE, IN_DELETE | IN_ISDIR, ".git", NONE),
        (TREE, IN_DELETE_SELF, "", RESYNC),
        (TREE, IN_IGNORED, "", RESYNC),
        (TARGETS, IN_CLOSE_WRITE, "policy.yaml", RESCAN),
        (TARGETS, IN_MOVED_TO, "policy.yaml", RESYNC),  # a symlink flipped, or a rename over
        (TARGETS, IN_CLOSE_WRITE, "other.yaml", NONE),
        (TARGETS, IN_CREATE | IN_ISDIR, "team", NONE),
        (None, IN_CLOSE_WRITE, "policy.yaml", RESYNC),  # a watch not in the table yet
        (None, IN_IGNORED, "", NONE),  # the last event of a watch removed
        (None, IN_Q_OVERFLOW, "", RESYNC),
    ],
)
def test_which_events_count(watched: Watched | None, mask: int, name: str, wanted: int) -> None:
    assert classify(watched, mask, name) == wanted
