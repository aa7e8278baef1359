"""List, then watch, one kind of object; keep a local copy of every object of that kind.

In: a list function of the official client (e.g. ``CoreV1Api.list_pod_for_all_namespaces``).
Out: callbacks with the whole set after each list, and one call per watch event; ``synced`` once
the first list has arrived. Runs in its own thread, because the client blocks.

How it follows the API server, as client-go's reflector does:
- list (in pages), remember ``metadata.resourceVersion``, then watch from it with bookmarks;
  every event and bookmark moves the resourceVersion on, so a watch that ends (server timeout,
  dropped connection) resumes where it stopped and nothing is seen twice or missed;
- 410 Gone (history compacted) means relist: the new list replaces the copy, and objects that
  vanished meanwhile are reported as deleted;
- any other failure (API server away, 5xx) waits with capped exponential backoff, then resumes.
Objects are plain dicts as the API sends them (camelCase), never the client's model classes.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
HTTP_GONE = 410
PAGE_SIZE = 500


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


@dataclass(frozen=True)
class WatchSettings:
    watch_timeout_s: int = 300  # the server ends each watch after this; we resume at once
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 90.0  # no byte for this long (not even a bookmark): reconnect
    backoff_first_s: float = 0.2
    backoff_max_s: float = 10.0


@dataclass
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    failures: int = 0
    events: int = 0
    bookmarks: int = 0


@dataclass
class Reflector:
    """One kind. ``on_replace(kind, objects)`` after each list; ``on_event(kind, type, obj)``."""

    kind: str
    api_version: str
    list_func: Callable[..., Any]
    on_replace: Callable[[str, dict[Key, Obj]], None]
    on_event: Callable[[str, str, Obj], None]
    list_kwargs: Mapping[str, Any] = field(default_factory=dict)
    settings: WatchSettings = field(default_factory=WatchSettings)
    synced: threading.Event = field(default_factory=threading.Event)
    stats: ReflectorStats = field(default_factory=ReflectorStats)
    resource_version: str | None = None
    connected: bool = False

    def run(self, stop: threading.Event) -> None:
        """Follow the kind until ``stop`` is set. Never raises."""
        backoff = self.settings.backoff_first_s
        while not stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch(stop)
                backoff = self.settings.backoff_first_s
            except ApiException as exc:
                if exc.status == HTTP_GONE:
                    self.stats.relists_after_gone += 1
                    log.info(
                        "%s: resourceVersion %s expired; relisting",
                        self.kind,
                        self.resource_version,
                    )
                    self.resource_version = None
                    continue
                backoff = self._failed(stop, backoff, f"HTTP {exc.status} {exc.reason}")
            except Exception as exc:  # connection refused, reset, timeouts, bad data
                backoff = self._failed(stop, backoff, f"{type(exc).__name__}: {exc}")

    def _failed(self, stop: threading.Event, backoff: float, why: str) -> float:
        self.connected = False
        if stop.is_set():  # stopping: the stream was cut on purpose
            return backoff
        self.stats.failures += 1
        log.warning("%s: watch failed (%s); retrying in %.1f s", self.kind, why, backoff)
        stop.wait(backoff * random.uniform(0.8, 1.2))
        return min(backoff * 2, self.settings.backoff_max_s)

    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout_s, self.settings.idle_timeout_s)

    def _list(self) -> None:
        objects: dict[Key, Obj] = {}
        token: str | None = None
        for _ in range(100_000):  # pages; bounded so a misbehaving server cannot loop us forever
            kwargs = dict(self.list_kwargs, limit=PAGE_SIZE, _preload_content=False)
            if token:
                kwargs["_continue"] = token
            response = self.list_func(_request_timeout=self._timeout(), **kwargs)
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            for item in body.get("items") or ():
                item.setdefault("kind", self.kind)  # core lists leave these out of items
                item.setdefault("apiVersion", self.api_version)
                objects[key_of(item)] = item
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        self.stats.lists += 1
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.connected = True
        self.on_replace(self.kind, objects)
        if not self.synced.is_set():
            log.info(
                "%s: listed %d objects at resourceVersion %s",
                self.kind,
                len(objects),
                self.resource_version,
            )
        self.synced.set()

    def _watch(self, stop: threading.Event) -> None:
        """One watch request, from ``resource_version`` until the server or the network ends it.
        A stop request is noticed at the next event or bookmark (threads are daemon threads)."""
        watcher = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]  # plain dicts, as the server sent them
        self.stats.watches += 1

        stream = watcher.stream(  # type: ignore[no-untyped-call]
            self.list_func,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.settings.watch_timeout_s,  # also makes the client not retry 410
            _request_timeout=self._timeout(),
            **self.list_kwargs,
        )
        try:
            for event in stream:
                self.connected = True
                kind = event.get("type")
                obj = event.get("raw_object") or event.get("object")
                if not isinstance(obj, dict):
                    continue
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    self.stats.bookmarks += 1
                elif kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.stats.events += 1
                    obj.setdefault("kind", self.kind)
                    obj.setdefault("apiVersion", self.api_version)
                    self.on_event(self.kind, kind, obj)
                if rv:
                    self.resource_version = str(rv)
                if stop.is_set():
                    return
        except urllib3.exceptions.ProtocolError as exc:
            raise ConnectionError(f"watch stream broken: {exc}") from exc
        finally:
            watcher.stop()  # type: ignore[no-untyped-call]
