"""An in-memory stand-in for NftDatapath's element programming, for unit tests of other layers.

It records what would be in force and can be told to fail or to be slow.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from egressgw.datapath.kernel import DatapathBusy, StalePolicy
from egressgw.datapath.state import Learned, LearnedPolicy


class FakeDatapath:
    def __init__(self) -> None:
        self.learned: dict[Learned, float] = {}  # element -> lifetime asked for, seconds
        self.names: dict[Learned, set[str]] = {}  # element -> the names that opened it
        self.batches = 0
        self.fail_with: Exception | None = None
        self.delay_s = 0.0
        self.epoch = 0
        self.unsettled: frozenset[int] = frozenset()
        self.in_force: LearnedPolicy | None = None  # None: accept under any policy

    def commit(self, policy: LearnedPolicy | None, unsettled: frozenset[int] = frozenset()) -> None:
        """What a reconcile does to the interceptor's world: a new epoch (whose change touches
        the learned elements of ``unsettled``), a new policy in force."""
        self.unsettled = unsettled
        self.epoch += 1
        self.in_force = policy

    def program(
        self,
        learned: Iterable[Learned],
        lifetime_s: float,
        *,
        name: str | None = None,
        policy: LearnedPolicy | None = None,
        wait_s: float | None = None,
    ) -> int:
        items = list(learned)
        if self.in_force is not None and policy is not None and policy is not self.in_force:
            raise StalePolicy("the policy changed")
        if self.fail_with is not None:
            raise self.fail_with
        if self.delay_s:
            if wait_s is not None and self.delay_s > wait_s:
                time.sleep(max(0.0, wait_s))
                raise DatapathBusy(f"busy for longer than {wait_s:.3f} s")
            time.sleep(self.delay_s)
        written = 0
        for item in items:
            if name is not None:
                self.names.setdefault(item, set()).add(name)
            if self.learned.get(item, -1) < lifetime_s:
                self.learned[item] = lifetime_s
                written += 1
        if written:
            self.batches += 1
        return written

    def revoke(self, learned: Iterable[Learned], wait_s: float | None = None) -> int:
        removed = 0
        for item in learned:
            if self.learned.pop(item, None) is not None:
                removed += 1
        return removed

    def allowed(self, identity: int) -> set[str]:
        return {str(item.address) for item in self.learned if item.identity == identity}
