"""What the daemon needs of each part it is built from, as Protocols.

In: nothing at run time (types only). Out: Source, Ownership, StatusSink, Upstream, Programmer
and Datapath for the gateway; GatewayTunnel for a gateway node's end of the tunnel;
AgentDatapath and EgressHolders for the agent on a worker node. The real adapters
(``sources.manifests.ManifestSource``, ``kube.*``, ``dns.upstream.Upstream``,
``datapath.kernel.NftDatapath`` and ``GatewayTunnel``, ``datapath.agent.AgentDatapath``) and
the test doubles in ``egressgw.testing`` both satisfy them under ``mypy --strict``; ``app``
builds the real ones. It may not import the adapters, nor ``runtime``, ``agent`` or ``app``.

What the tunnel's adapters return is theirs to choose (``object``): the daemons read nothing
back but the exceptions they raise.
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
from egressgw.steering import AgentPlan, TunnelPeers

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


class GatewayTunnel(Protocol):
    """A gateway node's end of the tunnel: accepts the pods' packets from the worker nodes the
    desired state places them on, redirects their DNS to the interceptor, and routes replies
    back into the tunnel."""

    def setup(self, local: IPAddress, dns_redirect: Sequence[tuple[IPAddress, int]] = ()) -> object:
        """Create or adopt the device, the chains and the rules with this node's tunnel
        address, DNS queries that come out of the tunnel redirected to ``dns_redirect`` (the
        interceptor; at most one address and port per family; none: not redirected); again
        when the address changes. Nothing that is already in place is removed first."""

    def apply(self, peers: TunnelPeers) -> object:
        """Accept exactly these pod addresses, each from its node, and route replies back."""

    def close(self) -> object:
        """Let go of kernel handles; the kernel state stays in force."""

    def remove(self) -> object:
        """Delete every piece of tunnel state this node has (uninstall)."""


class AgentDatapath(Protocol):
    """What the agent programs on a worker node: which pod addresses are steered into the
    tunnel, toward which gateway node, and which are dropped for want of one."""

    def setup(self, local: IPAddress) -> object:
        """Create or adopt the table, the device and the routing rules, with this node's
        tunnel address; again when that address changes. Nothing in force is removed first."""

    def apply(self, plan: AgentPlan) -> object:
        """Make ``plan`` the one in force, as one change; a failure leaves the previous one."""

    def dropped(self) -> int:
        """Packets of steered pods dropped for want of a next hop (after ``setup``)."""
        ...

    def close(self) -> object:
        """Let go of kernel handles; the kernel keeps steering as last applied."""

    def remove(self) -> object:
        """Delete the table, the rules, the routes and the device (uninstall)."""


class EgressHolders(Protocol):
    """Which node holds each egress IP, as the whole cluster sees it (Kubernetes: the Leases).
    In manifests mode the agent has none: the snapshot says (``steering.manifest_holders``)."""

    def holders(self) -> dict[IPAddress, str]:
        """Egress IP -> name of the node holding it, as last read."""
        ...

    async def run(self, changed: Callable[[], None]) -> None:
        """Follow the holders until cancelled; call ``changed`` once what was first read is in
        (even if it holds nothing), then after every change."""
