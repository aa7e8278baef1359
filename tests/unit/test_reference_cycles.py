"""What a plan, a DNS decision, a dump decode and a failed upstream query build must be freed by
refcounting alone.

The daemon freezes the collector's generations after every apply and every second
(``runtime.Daemon.apply``, ``Daemon._collect_young``). A frozen object is never examined by the
cyclic collector again, so an object in a reference cycle that is alive at a freeze, or already
unreachable but not yet collected, is never freed. These tests fail when something on those
paths builds a cycle again; they name the types and where the objects were allocated.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import socket
import tracemalloc
from collections import Counter
from collections.abc import Callable

import pytest

from egressgw.datapath import keys
from egressgw.datapath.netlink import Change, Element, Op, _decode_elements, encode_elements
from egressgw.datapath.state import Learned
from egressgw.dns.names import NamePolicy
from egressgw.dns.upstream import Upstream, UpstreamError
from egressgw.dns.wire import parse_question
from egressgw.identity import IdentityRegistry
from egressgw.plan import build
from egressgw.policy.model import (
    EgressGateway,
    EgressPolicy,
    EgressRule,
    LabelSelector,
    Namespace,
    Peer,
    Pod,
    PortSpec,
    Snapshot,
)


def cyclic_garbage(action: Callable[[], object]) -> list[str]:
    """What ``action`` left that only the cyclic collector frees, as readable lines. Only
    objects allocated while it ran count: a thread that an earlier test left behind may end
    meanwhile, and its objects are not the action's."""
    gc.collect()
    tracemalloc.start(30)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        action()
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    where: Counter[str] = Counter()
    for obj in found:
        trace = tracemalloc.get_object_traceback(obj)
        if trace is None:  # allocated before the action
            continue
        ours = [f for f in trace if "/egressgw/" in f.filename]
        frame = ours[-1] if ours else None  # the innermost frame of ours: who made it
        origin = f"{frame.filename.rsplit('egressgw/', 1)[-1]}:{frame.lineno}" if frame else "?"
        where[f"{type(obj).__qualname__} from {origin}"] += 1
    tracemalloc.stop()
    return [f"{n} x {what}" for what, n in where.most_common(8)]


def _snapshot(version: int) -> Snapshot:
    namespaces = {f"p{n}": Namespace(f"p{n}", {"project": "payments"}) for n in range(3)}
    pods = tuple(
        Pod(
            f"p{i % 3}",
            f"pod-{i}",
            {"app": f"a{i % 5}"},
            (ipaddress.ip_address(f"192.0.2.{i + 1}"),),
        )
        for i in range(60)
    )
    gateway = EgressGateway(
        "payments",
        LabelSelector((("project", "payments"),)),
        egress_ips=(ipaddress.ip_address("198.51.100.10"),),
    )
    rule = EgressRule(
        to=(
            Peer(fqdn=f"db-{version}.example.com"),
            Peer(fqdn_pattern="*.cdn.example.com"),
            Peer(cidr=ipaddress.ip_network(f"203.0.113.{version % 8 * 8}/29")),
        ),
        ports=(PortSpec(port=443 + version),),
    )
    policies = tuple(
        EgressPolicy(f"p{n}", f"pol-{a}", LabelSelector((("app", f"a{a}"),)), egress=(rule,))
        for n in range(3)
        for a in range(5)
    )
    return Snapshot(namespaces, pods, (gateway,), policies)


def test_planning_and_deciding_leave_no_cyclic_garbage() -> None:
    registry = IdentityRegistry()

    def plans() -> None:
        for version in range(1, 4):  # each plan also frees the plan and decisions before it
            plan = build(_snapshot(version), registry)
            plan.desired.static_elements()
            names = NamePolicy(plan.selections)
            for identity in plan.desired.identities:
                for name in (f"db-{version}.example.com", "x.cdn.example.com", "no.example.org"):
                    names.decide(identity, name)

    found = cyclic_garbage(plans)
    assert not found, "\n".join(found)


def test_decoding_a_dump_leaves_no_cyclic_garbage() -> None:
    address = ipaddress.ip_address("198.51.100.7")
    elements = (
        *(Learned(7, address, 6, (p, p)).element(60_000, f"n{p}.example.com") for p in range(200)),
        Element(key=keys.mark(1), comment="payments/0123456789abcdef0123"),
    )
    raw = encode_elements("egressgw", Change(Op.ADD, "allow4", elements), elements, 1)
    decoded: list[Element] = []
    found = cyclic_garbage(lambda: decoded.extend(_decode_elements(raw)))
    assert not found, "\n".join(found)
    assert decoded == list(elements)


def test_an_upstream_that_fails_leaves_no_cyclic_garbage() -> None:
    silent = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for sock in silent:
        sock.bind(("127.0.0.1", 0))
    # made before the measurement: an Upstream and its servers refer to each other, once
    upstream = Upstream([sock.getsockname() for sock in silent], timeout_s=0.05)

    async def scenario() -> None:
        await upstream.start()
        failed: list[str] = []  # names only: keeping the exceptions would be a cycle of ours
        try:
            for i in range(10):
                query = bytes.fromhex("abcd01000001000000000000") + bytes(
                    [1, 97 + i, 0, 0, 1, 0, 1]
                )
                with pytest.raises(UpstreamError):
                    await upstream.resolve(parse_question(query), query)  # both time out
                upstream.ask(  # the UDP hot path
                    parse_question(query), query, lambda outcome: failed.append(repr(outcome))
                )
            while len(failed) < 10:
                await asyncio.sleep(0.01)
        finally:
            upstream.close()

    try:
        found = cyclic_garbage(lambda: asyncio.run(scenario()))
    finally:
        for sock in silent:
            sock.close()
    # asyncio.run's event loop is a cycle of its own (made once per daemon): only what the
    # failed queries left counts
    per_query = [line for line in found if " from dns/" in line or "Future" in line]
    assert not per_query, "\n".join(found)
