"""The status of EgressPolicy and EgressGateway objects: what egressgw made of them.

In: each apply's outcome (``report``: snapshot, plan, problems), the objects as last seen from the
API (their generation and current status) and the Lease holders. Out: merge patches on the
``status`` subresource, only for objects whose status would change.

- EgressPolicy: ``Accepted`` True (reason Accepted), or False with reason Invalid and a message
  naming each bad field; ``observedGeneration``.
- EgressGateway: the same ``Accepted``; ``Conflict`` True when some workloads are selected by
  more than one gateway (the lowest name wins; the message says which pods), else False;
  ``egressIPs``: each IP with the node that holds its Lease.
- ``lastTransitionTime`` moves only when a condition's status changes.

Writes happen on a thread of their own, so a slow or absent API server never delays an apply;
a failed round is retried with backoff, and the latest desired status wins. It never writes
anything but status.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from egressgw.identity import IPAddress
from egressgw.kube.api import GROUP, VERSION
from egressgw.kube.reflector import Obj
from egressgw.kube.source import KubeSource
from egressgw.plan import Plan
from egressgw.policy.load import Problem
from egressgw.policy.model import Snapshot

log = logging.getLogger(__name__)
ObjectKey = tuple[str, str, str]  # (kind, namespace or "", name)
PLURALS = {"EgressGateway": "egressgateways", "EgressPolicy": "egresspolicies"}
MAX_MESSAGE = 32768


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, ok: bool, reason: str, message: str, generation: int, previous: Sequence[Obj]
) -> Obj:
    """A metav1.Condition; keeps the previous lastTransitionTime if the status is unchanged."""
    status = "True" if ok else "False"
    since = next(
        (
            c.get("lastTransitionTime")
            for c in previous
            if c.get("type") == type_ and c.get("status") == status
        ),
        None,
    )
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "observedGeneration": generation,
        "lastTransitionTime": since or _now(),
    }


def accepted(problems: Sequence[Problem], generation: int, previous: Sequence[Obj]) -> Obj:
    if problems:
        message = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems)
        return condition("Accepted", False, "Invalid", message, generation, previous)
    return condition("Accepted", True, "Accepted", "valid and applied", generation, previous)


@dataclass
class _Written:
    status: Obj
    from_rv: str  # the resourceVersion the object had when we wrote


class StatusWriter:
    """``StatusSink`` for the daemon in Kubernetes mode."""

    def __init__(
        self,
        api: client.ApiClient,
        source: KubeSource,
        holders: Callable[[], Mapping[IPAddress, str]],
        request_timeout_s: float = 5.0,
        resync_s: float = 60.0,
    ) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.source = source
        self.holders = holders
        self.request_timeout_s = request_timeout_s
        self.resync_s = resync_s
        self.writes = 0
        self._lock = threading.Lock()
        self._latest: tuple[Snapshot, Plan, list[Problem]] | None = None
        self._written: dict[ObjectKey, _Written] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- StatusSink ---------------------------------------------------------------------------
    def report(self, snapshot: Snapshot, plan: Plan, problems: Sequence[Problem]) -> None:
        """Called after each apply (worker thread); returns at once."""
        with self._lock:
            self._latest = (snapshot, plan, list(problems))
        self.poke()

    def poke(self) -> None:
        """Recompute soon (e.g. a Lease changed holder)."""
        self._wake.set()

    # -- the writer thread --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        backoff = 0.5
        wait = self.resync_s
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.write_once()
                backoff, wait = 0.5, self.resync_s
            except Exception as exc:  # API away: the next round writes the latest state
                log.warning(
                    "status not written (%s: %s); retrying in %.1f s",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                wait = backoff
                backoff = min(backoff * 2, 30.0)

    # -- what to write ------------------------------------------------------------------------
    def desired(self) -> dict[ObjectKey, tuple[Obj, Obj]]:
        """(object as last seen, status it should have) for every object we know."""
        with self._lock:
            latest = self._latest
        if latest is None:
            return {}
        snapshot, plan, problems = latest
        by_object: dict[ObjectKey, list[Problem]] = defaultdict(list)
        for problem in problems:
            by_object[(problem.kind, problem.namespace or "", problem.name)].append(problem)
        valid_gateways = {g.name: g for g in snapshot.gateways}
        holders = {str(ip): node for ip, node in self.holders().items()}
        wanted: dict[ObjectKey, tuple[Obj, Obj]] = {}
        for obj in self.source.raw_all("EgressPolicy"):
            meta = obj["metadata"]
            key = ("EgressPolicy", meta.get("namespace", ""), meta["name"])
            generation = int(meta.get("generation", 0))
            previous = (obj.get("status") or {}).get("conditions") or []
            wanted[key] = (
                obj,
                {
                    "observedGeneration": generation,
                    "conditions": [accepted(by_object[key], generation, previous)],
                },
            )
        for obj in self.source.raw_all("EgressGateway"):
            meta = obj["metadata"]
            key = ("EgressGateway", "", meta["name"])
            generation = int(meta.get("generation", 0))
            previous = (obj.get("status") or {}).get("conditions") or []
            conflicts = plan.conflicts.get(meta["name"], [])
            conditions = [
                accepted(by_object[key], generation, previous),
                condition(
                    "Conflict",
                    bool(conflicts),
                    "SelectedByOtherGateways" if conflicts else "NoConflict",
                    "; ".join(conflicts) or "no workload is selected by another EgressGateway",
                    generation,
                    previous,
                ),
            ]
            gateway = valid_gateways.get(meta["name"])
            egress_ips = []
            for address in gateway.egress_ips if gateway is not None else ():
                entry = {"ip": str(address)}
                if str(address) in holders:
                    entry["node"] = holders[str(address)]
                egress_ips.append(entry)
            wanted[key] = (
                obj,
                {
                    "observedGeneration": generation,
                    "conditions": conditions,
                    "egressIPs": egress_ips,
                },
            )
        return wanted

    def write_once(self) -> int:
        """Patch every status that differs from what the API shows; returns how many."""
        written = 0
        for key, (obj, status) in self.desired().items():
            current = obj.get("status") or {}
            rv = str(obj["metadata"].get("resourceVersion", ""))
            last = self._written.get(key)
            if current == status or (
                last is not None and last.from_rv == rv and last.status == status
            ):
                continue  # already so, or we wrote it and the watch has not shown it yet
            self._patch(key, status)
            self._written[key] = _Written(status, rv)
            written += 1
        self.writes += written
        return written

    def _patch(self, key: ObjectKey, status: Obj) -> None:
        kind, namespace, name = key
        body: dict[str, Any] = {"status": status}
        try:
            if namespace:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURALS[kind],
                    name,
                    body,
                    _request_timeout=self.request_timeout_s,
                )
            else:
                self.custom.patch_cluster_custom_object_status(
                    GROUP,
                    VERSION,
                    PLURALS[kind],
                    name,
                    body,
                    _request_timeout=self.request_timeout_s,
                )
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            raise
        log.info("status of %s %s written", kind, f"{namespace}/{name}" if namespace else name)
