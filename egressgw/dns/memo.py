"""What the DNS path remembers between queries, and every rule that makes it forget.

In: the replies given to repeated UDP queries and the answers known to be programmed per
identity; then what can make them wrong: a reconcile (the identities it unsettles), a new plan
(the identities it decides differently, the sources that moved), an identity evicting learned
elements at its cap, and time. Out: a reply that may be repeated as it is, and whether an
answer's addresses are already in force for an identity. It decides nothing and never touches
the datapath; time is a parameter of every call.

The rules, all here:
- a ready reply lives within the second in which the TTLs it carries stay the same, and only
  while its identity has not evicted since (it carries the identity's eviction count);
- a programmed-answer memo lives until the horizon it was programmed for;
- a reconcile drops both for the identities it unsettles (all of them when several ran since);
- a new plan drops both for identities it decides differently, and replies of sources that now
  belong to another identity or to none;
- an eviction drops every programmed-answer memo (some answers are no longer fully programmed);
- a full memory starts again empty, and what expired is dropped by ``forget_expired``;
- eviction counts start again at 0 whenever no reply is held (none carries a count then).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from egressgw.dns.budget import Source

# (until, the reply after its ID, index of its verdict label, identity, the identity's
# evictions when it was made)
Reply = tuple[float, bytes, int, int, int]
# (identity, the question's cache key, when the answer was stored)
ProgrammedKey = tuple[int, tuple[object, ...], float]


class Memo:
    def __init__(self, replies_max: int, programmed_max: int) -> None:
        self.replies_max = replies_max
        self.programmed_max = programmed_max
        # (source, UDP query without its ID) -> Reply: ``Interceptor.ready`` reads it directly
        # (the whole cost of a repeated query), and repeats a reply while ``until`` is ahead
        # and the identity's eviction count is the one it carries
        self.replies: dict[tuple[Source, bytes], Reply] = {}
        self.evictions: dict[int, int] = {}  # identity -> how many times it evicted
        self._programmed: dict[ProgrammedKey, float] = {}  # -> until when it is in force
        self._programmed_expiries: list[tuple[float, ProgrammedKey]] = []

    # -- replies -------------------------------------------------------------------------------
    def remember_reply(
        self, source: Source, rest: bytes, until: float, tail: bytes, label: int, identity: int
    ) -> None:
        if len(self.replies) >= self.replies_max:
            self.replies.clear()
        evictions = self.evictions.get(identity, 0)
        self.replies[(source, rest)] = (until, tail, label, identity, evictions)

    # -- programmed answers --------------------------------------------------------------------
    def programmed_until(self, key: ProgrammedKey) -> float:
        return self._programmed.get(key, 0.0)

    def remember_programmed(self, key: ProgrammedKey, until: float) -> None:
        if len(self._programmed) > self.programmed_max:
            self._programmed.clear()
            self._programmed_expiries.clear()
        self._programmed[key] = until
        heapq.heappush(self._programmed_expiries, (until, key))

    def evicted(self, identity: int) -> None:
        """``identity`` evicted learned elements at its cap."""
        self._programmed.clear()  # some cached answers are no longer fully programmed
        self.evictions[identity] = self.evictions.get(identity, 0) + 1

    # -- forgetting ----------------------------------------------------------------------------
    def forget(self, identities: frozenset[int] | None) -> None:
        """Drop what is remembered for ``identities`` (None: for every identity)."""
        if identities is None:
            self._programmed.clear()
            self.replies.clear()
            return
        if not identities:
            return
        for key in [k for k in self._programmed if k[0] in identities]:
            del self._programmed[key]
        for rkey in [k for k, entry in self.replies.items() if entry[3] in identities]:
            del self.replies[rkey]

    def forget_changed(
        self, same: Callable[[int], bool], owner: Callable[[Source], int | None]
    ) -> None:
        """Under a new plan: keep only what is remembered for identities it decides as before
        (``same``), and replies of sources that still belong to their identity (``owner``)."""
        for key in [k for k in self._programmed if not same(k[0])]:
            del self._programmed[key]
        for rkey in [
            (source, rest)
            for (source, rest), entry in self.replies.items()
            if not same(entry[3]) or owner(source) != entry[3]
        ]:
            del self.replies[rkey]

    def retain(self, identities: frozenset[int] | set[int]) -> None:
        """Forget the eviction counts of identities that no longer exist."""
        for gone in [i for i in self.evictions if i not in identities]:
            del self.evictions[gone]

    def forget_expired(self, now: float) -> int:
        """Drop what expired by ``now``; how many entries. Costs what expired, but for the
        replies, which live a second each."""
        dropped = 0
        heap, programmed = self._programmed_expiries, self._programmed
        while heap and heap[0][0] <= now:
            until, key = heapq.heappop(heap)
            if programmed.get(key) == until:
                del programmed[key]
                dropped += 1
        if len(heap) > 2 * len(programmed) + 1024:
            heap[:] = [(until, key) for key, until in programmed.items()]
            heapq.heapify(heap)
        replies = self.replies
        stale = [key for key, entry in replies.items() if entry[0] <= now]
        for rkey in stale:
            del replies[rkey]
        dropped += len(stale)
        # Emptied, a dict still holds the room of what it held, until it is cleared: in place,
        # since a new dict made now would sit among what a burst of queries left behind.
        if not programmed:
            programmed.clear()
            heap.clear()
        if not replies:
            replies.clear()
            self.evictions.clear()  # no reply carries a count now: they may start again at 0
        return dropped

    def sizes(self) -> tuple[int, int]:
        """(ready replies, programmed-answer memos)."""
        return len(self.replies), len(self._programmed)
