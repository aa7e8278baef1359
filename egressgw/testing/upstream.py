"""A stand-in for ``Upstream`` in unit tests: answers from a table of records, counts questions.

Records are zone-file lines for dnslib (``"db.example. 60 A 203.0.113.10"``); a name without
records gets NXDOMAIN. ``fail`` makes every question raise UpstreamError, as dead upstreams do.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from dnslib import RCODE, RR, DNSRecord

from egressgw.contracts import Done
from egressgw.dns.upstream import UpstreamError, settle
from egressgw.dns.wire import Question


class FakeUpstream:
    def __init__(self, zone: str = "") -> None:
        self.records = RR.fromZone(zone) if zone.strip() else []
        self.asked: Counter[str] = Counter()
        self.queries: list[bytes] = []  # as they reached the upstream
        self.fail = False
        self._tasks: set[asyncio.Task[None]] = set()

    def ask(self, question: Question, query: bytes, done: Done) -> None:
        settle(self._tasks, self.resolve(question, query), done)

    async def start(self) -> None:
        return None

    def reopen(self) -> list[str]:
        return []

    def close(self) -> None:
        return None

    async def resolve(self, question: Question, query: bytes) -> bytes:
        self.asked[question.name] += 1
        self.queries.append(query)
        if self.fail:
            raise UpstreamError("every upstream failed: fake: timed out")
        request = DNSRecord.parse(query)
        reply = request.reply()
        names = {question.name}
        for _ in range(8):
            for rr in self.records:
                owner = str(rr.rname).rstrip(".").lower()
                if owner in names and rr not in reply.rr and rr.rtype in (question.qtype, 5):
                    reply.add_answer(rr)
                    if rr.rtype == 5:
                        names.add(str(rr.rdata.label).rstrip(".").lower())
        if not reply.rr:
            reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())
