"""A plan change re-decides what DNS answers opened: kept, narrowed or removed, by the names.

Each row changes the policies of one workload that has learned three destinations through three
names and asks the datapath's judge what becomes of each learned element under the new plan.
"""

from __future__ import annotations

import ipaddress

import pytest

from egressgw.datapath.netlink import Element
from egressgw.datapath.state import (
    ANY_ATOM,
    Judge,
    Learned,
    PortAtom,
    names_comment,
    names_of,
    redecide,
    with_name,
)
from egressgw.dns.names import NamePolicy
from egressgw.identity import IdentityRegistry
from egressgw.plan import build
from egressgw.policy.model import (
    Action,
    EgressGateway,
    EgressPolicy,
    EgressRule,
    LabelSelector,
    Mode,
    Namespace,
    Peer,
    Pod,
    PortSpec,
    Protocol,
    Snapshot,
)

IP = ipaddress.ip_address
TCP = Protocol.TCP
NOW = 1000.0
DB, CDN, WEB, OLD = IP("203.0.113.10"), IP("203.0.113.21"), IP("203.0.113.20"), IP("203.0.113.30")


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def allow(peer: Peer, *ports: PortSpec) -> EgressRule:
    return EgressRule(action=Action.ALLOW, to=(peer,), ports=ports)


def deny(peer: Peer, *ports: PortSpec) -> EgressRule:
    return EgressRule(action=Action.DENY, to=(peer,), ports=ports)


RULES = (
    allow(Peer(fqdn="db.payments.example"), PortSpec(TCP, 5432)),
    allow(Peer(fqdn_pattern="*.cdn.example"), PortSpec(TCP, 443)),
    allow(Peer(fqdn="web.example"), PortSpec(TCP, 8000, 8100)),
)


def policy(*rules: EgressRule, mode: Mode = Mode.ENFORCE) -> EgressPolicy:
    return EgressPolicy("payments", "api", sel(app="api"), mode, rules)


def snapshot(
    *policies: EgressPolicy, labels: dict[str, str] | None = None, project: str = "payments"
) -> Snapshot:
    return Snapshot(
        namespaces={"payments": Namespace("payments", {"project": project})},
        pods=(Pod("payments", "api-0", labels or {"app": "api"}, (IP("192.0.2.10"),)),),
        gateways=(
            EgressGateway("payments", sel(project="payments"), egress_ips=(IP("198.51.100.10"),)),
        ),
        policies=policies,
    )


def learned_elements(identity: int) -> list[tuple[str, tuple[float, Element]]]:
    """What the workload learned: three names, and one element written without a name."""
    items = [
        (Learned(identity, DB, 6, (5432, 5432)), "db.payments.example"),
        (Learned(identity, CDN, 6, (443, 443)), "www.cdn.example"),
        (Learned(identity, WEB, 6, (8000, 8100)), "web.example"),
        (Learned(identity, OLD, 6, (5432, 5432)), None),
    ]
    return [(item.set_name, (NOW + 600, item.element(610_000, names))) for item, names in items]


def fates(changed: Snapshot) -> dict[str, list[PortAtom] | str]:
    """Per learned destination: "kept", or the port atoms that replace it ([] = removed)."""
    registry = IdentityRegistry()
    before = build(snapshot(policy(*RULES)), registry)
    (identity,) = before.desired.identities
    after = build(changed, registry)
    judge = Judge(after.desired, NamePolicy(after.selections), NOW)
    out: dict[str, list[PortAtom] | str] = {}
    for set_name, entry in learned_elements(identity):
        address = str(Learned.from_element(set_name, entry[1]).address)
        fate = judge.fate(set_name, entry)
        if fate is None:
            out[address] = "kept"
            continue
        out[address] = []
        for piece_set, piece in fate:
            learned = Learned.from_element(piece_set, piece)
            assert piece.timeout_ms == 600_000  # the remaining lifetime, not a new one
            assert str(learned.address) == address
            out[address].append(learned.atom)  # type: ignore[union-attr]
    return out


ALL_KEPT = {str(DB): "kept", str(CDN): "kept", str(WEB): "kept", str(OLD): []}
GONE: list[PortAtom] = []

