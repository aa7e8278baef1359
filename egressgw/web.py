"""Health, readiness, metrics and the operator API over HTTP (aiohttp).

In: the runtime's status and, through ``Operator``, its last desired state and recent DNS
denials. Out:

- ``/healthz``: the daemon's tasks are alive; ``/readyz``: the datapath was adopted and every
  source has synced (503 with the reason until then);
- ``/metrics``: the Prometheus registry, produced off the event loop (the scrape reads kernel
  counters, and DNS answers must not wait behind it);
- ``/v1/egress-ips``: every gateway, its namespaces and egress IPs, and whether this node holds
  them (``egressgw.report`` JSON);
- ``/v1/explain?namespace=NS&(pod=NAME|ip=ADDR)&(host=NAME|address=ADDR)[&port=N][&protocol=P]``:
  the verdict, reason and rule (``egressgw.explain`` JSON); 400 for a malformed query, 404 for a
  workload that does not exist, with ``{"error": ...}``;
- ``/v1/decisions[?limit=N][&namespace=NS]``: the most recent DNS denials, newest first, at most
  as many as the daemon keeps.

Read-only: no endpoint changes anything. Errors are JSON objects with an ``error`` field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from egressgw.explain import Explanation, Query, UnknownWorkload


class NotReady(RuntimeError):
    """The daemon has no desired state yet; the message says what it is waiting for."""


@dataclass
class Health:
    alive: Callable[[], bool]
    not_ready_reason: Callable[[], str | None]  # None when ready


@dataclass
class Operator:
    """What the operator endpoints read; each callable may raise ``NotReady``."""

    egress_ips: Callable[[], Mapping[str, Any]]
    explain: Callable[[Query], Explanation]
    decisions: Callable[[], Sequence[Mapping[str, object]]]  # oldest first
    decisions_kept: int = 0  # how many denials the daemon keeps at most


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_app(health: Health, operator: Operator | None = None) -> web.Application:
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
        body = await asyncio.to_thread(generate_latest)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if operator is not None:
        _add_operator_routes(app, operator)
    return app


def _add_operator_routes(app: web.Application, operator: Operator) -> None:
    async def egress_ips(_request: web.Request) -> web.Response:
        try:
            return web.json_response(operator.egress_ips())
        except NotReady as exc:
            return _error(503, str(exc))

    async def explain(request: web.Request) -> web.Response:
        try:
            query = Query.from_params(request.query)
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            return web.json_response(operator.explain(query).to_json())
        except NotReady as exc:
            return _error(503, str(exc))
        except UnknownWorkload as exc:
            return _error(404, str(exc))
        except ValueError as exc:  # e.g. an invalid name or port combination
            return _error(400, str(exc))

    async def decisions(request: web.Request) -> web.Response:
        limit_text = request.query.get("limit", "")
        if limit_text and not (limit_text.isascii() and limit_text.isdigit()):  # not "²"
            return _error(400, f"limit must be a number, got {limit_text!r}")
        namespace = request.query.get("namespace")
        try:
            records = list(operator.decisions())
        except NotReady as exc:
            return _error(503, str(exc))
        newest_first = [
            r for r in reversed(records) if namespace is None or r.get("namespace") == namespace
        ]
        if limit_text:
            newest_first = newest_first[: int(limit_text)]
        body = {"decisions": newest_first, "kept": operator.decisions_kept}
        return web.json_response(body)

    app.router.add_get("/v1/egress-ips", egress_ips)
    app.router.add_get("/v1/explain", explain)
    app.router.add_get("/v1/decisions", decisions)


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
