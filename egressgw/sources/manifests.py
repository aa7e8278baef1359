"""A directory of YAML manifests as the desired state, re-read when it changes.

In: a directory. Out: a Snapshot each time a file is added, changed or removed.

The files are found, read and checked as ``egressgw policy check`` does (``policy.load``: the
same walk, which skips hidden names and reads a ConfigMap mount through its visible names in one
generation; the same parser; the same ``build_snapshot`` with its duplicate rules and words), so
the daemon applies exactly what ``policy check`` calls valid, with one difference: a file with
any problem is reported and ignored as a whole, and the objects it held when it was last valid
stay in force, so a bad edit never opens or closes anything. That is why files are parsed one by
one and merged afterwards.

Change detection waits on inotify (``sources.watch``): the directory and every visible
subdirectory are watched, and a batch of events (a file written, renamed over, created or
removed, a subdirectory added or removed, the kubelet swapping a ConfigMap mount's ``..data``)
settles into one rescan, so nothing runs while nothing changes. A slow safety poll rescans every
``safety_poll_s`` anyway, for a filesystem that does not report every change. Where inotify
cannot be used (no inotify, or ``fs.inotify.max_user_watches`` exhausted) the source says so once
and polls ``stat`` of every file every ``poll_interval_s`` instead; while the directory is
missing it is looked for at that interval too.

A rescan is the same either way: ``stat`` of every file, and only the changed ones read. The stamp
follows symlinks and includes the file's inode and the generation directory it lies in, so a
ConfigMap swap (new files behind the same visible names, possibly of the same size and mtime)
and an editor's rename are both seen. A file whose stamp changed but whose bytes did not (the
other keys of a ConfigMap changed) is not parsed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from pathlib import Path

from egressgw.policy.load import (
    GenerationMoved,
    KubeObject,
    ManifestFile,
    Problem,
    Stamp,
    build_snapshot,
    parse_manifest,
    read_manifest,
    walk,
)
from egressgw.policy.model import Snapshot
from egressgw.sources.watch import DirectoryWatcher, WatchUnavailable

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.5  # without inotify, or while the directory is missing
SAFETY_POLL_S = 60.0  # with inotify: a rescan anyway, for changes no event reported
SCAN_ATTEMPTS = 5  # scans restarted because the kubelet swapped generations meanwhile


@dataclass
class FileState:
    stamp: Stamp
    digest: bytes | None  # of the bytes last read (not the bytes: a large directory stays
    # small in memory); None if the file could not be read
    objects: list[tuple[str, KubeObject]]  # the last valid content; empty if never valid
    problems: list[Problem] = field(default_factory=list)


class ManifestSource:
    def __init__(
        self,
        directory: str | Path,
        poll_interval_s: float = POLL_INTERVAL_S,
        safety_poll_s: float = SAFETY_POLL_S,
    ) -> None:
        self.directory = Path(directory)
        self.poll_interval_s = poll_interval_s
        self.safety_poll_s = safety_poll_s
        self.files: dict[Path, FileState] = {}  # in the walk's order: the order duplicates use
        self.cross_problems: list[Problem] = []  # duplicates and clashes between files
        self.synced = asyncio.Event()

    def problems(self) -> list[Problem]:
        per_file = [p for state in self.files.values() for p in state.problems]
        return per_file + self.cross_problems

    def scan(self) -> Snapshot | None:
        """Re-read changed files; return the new Snapshot, or None if nothing changed."""
        if not self.directory.is_dir():
            raise FileNotFoundError(f"manifests directory {self.directory} does not exist")
        for _ in range(SCAN_ATTEMPTS):
            try:
                files, changed, events = self._read(walk(self.directory))
                break
            except GenerationMoved:
                continue  # the old generation was removed under this scan: read the new one
        else:
            log.warning(
                "%s changed generation %d times during one scan;"
                " trying again at the next change or poll",
                self.directory,
                SCAN_ATTEMPTS,
            )
            return None
        for level, message in events:
            log.log(level, "%s", message)
        self.files = files
        if not changed and self.synced.is_set():
            return None
        objects = [obj for state in files.values() for obj in state.objects]
        snapshot, cross = build_snapshot(objects)
        for problem in cross:
            log.error("invalid object, not applied: %s", problem)
        self.cross_problems = cross
        self.synced.set()
        return snapshot

    def _read(
        self, found: list[ManifestFile]
    ) -> tuple[dict[Path, FileState], bool, list[tuple[int, str]]]:
        """The new state of every file, whether any content changed, and what to log.
        Changes nothing: a scan restarted by ``GenerationMoved`` leaves no trace."""
        files: dict[Path, FileState] = {}
        events: list[tuple[int, str]] = []
        changed = False
        for manifest in found:
            path, old = manifest.path, self.files.get(manifest.path)
            if old is not None and old.stamp == manifest.stamp:
                files[path] = old
                continue
            objects: list[tuple[str, KubeObject]] = []
            digest: bytes | None = None
            try:
                stamp, content = read_manifest(manifest)
            except FileNotFoundError:
                continue  # removed since the walk: as if the walk had not seen it
            except OSError as exc:
                stamp = manifest.stamp
                problems = [Problem(str(path), "?", None, "?", "", f"cannot read the file: {exc}")]
            else:
                digest = hashlib.blake2b(content, digest_size=16).digest()
                if old is not None and old.digest == digest:
                    files[path] = replace(old, stamp=stamp)
                    continue
                objects, problems = parse_manifest(str(path), content)
            changed = True
            if problems:
                for problem in problems:
                    message = f"invalid manifest, previous content stays in force: {problem}"
                    events.append((logging.ERROR, message))
                kept = old.objects if old is not None else []
                files[path] = FileState(stamp, digest, kept, problems)
            else:
                events.append((logging.INFO, f"manifest loaded: {path}"))
                files[path] = FileState(stamp, digest, objects)
        for path in self.files.keys() - files.keys():
            events.append((logging.INFO, f"manifest removed: {path}"))
            changed = True
        return files, changed, events

    def unchanged(self) -> bool:
        """Whether every file is as last read: a few stat calls, cheap enough for the loop."""
        if not self.synced.is_set() or not self.directory.is_dir():
            return False
        try:
            found = walk(self.directory)
        except GenerationMoved:
            return False
        return {f.path: f.stamp for f in found} == {p: s.stamp for p, s in self.files.items()}

    async def snapshots(self) -> AsyncGenerator[Snapshot, None]:
        """The first Snapshot at once, then one after each change. Runs until cancelled; the
        watches are released when it stops.

        With inotify, each look (a settled batch of events, or the safety poll) is one trip to
        a worker thread that brings the watches up to date, then rescans. Without it, the poll
        runs on the event loop and only reading changed files goes to a worker thread: a thread
        woken twice a second would take the interpreter lock from the loop for up to the 5 ms
        switch interval each time, which showed as DNS tail latency under load.
        """
        watcher = self._watcher()
        try:
            while True:
                snapshot = None
                try:
                    if watcher is not None:
                        snapshot = await asyncio.to_thread(self._sync_and_scan, watcher)
                    elif not self.unchanged():
                        snapshot = await asyncio.to_thread(self.scan)
                except WatchUnavailable as exc:
                    self._polling_instead(exc)
                    assert watcher is not None
                    watcher.close()
                    watcher = None
                    continue  # look again at once, by polling
                except FileNotFoundError as exc:
                    log.error("%s", exc)
                if snapshot is not None:
                    yield snapshot
                if watcher is None:
                    await asyncio.sleep(self.poll_interval_s)
                elif watcher.complete:
                    await watcher.wait(self.safety_poll_s)
                else:  # the directory is missing: poll until it is back and watched
                    await watcher.wait(self.poll_interval_s)
        finally:
            if watcher is not None:
                watcher.close()

    def _watcher(self) -> DirectoryWatcher | None:
        watcher = DirectoryWatcher(self.directory)
        try:
            watcher.start()
        except WatchUnavailable as exc:
            self._polling_instead(exc)
            return None
        return watcher

    def _polling_instead(self, exc: WatchUnavailable) -> None:
        log.warning(
            "cannot watch %s for changes (%s); polling it every %g s instead",
            self.directory,
            exc,
            self.poll_interval_s,
        )

    def _sync_and_scan(self, watcher: DirectoryWatcher) -> Snapshot | None:
        """Watch what the scan is about to read, then scan: a directory created meanwhile is
        either read by this scan or reported by its new watch."""
        watcher.sync()
        return self.scan()
