"""Decisions: every branch, with the exact reason a user reads in the log."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from egressgw.policy.decide import (
    NO_GATEWAY,
    Decision,
    Verdict,
    decide_address,
    decide_name,
)
from egressgw.policy.load import load_paths
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
    RuleRef,
    Snapshot,
)
from egressgw.policy.select import WorkloadSelection, index_workloads

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
REPO = Path(__file__).resolve().parents[2]
POD = Pod("payments", "api-0", {"app": "api"}, (ipaddress.ip_address("192.0.2.10"),))


def gateway(default: Action = Action.DENY) -> EgressGateway:
    return EgressGateway("payments", LabelSelector(), default_action=default)


def net(text: str) -> Peer:
    return Peer(cidr=ipaddress.ip_network(text))


def policy(name: str, *rules: EgressRule, mode: Mode = Mode.ENFORCE) -> EgressPolicy:
    return EgressPolicy("payments", name, LabelSelector(), mode, tuple(rules))


def workload(*policies: EgressPolicy, default: Action = Action.DENY) -> WorkloadSelection:
    return WorkloadSelection(POD, gateway(default), tuple(policies))


DATABASE = policy(
    "database",
    EgressRule(
        Action.ALLOW,
        (Peer(fqdn="db.example.com"), net("203.0.113.0/24"), net("2001:db8:203::/48")),
        (PortSpec(TCP, 5432),),
    ),
    EgressRule(
        Action.ALLOW,
        (Peer(fqdn_pattern="*.s3.example.com"),),
        (PortSpec(TCP, 443), PortSpec(TCP, 8000, 8100), PortSpec(UDP)),
    ),
)
BLOCK = policy(
    "block",
    EgressRule(Action.DENY, (net("203.0.113.66/32"), Peer(fqdn="evil.s3.example.com"))),
    EgressRule(Action.DENY, (Peer(fqdn_pattern="**.s3.example.com"),), (PortSpec(TCP, 8080),)),
)
ANYWHERE = policy("anywhere", EgressRule(Action.ALLOW, (net("0.0.0.0/0"), net("::/0"))))


def ref(policy: str, index: int) -> RuleRef:
    return RuleRef("payments", policy, index)


ADDRESS_CASES = [
    (
        "cidr and port match",
        workload(DATABASE),
        ("203.0.113.10", TCP, 5432),
        Decision(
            Verdict.ALLOW,
            "address matched cidr 203.0.113.0/24 in Allow rule payments/database#0",
            ref("database", 0),
        ),
    ),
    (
        "IPv6",
        workload(DATABASE),
        ("2001:db8:203::10", TCP, 5432),
        Decision(
            Verdict.ALLOW,
            "address matched cidr 2001:db8:203::/48 in Allow rule payments/database#0",
            ref("database", 0),
        ),
    ),
    (
        "wrong port",
        workload(DATABASE),
        ("203.0.113.10", TCP, 5433),
        Decision(
            Verdict.DENY,
            "address matched cidr 203.0.113.0/24 in Allow rule payments/database#0 but not its"
            ' ports (TCP/5433); EgressGateway "payments" defaultAction is Deny',
        ),
    ),
    (
        "wrong protocol",
        workload(DATABASE),
        ("203.0.113.10", UDP, 5432),
        Decision(
            Verdict.DENY,
            "address matched cidr 203.0.113.0/24 in Allow rule payments/database#0 but not its"
            ' ports (UDP/5432); EgressGateway "payments" defaultAction is Deny',
        ),
    ),
    (
        "outside every cidr",
        workload(DATABASE),
        ("198.51.100.1", TCP, 5432),
        Decision(Verdict.DENY, 'no rule matches; EgressGateway "payments" defaultAction is Deny'),
    ),
    (
        "Deny wins over Allow across policies",
        workload(DATABASE, BLOCK),
        ("203.0.113.66", TCP, 5432),
        Decision(
            Verdict.DENY,
            "address matched cidr 203.0.113.66/32 in Deny rule payments/block#0",
            ref("block", 0),
        ),
    ),
    (
        "no ports means every port and protocol",
        workload(ANYWHERE),
        ("192.0.2.200", SCTP, 9),
        Decision(
            Verdict.ALLOW,
            "address matched cidr 0.0.0.0/0 in Allow rule payments/anywhere#0",
            ref("anywhere", 0),
        ),
    ),
    (
        "gateway default Allow",
        workload(DATABASE, default=Action.ALLOW),
        ("198.51.100.1", TCP, 22),
        Decision(Verdict.ALLOW, 'no rule matches; EgressGateway "payments" defaultAction is Allow'),
    ),
    (
        "gateway default Allow does not beat a Deny rule",
        workload(BLOCK, default=Action.ALLOW),
        ("203.0.113.66", TCP, 22),
        Decision(
            Verdict.DENY,
            "address matched cidr 203.0.113.66/32 in Deny rule payments/block#0",
            ref("block", 0),
        ),
    ),
    (
        "no policy",
        workload(),
        ("203.0.113.10", TCP, 5432),
        Decision(
            Verdict.DENY,
            'no EgressPolicy selects this workload; EgressGateway "payments" defaultAction is Deny',
        ),
    ),
    (
        "no gateway",
        WorkloadSelection(POD, None, (ANYWHERE,)),
        ("203.0.113.10", TCP, 5432),
        Decision(Verdict.DENY, "no EgressGateway selects this workload"),
    ),
]


@pytest.mark.parametrize(
    ("selection", "query", "expected"),
    [case[1:] for case in ADDRESS_CASES],
    ids=[case[0] for case in ADDRESS_CASES],
)
def test_decide_address(
    selection: WorkloadSelection, query: tuple[str, Protocol, int], expected: Decision
) -> None:
    assert decide_address(selection, *query) == expected


@pytest.mark.parametrize(
    ("port", "verdict"),
    [(7999, Verdict.DENY), (8000, Verdict.ALLOW), (8100, Verdict.ALLOW), (8101, Verdict.DENY)],
)
def test_end_port_is_inclusive(port: int, verdict: Verdict) -> None:
    assert decide_name(workload(DATABASE), "a.s3.example.com", TCP, port).verdict is verdict


NAME_CASES = [
    (
        "exact name, any port",
        workload(DATABASE),
        ("DB.Example.com.", None, None),
        Decision(
            Verdict.ALLOW,
            'name matched fqdn "db.example.com" in Allow rule payments/database#0',
            ref("database", 0),
        ),
    ),
    (
        "pattern",
        workload(DATABASE),
        ("bucket.s3.example.com", TCP, 443),
        Decision(
            Verdict.ALLOW,
            'name matched fqdnPattern "*.s3.example.com" in Allow rule payments/database#1',
            ref("database", 1),
        ),
    ),
    (
        "protocol without port: every port of that protocol",
        workload(DATABASE),
        ("bucket.s3.example.com", UDP, 53),
        Decision(
            Verdict.ALLOW,
            'name matched fqdnPattern "*.s3.example.com" in Allow rule payments/database#1',
            ref("database", 1),
        ),
    ),
    (
        "pattern is one label only",
        workload(DATABASE),
        ("a.bucket.s3.example.com", None, None),
        Decision(Verdict.DENY, 'no rule matches; EgressGateway "payments" defaultAction is Deny'),
    ),
    (
        "name allowed but not on this port",
        workload(DATABASE),
        ("db.example.com", TCP, 80),
        Decision(
            Verdict.DENY,
            'name matched fqdn "db.example.com" in Allow rule payments/database#0 but not its'
            ' ports (TCP/80); EgressGateway "payments" defaultAction is Deny',
        ),
    ),
    (
        "Deny rule on every port denies the name itself",
        workload(DATABASE, BLOCK),
        ("evil.s3.example.com", None, None),
        Decision(
            Verdict.DENY,
            'name matched fqdn "evil.s3.example.com" in Deny rule payments/block#0',
            ref("block", 0),
        ),
    ),
    (
        "Deny rule on one port does not deny the name",
        workload(DATABASE, BLOCK),
        ("good.s3.example.com", None, None),
        Decision(
            Verdict.ALLOW,
            'name matched fqdnPattern "*.s3.example.com" in Allow rule payments/database#1',
            ref("database", 1),
        ),
    ),
    (
        "Deny rule on one port denies that port",
        workload(DATABASE, BLOCK),
        ("good.s3.example.com", TCP, 8080),
        Decision(
            Verdict.DENY,
            'name matched fqdnPattern "**.s3.example.com" in Deny rule payments/block#1',
            ref("block", 1),
        ),
    ),
    (
        "cidr peers never match names",
        workload(ANYWHERE),
        ("db.example.com", None, None),
        Decision(Verdict.DENY, 'no rule matches; EgressGateway "payments" defaultAction is Deny'),
    ),
    (
        "invalid name",
        workload(DATABASE, default=Action.ALLOW),
        ("db..example.com", None, None),
        Decision(
            Verdict.DENY,
            'not a valid DNS name: "db..example.com" has an empty label (two dots in a row, or a'
            " leading dot)",
        ),
    ),
    (
        "no gateway",
        WorkloadSelection(POD, None, (DATABASE,)),
        ("db.example.com", None, None),
        Decision(Verdict.DENY, NO_GATEWAY),
    ),
]


@pytest.mark.parametrize(
    ("selection", "query", "expected"),
    [case[1:] for case in NAME_CASES],
    ids=[case[0] for case in NAME_CASES],
)
def test_decide_name(
    selection: WorkloadSelection,
    query: tuple[str, Protocol | None, int | None],
    expected: Decision,
) -> None:
    assert decide_name(selection, *query) == expected


AUDIT_DATABASE = EgressPolicy("payments", "trial", LabelSelector(), Mode.AUDIT, DATABASE.egress)
AUDIT_BLOCK = EgressPolicy("payments", "trial-block", LabelSelector(), Mode.AUDIT, BLOCK.egress)


def test_audit_only_turns_would_deny_into_audit() -> None:
    assert decide_name(workload(AUDIT_DATABASE), "other.example", TCP, 443) == Decision(
        Verdict.AUDIT,
        'Audit mode, would be denied: no rule matches; EgressGateway "payments" defaultAction is'
        " Deny",
    )
    assert decide_address(workload(AUDIT_BLOCK), "203.0.113.66", TCP, 1) == Decision(
        Verdict.AUDIT,
        "Audit mode, would be denied: address matched cidr 203.0.113.66/32 in Deny rule"
        " payments/trial-block#0",
        RuleRef("payments", "trial-block", 0),
    )
    # what the Audit policy allows is simply allowed
    assert decide_name(workload(AUDIT_DATABASE), "db.example.com").verdict is Verdict.ALLOW


def test_enforce_policies_decide_when_present() -> None:
    # the Audit policy would allow db.example.com, but an Enforce policy selects the workload
    mixed = workload(ANYWHERE, AUDIT_DATABASE)
    assert decide_name(mixed, "db.example.com") == Decision(
        Verdict.DENY, 'no rule matches; EgressGateway "payments" defaultAction is Deny'
    )
    # and the Audit policy's Deny rule does not deny what the Enforce policy allows
    mixed = workload(ANYWHERE, AUDIT_BLOCK)
    assert decide_address(mixed, "203.0.113.66", TCP, 1).verdict is Verdict.ALLOW


def test_audit_and_allowed_both_pass() -> None:
    assert Decision(Verdict.AUDIT, "x").allowed
    assert Decision(Verdict.ALLOW, "x").allowed
    assert not Decision(Verdict.DENY, "x").allowed


def test_a_port_needs_a_protocol() -> None:
    with pytest.raises(ValueError, match="a port needs a protocol"):
        decide_name(workload(DATABASE), "db.example.com", None, 5432)


def test_lab_outcomes_from_the_example_policies() -> None:
    """What the demo shows: payments reaches db, and web by name only; analytics only db;
    sandbox nothing."""
    loaded = load_paths([REPO / "policies"])
    assert loaded.problems == []
    pods = (
        Pod("payments", "api-0", {"app": "api"}, (ipaddress.ip_address("192.0.2.10"),)),
        Pod("analytics", "etl-0", {"app": "etl"}, (ipaddress.ip_address("192.0.2.20"),)),
        Pod("sandbox", "shell-0", {"app": "shell"}, (ipaddress.ip_address("192.0.2.30"),)),
    )
    namespaces = {
        "payments": Namespace("payments", {"project": "payments"}),
        "analytics": Namespace("analytics", {"project": "analytics"}),
        "sandbox": Namespace("sandbox", {}),
    }
    snapshot = Snapshot(namespaces, pods, loaded.snapshot.gateways, loaded.snapshot.policies)
    index = index_workloads(snapshot)

    def verdicts(address: str) -> list[Verdict]:
        selection = index.lookup(ipaddress.ip_address(address))
        assert selection is not None
        return [
            decide_name(selection, "db.lab.example", TCP, 5432).verdict,
            decide_address(selection, "203.0.113.10", TCP, 5432).verdict,
            decide_address(selection, "2001:db8:203::10", TCP, 5432).verdict,
            decide_name(selection, "web.lab.example", TCP, 80).verdict,
            decide_name(selection, "img.cdn.lab.example", TCP, 80).verdict,
            decide_address(selection, "203.0.113.20", TCP, 80).verdict,
            decide_name(selection, "db.lab.example", TCP, 80).verdict,
            decide_name(selection, "example.org").verdict,
        ]

    allow, deny = Verdict.ALLOW, Verdict.DENY
    assert verdicts("192.0.2.10") == [allow] * 5 + [deny] * 3
    assert verdicts("192.0.2.20") == [allow] * 3 + [deny] * 5
    assert verdicts("192.0.2.30") == [deny] * 8
