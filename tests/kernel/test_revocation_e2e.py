"""End to end: a policy change closes at once what it no longer allows, even with long TTLs.

The lab's gateway runs with ``--min-ttl 600``, so every learned address would stay open for ten
minutes if only its TTL decided. The lab's own payments policy is replaced by one that allows no
race name; each test adds a policy of its own that allows fresh race names (each resolving to
its own address on the echo server's port), resolves them through the pod's resolver, connects,
then changes the manifests and measures how long until a new connection is rejected at the
gateway, while what is still allowed keeps connecting and established connections keep working.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator

import pytest

from egressgw.lab import Lab, Verdict
from egressgw.lab.lab import url
from egressgw.lab.manifests import CLUSTER_FILE, cluster_objects
from egressgw.lab.services import daemon_available
from egressgw.lab.topology import TEST_PORT, pod_by_key, race_address, race_name
from tests.conftest import require, require_kernel, unique_name

pytestmark = pytest.mark.kernel

PAYMENTS = "payments/api-0"  # on worker-1
OTHER_API = "payments/api-1"  # on worker-2, the same labels: the same identity as api-0
CLOSE_WITHIN_S = 2.0
OTHER_PORT = 9001  # nothing listens there: "refused by server" shows the gateway let it through
POLICY_FILE = "revocation.yaml"

# the lab's payments policy without its race-name rule: only the tests' own policies allow those
PAYMENTS_WITHOUT_RACE = """\
apiVersion: egressgw.io/v1alpha1
kind: EgressPolicy
metadata: {name: database, namespace: payments}
spec:
  podSelector: {matchLabels: {app: api}}
  egress:
    - to: [{fqdn: db.lab.example}, {cidr: 203.0.113.10/32}]
      ports: [{protocol: TCP, port: 5432}]
"""

_names = itertools.count(2100)  # race names no other lab test uses


def fresh() -> tuple[str, str]:
    index = next(_names)
    return race_name(index), race_address(index)


def policy(*rules: str, name: str = "revocation", app: str = "api") -> str:
    return (
        "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\n"
        f"metadata: {{name: {name}, namespace: payments}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  egress:\n"
        + "".join(f"    - {rule}\n" for rule in rules)
    )


def to(peer: str, *ports: int) -> str:
    listed = ", ".join(f"{{protocol: TCP, port: {p}}}" for p in ports or (TEST_PORT,))
    return f"{{to: [{peer}], ports: [{listed}]}}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_kernel()
    require(daemon_available(), "`python -m egressgw run` is not available")
    with Lab.up(unique_name("egt"), start_daemon=False) as built:
        built.write_manifest("payments.yaml", PAYMENTS_WITHOUT_RACE)
        built.start_daemon(["--min-ttl", "600"])
        yield built


@pytest.fixture(autouse=True)
def own_policy(lab: Lab) -> Iterator[None]:
    yield
    (lab.manifests_dir / POLICY_FILE).unlink(missing_ok=True)
    lab.write_manifest(CLUSTER_FILE, _cluster())
    if not lab.daemon_alive():
        lab.start_daemon()


def _cluster(relabel: dict[str, str] | None = None) -> str:
    import yaml

    objects = cluster_objects()
    for obj in objects:
        meta = obj["metadata"]
        if relabel and obj["kind"] == "Pod" and f"{meta['namespace']}/{meta['name']}" == PAYMENTS:
            meta["labels"] = relabel
    return yaml.safe_dump_all(objects, sort_keys=False)


def connect(lab: Lab, address: str, port: int = TEST_PORT, *, pod: str = PAYMENTS) -> Verdict:
    return lab.http(pod, url(address, port), timeout_s=3).verdict


def learn(lab: Lab, name: str, address: str) -> None:
    """Resolve ``name`` through the pod's resolver, then connect to what it gave."""
    assert lab.resolve(PAYMENTS, name, 6) == [address]
    assert connect(lab, address) is Verdict.CONNECTED


