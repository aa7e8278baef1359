"""What the daemon needs of each part it is built from, as Protocols.

In: nothing at run time (types only). Out: Source, Ownership, StatusSink, Upstream, Programmer
and Datapath, which the real adapters (``sources.manifests.ManifestSource``, ``kube.*``,
``dns.upstream.Upstream``, ``datapath.kernel.NftDatapath``) and the test doubles in
``egressgw.testing`` both satisfy under ``mypy --strict``; ``app`` builds the real ones. It may
not import the adapters, nor ``runtime`` or ``app``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Protocol

from egressgw.datapath.kernel import Adopted, ReconcileResult, Traffic
from egressgw.datapath.state import DesiredState, Learned, LearnedPolicy
from egressgw.dns.wire import Question
from egressgw.identity import IPAddress
from egressgw.plan import Plan
from egressgw.policy.load import Problem
from egressgw.policy.model import EgressGateway, Snapshot

# how an upstream hands back what it got for a query: the response bytes or the failure
Done = Callable[[bytes | Exception], None]


class Source(Protocol):
    """Desired state: whole Snapshots, the first once everything has been read."""

    synced: asyncio.Event

    def problems(self) -> list[Problem]: ...

    def snapshots(self) -> AsyncIterator[Snapshot]: ...


class Ownership(Protocol):
    """Which egress IPs this node holds. Manifests mode holds them all (``runtime.HoldAll``)."""

    def holds(self, gateway: EgressGateway, address: IPAddress) -> bool: ...

    def update(self, gateways: Sequence[EgressGateway]) -> None:
        """The gateways of the latest snapshot (which IPs exist, which nodes may hold them)."""

    async def run(self, changed: Callable[[], None]) -> None:
        """Keep ownership current; call ``changed`` when what this node holds changes."""


class StatusSink(Protocol):
    """Where the outcome of each apply is reported (Kubernetes: object status)."""

    def report(self, snapshot: Snapshot, plan: Plan, problems: Sequence[Problem]) -> None: ...


class Upstream(Protocol):
    """The resolvers allowed names are forwarded to."""

    async def start(self) -> None:
        """Open the sockets; an upstream that cannot be reached is demoted, never fatal."""

    def reopen(self) -> list[str]:
        """Try again the upstreams that could not be opened; those still closed."""
        ...

    def close(self) -> None: ...

    def ask(self, question: Question, query: bytes, done: Done) -> None:
        """Send ``query``; ``done`` gets the response (with the query's ID) or the failure."""

    async def resolve(self, question: Question, query: bytes) -> bytes:
        """The response to ``query``; raises ``dns.upstream.UpstreamError`` when all failed."""
        ...


class Programmer(Protocol):
    """What the DNS path writes into the datapath: learned elements, before it answers."""

    @property
    def epoch(self) -> int:
        """Moves before every change of the policy in force reaches the kernel."""
        ...

    @property
    def unsettled(self) -> frozenset[int]:
        """The identities whose learned elements the change of the current epoch touches."""
        ...

    def program(
        self,
        learned: Iterable[Learned],
        lifetime_s: float,
        *,
        name: str | None = None,
        policy: LearnedPolicy | None = None,
        wait_s: float | None = None,
    ) -> int: ...

    def revoke(self, learned: Iterable[Learned], wait_s: float | None = None) -> int: ...


class Datapath(Programmer, Protocol):
    """The kernel state the daemon keeps in step with the plan."""

    def adopt(self) -> Adopted:
        """Take over what a previous run left in the kernel."""
        ...

    def reconcile(
        self,
        desired: DesiredState,
        policy: LearnedPolicy | None = None,
        committed: Callable[[], None] | None = None,
    ) -> ReconcileResult: ...

    def forget_expired(self) -> int: ...

    def learned_by_identity(self) -> dict[int, int]: ...

    def counters(self) -> dict[int, Traffic]: ...

    def close(self) -> None: ...
