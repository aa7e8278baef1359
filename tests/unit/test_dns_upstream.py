"""Forwarding from callbacks (``Upstream.ask``): answers, timeouts and failover, over loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import cast

from dnslib import QTYPE, RR, A, DNSRecord
from prometheus_client import REGISTRY

from egressgw.contracts import Done
from egressgw.dns.upstream import Evidence, Health, State, Upstream, UpstreamError
from egressgw.dns.wire import parse_question

LOOPBACK = "127.0.0.1"


class _Responder(asyncio.DatagramProtocol):
    """A resolver on loopback: answers every name with 203.0.113.N, except the names and query
    types it ignores."""

    def __init__(
        self, silent_prefix: str | None = None, silent_types: set[int] | None = None
    ) -> None:
        self.silent_prefix = silent_prefix
        self.silent_types = silent_types or set()
        self.asked: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = DNSRecord.parse(data)
        name = str(request.q.qname).rstrip(".")
        self.asked.append(name)
        if self.silent_prefix is not None and name.startswith(self.silent_prefix):
            return
        if request.q.qtype in self.silent_types:
            return
        reply = request.reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=A(f"203.0.113.{len(self.asked) % 250}"), ttl=60))
        assert self.transport is not None
        self.transport.sendto(bytes(reply.pack()), addr)


async def _responder(
    silent_prefix: str | None = None, silent_types: set[int] | None = None
) -> tuple[_Responder, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Responder(silent_prefix, silent_types), local_addr=(LOOPBACK, 0)
    )
    return protocol, transport.get_extra_info("sockname")


def _query(name: str, ident: int) -> bytes:
    record = DNSRecord.question(name, "A")
    record.header.id = ident
    return bytes(record.pack())


def test_answers_come_back_through_done_and_a_silent_upstream_fails_over() -> None:
    async def scenario() -> None:
        first, first_address = await _responder(silent_prefix="lost")
        second, second_address = await _responder()
        upstream = Upstream([first_address, second_address], timeout_s=0.3)
        await upstream.start()
        loop = asyncio.get_running_loop()
        results: dict[str, tuple[bytes | Exception, float]] = {}
        all_done = asyncio.Event()
        names = [f"n{i}.example" for i in range(200)]
        names.insert(100, "lost.example")
        started = time.monotonic()

        def done_for(name: str) -> Done:
            def done(outcome: bytes | Exception) -> None:
                results[name] = (outcome, time.monotonic() - started)
                if len(results) == len(names):
                    all_done.set()

            return done

        try:
            for index, name in enumerate(names):
                query = _query(name, 1000 + index)
                upstream.ask(parse_question(query), query, done_for(name))
            await asyncio.wait_for(all_done.wait(), 5)
            # every name is answered, under the client's own ID, for its own question
            for index, name in enumerate(names):
                outcome, _ = results[name]
                assert isinstance(outcome, bytes), (name, outcome)
                reply = DNSRecord.parse(outcome)
                assert reply.header.id == 1000 + index
                assert str(reply.q.qname).rstrip(".") == name
            # the one the first upstream ignored came from the second, after one timeout
            assert second.asked == ["lost.example"]
            assert 0.3 <= results["lost.example"][1] < 1.0
            assert max(seconds for n, (_, seconds) in results.items() if n != "lost.example") < 0.3
            # the first upstream answered the others meanwhile, so the lost query was its own
            # trouble: the first upstream is not demoted and is still asked first
            query = _query("after.example", 7)
            answered = loop.create_future()
            upstream.ask(parse_question(query), query, answered.set_result)
            assert isinstance(await asyncio.wait_for(answered, 1), bytes)
            assert first.asked[-1] == "after.example" and "after.example" not in second.asked
        finally:
            upstream.close()

    asyncio.run(scenario())


def test_every_upstream_silent_is_an_upstream_error_within_the_timeouts() -> None:
    async def scenario() -> None:
        _, first = await _responder(silent_prefix="")  # silent for every name
        _, second = await _responder(silent_prefix="")
        upstream = Upstream([first, second], timeout_s=0.2)
        await upstream.start()
        loop = asyncio.get_running_loop()
        try:
            query = _query("db.example", 9)
            failed = loop.create_future()
            started = time.monotonic()
            upstream.ask(parse_question(query), query, failed.set_result)
            outcome = await asyncio.wait_for(failed, 2)
            assert isinstance(outcome, UpstreamError)
            assert "every upstream failed" in str(outcome) and "timed out" in str(outcome)
            assert 0.4 <= time.monotonic() - started < 1.0  # two tries of 0.2 s each
        finally:
            upstream.close()

    asyncio.run(scenario())


# --- when an upstream is demoted: the rule, on a fake clock ------------------------------------


def test_one_clients_odd_query_never_demotes_its_upstream() -> None:
    health = Health(demote_s=5.0, distinct=3, window_s=5.0, suspect_s=2.0)
    now = 100.0
    # others' queries are answered while the odd one waits: its timeout is its own
    for _ in range(20):
        health.answered(now + 0.5)
        assert health.timed_out("zone.example", sent_at=now, now=now + 1.0) is Evidence.OWN
        assert health.state(now + 1.0) is State.UP
        now += 1.0
    # nobody else asks: each timeout makes it suspect (probed), never demoted, however often
    for _ in range(20):
        assert health.timed_out("zone.example", sent_at=now, now=now + 1.0) is Evidence.SUSPECT
        assert health.state(now + 1.0) is State.SUSPECT
        now += 1.0
    assert health.down_until == 0.0
    health.answered(now)  # the probe's answer
    assert health.state(now) is State.UP


def test_timeouts_of_several_names_with_no_answer_between_demote() -> None:
    health = Health(demote_s=5.0, distinct=3, window_s=5.0, suspect_s=2.0)
    assert health.timed_out("a.example", sent_at=10.0, now=11.0) is Evidence.SUSPECT
    assert health.timed_out("a.example", sent_at=10.5, now=11.5) is Evidence.SUSPECT  # same name
    assert health.timed_out("b.example", sent_at=11.0, now=12.0) is Evidence.SUSPECT
    assert health.state(12.0) is State.SUSPECT
    assert health.timed_out("c.example", sent_at=11.5, now=12.5) is Evidence.DEMOTED
    assert health.state(12.5) is State.DOWN
    # while it is down, more failures change nothing (no second demotion to count)
    assert health.timed_out("d.example", sent_at=12.0, now=13.0) is Evidence.OWN
    assert health.state(17.4) is State.DOWN


def test_an_answer_between_the_failures_starts_the_count_again() -> None:
    health = Health(demote_s=5.0, distinct=3, window_s=5.0, suspect_s=2.0)
    health.timed_out("a.example", sent_at=10.0, now=11.0)
    health.timed_out("b.example", sent_at=10.1, now=11.1)
    health.answered(11.2)
    assert health.state(11.2) is State.UP
    # sent before that answer: nothing to say about the upstream
    assert health.timed_out("c.example", sent_at=11.0, now=12.0) is Evidence.OWN
    assert health.timed_out("d.example", sent_at=11.3, now=12.3) is Evidence.SUSPECT
    assert health.timed_out("e.example", sent_at=11.4, now=12.4) is Evidence.SUSPECT
    assert health.state(12.4) is State.SUSPECT
    assert health.timed_out("f.example", sent_at=11.5, now=12.5) is Evidence.DEMOTED


def test_failures_spread_wider_than_the_window_do_not_demote() -> None:
    health = Health(demote_s=5.0, distinct=3, window_s=5.0, suspect_s=2.0)
    assert health.timed_out("a.example", sent_at=9.0, now=10.0) is Evidence.SUSPECT
    assert health.timed_out("b.example", sent_at=12.0, now=13.0) is Evidence.SUSPECT
    assert health.timed_out("c.example", sent_at=15.5, now=16.5) is Evidence.SUSPECT  # a: too old
    assert health.timed_out("d.example", sent_at=16.0, now=17.0) is Evidence.DEMOTED


def test_a_demotion_expires_and_an_answer_lifts_it_sooner() -> None:
    health = Health(demote_s=5.0, distinct=3, window_s=5.0, suspect_s=2.0)
    assert health.unreachable(20.0)  # an ICMP error demotes at once
    assert not health.unreachable(20.1)  # and is not news twice
    assert health.state(24.9) is State.DOWN
    assert health.state(25.0) is State.UP
    # after it expired, fresh evidence is needed: one timeout only makes it suspect
    assert health.timed_out("a.example", sent_at=25.0, now=26.0) is Evidence.SUSPECT
    assert health.state(28.0) is State.UP  # a suspicion no probe settled does not last
    assert health.unreachable(30.0)
    health.answered(31.0)  # the only upstream left was asked, and answered
    assert health.state(31.0) is State.UP


def test_a_failed_probe_demotes_unless_something_was_answered_since_it_was_sent() -> None:
    health = Health(demote_s=5.0, distinct=3, window_s=5.0, suspect_s=2.0)
    health.timed_out("a.example", sent_at=9.0, now=10.0)
    health.answered(10.5)  # an answer to someone else's query
    assert not health.probe_failed(sent_at=10.0, now=11.0)
    assert health.state(11.0) is State.UP
    health.timed_out("b.example", sent_at=11.0, now=12.0)
    assert health.probe_failed(sent_at=12.0, now=13.0)
    assert health.state(13.0) is State.DOWN
    assert health.state(18.0) is State.UP


# --- over loopback -----------------------------------------------------------------------------


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, (name, labels)  # the series exists from the start
    return value


def _label(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


async def _ask(upstream: Upstream, name: str, ident: int, qtype: str = "A") -> bytes | Exception:
    record = DNSRecord.question(name, qtype)
    record.header.id = ident
    query = bytes(record.pack())
    outcome: asyncio.Future[bytes | Exception] = asyncio.get_running_loop().create_future()
    upstream.ask(parse_question(query), query, outcome.set_result)
    return await asyncio.wait_for(outcome, 5)


def test_a_query_the_first_upstream_ignores_does_not_demote_it_for_other_clients() -> None:
    async def scenario() -> None:
        first, first_address = await _responder(silent_types={QTYPE.AXFR})
        second, second_address = await _responder()
        upstream = Upstream([first_address, second_address], timeout_s=0.2)
        await upstream.start()
        label = _label(first_address)
        demotions = {
            reason: _sample("egressgw_dns_upstream_demotions_total", upstream=label, reason=reason)
            for reason in ("unreachable", "timeouts", "probe")
        }
        assert all(value == 0 for value in demotions.values())
        odd_done = asyncio.Event()
        others: list[str] = []

        async def odd_client() -> None:
            # each attempt waits out the first upstream, then the second answers it
            for attempt in range(4):
                outcome = await _ask(upstream, "zone.example", attempt, "AXFR")
                assert isinstance(outcome, bytes), outcome
            odd_done.set()

        async def other_client() -> None:
            deadline = time.monotonic() + 5
            index = 0
            while not odd_done.is_set() and index < 5000 and time.monotonic() < deadline:
                name = f"n{index}.example"
                outcome = await _ask(upstream, name, index % 65536)
                assert isinstance(outcome, bytes), outcome
                others.append(name)
                index += 1

        try:
            await asyncio.gather(odd_client(), other_client())
            # the odd query failed over each time; everyone else's went to the first upstream
            assert second.asked == ["zone.example"] * 4
            assert len(others) > 20 and set(others) <= set(first.asked)
            # alone, with no one else asking, the same odd query makes the first upstream
            # suspect only until its probe is answered
            for attempt in range(3):
                outcome = await _ask(upstream, "zone.example", 100 + attempt, "AXFR")
                assert isinstance(outcome, bytes), outcome
            await _until(lambda: upstream.states()[label] is State.UP)
            assert first.asked.count("") >= 1  # the probe, ". NS"
            assert isinstance(await _ask(upstream, "after.example", 7), bytes)
            assert first.asked[-1] == "after.example" and "after.example" not in second.asked
            for reason, before in demotions.items():
                value = _sample(
                    "egressgw_dns_upstream_demotions_total", upstream=label, reason=reason
                )
                assert value == before, reason
        finally:
            upstream.close()

    asyncio.run(scenario())


def test_a_dead_upstream_is_demoted_by_its_failed_probe_or_at_once_when_refused() -> None:
    async def scenario() -> None:
        _, hole = await _responder(silent_prefix="")  # bound, answers nothing
        live, live_address = await _responder()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spare:
            spare.bind((LOOPBACK, 0))
            closed = spare.getsockname()  # nothing listens there once this closes
        upstream = Upstream([hole, closed, live_address], timeout_s=0.2)
        await upstream.start()
        try:
            started = time.monotonic()
            assert isinstance(await _ask(upstream, "first.example", 1), bytes)
            # the hole waited out once; the closed port refused at once and is demoted for that
            assert 0.2 <= time.monotonic() - started < 0.5
            assert upstream.states()[_label(closed)] is State.DOWN
            assert (
                _sample(
                    "egressgw_dns_upstream_demotions_total",
                    upstream=_label(closed),
                    reason="unreachable",
                )
                == 1
            )
            # the hole is suspect: the live upstream is asked first while its probe is out
            started = time.monotonic()
            assert isinstance(await _ask(upstream, "second.example", 2), bytes)
            assert time.monotonic() - started < 0.15 and live.asked[-1] == "second.example"
            await _until(lambda: upstream.states()[_label(hole)] is State.DOWN)
            labels = {"upstream": _label(hole)}
            assert _sample("egressgw_dns_upstream_probes_total", **labels, result="failed") == 1
            assert _sample("egressgw_dns_upstream_demotions_total", **labels, reason="probe") == 1
        finally:
            upstream.close()

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
