"""The DNS path's memory, rule by rule (``dns.memo``): a reply is repeated only while nothing it
depended on can have changed, and each kind of change drops exactly what it may have made wrong."""

from __future__ import annotations

from egressgw.dns.memo import Memo

A, B = 1, 2  # identities
QUERY = b"\x01\x00\x00\x01query"


def memo_with_both() -> Memo:
    memo = Memo(replies_max=100, programmed_max=100)
    memo.remember_reply("192.0.2.10", QUERY, 11.0, b"reply-a", 0, A)
    memo.remember_reply("192.0.2.20", QUERY, 11.0, b"reply-b", 0, B)
    memo.remember_programmed((A, ("db.example", 1), 10.0), 75.0)
    memo.remember_programmed((B, ("db.example", 1), 10.0), 75.0)
    return memo


def test_a_reconcile_drops_what_it_unsettles_and_several_drop_everything() -> None:
    memo = memo_with_both()
    memo.forget(frozenset({A}))
    assert set(memo.replies) == {("192.0.2.20", QUERY)}
    assert memo.programmed_until((A, ("db.example", 1), 10.0)) == 0.0
    assert memo.programmed_until((B, ("db.example", 1), 10.0)) == 75.0
    memo.forget(None)
    assert memo.sizes() == (0, 0)


def test_a_new_plan_keeps_identities_decided_alike_whose_sources_stayed() -> None:
    memo = memo_with_both()
    owners = {"192.0.2.10": A, "192.0.2.20": A}  # B's address now belongs to A
    memo.forget_changed(lambda identity: True, owners.get)
    assert set(memo.replies) == {("192.0.2.10", QUERY)}
    memo.forget_changed(lambda identity: identity != A, owners.get)  # A decided differently
    assert memo.sizes() == (0, 1)


def test_an_eviction_makes_the_identitys_replies_and_every_programmed_memo_stale() -> None:
    memo = memo_with_both()
    memo.evicted(A)
    stale = memo.replies[("192.0.2.10", QUERY)]
    assert memo.evictions.get(stale[3], 0) != stale[4]  # what Interceptor.ready checks
    fresh = memo.replies[("192.0.2.20", QUERY)]
    assert memo.evictions.get(fresh[3], 0) == fresh[4]
    assert memo.sizes() == (2, 0)
    memo.remember_reply("192.0.2.10", QUERY, 12.0, b"reply-a2", 0, A)  # made after it
    again = memo.replies[("192.0.2.10", QUERY)]
    assert memo.evictions.get(again[3], 0) == again[4]


def test_what_expired_is_dropped_and_the_rest_kept() -> None:
    memo = memo_with_both()
    assert memo.forget_expired(10.5) == 0
    assert memo.forget_expired(11.0) == 2  # the replies of that second
    assert memo.sizes() == (0, 2)
    memo.remember_programmed((A, ("db.example", 1), 10.0), 90.0)  # programmed again, longer
    assert memo.forget_expired(80.0) == 1  # B's; A's memo was renewed
    assert memo.programmed_until((A, ("db.example", 1), 10.0)) == 90.0


def test_a_full_memory_starts_again_empty() -> None:
    memo = Memo(replies_max=2, programmed_max=100)
    for n in range(3):
        memo.remember_reply(f"192.0.2.{n}", QUERY, 11.0, b"r", 0, A)
    assert list(memo.replies) == [("192.0.2.2", QUERY)]
