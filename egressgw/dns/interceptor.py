"""The DNS decision path: who asks, may it resolve this name, program, then answer.

In: a query's bytes and its source address. Out: the bytes to send back (or None to drop).
For an allowed name the answer's addresses (CNAME chains followed) are programmed into the
asking identity's allowed set, with a lifetime of the released TTL plus a grace period, before
the answer leaves; if that fails or takes longer than ``program_timeout_s`` the client gets
SERVFAIL instead. Denied names are answered here and never forwarded. It never raises on input.

Answered here, never forwarded: denials (NXDOMAIN, with an SOA whose TTL is
``negative_ttl_s`` so downstream caches keep it; or REFUSED); unknown sources (REFUSED); zone
transfers and the obsolete mailbox queries (AXFR, IXFR, MAILB, MAILA: REFUSED, a workload has
no use for them); names no policy can name, such as a label with a dot or a control character
in it (denied, passthrough domains included); opcodes other than QUERY (NOTIMP); malformed
queries (FORMERR). Each carries an OPT record if the query did. ANY is decided and forwarded
like any other type: the policy governs names, not types, and RFC 8482 lets the upstream keep
its answer small. The upstream is asked the question alone, with an OPT record of the
gateway's own for an EDNS query (``wire.forwarded``): a client's EDNS options (a cookie, a
client subnet) never reach it, so no answer is tailored to one client and every cached answer
may be shared by the clients with its cache key. A datagram that is not a query at all
(shorter than a header, a response, or counts it cannot hold) gets no reply, so two servers
cannot bounce errors at each other.

Passthrough domains (``passthrough_domains``, a cluster's own such as ``cluster.local``): a
known workload's query for a name at or under one is forwarded to the upstream and its answer
released without a policy decision (no decision line, nothing in ``recent_denials``) and
without programming anything, since the traffic to such names stays inside the cluster and
never reaches this datapath. It is counted as verdict ``passthrough`` in
``egressgw_dns_queries_total``. A name that only ends in the same letters
(``evilcluster.local``) is decided as any other; an unknown source is refused as for any name.

The datapath call is synchronous: a netlink batch is processed by the kernel inside sendmsg, so
it is bounded by the socket timeout, which is set to ``program_timeout_s``.

One thread owns this state: the event loop's. A new plan is ``offer``ed from the thread that
computed it (one reference, taken by the loop at its next query or answer), after the datapath
made it the policy in force. What is remembered between queries (ready replies, what is
programmed) lives in ``dns.memo`` with every rule that makes it stale: for an identity whose
learned elements a reconcile removes or rewrites it is dropped as soon as the datapath's
``epoch`` moves, which it does before the kernel changes; when the new plan is taken, what was
remembered for an identity it decides differently, or for a source that now belongs to another
identity or to none, is dropped too. The rest stands, so a big reconcile does not turn
every repeated query into a programming call that waits for the kernel. An answer decided under
an older plan is decided again under the new one before it is released; the datapath refuses
elements offered under a plan that is not in force (``StalePolicy``), and an answer waits for a
busy datapath only as long as its programming bound (then SERVFAIL).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from egressgw import metrics
from egressgw.datapath.kernel import DatapathBusy, StalePolicy
from egressgw.datapath.state import PortAtom
from egressgw.dns.budget import AddressBudget, RateLimiter, Source, learned_elements
from egressgw.dns.cache import Answer, AnswerCache, prepare
from egressgw.dns.memo import Memo
from egressgw.dns.names import NameDecision, NamePolicy
from egressgw.dns.upstream import UpstreamError
from egressgw.dns.wire import (
    FORMERR,
    HEADER,
    NOTIMP,
    NXDOMAIN,
    OPCODE_MASK,
    REFUSED,
    SERVFAIL,
    Question,
    WireError,
    badvers_response,
    forwarded,
    local_response,
    not_a_query,
    parse_question,
    truncated,
)
from egressgw.identity import Workload, WorkloadTable
from egressgw.policy.decide import Verdict
from egressgw.policy.fqdn import InvalidName, canonical_name

if TYPE_CHECKING:
    from egressgw.contracts import Programmer, Upstream

log = logging.getLogger("egressgw.dns")
Clock = Callable[[], float]
CAP_LOG_INTERVAL_S = 60.0
DROP = b""  # ``ready``'s answer for a query that gets no reply
READY_LABELS = ("allow", "passthrough")  # the verdicts ``ready`` may repeat (audit logs each)
# every (verdict, reason) a query can be counted under: each series exists, at 0, from the start
OUTCOMES = (
    *((label, "resolved") for label in (*READY_LABELS, "audit")),
    ("deny", "denied by policy"),
    ("deny", "invalid name"),
    ("refused", "unknown source"),
    ("refused", "query type not served"),
    ("servfail", "upstream failed"),
    ("servfail", "bad upstream answer"),
    ("servfail", "programming failed"),
    ("servfail", "datapath busy"),
    ("servfail", "policy changed"),
    ("formerr", "malformed query"),
    ("notimp", "opcode not supported"),
    ("badvers", "EDNS version not supported"),
    ("dropped", "rate limited"),
    ("dropped", "shorter than a header"),
    ("dropped", "not a query"),
    ("dropped", "counts exceed the message"),
    ("error", "internal error"),
)
TYPE_NAMES = {1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 33: "SRV", 12: "PTR", 6: "SOA"}
TYPE_NAMES.update({251: "IXFR", 252: "AXFR", 253: "MAILB", 254: "MAILA", 255: "ANY"})
# Zone transfers and the obsolete mailbox meta-queries: refused here, before any upstream is asked
NOT_SERVED_TYPES = frozenset((251, 252, 253, 254))
_ESCAPED_BYTE = "a label holds a dot, a space or another byte that no policy can name"


@dataclass(frozen=True)
class DnsSettings:
    min_ttl_s: int = 5
    max_ttl_s: int = 3600
    grace_s: int = 10  # kernel elements outlive the released TTL by this much
    program_timeout_s: float = 0.25
    deny_rcode: int = NXDOMAIN  # or REFUSED
    negative_ttl_s: int = 60  # how long caches may keep a denial's NXDOMAIN (its SOA's TTL)
    passthrough_domains: tuple[str, ...] = ()
    max_addresses_per_name: int = 64
    max_addresses_per_identity: int = 4096
    rate_per_source_qps: float = 500.0
    burst_per_source: float = 1000.0
    cache_size: int = 65536
    recent_denials: int = 256  # how many denials /v1/decisions can show
    log_allowed_per_second: int = 0  # allowed decisions logged at INFO a second (DEBUG: all)


@dataclass
class PolicyView:
    """What the interceptor needs from the latest plan."""

    workloads: WorkloadTable = field(default_factory=WorkloadTable)
    names: NamePolicy = field(default_factory=lambda: NamePolicy({}))


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One DNS decision, as logged and as served by the recent-denials API."""

    time: float  # wall clock, seconds since the epoch
    namespace: str | None
    pod: str | None
    source: str | None  # set when the asker is not a known workload
    name: str
    qtype: str
    verdict: str
    reason: str
    rule: str | None
    addresses: tuple[str, ...] = ()

    @property
    def identity(self) -> str:
        return f"{self.namespace}/{self.pod}" if self.namespace else str(self.source)

    def line(self) -> str:
        return (
            f"dns decision identity={self.identity} name={self.name} type={self.qtype} "
            f'verdict={self.verdict} reason="{self.reason}" rule={self.rule or "-"} '
            f"addresses={','.join(self.addresses) or '-'}"
        )

    def fields(self) -> dict[str, object]:
        return {
            "event": "dns decision",
            "identity": self.identity,
            "namespace": self.namespace,
            "pod": self.pod,
            "source": self.source,
            "name": self.name,
            "type": self.qtype,
            "verdict": self.verdict,
            "reason": self.reason,
            "rule": self.rule,
            "addresses": list(self.addresses),
        }


