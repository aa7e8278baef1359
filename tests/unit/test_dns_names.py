"""Name decisions per identity: what a workload's DNS query is told, and which ports it opens.

``NamePolicy`` works a decision out once per identity and set of matching peers; every name must
still get exactly the decision and ports it would get on its own.
"""

from __future__ import annotations

import ipaddress
import itertools

from egressgw.dns.names import ANY, NamePolicy
from egressgw.policy.decide import Verdict, decide_name
from egressgw.policy.model import (
    Action,
    EgressGateway,
    EgressPolicy,
    EgressRule,
    LabelSelector,
    Mode,
    Peer,
    Pod,
    PortSpec,
    Protocol,
)
from egressgw.policy.select import WorkloadSelection

TCP = Protocol.TCP


def _pod(index: int) -> Pod:
    return Pod("payments", f"api-{index}", {}, (ipaddress.ip_address(f"192.0.2.{10 + index}"),))


def _policy(name: str, *rules: EgressRule, mode: Mode = Mode.ENFORCE) -> EgressPolicy:
    return EgressPolicy("payments", name, LabelSelector(), mode, rules)


API = _policy(
    "api",
    EgressRule(Action.ALLOW, (Peer(fqdn="db.example.com"),), (PortSpec(TCP, 5432),)),
    EgressRule(Action.DENY, (Peer(fqdn_pattern="secret-*.example.com"),)),
    EgressRule(Action.ALLOW, (Peer(fqdn_pattern="*.example.com"),), (PortSpec(TCP, 443),)),
    EgressRule(
        Action.ALLOW,
        (Peer(fqdn_pattern="**.cdn.example"), Peer(fqdn="api.example.com")),
        (PortSpec(TCP, 8000, 8100),),
    ),
)
EVERY_PORT = _policy("any", EgressRule(Action.ALLOW, (Peer(fqdn_pattern="*.cdn.example"),)))
WATCHING = _policy(
    "watching", EgressRule(Action.ALLOW, (Peer(fqdn="db.example.com"),)), mode=Mode.AUDIT
)
GATEWAY = EgressGateway("payments", LabelSelector(), default_action=Action.DENY)
OPEN_GATEWAY = EgressGateway("payments", LabelSelector(), default_action=Action.ALLOW)

IDENTITIES = {
    1: WorkloadSelection(_pod(1), GATEWAY, (API,)),
    2: WorkloadSelection(_pod(2), GATEWAY, (API, EVERY_PORT)),
    3: WorkloadSelection(_pod(3), GATEWAY, (WATCHING,)),
    4: WorkloadSelection(_pod(4), OPEN_GATEWAY, (API,)),
    5: WorkloadSelection(_pod(5), None, (API,)),
    6: WorkloadSelection(_pod(6), GATEWAY, ()),
}
LABELS = ["db", "API", "secret-x", "x", "example", "com", "cdn", "a-", ""]


def _names() -> list[str]:
    names = []
    for length in (1, 2, 3, 4):
        for labels in itertools.product(LABELS, repeat=length):
            if length == 4 and labels[-2:] not in (("example", "com"), ("cdn", "example")):
                continue
            names.append(".".join(labels))
    return names + [n + "." for n in names[:200]] + ["db.example.com\n", "a" * 64 + ".example.com"]


def test_every_name_gets_the_decision_it_would_get_alone() -> None:
    shared = NamePolicy(IDENTITIES)
    verdicts = set()
    for name in _names():
        for identity, selection in IDENTITIES.items():
            got = shared.decide(identity, name)
            alone = NamePolicy(IDENTITIES).decide(identity, name)
            assert got == alone, (identity, name)
            assert got.decision == decide_name(selection, name), (identity, name)
            verdicts.add((got.decision.verdict, got.ports))
    # the table above reaches every kind of outcome
    assert (Verdict.DENY, ()) in verdicts
    assert (Verdict.ALLOW, ((6, 443, 443),)) in verdicts
    assert (Verdict.ALLOW, (ANY,)) in verdicts
    assert (Verdict.AUDIT, ()) in verdicts


def test_names_under_one_pattern_share_one_decision() -> None:
    names = NamePolicy(IDENTITIES)
    first = names.decide(1, "a.example.com")
    assert first.ports == ((6, 443, 443),)
    assert names.decide(1, "B.Example.COM.") is first
    assert names.decide(1, "secret-b.example.com").decision.verdict is Verdict.DENY
    assert names.decide(1, "db.example.com").ports == ((6, 443, 443), (6, 5432, 5432))
    assert names.decide(1, "x.y.cdn.example").ports == ((6, 8000, 8100),)


def test_invalid_names_are_denied_with_the_name_in_the_reason() -> None:
    names = NamePolicy(IDENTITIES)
    got = names.decide(1, "db.example.com\n")
    assert got.decision.verdict is Verdict.DENY
    assert 'label "com\\n" has invalid characters "\\n"' in got.decision.reason


def test_a_deny_rule_carves_its_ports_out_of_what_an_allowed_name_opens() -> None:
    name = Peer(fqdn="db.lab.example")
    policies = (
        _policy(
            "db",
            EgressRule(to=(name,)),  # every port
            EgressRule(to=(name,), ports=(PortSpec(TCP, 8000, 8100),)),
            EgressRule(action=Action.DENY, to=(name,), ports=(PortSpec(TCP, 22),)),
            EgressRule(action=Action.DENY, to=(name,), ports=(PortSpec(Protocol.UDP),)),
        ),
    )
    selection = WorkloadSelection(_pod(0), GATEWAY, policies)
    decision = NamePolicy({1: selection}).decide(1, "db.lab.example")
    assert decision.decision.verdict is Verdict.ALLOW
    assert decision.ports == (
        (6, 0, 21),
        (6, 23, 7999),
        (6, 8000, 8100),
        (6, 8101, 65535),
        (132, 0, 65535),
    )


def test_a_flood_of_one_off_names_is_forgotten_and_names_in_use_are_kept() -> None:
    names = NamePolicy(IDENTITIES)
    in_use = names.decide(1, "db.example.com")
    for generation in range(3):
        for n in range(1000):
            assert names.decide(1, f"n{generation}-{n}.denied.invalid").decision.verdict is (
                Verdict.DENY
            )
        assert names.decide(1, "db.example.com") is in_use  # asked in every generation
        names.forget_unused()
    assert names.remembered == 1001  # the last generation's one-off names and the one in use
    names.forget_unused()
    assert names.remembered == 0
    assert names.decide(1, "db.example.com") == in_use  # decided again, alike


def test_a_full_generation_starts_the_next_one() -> None:
    names = NamePolicy(IDENTITIES, cache_size=100)
    for n in range(1000):
        names.decide(1, f"n{n}.example.com")
    assert names.remembered <= 200
