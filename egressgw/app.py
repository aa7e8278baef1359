"""The one place that builds egressgw: a gateway or an agent from its Settings.

In: ``runtime.Settings`` (the gateway) or ``agent.AgentSettings`` (the agent on a worker node)
and, in Kubernetes mode, ``KubeSettings``. Out: a ``Gateway`` whose ``run()`` serves until
SIGTERM (``runtime.Daemon``), or a ``WorkerAgent`` (``agent.Agent``), with every part built
here and nowhere else: the datapath, the source (manifests or the API server), egress IP
ownership (all, by Node in the manifests, or by Lease), the status writer, the upstream, the
DNS interceptor, the gateway's end of the tunnel (with ``--node-name``); for the agent its
datapath, its source and who holds each egress IP. A setting that cannot work raises
``ConfigError`` with one line that names it. Building does no work: nothing is read, listened
on or written until ``run()``; what only shows then (an address in use, a missing uplink, no
CAP_NET_ADMIN) raises ``runtime.StartupError``, one line as well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from egressgw.agent import Agent, AgentSettings
from egressgw.contracts import (
    AgentDatapath,
    EgressHolders,
    GatewayTunnel,
    Ownership,
    Source,
    StatusSink,
)
from egressgw.datapath.kernel import NftDatapath
from egressgw.datapath.tunnel import TunnelSettings
from egressgw.dns.interceptor import Interceptor
from egressgw.dns.upstream import Upstream
from egressgw.policy.model import IPAddress, IPNetwork
from egressgw.runtime import Daemon, GatewayNode, Settings
from egressgw.sources.manifests import ManifestSource

if TYPE_CHECKING:
    from egressgw.kube.leases import LeaseOwnership


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line for the operator."""


@dataclass(frozen=True)
class KubeSettings:
    node_name: str
    kubeconfig: Path | None = None  # None: the in-cluster service account
    lease_namespace: str = "egressgw-system"
    lease_duration_s: int = 10


@dataclass
class Gateway:
    """A built gateway: its daemon, and what runs beside it (Kubernetes: the status writer)."""

    daemon: Daemon
    starts: list[Callable[[], None]] = field(default_factory=list)
    stops: list[Callable[[], None]] = field(default_factory=list)

    async def run(self) -> int:
        return await _running(self.starts, self.stops, self.daemon.run)


@dataclass
class WorkerAgent:
    """A built agent, and what runs beside it."""

    agent: Agent
    starts: list[Callable[[], None]] = field(default_factory=list)
    stops: list[Callable[[], None]] = field(default_factory=list)

    async def run(self) -> int:
        return await _running(self.starts, self.stops, self.agent.run)


async def _running(
    starts: list[Callable[[], None]],
    stops: list[Callable[[], None]],
    main: Callable[[], Awaitable[int]],
) -> int:
    for start in starts:
        start()
    try:
        return await main()
    finally:
        for stop in reversed(stops):
            stop()


def _check_netns(netns: str | None) -> None:
    if netns is not None and not Path("/run/netns", netns).exists():
        raise ConfigError(
            f"--netns {netns}: no such network namespace (`ip netns list` lists them)"
        )


def check(settings: Settings, kube: KubeSettings | None) -> None:
    """Raise ``ConfigError`` for settings that cannot work together."""
    if settings.dns_listen and not settings.upstreams:
        raise ConfigError("--dns-listen needs at least one --upstream")
    if (settings.node_name or kube is not None) and settings.upstreams and not settings.dns_listen:
        raise ConfigError(
            "--upstream on a gateway node needs --dns-listen: the DNS that comes through the "
            "tunnel is answered there"
        )
    if settings.dns.min_ttl_s > settings.dns.max_ttl_s:
        raise ConfigError("--min-ttl must not exceed --max-ttl")
    if kube is not None:
        if not kube.node_name:
            raise ConfigError("--kubernetes needs --node-name (or NODE_NAME)")
    elif settings.manifests is None:
        raise ConfigError("a source is needed: --manifests DIR or --kubernetes")
    elif not settings.manifests.is_dir():
        raise ConfigError(f"--manifests {settings.manifests} is not a directory")
    _check_netns(settings.netns)


def build_gateway(
    settings: Settings, kube: KubeSettings | None = None, *, source: Source | None = None
) -> Gateway:
    """The gateway for ``settings``: fed by the manifests directory, by the API server
    (``kube``), or by ``source`` (tests hand one in)."""
    if source is None:
        check(settings, kube)
    datapath = NftDatapath(
        settings.table,
        settings.uplink,
        netns=settings.netns,
        buffer_bytes=settings.netlink_buffer_bytes,
    )
    interceptor = None
    if settings.dns_listen:
        upstream = Upstream(list(settings.upstreams), settings.upstream_timeout_s)
        interceptor = Interceptor(settings.dns, upstream, datapath)
    starts: list[Callable[[], None]] = []
    stops: list[Callable[[], None]] = []
    ownership: Ownership | None = None
    status: StatusSink | None = None
    node: GatewayNode | None = None

    def tunnel() -> GatewayTunnel:  # built once this node's Node is known
        return gateway_tunnel(settings.tunnel, settings.table, settings.uplink, settings.netns)

    if source is None and kube is not None:
        source, leases, status = _kubernetes(kube, starts, stops)
        ownership = leases
        node = GatewayNode(
            kube.node_name, tunnel, settings.dns_listen, manifests=False, others=leases.holders
        )
    else:
        if source is None:
            assert settings.manifests is not None  # check() made sure
            source = ManifestSource(settings.manifests)
        if settings.node_name:  # manifests with Nodes: this node holds its share
            ownership = node = GatewayNode(
                settings.node_name, tunnel, settings.dns_listen, manifests=True
            )
    daemon = Daemon(settings, datapath, source, ownership, status, interceptor, node)
    return Gateway(daemon, starts, stops)


