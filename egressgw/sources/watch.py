"""Linux inotify on a manifests directory: "look again" when what ``policy.load.walk`` reads may
have changed, and nothing at all while nothing changes.

In: a directory. Out: ``DirectoryWatcher.wait()`` returns True once a batch of relevant events
has settled, False when its timeout passes first. It never reads a manifest and never decides
what changed: the caller's rescan (a ``stat`` of every file) does that, so an event that turns
out to change nothing costs one rescan, never a wrong snapshot.

What is watched mirrors ``walk``: the directory and every subdirectory whose name does not start
with ".", symlinked directories that stay inside it, and the directory holding the target of
each symlinked manifest file (wherever it lies, as ``walk`` reads it there), with only those
target names counting; and the directory holding the watched directory, for its name only, so
that a symlink flipped to another tree (as git-sync publishes) is seen. A ConfigMap mount needs
nothing more: the kubelet never changes a generation's files, it swaps the ``..data`` symlink,
which is an ``IN_MOVED_TO`` (or ``IN_CREATE``) of ``..data`` in the watched directory.

Which events count, in a directory watched for some names only: any event on those names. In a
directory of the tree:

- anything about a subdirectory, and creating, moving or removing any visible name or ``..data``
  (it may be a symlink to a directory, or to a file elsewhere): rescan, and first bring the set
  of watches up to date (``sync``), so that a new subdirectory is watched before it is read;
- a write closed (``IN_CLOSE_WRITE``) or metadata changed (``IN_ATTRIB``) on a ``*.yaml`` or
  ``*.yml`` name: rescan;
- other names starting with "." (editors' swap files, the kubelet's ``..data_tmp`` and
  generation directories) and other files' writes: nothing.

A watch that goes away (its directory removed or moved, ``IN_IGNORED``) and a queue overflow
(``IN_Q_OVERFLOW``) mean rescan and sync. Events are debounced: the batch settles when
``quiet_s`` pass without a relevant event, or ``max_delay_s`` after its first one, so a kubelet
swap or a ``cp -r`` of many files gives one rescan, and a steady trickle still gives one at
least every ``max_delay_s``.

A new directory is watched before the rescan that follows reads it (``sync`` runs first), so a
file written into it before the watch existed is found by that rescan, and one written after
makes an event. Without inotify (``inotify_init1`` fails: ENOSYS, EMFILE) or when the kernel's
``fs.inotify.max_user_watches`` runs out (ENOSPC), ``start``/``sync`` raise ``WatchUnavailable``
and the caller polls instead. On a filesystem that does not report changes (a network
filesystem changed from another host) only the caller's slow safety poll notices them.

Threads: ``start``, ``close`` and the event callback run on the event loop; ``sync`` may run in a
worker thread. It replaces the table of watches in one assignment, and an event from a watch
that table does not know yet counts as relevant.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
import struct
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from egressgw.policy.load import CONFIGMAP_DATA, MANIFEST_SUFFIXES

QUIET_S = 0.1  # a batch of events settles after this long without another
MAX_DELAY_S = 1.0  # ... or this long after its first event, however many follow
READ_BYTES = 64 * 1024  # events read per callback; the loop calls again while more are queued
TIMER_SLACK_S = 0.001  # a settle timer firing this close to its due time counts as on time

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000

WATCH_MASK = (
    IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CLOSE_WRITE
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_WATCH_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
_CONTENT = IN_CLOSE_WRITE | IN_ATTRIB
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len name bytes

# errors of inotify_init1/inotify_add_watch that mean "no inotify here", with what to do
_UNAVAILABLE = {
    errno.ENOSYS: "this kernel has no inotify",
    errno.EMFILE: "too many inotify instances or open files: raise fs.inotify.max_user_instances"
    " or the open files limit",
    errno.ENFILE: "the system's open files limit is reached",
    errno.ENOSPC: "the inotify watch limit is reached: raise fs.inotify.max_user_watches",
    errno.ENOMEM: "the kernel is out of memory for inotify",
}


class WatchUnavailable(Exception):
    """inotify cannot be used for this directory; poll it instead."""


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


def _error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


def inotify_init() -> int:
    """A new non-blocking, close-on-exec inotify descriptor. Raises OSError."""
    try:
        init = _libc().inotify_init1
    except AttributeError:  # a C library without inotify
        raise OSError(errno.ENOSYS, "inotify_init1: not in this C library") from None
    fd: int = init(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise _error("inotify_init1")
    return fd


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """The watch descriptor for ``path`` (the same one again for an inode already watched).
    Raises OSError."""
    wd: int = _libc().inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        raise _error(f"inotify_add_watch {path}")
    return wd


def inotify_rm_watch(fd: int, wd: int) -> None:
    """Remove a watch; one the kernel already dropped (its directory is gone) is no error."""
    _libc().inotify_rm_watch(fd, wd)


def unavailable(exc: OSError) -> WatchUnavailable | None:
    """The WatchUnavailable an inotify error amounts to, or None for an error about one path."""
    hint = _UNAVAILABLE.get(exc.errno or 0)
    return None if hint is None else WatchUnavailable(f"{hint} ({exc.strerror})")


@dataclass(frozen=True)
class Watched:
    """What counts in one watched directory."""

    tree: bool  # the walk lists it: every visible name counts
    names: frozenset[str] = frozenset()  # targets of symlinked manifest files: these count too

    def merged(self, other: Watched) -> Watched:
        return Watched(self.tree or other.tree, self.names | other.names)


NONE, RESCAN, RESYNC = 0, 1, 2  # what an event calls for; RESYNC = watch again, then rescan


def classify(watched: Watched | None, mask: int, name: str) -> int:
    """What one event calls for. ``watched`` is None for a watch the table does not know."""
    if mask & IN_Q_OVERFLOW:
        return RESYNC
    if watched is None:
        # a watch being added (count it) or the last words of one removed (nothing left to see)
        return NONE if mask & IN_IGNORED else RESYNC
    if mask & _WATCH_GONE:
        return RESYNC
    if name in watched.names:
        return RESCAN if mask & _CONTENT else RESYNC
    if not watched.tree or (name.startswith(".") and name != CONFIGMAP_DATA):
        return NONE
    if mask & _CONTENT and not mask & IN_ISDIR:
        return RESCAN if name.endswith(MANIFEST_SUFFIXES) else NONE
    return RESYNC  # a name created, moved or removed: a directory, or a link to one or to a file


def directories(root: Path) -> list[tuple[str, Watched]]:
    """The directories to watch for ``root``, ``root`` first, as ``walk`` would read them now,
    and last the directory holding ``root``, for ``root``'s own name: a symlink flipped to
    another directory (as git-sync publishes), or ``root`` made again, is seen there."""
    parent, name = os.path.split(os.path.abspath(root))
    holder = [(parent, Watched(False, frozenset({name})))] if name else []
    try:
        st = os.stat(root)
    except OSError:
        return holder
    root_real = os.path.realpath(root)
    visited = {(st.st_dev, st.st_ino)}
    tree = [str(root)]
    targets: dict[str, set[str]] = {}
    resolved_dirs: dict[str, str] = {}
    for directory in tree:  # grows while it is read; each directory once (``visited``)
        try:
            with os.scandir(directory) as scan:
                listed = sorted(
                    (e.name, e.path, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in scan
                )  # in the walk's order: a directory reached by two names is watched by the first
        except OSError:
            continue  # removed meanwhile or unreadable: the walk cannot read it either
        for name, path, is_link, is_dir in listed:
            if name.startswith("."):
                continue
            if not is_link and not is_dir:
                continue  # a file in a watched directory: its events come with the directory's
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling symlink, or removed meanwhile
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in visited:
                    continue
                if is_link and not _inside(root_real, os.path.realpath(path)):
                    continue  # the walk does not follow it either
                visited.add((st.st_dev, st.st_ino))
                tree.append(path)
            elif stat.S_ISREG(st.st_mode) and name.endswith(MANIFEST_SUFFIXES):
                try:
                    target_dir, target_name = os.path.split(_resolved(path, resolved_dirs))
                except OSError:
                    continue  # replaced meanwhile: an event says so
                targets.setdefault(target_dir, set()).add(target_name)
    found = [(path, Watched(tree=True)) for path in tree]
    found += [(path, Watched(False, frozenset(names))) for path, names in sorted(targets.items())]
    return found + holder


def _resolved(link: str, resolved_dirs: dict[str, str]) -> str:
    """``os.path.realpath(link)`` for a symlink to a file, resolving the directory part of each
    distinct link text once: the links of a ConfigMap mount all lead through ``..data``."""
    folder, name = os.path.split(os.path.join(os.path.dirname(link), os.readlink(link)))
    real = resolved_dirs.get(folder)
    if real is None:
        real = resolved_dirs[folder] = os.path.realpath(folder)
    target = os.path.join(real, name)
    return os.path.realpath(target) if os.path.islink(target) else target


def _inside(root_real: str, real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip("/") + "/")


class DirectoryWatcher:
    """inotify watches on ``root`` and what ``walk`` reads below it; see the module docstring."""

    def __init__(self, root: Path, quiet_s: float = QUIET_S, max_delay_s: float = MAX_DELAY_S):
        self.root = root
        self.quiet_s = quiet_s
        self.max_delay_s = max_delay_s
        self.complete = False  # ``root`` itself is watched; until it is, only polling sees changes
        self._fd = -1
        self._watches: dict[int, Watched] = {}  # replaced whole by ``sync``, read by the callback
        self._needs_sync = True
        self._syncing = False
        self._closed = False
        self._lock = threading.Lock()  # the descriptor stays open while a sync uses it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()  # a batch has settled since the last ``wait``
        self._batch_started: float | None = None
        self._last_event = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Open the inotify descriptor and follow it on the running loop. Watches are added by
        the first ``sync``. Raises WatchUnavailable."""
        try:
            self._fd = inotify_init()
        except OSError as exc:
            raise unavailable(exc) or WatchUnavailable(str(exc)) from None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)

    def sync(self) -> None:
        """Watch every directory ``walk`` would read now and drop the watches on those it would
        not, if an event asked for it (or nothing was watched yet). Runs in any thread; raises
        WatchUnavailable when the kernel refuses more watches."""
        with self._lock:
            if self._closed or not self._needs_sync:
                return
            self._needs_sync = False  # an event from here on asks again
            self._syncing = True
        try:
            self._sync()
        finally:
            with self._lock:
                self._syncing = False
                if self._closed:
                    self._close_fd()

    def _sync(self) -> None:
        watches: dict[int, Watched] = {}
        root_watched = False
        for index, (path, watched) in enumerate(directories(self.root)):
            try:
                wd = inotify_add_watch(self._fd, path, WATCH_MASK)
            except OSError as exc:
                refused = unavailable(exc)
                if refused is not None:
                    raise refused from None
                continue  # removed meanwhile, or not readable: the walk skips it too
            before = watches.get(wd)
            watches[wd] = watched if before is None else before.merged(watched)
            root_watched = root_watched or (index == 0 and watched.tree)
        for wd in self._watches.keys() - watches.keys():
            inotify_rm_watch(self._fd, wd)
        self._watches = watches
        self.complete = root_watched
        if not root_watched:
            self._needs_sync = True  # try again at the next look: the directory may come back

    async def wait(self, timeout_s: float) -> bool:
        """True once a batch of relevant events has settled (at once if one settled since the
        last call), False if ``timeout_s`` passes first."""
        try:
            async with asyncio.timeout(timeout_s):  # unlike wait_for, never swallows a cancel
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    def close(self) -> None:
        """Release the descriptor and with it every watch. Idempotent; runs on the loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._loop is not None and self._fd >= 0:
                self._loop.remove_reader(self._fd)
            if not self._syncing:
                self._close_fd()  # else the running sync closes it when it is done with it

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        watches = self._watches
        wanted = NONE
        offset = 0
        while offset + _EVENT.size <= len(data):  # each step consumes at least one header
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            offset = start + length
            raw = data[start:offset].split(b"\0", 1)[0]
            wanted = max(wanted, classify(watches.get(wd), mask, os.fsdecode(raw)))
        if wanted == RESYNC:
            self._needs_sync = True
        if wanted != NONE:
            self._note()

    def _note(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._last_event = now
        if self._batch_started is None:
            self._batch_started = now
            due = now + min(self.quiet_s, self.max_delay_s)
            self._timer = self._loop.call_at(due, self._settle)

    def _settle(self) -> None:
        assert self._loop is not None and self._batch_started is not None
        due = min(self._last_event + self.quiet_s, self._batch_started + self.max_delay_s)
        if due - self._loop.time() > TIMER_SLACK_S:
            self._timer = self._loop.call_at(due, self._settle)  # events came meanwhile
            return
        self._batch_started = self._timer = None
        self._changed.set()