def seconds_until_rejected(lab: Lab, since: float, *addresses: str, port: int = TEST_PORT) -> float:
    """Seconds from ``since`` until the gateway holds none of ``addresses`` on ``port`` for
    the pod, checked in the kernel's learned set; then new connections must be rejected. (An
    IPv6 client learns of the reject only from its retransmitted SYN, about a second later.)"""
    deadline = since + 10
    while time.monotonic() < deadline:
        learned = _learned(lab)
        if not any(f"{address} . tcp . {port}" in learned for address in addresses):
            took = time.monotonic() - since
            for address in addresses:
                assert connect(lab, address, port) is Verdict.REJECTED_AT_GATEWAY, address
            return took
        time.sleep(0.02)
    raise AssertionError(f"{addresses} still open on {port} 10 s after the change")


def _learned(lab: Lab) -> str:
    return lab.exec("gw", ["nft", "list", "set", "inet", "egressgw", "allow6"], check=True).stdout


def _identity_of(lab: Lab, pod: str) -> str | None:
    """The mark the gateway gives the pod's IPv6 address now (its identity), if any."""
    listing = lab.exec(
        "gw", ["nft", "list", "map", "inet", "egressgw", "workloads6"], check=True
    ).stdout
    found = re.search(rf"(?<![\w:]){re.escape(pod_by_key(pod).ipv6)} : (0x[0-9a-f]+)", listing)
    return found.group(1) if found else None


def seconds_until_closed_for(lab: Lab, since: float, pod: str, address: str) -> float:
    """Seconds from ``since`` until the gateway's learned set holds ``address`` on the test port
    for the identity ``pod`` has now no more; then the pod's new connections must be rejected."""
    deadline = since + 10
    while time.monotonic() < deadline:
        mark = _identity_of(lab, pod)
        if mark is not None and f"{mark} . {address} . tcp . {TEST_PORT}" not in _learned(lab):
            took = time.monotonic() - since
            assert connect(lab, address, pod=pod) is Verdict.REJECTED_AT_GATEWAY, address
            return took
        time.sleep(0.02)
    raise AssertionError(f"{address} still open for {pod} 10 s after the change")


def change(lab: Lab, text: str) -> float:
    """Write the tests' policy file; returns when (the daemon notices within its poll)."""
    lab.write_manifest(POLICY_FILE, text)
    return time.monotonic()


def apply(lab: Lab, text: str, filename: str = POLICY_FILE) -> None:
    """Write a manifest and wait until the daemon applied it."""
    offset = lab.daemon_log_offset()
    lab.write_manifest(filename, text)
    lab.wait_for_daemon_log("applied:", since=offset, timeout_s=5)


def test_removing_an_fqdn_closes_its_address_and_keeps_the_other_name_open(lab: Lab) -> None:
    (gone, gone_at), (kept, kept_at) = fresh(), fresh()
    apply(lab, policy(to(f"fqdn: {gone}"), to(f"fqdn: {kept}")))
    learn(lab, gone, gone_at)
    learn(lab, kept, kept_at)

    since = change(lab, policy(to(f"fqdn: {kept}")))
    took = seconds_until_rejected(lab, since, gone_at)
    print(f"\nfqdn removed: new connections to its address rejected after {took:.2f} s")
    assert took <= CLOSE_WITHIN_S
    assert connect(lab, kept_at) is Verdict.CONNECTED
    assert lab.dns_query(PAYMENTS, gone, "AAAA").rcode == "NXDOMAIN"


def test_removing_an_fqdn_pattern_closes_what_it_opened(lab: Lab) -> None:
    (first, first_at), (second, second_at), (kept, kept_at) = fresh(), fresh(), fresh()
    pattern = f'fqdnPattern: "*.{first.split(".", 1)[1]}"'  # every race name
    apply(lab, policy(to(pattern), to(f"fqdn: {kept}")))
    for name, address in ((first, first_at), (second, second_at), (kept, kept_at)):
        learn(lab, name, address)

    since = change(lab, policy(to(f"fqdn: {kept}")))
    took = seconds_until_rejected(lab, since, first_at, second_at)
    print(f"\nfqdnPattern removed: its addresses rejected after {took:.2f} s")
    assert took <= CLOSE_WITHIN_S
    assert connect(lab, kept_at) is Verdict.CONNECTED  # also matched the pattern before