CASES = [
    ("nothing changed", snapshot(policy(*RULES)), ALL_KEPT),
    (
        "fqdn removed",
        snapshot(policy(RULES[1], RULES[2])),
        {**ALL_KEPT, str(DB): GONE},
    ),
    (
        "fqdnPattern removed",
        snapshot(policy(RULES[0], RULES[2])),
        {**ALL_KEPT, str(CDN): GONE},
    ),
    (
        "port changed",
        snapshot(policy(allow(Peer(fqdn="db.payments.example"), PortSpec(TCP, 5433)), *RULES[1:])),
        {**ALL_KEPT, str(DB): GONE},
    ),
    (
        "port range narrowed",
        snapshot(policy(*RULES[:2], allow(Peer(fqdn="web.example"), PortSpec(TCP, 8050, 8100)))),
        {**ALL_KEPT, str(WEB): [(6, 8050, 8100)]},
    ),
    (
        "Deny on the name's port",
        snapshot(policy(*RULES, deny(Peer(fqdn="db.payments.example"), PortSpec(TCP, 5432)))),
        {**ALL_KEPT, str(DB): GONE},
    ),
    (
        "Deny on one port inside the range",
        snapshot(policy(*RULES, deny(Peer(fqdn="web.example"), PortSpec(TCP, 8080)))),
        {**ALL_KEPT, str(WEB): [(6, 8000, 8079), (6, 8081, 8100)]},
    ),
    (
        "Deny on the whole name",
        snapshot(policy(*RULES, deny(Peer(fqdn_pattern="*.cdn.example")))),
        {**ALL_KEPT, str(CDN): GONE},
    ),
    (
        "rule moved to a pattern that still allows the name",
        snapshot(
            policy(allow(Peer(fqdn_pattern="*.payments.example"), PortSpec(TCP, 5432)), *RULES[1:])
        ),
        ALL_KEPT,
    ),
    (
        "Audit mode: its Allow rules still open what they name",
        snapshot(policy(*RULES, mode=Mode.AUDIT)),
        ALL_KEPT,
    ),
    (
        "an Enforce policy now selects the workload: only it decides",
        snapshot(
            policy(*RULES, mode=Mode.AUDIT),
            EgressPolicy("payments", "strict", sel(app="api"), Mode.ENFORCE, (RULES[0],)),
        ),
        {**ALL_KEPT, str(CDN): GONE, str(WEB): GONE},
    ),
    (
        "policy deleted",
        snapshot(),
        {str(DB): GONE, str(CDN): GONE, str(WEB): GONE, str(OLD): GONE},
    ),
    (
        "pod relabelled into another identity",
        snapshot(policy(*RULES), labels={"app": "batch"}),
        {str(DB): GONE, str(CDN): GONE, str(WEB): GONE, str(OLD): GONE},
    ),
    (
        "namespace left its gateway",
        snapshot(policy(*RULES), project="elsewhere"),
        {str(DB): GONE, str(CDN): GONE, str(WEB): GONE, str(OLD): GONE},
    ),
]