class Deferred(NamedTuple):
    """A query that needs the upstream; everything else about it is decided."""

    query: bytes
    question: Question
    workload: Workload
    verdict: NameDecision | None  # None: passthrough domain, nothing to program
    udp: bool
    label: str
    source: Source
    names: NamePolicy  # the plan it was decided under


class _AllowedLines:
    """At most ``per_second`` allowed-decision lines at INFO in each second of the clock, and
    one line at the end of a second that had more, saying how many went unlogged (repeated
    queries answered from the memo included: they are counted, not decided again)."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.second = 0
        self.logged = 0
        self.allowed = 0  # allowed answers in the current second, logged or not

    def take(self, now: float) -> bool:
        """Whether an allowed decision may be logged at ``now``."""
        self.roll(now)
        if self.logged >= self.per_second:
            return False
        self.logged += 1
        return True

    def count(self, n: int, now: float) -> None:
        self.roll(now)
        self.allowed += n

    def roll(self, now: float) -> None:
        second = int(now)
        if second == self.second:
            return
        unlogged = self.allowed - self.logged
        if unlogged > 0 and self.per_second > 0:
            log.info(
                "dns: %d allowed decisions in the last second not logged "
                "(at most %d lines a second, --log-allowed)",
                unlogged,
                self.per_second,
            )
        self.second, self.logged, self.allowed = second, 0, 0


class Interceptor:
    def __init__(
        self,
        settings: DnsSettings,
        upstream: Upstream,
        datapath: Programmer,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.datapath = datapath
        self.clock = clock
        self.view = PolicyView()
        self._offered = self.view  # written by the applying thread, taken by the loop
        self._epoch = datapath.epoch  # the datapath's epoch the memories below belong to
        self.cache = AnswerCache(settings.cache_size)
        self._budget = AddressBudget()
        self._limiter = RateLimiter(settings.rate_per_source_qps, settings.burst_per_source)
        # canonical as the question's name is: a domain that is no name (the root among them,
        # which would pass everything through) raises InvalidName here
        domains = tuple(canonical_name(d) for d in settings.passthrough_domains)
        self._passthrough = frozenset(domains)
        self._passthrough_suffixes = tuple("." + d for d in domains)
        # ready replies and programmed-answer memos, with every rule that makes them stale
        self.memo = Memo(min(settings.cache_size, 16384), 4 * settings.cache_size)
        self._replied = [0] * len(READY_LABELS)  # replies given by ``ready``, not yet counted
        self.recent_denials: deque[DecisionRecord] = deque(maxlen=settings.recent_denials)
        self._cap_logged: dict[int, float] = {}  # identity -> when its cap was last logged
        self._allowed_lines = _AllowedLines(settings.log_allowed_per_second)

        self._counters: dict[tuple[str, str], metrics.CounterChild] = {}
        self._cache_hit = metrics.DNS_CACHE.labels("hit")
        self._cache_miss = metrics.DNS_CACHE.labels("miss")
        # every series made now, not at its first use in the middle of a burst of queries
        self._remembered = {
            kind: metrics.DNS_REMEMBERED.labels(kind) for kind in metrics.REMEMBERED_KINDS
        }
        for verdict, reason in OUTCOMES:
            self._count(verdict, reason, 0)

    def _count(self, verdict: str, reason: str, n: int = 1) -> None:
        child = self._counters.get((verdict, reason))
        if child is None:
            child = self._counters[(verdict, reason)] = metrics.DNS_QUERIES.labels(verdict, reason)
        child.inc(n)
        if verdict == "allow" and self._allowed_lines.per_second:
            self._allowed_lines.count(n, self.clock())

    def offer(self, view: PolicyView) -> None:
        """Hand a new plan over from another thread; the loop takes it at its next query."""
        self._offered = view

    def update(self, view: PolicyView) -> None:
        """Take a new plan now (on the loop's thread)."""
        self._offered = view
        self._sync()

    def _sync(self) -> None:
        """Take an offered plan, and drop what was remembered for identities that a change of
        the datapath or the plan may have affected (see the module's docstring)."""
        epoch = self.datapath.epoch
        if epoch != self._epoch:
            # one reconcile since: only its identities are unsettled; several: all may be
            self.memo.forget(self.datapath.unsettled if epoch == self._epoch + 1 else None)
            self._epoch = epoch
        offered = self._offered
        if offered is not self.view:
            old, self.view = self.view, offered
            self._forget_changed(old, offered)
            identities = offered.names.identities
            self._budget.retain(identities)  # identities may have been renumbered or removed
            self.memo.retain(set(identities))
            for gone in [i for i in self._cap_logged if i not in identities]:
                del self._cap_logged[gone]

    def _forget_changed(self, old: PolicyView, new: PolicyView) -> None:
        """Keep only what the new plan decides as the old one did, for the same sources."""
        alike: dict[int, bool] = {}

        def same(identity: int) -> bool:
            found = alike.get(identity)
            if found is None:
                found = alike[identity] = new.names.decides_alike(identity, old.names)
            return found

        lookup = new.workloads.lookup
        self.memo.forget_changed(same, lambda source: getattr(lookup(source), "identity", None))

    def forget_expired(self) -> int:
        """Drop what is remembered past its life: expired answers, replies, programmed-answer
        memos, learned addresses the kernel has expired, sources the rate limit no longer
        holds anything against, name decisions not asked for since the last call. Costs what
        expired, not what is remembered (but the replies, which live a second each). Returns
        how many entries were dropped; run on the loop's thread, now and then, so that memory
        follows the traffic down as well as up."""
        now = self.clock()
        dropped = self.cache.forget_expired(now) + self.memo.forget_expired(now)
        dropped += self._budget.forget_expired(now)
        dropped += self._limiter.forget_paid(now)
        self.view.names.forget_unused()
        for identity in [i for i, t in self._cap_logged.items() if now - t >= CAP_LOG_INTERVAL_S]:
            del self._cap_logged[identity]
        self._allowed_lines.roll(now)  # a quiet gateway still says what its last second left out
        for kind, held in self.remembered().items():
            self._remembered[kind].set(held)
        return dropped

    def remembered(self) -> dict[str, int]:
        """How many entries each memory holds (``metrics.REMEMBERED_KINDS``)."""
        replies, programmed = self.memo.sizes()
        return {
            "answers": len(self.cache),
            "replies": replies,
            "programmed": programmed,
            "learned": sum(map(len, self._budget.known.values())),
            "sources": self._limiter.tracked,
            "decisions": self.view.names.remembered,
        }

    def flush_counts(self) -> None:
        """Add the replies given by ``ready`` to the metrics (the server calls this after each
        batch, so the per-query path does not take the metrics' locks)."""
        replied = self._replied
        for index, n in enumerate(replied):
            if n:
                replied[index] = 0
                self._cache_hit.inc(n)
                self._count(READY_LABELS[index], "resolved", n)

    # -- entry points ---------------------------------------------------------------------
    async def handle(self, query: bytes, source: Source, udp: bool = True) -> bytes | None:
        """The response to one query, or None to drop it (for UDP: ``ready``, then the rest)."""
        if udp:
            tail = self.ready(source, query[2:])
            if tail is not None:
                return query[:2] + tail if tail else None
        result = self.answer_now(query, source, udp)
        if isinstance(result, Deferred):
            return await self.resolve(result)
        return result

    def ready(self, source: Source, rest: bytes) -> bytes | None:
        """For a UDP query (``rest``: its bytes after the 2-byte ID) that this source asked
        within the second: the reply after its ID; ``DROP`` when the rate limit drops it; None
        when it must go through ``answer_now``. This is the whole cost of a repeated query."""
        if self.datapath.epoch != self._epoch or self._offered is not self.view:
            self._sync()
        memo = self.memo
        entry = memo.replies.get((source, rest))
        if entry is None:
            return None
        now = self.clock()
        if entry[0] <= now or memo.evictions.get(entry[3], 0) != entry[4]:
            return None
        if not self._limiter.allow(source, now):
            self._count("dropped", "rate limited")
            return DROP
        self._replied[entry[2]] += 1
        return entry[1]

    def answer_now(self, query: bytes, source: Source, udp: bool = True) -> bytes | Deferred | None:
        """Everything that needs no upstream round trip, synchronously (cache hits included);
        a ``Deferred`` when the upstream must be asked (then ``await resolve(deferred)``)."""
        try:
            return self._answer_now(query, source, udp)
        except Exception:  # the server never dies of a packet
            return self._internal_error(query, source)

    async def resolve(self, deferred: Deferred) -> bytes | None:
        try:
            return await self._resolve(deferred)
        except Exception:
            return self._internal_error(deferred.query, None)

    def resolve_soon(self, deferred: Deferred, reply: Callable[[bytes | None], None]) -> None:
        """``resolve`` for the UDP server, without a task: ``reply`` gets the response from
        the callback that reads the upstream's answer (None: send nothing)."""

        def done(raw: bytes | Exception) -> None:
            try:
                if isinstance(raw, Exception) and not isinstance(raw, UpstreamError):
                    raise raw
                response: bytes | None = self._answered(deferred, raw)
            except Exception:
                response = self._internal_error(deferred.query, None)
            reply(response)

        try:
            self.upstream.ask(deferred.question, forwarded(deferred.query, deferred.question), done)
        except Exception:
            reply(self._internal_error(deferred.query, None))

    def _internal_error(self, query: bytes, source: Source | None) -> bytes | None:
        self._count("error", "internal error")
        log.exception("dns: internal error answering %s", source or "a query")
        try:
            return local_response(query, None, SERVFAIL)
        except WireError:
            return None

    def _answer_now(self, query: bytes, source: Source, udp: bool) -> bytes | Deferred | None:
        if not self._limiter.allow(source, self.clock()):
            self._count("dropped", "rate limited")
            return None
        self._sync()
        try:
            question = parse_question(query)
        except WireError as exc:
            return self._unreadable(query, source, exc)
        if question.flags & OPCODE_MASK:
            return self._local(query, question, NOTIMP, "notimp", "opcode not supported")
        if question.edns_version:  # answered here, never from an answer cached for version 0
            self._count("badvers", "EDNS version not supported")
            return badvers_response(query, question)
        deferred = self._decide(query, question, source, udp)
        if not isinstance(deferred, Deferred):
            return deferred
        now = self.clock()
        answer = self.cache.get(question.cache_key, now)
        if answer is None:
            self._cache_miss.inc()
            return deferred
        self._cache_hit.inc()
        return self._release(deferred, answer, now)

    def _unreadable(self, query: bytes, source: Source, exc: WireError) -> bytes | None:
        """The answer to a datagram ``parse_question`` rejected: none if it is not a query at
        all; NOTIMP if its opcode is not QUERY (whatever follows the header); else FORMERR."""
        why = not_a_query(query)
        if why is not None:
            self._count("dropped", why)
            log.debug("dns: no reply to a datagram from %s: %s", source, why)
            return None
        if HEADER.unpack_from(query)[1] & OPCODE_MASK:
            self._count("notimp", "opcode not supported")
            return local_response(query, None, NOTIMP)
        self._count("formerr", "malformed query")
        log.debug("dns: malformed query from %s: %s", source, exc)
        return local_response(query, None, FORMERR)

    def _decide(
        self, query: bytes, question: Question, source: Source, udp: bool
    ) -> bytes | Deferred:
        """Who asks and whether the plan in force lets it resolve the name."""
        view = self.view
        workload = view.workloads.lookup(source)
        if workload is None:
            self._log(None, source, question, "refused", "source is not a known workload", None)
            return self._local(query, question, REFUSED, "refused", "unknown source")
        if question.qtype in NOT_SERVED_TYPES:
            reason = f"query type {TYPE_NAMES[question.qtype]} is not served"
            self._log(workload, source, question, "refused", reason, None)
            return self._local(query, question, REFUSED, "refused", "query type not served")
        if "\\" in question.name:  # an escaped byte (see wire): a name no policy can name
            return self._invalid(query, question, workload, source, _ESCAPED_BYTE)
        if self._is_passthrough(question.name):
            try:  # passthrough skips the policy, not the check that the name is one
                canonical_name(question.name)
            except InvalidName as exc:
                return self._invalid(query, question, workload, source, str(exc))
            return Deferred(query, question, workload, None, udp, "passthrough", source, view.names)
        verdict = view.names.decide(workload.identity, question.name)
        if not verdict.allowed:
            self._log(workload, source, question, "deny", verdict.decision.reason, verdict)
            rcode = self.settings.deny_rcode
            return self._local(query, question, rcode, "deny", "denied by policy")
        label = "audit" if verdict.decision.verdict is Verdict.AUDIT else "allow"
        return Deferred(query, question, workload, verdict, udp, label, source, view.names)

    # -- helpers --------------------------------------------------------------------------
    def _invalid(
        self, query: bytes, question: Question, workload: Workload, source: Source, why: str
    ) -> bytes:
        """Deny a name that is not one a policy could name: answered here, never forwarded."""
        self._log(workload, source, question, "deny", f"not a valid DNS name: {why}", None)
        return self._local(query, question, self.settings.deny_rcode, "deny", "invalid name")

    def _local(
        self, query: bytes, question: Question, rcode: int, verdict: str, reason: str
    ) -> bytes:
        self._count(verdict, reason)
        return local_response(query, question, rcode, self.settings.negative_ttl_s)

    def _is_passthrough(self, name: str) -> bool:
        return name in self._passthrough or name.endswith(self._passthrough_suffixes)

    async def _resolve(self, d: Deferred) -> bytes:
        try:
            raw = await self.upstream.resolve(d.question, forwarded(d.query, d.question))
        except UpstreamError as exc:
            return self._answered(d, exc)
        return self._answered(d, raw)

    def _answered(self, d: Deferred, raw: bytes | UpstreamError) -> bytes:
        """The response for ``d`` once the upstream answered ``raw`` (or failed)."""
        question = d.question
        if isinstance(raw, UpstreamError):
            log.warning("dns: %s %s: %s", question.name, TYPE_NAMES.get(question.qtype), raw)
            return self._local(d.query, question, SERVFAIL, "servfail", "upstream failed")
        now = self.clock()
        try:
            answer = prepare(
                raw,
                question,
                now,
                min_ttl=self.settings.min_ttl_s,
                max_ttl=self.settings.max_ttl_s,
                max_addresses=self.settings.max_addresses_per_name,
            )
        except Exception as exc:  # dnslib raises several types on bad input
            log.warning("dns: unusable upstream answer for %s: %s", question.name, exc)
            return self._local(d.query, question, SERVFAIL, "servfail", "bad upstream answer")
        if answer.capped:
            metrics.DNS_CAP_HITS.labels(d.workload.namespace, "name").inc()
            log.warning(
                "dns: %s answered %d addresses; %d dropped by the per-name cap of %d",
                question.name,
                len(answer.addresses) + answer.capped,
                answer.capped,
                self.settings.max_addresses_per_name,
            )
        self.cache.put(question.cache_key, answer)
        return self._release(d, answer, now)

    def _release(self, d: Deferred, answer: Answer, now: float) -> bytes:
        """Program the answer's addresses for the asking identity, then hand out the answer.

        Decided under an older plan (the answer took a while, or the plan changed meanwhile),
        the query is decided again under the plan in force first."""
        for _attempt in range(2):
            self._sync()
            if d.names is not self.view.names:
                again = self._decide(d.query, d.question, d.source, d.udp)
                if not isinstance(again, Deferred):
                    return again
                d = again
            try:
                if self._programmed_for(d, answer, now):
                    break
            except StalePolicy:
                continue  # the plan changed while programming: decide again under the new one
            except DatapathBusy:
                return self._local(d.query, d.question, SERVFAIL, "servfail", "datapath busy")
            return self._local(d.query, d.question, SERVFAIL, "servfail", "programming failed")
        else:
            return self._local(d.query, d.question, SERVFAIL, "servfail", "policy changed")
        question = d.question
        wire = answer.served(question, d.query, now)
        if d.verdict is not None:
            reason = d.verdict.decision.reason
            self._log(d.workload, None, question, d.label, reason, d.verdict, answer)
        self._count(d.label, "resolved")
        if d.udp and len(wire) > question.udp_size:
            wire = truncated(wire, question, d.query)
        if d.udp and d.label in READY_LABELS and not log.isEnabledFor(logging.DEBUG):
            # the same query again within this second gets these bytes (audit decisions and
            # debug logging need their line per query, so those always come through here)
            until = answer.stored_at + int(now - answer.stored_at) + 1
            label = READY_LABELS.index(d.label)
            self.memo.remember_reply(
                d.source, d.query[2:], until, wire[2:], label, d.workload.identity
            )
        return wire

    def _programmed_for(self, d: Deferred, answer: Answer, now: float) -> bool:
        """Whether the answer's addresses are in force for the asking identity (programming
        them if need be); False if that failed. Raises ``StalePolicy``."""
        if d.verdict is None or not d.verdict.ports or not answer.addresses:
            return True
        key = (d.workload.identity, d.question.cache_key, answer.stored_at)
        # However late this answer is served, the TTL released with it ends no later than
        # stored_at + address_ttl + 1 (TTLs count down in whole seconds): one horizon per
        # answer, so repeated hits do not rewrite elements as the remaining TTL ticks down.
        needed = answer.stored_at + answer.address_ttl + 1 + self.settings.grace_s
        if self.memo.programmed_until(key) >= needed:
            return True
        if not self._program(d, answer, d.verdict.ports, needed - now):
            return False
        self.memo.remember_programmed(key, needed)
        return True

    def _program(
        self,
        d: Deferred,
        answer: Answer,
        atoms: tuple[PortAtom, ...],
        lifetime: float,
    ) -> bool:
        workload = d.workload
        now = self.clock()
        learned = learned_elements(workload.identity, answer.addresses, atoms)
        evicted = self._budget.admit(
            workload.identity,
            answer.addresses,
            atoms,
            now + lifetime,
            self.settings.max_addresses_per_identity,
        )
        started = time.perf_counter()
        try:
            if evicted:
                self.memo.evicted(workload.identity)
                self.datapath.revoke(evicted, wait_s=self._left(started))
                metrics.DNS_CAP_HITS.labels(workload.namespace, "identity").inc()
                if now - self._cap_logged.get(workload.identity, -CAP_LOG_INTERVAL_S) >= (
                    CAP_LOG_INTERVAL_S
                ):  # a workload at its cap evicts on every new answer: say so once in a while
                    self._cap_logged[workload.identity] = now
                    log.warning(
                        "dns: identity %s/%s is at its cap of %d addresses; evicting the "
                        "oldest expiring (counted in egressgw_dns_cap_hits_total)",
                        workload.namespace,
                        workload.pod,
                        self.settings.max_addresses_per_identity,
                    )
            written = self.datapath.program(
                learned, lifetime, name=d.question.name, policy=d.names, wait_s=self._left(started)
            )
        except StalePolicy:
            raise
        except DatapathBusy as exc:
            metrics.DNS_PROGRAM_FAILURES.inc()
            log.warning("dns: %s; answering SERVFAIL", exc)
            raise
        except Exception as exc:
            metrics.DNS_PROGRAM_FAILURES.inc()
            log.error("dns: programming %d elements failed: %s", len(learned), exc)
            return False
        elapsed = time.perf_counter() - started
        if written:
            metrics.DNS_PROGRAM_SECONDS.observe(elapsed)
        if elapsed > self.settings.program_timeout_s:
            metrics.DNS_PROGRAM_FAILURES.inc()
            log.error("dns: programming took %.0f ms, over the bound", elapsed * 1000)
            return False
        return True

    def _left(self, started: float) -> float:
        """What is left of the programming bound of an answer whose programming began at
        ``started`` (``time.perf_counter``)."""
        return self.settings.program_timeout_s - (time.perf_counter() - started)

    def _log(
        self,
        workload: Workload | None,
        source: Source | None,
        question: Question,
        verdict: str,
        reason: str,
        decision: NameDecision | None,
        answer: Answer | None = None,
    ) -> None:
        """The one canonical line per decision; denials are also kept in ``recent_denials``."""
        level = logging.INFO
        if verdict == "allow":
            if log.isEnabledFor(logging.DEBUG):
                level = logging.DEBUG
            elif not self._allowed_lines.take(self.clock()):
                return
        denied = verdict in ("deny", "refused")
        if not denied and not log.isEnabledFor(level):
            return
        rule = decision.decision.rule if decision else None
        record = DecisionRecord(
            time=time.time(),
            namespace=workload.namespace if workload else None,
            pod=workload.pod if workload else None,
            source=str(source) if source is not None else None,
            name=question.name,
            qtype=TYPE_NAMES.get(question.qtype, str(question.qtype)),
            verdict=verdict,
            reason=reason,
            rule=str(rule) if rule else None,
            addresses=tuple(str(a) for a in answer.addresses) if answer else (),
        )
        if denied:
            self.recent_denials.append(record)
            metrics.DNS_DENIALS.labels(record.namespace or "").inc()
        if log.isEnabledFor(level):
            log.log(level, "%s", record.line(), extra={"decision": record.fields()})
