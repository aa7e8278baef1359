"""The daemon's /readyz and operator API, in process, over a real datapath in a namespace.

The source is held back until the test lets it sync, so "not ready" is observed for certain,
not by luck of timing.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from egressgw.app import build_gateway
from egressgw.policy.load import Problem
from egressgw.policy.model import EgressGateway, LabelSelector, Namespace, Pod, Snapshot
from egressgw.runtime import Settings
from tests.conftest import require_kernel, unique_name
from tests.kernel.topology import topology

pytestmark = pytest.mark.kernel

SNAPSHOT = Snapshot(
    namespaces={"payments": Namespace("payments", {"project": "payments"})},
    pods=(Pod("payments", "api-0", {"app": "api"}, (ipaddress.ip_address("192.0.2.10"),)),),
    gateways=(
        EgressGateway(
            "payments",
            LabelSelector(match_labels=(("project", "payments"),)),
            egress_ips=(ipaddress.ip_address("198.51.100.10"),),
        ),
    ),
)


class HeldBackSource:
    """Yields its one snapshot only once ``release`` is set."""

    def __init__(self) -> None:
        self.synced = asyncio.Event()
        self.release = asyncio.Event()

    def problems(self) -> list[Problem]:
        return []

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        await self.release.wait()
        self.synced.set()
        yield SNAPSHOT
        await asyncio.Event().wait()


async def _poll(client: TestClient, path: str, status: int) -> str:  # type: ignore[type-arg]
    for _ in range(200):  # bounded: 200 x 50 ms
        reply = await client.get(path)
        if reply.status == status:
            return await reply.text()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never answered {status}")


def test_readyz_is_not_ready_before_the_first_sync_and_ready_after() -> None:
    require_kernel()
    with topology() as topo:
        table = unique_name("egw").replace("-", "_")
        settings = Settings(uplink="up0", table=table, netns=topo.gateway, node_name="gw-test")
        source = HeldBackSource()
        daemon = build_gateway(settings, source=source).daemon

        async def scenario() -> None:
            running = asyncio.create_task(daemon.run())
            try:
                async with TestClient(TestServer(daemon.web_app(), host="127.0.0.1")) as client:
                    assert (await client.get("/readyz")).status == 503
                    # adopted, but the source has not synced: still not ready
                    for _ in range(200):
                        if daemon.adopted:
                            break
                        await asyncio.sleep(0.05)
                    reply = await client.get("/readyz")
                    assert (reply.status, await reply.text()) == (
                        503,
                        "not ready: desired state not loaded yet\n",
                    )
                    reply = await client.get("/v1/egress-ips")
                    assert reply.status == 503
                    source.release.set()
                    assert await _poll(client, "/readyz", 200) == "ready\n"
                    body = await (await client.get("/v1/egress-ips")).json()
                    assert body["gateways"][0]["egressIPs"] == [
                        {"address": "198.51.100.10", "family": 4, "held": True, "node": "gw-test"}
                    ]
                    metrics = await (await client.get("/metrics")).text()
                    assert (
                        'egressgw_egress_ip_held{egress_ip="198.51.100.10",gateway="payments",'
                        'node="gw-test"} 1.0' in metrics.splitlines()
                    )
                    accepted = (
                        'egressgw_traffic_packets_total{namespace="payments",verdict="accepted"}'
                    )
                    assert f"{accepted} 0.0" in metrics.splitlines()
            finally:
                daemon.request_stop()
                assert await asyncio.wait_for(running, timeout=10) == 0

        asyncio.run(scenario())
