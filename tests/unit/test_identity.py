"""Identity numbers are stable across restarts and reused only when free."""

from __future__ import annotations

from egressgw.identity import IdentityKey, IdentityRegistry


def test_same_labels_in_any_order_are_one_identity() -> None:
    registry = IdentityRegistry()
    a = registry.number(IdentityKey.of("payments", {"app": "api", "tier": "1"}))
    b = registry.number(IdentityKey.of("payments", {"tier": "1", "app": "api"}))
    c = registry.number(IdentityKey.of("analytics", {"app": "api", "tier": "1"}))
    assert a == b == 1 and c == 2


def test_adopted_numbers_survive_a_restart() -> None:
    first = IdentityRegistry()
    api = IdentityKey.of("payments", {"app": "api"})
    etl = IdentityKey.of("analytics", {"app": "etl"})
    numbers = {first.number(api): api.comment, first.number(etl): etl.comment}
    # the new run meets the identities in the opposite order, and a new one
    second = IdentityRegistry(numbers)
    new = IdentityKey.of("sandbox", {})
    assert second.number(new) == 3
    assert second.number(etl) == 2 and second.number(api) == 1


def test_retain_frees_numbers_for_reuse() -> None:
    registry = IdentityRegistry()
    keys = [IdentityKey.of("ns", {"n": str(i)}) for i in range(3)]
    for key in keys:
        registry.number(key)
    kept = registry.retain([keys[0], keys[2]])
    assert sorted(kept) == [1, 3]
    assert registry.number(IdentityKey.of("ns", {"n": "new"})) == 2
