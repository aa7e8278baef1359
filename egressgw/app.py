"""The one place that builds egressgw: a gateway from its Settings.

In: ``runtime.Settings`` and, in Kubernetes mode, ``KubeSettings``. Out: a ``Gateway`` whose
``run()`` serves until SIGTERM (``runtime.Daemon``), with every part built here and nowhere
else: the datapath, the source (manifests or the API server), egress IP ownership (all, or by
Lease), the status writer, the upstream and the DNS interceptor. A setting that cannot work
raises ``ConfigError`` with one line that names it. Building does no work: nothing is read,
listened on or written until ``run()``; what only shows then (an address in use, a missing
uplink, no CAP_NET_ADMIN) raises ``runtime.StartupError``, one line as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from egressgw.contracts import Ownership, Source, StatusSink
from egressgw.datapath.kernel import NftDatapath
from egressgw.dns.interceptor import Interceptor
from egressgw.dns.upstream import Upstream
from egressgw.runtime import Daemon, Settings
from egressgw.sources.manifests import ManifestSource


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
        for start in self.starts:
            start()
        try:
            return await self.daemon.run()
        finally:
            for stop in reversed(self.stops):
                stop()


def check(settings: Settings, kube: KubeSettings | None) -> None:
    """Raise ``ConfigError`` for settings that cannot work together."""
    if settings.dns_listen and not settings.upstreams:
        raise ConfigError("--dns-listen needs at least one --upstream")
    if settings.dns.min_ttl_s > settings.dns.max_ttl_s:
        raise ConfigError("--min-ttl must not exceed --max-ttl")
    if kube is not None:
        if not kube.node_name:
            raise ConfigError("--kubernetes needs --node-name (or NODE_NAME)")
    elif settings.manifests is None:
        raise ConfigError("a source is needed: --manifests DIR or --kubernetes")
    elif not settings.manifests.is_dir():
        raise ConfigError(f"--manifests {settings.manifests} is not a directory")
    if settings.netns is not None and not Path("/run/netns", settings.netns).exists():
        raise ConfigError(
            f"--netns {settings.netns}: no such network namespace (`ip netns list` lists them)"
        )


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
    if source is None and kube is not None:
        source, ownership, status = _kubernetes(kube, starts, stops)
    elif source is None:
        assert settings.manifests is not None  # check() made sure
        source = ManifestSource(settings.manifests)
    daemon = Daemon(settings, datapath, source, ownership, status, interceptor)
    return Gateway(daemon, starts, stops)


def _kubernetes(
    kube: KubeSettings, starts: list[Callable[[], None]], stops: list[Callable[[], None]]
) -> tuple[Source, Ownership, StatusSink]:
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
