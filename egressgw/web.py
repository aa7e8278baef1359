"""Health, readiness and metrics over HTTP (aiohttp).

In: the runtime's status. Out: ``/healthz`` (the daemon's tasks are alive), ``/readyz`` (the
datapath was adopted and every source has synced), ``/metrics``. Read-only: no endpoint changes
anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


@dataclass
class Health:
    alive: Callable[[], bool]
    not_ready_reason: Callable[[], str | None]  # None when ready


def make_app(health: Health) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        if health.alive():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="a daemon task has stopped\n")

    async def readyz(_request: web.Request) -> web.Response:
        reason = health.not_ready_reason()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
