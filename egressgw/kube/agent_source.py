"""The API server as a worker agent's source of desired state: its own pods, gateways, nodes.

In: every Namespace, EgressGateway and Node (the agent needs the gateway nodes' tunnel
addresses, and its own), and only the Pods scheduled on this node: their watch carries the field
selector ``spec.nodeName=<node>``, so the API server sends nothing about other nodes' pods. Each
kind is followed by a ``Reflector`` thread. Out: whole Snapshots (``contracts.Source``) of the
namespaces, this node's workload pods (each with its node name), the gateways and the nodes, with
no EgressPolicies (what the agent steers does not depend on them), and the problems of invalid
objects. It writes nothing to the API server and may not touch the datapath.

Rules, the same as the gateway's source (``kube.source``) wherever they overlap:
- nothing is yielded before every kind has been listed once: a half-read cluster would look like
  deleted pods or gateways, and the agent would stop steering them;
- a Pod is a workload only while ``status.phase`` is Running and ``status.podIPs`` has an
  address, and never on the host network (``source.workload_pod``); a Pod that names another
  node is left out even if the server sent it, so only addresses of this node's pods are ever
  steered;
- of a Node only its name, labels and ``status.addresses`` are read (``source.readable_node``):
  the status updates a kubelet makes all the time change none of them and yield nothing;
- every object goes through ``policy.load.parse_object``, so an invalid one is reported in the
  same words as in files and left out while the others stay in force;
- an API outage removes nothing: the last objects seen stay in force until the API answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

from kubernetes import client

from egressgw.kube.api import GROUP, VERSION
from egressgw.kube.reflector import Key, Obj, Reflector, WatchSettings
from egressgw.kube.source import DEBOUNCE_S, Parsed, readable_node, workload_pod
from egressgw.policy.load import API_SOURCE, Problem, build_snapshot, parse_object
from egressgw.policy.model import API_VERSION, Snapshot

log = logging.getLogger(__name__)
AGENT_KINDS = ("Namespace", "Pod", "EgressGateway", "Node")


def node_pod(pod: Mapping[str, Any], node_name: str) -> Obj | None:
    """What ``parse_object`` reads of a Pod on ``node_name`` that is a workload (its node name
    included); None for any other Pod."""
    if (pod.get("spec") or {}).get("nodeName") != node_name:
        return None
    return workload_pod(pod)


def _trimmed(obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    trimmed: Obj = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "labels", "generation") if k in meta},
    }
    if "spec" in obj:
        trimmed["spec"] = obj["spec"]
    return trimmed


class KubeAgentSource:
    """``Source`` for the agent on ``node_name``."""

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
        self._parsed: dict[str, dict[Key, Parsed]] = {kind: {} for kind in AGENT_KINDS}
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

        self.reflectors = [
            reflector("Namespace", "v1", core.list_namespace),
            reflector(
                "Pod",
                "v1",
                core.list_pod_for_all_namespaces,
                field_selector=f"spec.nodeName={node_name}",
            ),
            reflector(
                "EgressGateway",
                API_VERSION,
                functools.partial(
                    custom.list_cluster_custom_object, GROUP, VERSION, "egressgateways"
                ),
            ),
            reflector("Node", "v1", core.list_node),
        ]

    # -- what others read ---------------------------------------------------------------------
    def problems(self) -> list[Problem]:
        with self._lock:
            found = [p for kind in self._parsed.values() for _, ps in kind.values() for p in ps]
            return found + list(self._cross_problems)

    def pending_kinds(self) -> list[str]:
        """Kinds not listed yet (for /readyz)."""
        with self._lock:
            return [r.kind for r in self.reflectors if r.kind not in self._listed]

    def not_ready_reason(self) -> str | None:
        pending = self.pending_kinds()
        return f"waiting for the first list of {', '.join(pending)}" if pending else None

    # -- reflector callbacks (watch threads) ----------------------------------------------------
    def _readable(self, kind: str, obj: Obj) -> Obj | None:
        if kind == "Pod":
            return node_pod(obj, self.node_name)
        if kind == "Node":
            return readable_node(obj)
        return _trimmed(obj)

    def _store(self, kind: str, key: Key, obj: Obj | None) -> None:
        """Record one object (None: gone); marks the source dirty if the agent would notice."""
        parsed: Parsed | None = None
        readable = None if obj is None else self._readable(kind, obj)
        if readable is not None:
            built, problems = parse_object(readable, source=API_SOURCE)
            for problem in problems:
                log.error("invalid object, not applied: %s", problem)
            parsed = built, tuple(problems)
        table = self._parsed[kind]
        if table.get(key) != parsed:
            self._dirty = True
            if parsed is None:
                table.pop(key, None)
            else:
                table[key] = parsed

    def _replace(self, kind: str, objects: dict[Key, Obj]) -> None:
        with self._lock:
            for key in set(self._parsed[kind]) - set(objects):
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
                name=f"agent-watch-{reflector.kind}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """The watch threads end at their next event or bookmark."""
        self._stop.set()

    def take(self) -> Snapshot | None:
        """A Snapshot of the valid objects if anything the agent reads changed, else None."""
        with self._lock:
            if not self._dirty:
                return None
            self._dirty = False
            objects = [
                (API_SOURCE, built)
                for kind in AGENT_KINDS
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
                        log.info("every kind listed; steering")
                    self.synced.set()
                    yield snapshot
        finally:
            self.stop()