def test_narrowing_ports_closes_the_old_port_only(lab: Lab) -> None:
    name, address = fresh()
    apply(lab, policy(to(f"fqdn: {name}", TEST_PORT, OTHER_PORT)))
    learn(lab, name, address)
    assert connect(lab, address, OTHER_PORT) is Verdict.CONNECTION_REFUSED

    since = change(lab, policy(to(f"fqdn: {name}", OTHER_PORT)))
    took = seconds_until_rejected(lab, since, address)
    print(f"\nport removed: rejected after {took:.2f} s")
    assert took <= CLOSE_WITHIN_S
    assert connect(lab, address, OTHER_PORT) is Verdict.CONNECTION_REFUSED


def test_deleting_the_policy_closes_everything_it_opened_but_no_established_flow(
    lab: Lab,
) -> None:
    (one, one_at), (two, two_at) = fresh(), fresh()
    apply(lab, policy(to(f"fqdn: {one}"), to(f"fqdn: {two}")))
    learn(lab, one, one_at)
    learn(lab, two, two_at)
    with lab.http_keepalive(PAYMENTS, port=TEST_PORT, host=one_at) as held:
        first = held.first()
        assert first["ok"], first

        since = time.monotonic()
        (lab.manifests_dir / POLICY_FILE).unlink()
        took = seconds_until_rejected(lab, since, one_at, two_at)
        print(f"\npolicy deleted: both addresses rejected after {took:.2f} s")
        assert took <= CLOSE_WITHIN_S
        # conntrack keeps the established connection: only new ones are refused
        again = held.again()
        assert again["ok"] and again["local_port"] == first["local_port"], again


def test_relabelling_a_pod_closes_what_its_old_identity_learned_for_it(lab: Lab) -> None:
    name, address = fresh()
    both = (
        policy(to(f"fqdn: {name}"))
        + "---\n"
        + policy(to(f"fqdn: {name}"), name="moved", app="moved")
    )
    apply(lab, both)
    learn(lab, name, address)
    # what api-0 learned is its identity's: api-1, with the same labels, may connect too
    assert connect(lab, address, pod=OTHER_API) is Verdict.CONNECTED
    before = _identity_of(lab, PAYMENTS)
    assert before is not None

    since = time.monotonic()
    lab.write_manifest(CLUSTER_FILE, _cluster(relabel={"app": "moved"}))
    took = seconds_until_closed_for(lab, since, PAYMENTS, address)
    print(f"\npod relabelled: its old identity's address rejected for it after {took:.2f} s")
    assert took <= CLOSE_WITHIN_S
    assert _identity_of(lab, PAYMENTS) != before
    # api-1 keeps the old identity, and with it what that identity learned
    assert _identity_of(lab, OTHER_API) == before
    assert connect(lab, address, pod=OTHER_API) is Verdict.CONNECTED
    # the new identity is allowed the name, and gets the address once it resolves it itself
    learn(lab, name, address)


def test_a_change_made_while_the_daemon_is_down_is_revoked_before_it_is_ready(lab: Lab) -> None:
    (gone, gone_at), (kept, kept_at) = fresh(), fresh()
    apply(lab, policy(to(f"fqdn: {gone}"), to(f"fqdn: {kept}")))
    learn(lab, gone, gone_at)
    learn(lab, kept, kept_at)

    lab.stop_daemon()
    lab.write_manifest(POLICY_FILE, policy(to(f"fqdn: {kept}")))
    # while it is down, the kernel still enforces what it had (nothing tightens or loosens)
    assert connect(lab, gone_at) is Verdict.CONNECTED
    offset = lab.daemon_log_offset()
    lab.start_daemon()  # returns once /readyz answers 200
    assert connect(lab, gone_at) is Verdict.REJECTED_AT_GATEWAY
    assert connect(lab, kept_at) is Verdict.CONNECTED
    line = lab.wait_for_daemon_log("applied:", since=offset)
    assert "learned removed" in line and " 0 learned removed" not in line, line
