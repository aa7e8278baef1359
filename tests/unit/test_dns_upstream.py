"""Forwarding from callbacks (``Upstream.ask``): answers, timeouts and failover, over loopback."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from dnslib import QTYPE, RR, A, DNSRecord

from egressgw.dns.upstream import Done, Upstream, UpstreamError
from egressgw.dns.wire import parse_question

LOOPBACK = "127.0.0.1"


class _Responder(asyncio.DatagramProtocol):
    """A resolver on loopback: answers every name with 203.0.113.N, except names it ignores."""

    def __init__(self, silent_prefix: str | None = None) -> None:
        self.silent_prefix = silent_prefix
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
        reply = request.reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=A(f"203.0.113.{len(self.asked) % 250}"), ttl=60))
        assert self.transport is not None
        self.transport.sendto(bytes(reply.pack()), addr)


async def _responder(silent_prefix: str | None = None) -> tuple[_Responder, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Responder(silent_prefix), local_addr=(LOOPBACK, 0)
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
            # and the first upstream, now demoted, is asked after the second for a while
            query = _query("after.example", 7)
            answered = loop.create_future()
            upstream.ask(parse_question(query), query, answered.set_result)
            assert isinstance(await asyncio.wait_for(answered, 1), bytes)
            assert second.asked[-1] == "after.example" and "after.example" not in first.asked
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