@pytest.mark.parametrize(("case", "changed", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_plan_change_keeps_narrows_or_removes_each_learned_element(
    case: str, changed: Snapshot, expected: dict[str, object]
) -> None:
    assert fates(changed) == expected, case


def test_an_element_stays_while_any_of_its_names_allows_it() -> None:
    registry = IdentityRegistry()
    plan = build(snapshot(policy(*RULES[1:])), registry)  # db.payments.example is gone
    (identity,) = plan.desired.identities
    item = Learned(identity, CDN, 6, (443, 443))
    comment = names_comment(["db.payments.example", "www.cdn.example"])
    entry = (NOW + 60, item.element(60_000, comment))
    assert Judge(plan.desired, NamePolicy(plan.selections), NOW).fate(item.set_name, entry) is None


def test_an_any_port_element_is_narrowed_to_the_ports_its_name_opens_now() -> None:
    registry = IdentityRegistry()
    wide = allow(Peer(fqdn="db.payments.example"))
    plan = build(snapshot(policy(RULES[0])), registry)
    (identity,) = plan.desired.identities
    item = Learned(identity, DB)
    entry = (NOW + 30.2, item.element(40_000, "db.payments.example"))
    fate = Judge(plan.desired, NamePolicy(plan.selections), NOW).fate(item.set_name, entry)
    assert fate is not None
    assert [(s, Learned.from_element(s, e).atom, e.timeout_ms, e.comment) for s, e in fate] == [
        ("allow4", (6, 5432, 5432), 31_000, "db.payments.example")
    ]
    # and the other way round: a name that now opens every port widens no element beyond it
    plan = build(snapshot(policy(wide)), registry)
    exact = Learned(identity, DB, 6, (5432, 5432))
    entry = (NOW + 30, exact.element(30_000, "db.payments.example"))
    fate = Judge(plan.desired, NamePolicy(plan.selections), NOW).fate(exact.set_name, entry)
    assert fate is not None and [Learned.from_element(s, e).atom for s, e in fate] == [ANY_ATOM]


def test_an_expired_element_that_no_longer_fits_is_removed_not_rewritten() -> None:
    registry = IdentityRegistry()
    narrowed = allow(Peer(fqdn="web.example"), PortSpec(TCP, 8050, 8100))
    plan = build(snapshot(policy(narrowed)), registry)
    (identity,) = plan.desired.identities
    item = Learned(identity, WEB, 6, (8000, 8100))
    entry = (NOW - 1, item.element(5_000, "web.example"))
    assert Judge(plan.desired, NamePolicy(plan.selections), NOW).fate(item.set_name, entry) == ()


@pytest.mark.parametrize(
    "learned",
    [
        Learned(7, IP("203.0.113.9")),
        Learned(7, IP("2001:db8::9")),
        Learned(70000, IP("203.0.113.9"), 17, (53, 53)),
        Learned(7, IP("2001:db8::9"), 6, (8000, 8100)),
        Learned(7, IP("203.0.113.9"), 132, (1, 65535)),
    ],
)
def test_a_learned_element_reads_back_as_what_was_written(learned: Learned) -> None:
    element = learned.element(1000, "a.example")
    assert Learned.from_element(learned.set_name, element) == learned


def test_names_are_recorded_once_and_as_many_as_fit() -> None:
    assert with_name("a.example", "a.example") is None
    assert with_name("a.example,b.example", "b.example") is None
    assert with_name("a.example", "b.example") == "a.example,b.example"
    assert with_name(None, "b.example") == "b.example"
    long = [f"{'x' * 60}.n{i}.example" for i in range(6)]
    comment = names_comment(long)
    assert len(comment.encode()) <= 251
    assert names_of(comment) == tuple(long[:3])
    assert names_of("") == () and names_of(None) == ()


@pytest.mark.parametrize(
    ("atom", "allowed", "expected"),
    [
        ((6, 443, 443), [(6, 443, 443)], [(6, 443, 443)]),
        ((6, 443, 443), [(17, 443, 443)], []),
        ((6, 443, 443), [ANY_ATOM], [ANY_ATOM]),
        (ANY_ATOM, [(6, 443, 443), (17, 53, 53)], [(6, 443, 443), (17, 53, 53)]),
        ((6, 8000, 8100), [(6, 8050, 8100), (6, 9000, 9000)], [(6, 8050, 8100)]),
        ((6, 8000, 8100), [], []),
    ],
)
def test_redecide_keeps_only_the_allowed_atoms_an_element_overlaps(
    atom: PortAtom, allowed: list[PortAtom], expected: list[PortAtom]
) -> None:
    assert list(redecide(atom, allowed)) == expected


def test_elements_of_workloads_whose_policies_did_not_change_are_not_looked_at() -> None:
    # The element below records no name, so any look would remove it: it stays only because
    # its workload's gateway and policies are the same as under the policy it was decided by.
    registry = IdentityRegistry()
    before = build(snapshot(policy(*RULES)), registry)
    (identity,) = before.desired.identities
    item = Learned(identity, OLD, 6, (5432, 5432))
    entry = (NOW + 60, item.element(60_000))
    same = build(snapshot(policy(*RULES)), registry)
    changed = build(snapshot(policy(*RULES[1:])), registry)
    previous = NamePolicy(before.selections)
    for plan, expected in ((same, None), (changed, ())):
        judge = Judge(plan.desired, NamePolicy(plan.selections), NOW, previous)
        assert judge.fate(item.set_name, entry) == expected
    # without the policy it was decided under (a restart), every element is looked at
    judge = Judge(same.desired, NamePolicy(same.selections), NOW)
    assert judge.fate(item.set_name, entry) == ()