def gateway_tunnel(
    tunnel: TunnelSettings, table: str, uplink: str, netns: str | None
) -> GatewayTunnel:
    """The gateway's end of the tunnel, whose chains live in the gateway's ``table`` (the
    daemon builds it once its Node is known; cleanup to remove it)."""
    from egressgw.datapath.kernel import GatewayTunnel as KernelGatewayTunnel

    return KernelGatewayTunnel(tunnel, table, uplink, netns)


def agent_datapath(
    tunnel: TunnelSettings,
    cluster_cidrs: Sequence[IPNetwork],
    dns_addresses: Sequence[IPAddress],
    table: str,
    netns: str | None,
) -> AgentDatapath:
    """The agent's datapath (the agent's, or cleanup's to remove it)."""
    from egressgw.datapath.agent import AgentDatapath as KernelAgentDatapath

    return KernelAgentDatapath(tunnel, cluster_cidrs, dns_addresses, table, netns=netns)


def check_agent(settings: AgentSettings, kube: KubeSettings | None) -> None:
    """Raise ``ConfigError`` for agent settings that cannot work together."""
    if not settings.node_name:
        raise ConfigError("--node-name is needed (or NODE_NAME): the agent steers this node's pods")
    if not settings.cluster_cidrs:
        raise ConfigError("at least one --cluster-cidr is needed: the networks never steered")
    if kube is None:
        if settings.manifests is None:
            raise ConfigError("a source is needed: --manifests DIR or --kubernetes")
        if not settings.manifests.is_dir():
            raise ConfigError(f"--manifests {settings.manifests} is not a directory")
    _check_netns(settings.netns)


def build_agent(
    settings: AgentSettings,
    kube: KubeSettings | None = None,
    *,
    source: Source | None = None,
    holders: EgressHolders | None = None,
) -> WorkerAgent:
    """The agent for ``settings``: fed by the manifests directory (holders from the Nodes in
    it), by the API server and its Leases (``kube``), or by ``source`` and ``holders`` (tests
    hand them in)."""
    if source is None:
        check_agent(settings, kube)
    try:
        datapath = agent_datapath(
            settings.tunnel,
            settings.cluster_cidrs,
            settings.dns_addresses,
            settings.table,
            settings.netns,
        )
    except ValueError as exc:  # the datapath refuses what it cannot program, before any work
        raise ConfigError(str(exc)) from None
    stops: list[Callable[[], None]] = []
    if source is None and kube is not None:
        source, holders = _kubernetes_agent(kube, stops)
    elif source is None:
        assert settings.manifests is not None  # check_agent() made sure
        source = ManifestSource(settings.manifests)
    return WorkerAgent(Agent(settings, datapath, source, holders), stops=stops)


def _kubernetes_agent(
    kube: KubeSettings, stops: list[Callable[[], None]]
) -> tuple[Source, EgressHolders]:
    """This node's pods and the cluster's gateways and Nodes from the API server, and the
    egress IPs' holders from their Leases; their watch threads stop with the agent."""
    from egressgw.kube.agent_source import KubeAgentSource
    from egressgw.kube.api import KubeError, api_client
    from egressgw.kube.holders import LeaseHolders

    try:
        api = api_client(kube.kubeconfig)
    except KubeError as exc:
        raise ConfigError(str(exc)) from None
    source = KubeAgentSource(api, kube.node_name)
    holders = LeaseHolders(api, kube.lease_namespace)
    stops += [source.stop, holders.stop]
    return source, holders


def _kubernetes(
    kube: KubeSettings, starts: list[Callable[[], None]], stops: list[Callable[[], None]]
) -> tuple[Source, LeaseOwnership, StatusSink]:
    """The API server's watches, Lease ownership and status writes; their threads start and
    stop with the gateway."""
    from egressgw.kube.api import KubeError, api_client
    from egressgw.kube.leases import LeaseOwnership, LeaseTiming
    from egressgw.kube.source import KubeSource
    from egressgw.kube.status import StatusWriter

    try:
        api = api_client(kube.kubeconfig)
    except KubeError as exc:
        raise ConfigError(str(exc)) from None
    source = KubeSource(api, kube.node_name)
    ownership = LeaseOwnership(
        api,
        kube.lease_namespace,
        kube.node_name,
        source.node_labels,
        LeaseTiming(kube.lease_duration_s),
    )
    status = StatusWriter(api, source, ownership.holders)
    ownership.on_holders_changed = status.poke  # a new holder shows in EgressGateway status
    starts.append(status.start)
    stops += [source.stop, status.stop]
    return source, ownership, status
