"""The API server as the daemon's source of desired state.

In: Namespaces, Pods, EgressGateways, EgressPolicies and Nodes, each followed by a
``Reflector`` thread. Out: a whole Snapshot whenever what the planner sees changes (a status
write or a Pod's unrelated field does not count), the problems of invalid objects, and this
node's labels (for the Lease ownership's nodeSelector check). The Snapshot's ``nodes`` hold every
Node's labels and InternalIP addresses (the tunnel's peers), and each Pod its ``spec.nodeName``.

Rules:
- nothing is yielded before every kind has been listed once: a half-read cluster would look like
  deleted policies;
- a Pod is a workload only while ``status.phase`` is Running and ``status.podIPs`` has an
  address; host-network pods share the node's address and are never workloads;
- an invalid object is reported (same words as in files, via ``parse_object``) and left out,
  while the others stay in force; it is never half-applied.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from kubernetes import client

from egressgw.kube.api import GROUP, VERSION
from egressgw.kube.reflector import Key, Obj, Reflector, WatchSettings
from egressgw.policy.load import API_SOURCE, KubeObject, Problem, build_snapshot, parse_object
from egressgw.policy.model import API_VERSION, Snapshot

log = logging.getLogger(__name__)
Parsed = tuple[KubeObject | None, tuple[Problem, ...]]
DEBOUNCE_S = 0.05  # coalesce a burst of events (a relist, a rollout) into one apply
SNAPSHOT_KINDS = ("Namespace", "Pod", "EgressGateway", "EgressPolicy", "Node")


def workload_pod(pod: Mapping[str, Any]) -> Obj | None:
    """The fields egressgw reads of a Pod that is a workload, or None if it is not one."""
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    if status.get("phase") != "Running" or spec.get("hostNetwork"):
        return None
    ips = [{"ip": entry["ip"]} for entry in status.get("podIPs") or () if entry.get("ip")]
    if not ips:
        return None
    meta = pod.get("metadata") or {}
    readable: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": meta.get("labels") or {},
        },
        "status": {"podIPs": ips},
    }
    if spec.get("nodeName"):
        readable["spec"] = {"nodeName": spec["nodeName"]}
    return readable


def readable_node(node: Mapping[str, Any]) -> Obj:
    """The fields egressgw reads of a Node: name, labels and ``status.addresses``."""
    meta = node.get("metadata") or {}
    readable: Obj = {
        "apiVersion": node.get("apiVersion"),
        "kind": node.get("kind"),
        "metadata": {"name": meta.get("name"), "labels": meta.get("labels") or {}},
    }
    addresses = (node.get("status") or {}).get("addresses")
    if addresses:
        readable["status"] = {"addresses": addresses}
    return readable


def _readable(kind: str, obj: Obj) -> Obj | None:
    """What ``parse_object`` is given: only the fields it reads (metadata trimmed)."""
    if kind == "Pod":
        return workload_pod(obj)
    if kind == "Node":
        return readable_node(obj)
    meta = obj.get("metadata") or {}
    trimmed: Obj = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "labels", "generation") if k in meta
        },
    }
    if "spec" in obj:
        trimmed["spec"] = obj["spec"]
    return trimmed


class KubeSource:
    """``Source`` for the daemon; also what the status writer and Lease ownership read.

    What it watches (``_watches``), which kinds a Snapshot holds (``KINDS``) and what is read
    of an object (``_readable``) are methods, so the agent's source differs only in those."""

    KINDS: tuple[str, ...] = SNAPSHOT_KINDS
    SYNCED_LINE = "every kind listed; reconciling"
    THREAD_PREFIX = "watch-"

    def __init__(
        self,
        api: client.ApiClient,
        node_name: str,
        settings: WatchSettings | None = None,
    ) -> None:
        self.node_name = node_name
        self.synced = asyncio.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._raw: dict[str, dict[Key, Obj]] = {}
        self._parsed: dict[str, dict[Key, Parsed]] = {kind: {} for kind in self.KINDS}
        self._cross_problems: list[Problem] = []
        self._dirty = True
        self._listed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._threads: list[threading.Thread] = []
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        settings = settings or WatchSettings()

        def reflector(kind: str, api_version: str, func: Any, **kwargs: Any) -> Reflector:
            return Reflector(
                kind,
                api_version,
                func,
                self._replace,
                self._event,
                list_kwargs=kwargs,
                settings=settings,
            )

        self.reflectors = self._watches(reflector, core, custom)

    def _watches(
        self,
        reflector: Callable[..., Reflector],
        core: client.CoreV1Api,
        custom: client.CustomObjectsApi,
    ) -> list[Reflector]:
        """One Reflector per kind of ``KINDS``: ``reflector(kind, api_version, list_function,
        **kwargs)``; Pods listed with ``_pod_list_kwargs``."""
        lists: dict[str, tuple[str, Any, dict[str, str]]] = {
            "Namespace": ("v1", core.list_namespace, {}),
            "Pod": ("v1", core.list_pod_for_all_namespaces, self._pod_list_kwargs()),
            "EgressGateway": (
                API_VERSION,
                functools.partial(
                    custom.list_cluster_custom_object, GROUP, VERSION, "egressgateways"
                ),
                {},
            ),
            "EgressPolicy": (
                API_VERSION,
                functools.partial(
                    custom.list_cluster_custom_object, GROUP, VERSION, "egresspolicies"
                ),
                {},
            ),
            # every Node: the tunnel reaches worker nodes at their InternalIPs; a Node's
            # heartbeats change neither its labels nor its addresses, so they plan nothing
            "Node": ("v1", core.list_node, {}),
        }
        return [
            reflector(kind, api_version, function, **kwargs)
            for kind, (api_version, function, kwargs) in lists.items()
            if kind in self.KINDS
        ]

    def _pod_list_kwargs(self) -> dict[str, str]:
        """What narrows the Pods listed and watched: here, nothing (every Pod)."""
        return {}

    # -- what others read ---------------------------------------------------------------------
    def problems(self) -> list[Problem]:
        with self._lock:
            found = [p for kind in self._parsed.values() for _, ps in kind.values() for p in ps]
            return found + list(self._cross_problems)

    def raw(self, kind: str, namespace: str, name: str) -> Obj | None:
        """The object as last seen from the API (status included); None if unknown."""
        with self._lock:
            return self._raw.get(kind, {}).get((namespace, name))

    def raw_all(self, kind: str) -> list[Obj]:
        """Every EgressGateway or EgressPolicy (or this node's Node) as last seen from the API."""
        with self._lock:
            return list(self._raw.get(kind, {}).values())

    def node_labels(self) -> Mapping[str, str] | None:
        """This node's labels; None until the Node has been seen (or if it does not exist)."""
        node = self.raw("Node", "", self.node_name)
        return None if node is None else dict((node.get("metadata") or {}).get("labels") or {})

    def pending_kinds(self) -> list[str]:
        """Kinds not listed yet (for /readyz)."""
        with self._lock:
            return [r.kind for r in self.reflectors if r.kind not in self._listed]

    def not_ready_reason(self) -> str | None:
        pending = self.pending_kinds()
        return f"waiting for the first list of {', '.join(pending)}" if pending else None

    # -- reflector callbacks (watch threads) ----------------------------------------------------
    def _readable(self, kind: str, obj: Obj) -> Obj | None:
        """What ``parse_object`` is given of an object; None: not one the planner reads."""
        return _readable(kind, obj)

    def _parse(self, kind: str, obj: Obj) -> Parsed | None:
        readable = self._readable(kind, obj)
        if readable is None:
            return None
        built, problems = parse_object(readable, source=API_SOURCE)
        for problem in problems:
            log.error("invalid object, not applied: %s", problem)
        return built, tuple(problems)

    def _store(self, kind: str, key: Key, obj: Obj | None) -> None:
        """Record one object (None: gone); marks the source dirty if the planner would notice."""
        if kind in ("EgressGateway", "EgressPolicy") or key == ("", self.node_name):
            raw = self._raw.setdefault(kind, {})
            if obj is None:
                raw.pop(key, None)
            else:
                raw[key] = obj
        parsed = self._parse(kind, obj) if obj is not None else None
        table = self._parsed[kind]
        if table.get(key) != parsed:
            self._dirty = True
            if parsed is None:
                table.pop(key, None)
            else:
                table[key] = parsed

    def _replace(self, kind: str, objects: dict[Key, Obj]) -> None:
        with self._lock:
            known = set(self._parsed.get(kind, {})) | set(self._raw.get(kind, {}))
            for key in known - set(objects):
                self._store(kind, key, None)
            for key, obj in objects.items():
                self._store(kind, key, obj)
            self._listed.add(kind)  # here, not in the reflector: the notify below must see it
        self._notify()

    def _event(self, kind: str, type_: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            self._store(kind, key, None if type_ == "DELETED" else obj)
        self._notify()

    def _notify(self) -> None:
        loop, changed = self._loop, self._changed
        if loop is not None and changed is not None and not loop.is_closed():
            loop.call_soon_threadsafe(changed.set)

    # -- the Source protocol --------------------------------------------------------------------
    def start(self) -> None:
        """Start the watch threads (idempotent). ``snapshots`` calls it."""
        if self._threads:
            return
        for reflector in self.reflectors:
            thread = threading.Thread(
                target=reflector.run,
                args=(self._stop,),
                name=f"{self.THREAD_PREFIX}{reflector.kind}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> Snapshot | None:
        """A Snapshot of the valid objects if anything the planner reads changed, else None."""
        with self._lock:
            if not self._dirty:
                return None
            self._dirty = False
            objects = [
                (API_SOURCE, built)
                for kind in self.KINDS
                for built, _ in self._parsed[kind].values()
                if built is not None
            ]
        snapshot, cross = build_snapshot(objects)
        for problem in cross:
            log.error("invalid object, not applied: %s", problem)
        with self._lock:
            self._cross_problems = cross
        return snapshot

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        """The first Snapshot once every kind is listed, then one after each relevant change."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.start()
        self._changed.set()
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                if self.pending_kinds():
                    continue
                await asyncio.sleep(DEBOUNCE_S)
                snapshot = await asyncio.to_thread(self.take)
                if snapshot is not None:
                    if not self.synced.is_set():
                        log.info(self.SYNCED_LINE)
                    self.synced.set()
                    yield snapshot
        finally:
            self.stop()
