"""Test doubles for the worker agent and a gateway node's end of the tunnel.

In: what a test sets up. Out: ``FakeAgentDatapath`` (an ``AgentDatapath`` that records what it
was set up with and each plan applied, and can be told to fail or to hold an apply until
released), ``FakeGatewayTunnel`` (a ``GatewayTunnel`` recording the same), ``FakeHolders`` (an
``EgressHolders`` whose holders the test changes) and ``SnapshotFeed`` (a ``Source`` yielding
the snapshots the test puts). All typed against ``egressgw.contracts``; product code never
imports them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from egressgw.contracts import AgentDatapath, EgressHolders, GatewayTunnel, Source
from egressgw.policy.load import Problem
from egressgw.policy.model import IPAddress, Snapshot
from egressgw.steering import AgentPlan, TunnelPeers


class FakeAgentDatapath:
    def __init__(self) -> None:
        self.calls: list[str] = []  # "setup", "apply", "close", "remove", in order
        self.local: IPAddress | None = None
        self.applied: list[AgentPlan] = []
        self.fail_with: Exception | None = None
        self.gate: threading.Event | None = None  # set: an apply waits until it is set
        self.entered = threading.Event()  # an apply has started (and may be held by the gate)
        self.dropped_packets = 0
        self._done = threading.Condition()

    @property
    def in_force(self) -> AgentPlan | None:
        return self.applied[-1] if self.applied else None

    def setup(self, local: IPAddress) -> None:
        self.calls.append("setup")
        if self.fail_with is not None:
            raise self.fail_with
        self.local = local

    def apply(self, plan: AgentPlan) -> None:
        self.calls.append("apply")
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        with self._done:
            self.applied.append(plan)
            self._done.notify_all()

    def dropped(self) -> int:
        if self.local is None:
            raise RuntimeError("no table before setup")
        return self.dropped_packets

    def close(self) -> None:
        self.calls.append("close")

    def remove(self) -> list[str]:
        self.calls.append("remove")
        return ["removed everything"]

    def wait_applied(self, count: int, timeout_s: float = 10.0) -> bool:
        """Whether ``count`` plans were applied within ``timeout_s`` (from another thread)."""
        with self._done:
            return self._done.wait_for(lambda: len(self.applied) >= count, timeout_s)


class FakeGatewayTunnel:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.dns: tuple[tuple[IPAddress, int], ...] = ()
        self.local: IPAddress | None = None
        self.applied: list[TunnelPeers] = []
        self.fail_with: Exception | None = None

    def setup(self, local: IPAddress, dns_redirect: Sequence[tuple[IPAddress, int]] = ()) -> None:
        self.calls.append("setup")
        self.local = local
        self.dns = tuple(dns_redirect)

    def apply(self, peers: TunnelPeers) -> None:
        self.calls.append("apply")
        if self.fail_with is not None:
            raise self.fail_with
        self.applied.append(peers)

    def close(self) -> None:
        self.calls.append("close")

    def remove(self) -> None:
        self.calls.append("remove")


class FakeHolders:
    """Egress IP holders the test sets; ``read=False``: not read until the first ``set``."""

    def __init__(self, holders: Mapping[IPAddress, str] | None = None, read: bool = True) -> None:
        self.current = dict(holders or {})
        self.read = read
        self._changed: Callable[[], None] | None = None

    def holders(self) -> dict[IPAddress, str]:
        return dict(self.current)

    async def run(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        if self.read:
            changed()
        await asyncio.Event().wait()

    def set(self, holders: Mapping[IPAddress, str]) -> None:
        """New holders, as a Lease change would bring them (from any thread)."""
        self.current = dict(holders)
        self.read = True
        if self._changed is not None:
            self._changed()


class SnapshotFeed:
    """Yields each snapshot ``put`` (call ``put`` on the loop's thread)."""

    def __init__(self) -> None:
        self.synced = asyncio.Event()
        self._queue: asyncio.Queue[Snapshot] = asyncio.Queue()

    def problems(self) -> list[Problem]:
        return []

    def put(self, snapshot: Snapshot) -> None:
        self._queue.put_nowait(snapshot)

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        while True:
            snapshot = await self._queue.get()
            self.synced.set()
            yield snapshot


def _typed(
    datapath: FakeAgentDatapath, tunnel: FakeGatewayTunnel, holders: FakeHolders, feed: SnapshotFeed
) -> tuple[AgentDatapath, GatewayTunnel, EgressHolders, Source]:
    """mypy checks here that each fake satisfies its Protocol."""
    return datapath, tunnel, holders, feed
