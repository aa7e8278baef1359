"""Netlink sizes against the real kernel, with the send buffer of a stock host.

Each test loads the skeleton in a fresh network namespace and opens ``NftSocket`` there with
``buffer_bytes=212_992`` (net.core.wmem_max on a stock host), so a transaction holds at most
425,952 bytes. Changes of tens of thousands of elements must go in through ``apply_steps``;
``apply`` must refuse them before sending anything; a failing transaction must leave exactly the
earlier ones committed; and a transaction of a thousand messages must not lose its verdict to
a full receive buffer.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterator

import pytest

from egressgw.datapath import keys, netlink, skeleton
from egressgw.datapath.netlink import (
    MAX_COMMENT_BYTES,
    NLMSGHDR,
    BatchError,
    Change,
    Element,
    NftSocket,
    Op,
    TransactionTooLarge,
    _plan,
)
from egressgw.datapath.netns import call_in
from egressgw.datapath.state import Box

pytestmark = pytest.mark.kernel

TABLE = "egt"
STOCK_WMEM_MAX = 212_992
IDENTITIES = 1000
V4_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
WORKLOADS = 16_000  # every IPv4 address of the three documentation /24s, the rest IPv6
INTERVALS6 = 2000


@pytest.fixture
def sock(netns: str) -> Iterator[NftSocket]:
    skeleton.load(TABLE, "lo", netns)
    opened = call_in(netns, lambda: NftSocket(TABLE, buffer_bytes=STOCK_WMEM_MAX))
    yield opened
    opened.close()


def namespace_key(identity: int) -> str:
    """An identity key with a namespace name of 63 characters (the longest Kubernetes allows)."""
    if identity == IDENTITIES:  # the longest comment the kernel keeps
        return f"ns-{identity}-".ljust(MAX_COMMENT_BYTES, "z")
    return f"project-{identity:04d}-".ljust(63, "n") + f"/egress-gateway-{identity % 7}"


def big_steps() -> list[list[Change]]:
    identities = tuple(
        Element(key=keys.mark(i), comment=namespace_key(i)) for i in range(1, IDENTITIES + 1)
    )
    v4 = [a for net in V4_NETS for a in ipaddress.ip_network(net)]
    first6 = int(ipaddress.IPv6Address("2001:db8:1::"))
    v6 = [ipaddress.IPv6Address(first6 + n) for n in range(WORKLOADS - len(v4))]
    workloads = {
        f: tuple(
            Element(key=keys.address(a), data=keys.mark(1 + n % IDENTITIES))
            for n, a in enumerate(addresses)
        )
        for f, addresses in ((4, v4), (6, v6))
    }
    boxes = (
        Box.of(1 + n % IDENTITIES, ipaddress.ip_network(f"2001:db8:{0x100 + n:x}::/64"), (6, 6))
        for n in range(INTERVALS6)
    )
    return [
        [Change(Op.ADD, "identities", identities)],
        [
            Change(Op.ADD, "workloads4", workloads[4]),
            Change(Op.ADD, "workloads6", workloads[6]),
        ],
        [Change(Op.ADD, "allow6_net", tuple(box.element() for box in boxes))],
    ]


SETS = ("identities", "workloads4", "workloads6", "allow6_net")


def test_tens_of_thousands_of_elements_go_in_through_apply_steps(sock: NftSocket) -> None:
    steps = big_steps()
    changes = [change for step in steps for change in step]
    assert len(_plan(TABLE, changes, sock.max_transaction_bytes)) > 2  # really several
    reported: list[Change] = []
    total = IDENTITIES + WORKLOADS + INTERVALS6
    assert sock.apply_steps(steps, reported.append) == total
    for change in changes:
        dumped = sock.dump(change.set_name)
        assert len(dumped) == len(change.elements)
        assert set(dumped) == set(change.elements)
        carried = [e for c in reported if c.set_name == change.set_name for e in c.elements]
        assert carried == list(change.elements)
    comments = {e.comment for e in sock.dump("identities")}
    assert namespace_key(IDENTITIES) in comments and len(namespace_key(IDENTITIES)) == 251


def test_apply_of_the_same_changes_is_refused_before_anything_is_sent(sock: NftSocket) -> None:
    with pytest.raises(TransactionTooLarge) as refused:
        sock.apply([change for step in big_steps() for change in step])
    assert refused.value.errno == errno.EMSGSIZE
    assert refused.value.limit == sock.max_transaction_bytes
    assert refused.value.size > sock.max_transaction_bytes
    for name in SETS:
        assert sock.dump(name) == []
    assert sock.apply([Change(Op.ADD, "audit", (Element(key=keys.mark(3)),))]) == 1


def test_a_failed_third_transaction_leaves_the_first_two_committed(sock: NftSocket) -> None:
    first6 = int(ipaddress.IPv6Address("2001:db8:2::"))
    workloads = tuple(
        Element(key=ipaddress.IPv6Address(first6 + n).packed, data=keys.mark(1))
        for n in range(25_000)
    )
    absent = Element(key=ipaddress.IPv6Address("2001:db8:ffff::1").packed)
    steps = [
        [Change(Op.ADD, "workloads6", workloads)],
        [Change(Op.DELETE, "workloads6", (absent,))],  # ENOENT
        [Change(Op.ADD, "audit", (Element(key=keys.mark(1)),))],
    ]
    plan = _plan(TABLE, [c for step in steps for c in step], sock.max_transaction_bytes)
    assert len(plan) == 3 and plan[2][-2].change == 1  # the delete travels in the third
    reported: list[Change] = []
    with pytest.raises(BatchError) as failure:
        sock.apply_steps(steps, reported.append)
    assert failure.value.errno == errno.ENOENT
    assert "delete 1 element(s) workloads6" in str(failure.value)
    committed = [e for change in reported for e in change.elements]
    sent_before = sum(m.end - m.start for transaction in plan[:2] for m in transaction)
    assert len(reported) == 2 and committed == list(workloads[:sent_before])
    assert set(sock.dump("workloads6")) == set(committed)
    assert sock.dump("audit") == []


def test_the_send_buffer_limit_is_what_the_module_says(sock: NftSocket) -> None:
    assert sock.send_buffer_bytes == 2 * STOCK_WMEM_MAX == 425_984
    assert sock.max_transaction_bytes == 425_952
    raw = sock._sock  # a NLMSG_NOOP without NLM_F_ACK: the kernel skips it silently

    def noop(length: int) -> bytes:
        return NLMSGHDR.pack(length, 1, 1, 0, 0) + bytes(length - NLMSGHDR.size)

    raw.send(noop(sock.max_transaction_bytes))
    with pytest.raises(OSError) as refused:
        raw.send(noop(sock.max_transaction_bytes + 4))
    assert refused.value.errno == errno.EMSGSIZE


def one_per_message(op: Op, count: int) -> list[Change]:
    """``count`` changes of one workloads6 element each: one message per element."""
    first6 = int(ipaddress.IPv6Address("2001:db8:3::"))
    data = keys.mark(1) if op is Op.ADD else None
    return [
        Change(op, "workloads6", (Element(ipaddress.IPv6Address(first6 + n).packed, data=data),))
        for n in range(count)
    ]


def test_a_thousand_messages_keep_their_verdict_within_a_stock_receive_buffer(
    sock: NftSocket,
) -> None:
    # a reply costs about 830 bytes of receive buffer: 1,000 of them would not fit in 425,984
    rcvbuf = sock._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert rcvbuf == 425_984 < 1000 * 830
    deletes = one_per_message(Op.DELETE, 1000)  # every one refused: a thousand error replies
    with pytest.raises(BatchError) as failure:
        sock.apply(deletes)
    assert failure.value.errno == errno.ENOENT
    assert "delete 1 element(s) workloads6" in str(failure.value)
    # every reply was read or dropped: nothing left over confuses the transactions that follow
    assert sock.apply(one_per_message(Op.ADD, 1000)) == 1000
    assert len(sock.dump("workloads6")) == 1000
    assert sock.apply(one_per_message(Op.DELETE, 1000)) == 1000
    assert sock.dump("workloads6") == []


def test_the_longest_comment_the_kernel_keeps_is_the_encoders_limit(
    sock: NftSocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    def add(identity: int, comment_bytes: int) -> None:
        element = Element(key=keys.mark(identity), comment="c" * comment_bytes)
        sock.apply([Change(Op.ADD, "identities", (element,))])

    add(1, MAX_COMMENT_BYTES)
    with pytest.raises(ValueError, match=f"comment of {MAX_COMMENT_BYTES + 1} bytes"):
        add(2, MAX_COMMENT_BYTES + 1)
    monkeypatch.setattr(netlink, "MAX_COMMENT_BYTES", 300)  # what the kernel does past it
    with pytest.raises(BatchError) as refused:
        add(2, MAX_COMMENT_BYTES + 1)  # 255 bytes of user data
    assert refused.value.errno == errno.EINVAL
    add(3, MAX_COMMENT_BYTES + 2)  # 256 bytes: the kernel's one-byte length wraps to 0
    comments = {keys.parse_mark(e.key): e.comment for e in sock.dump("identities")}
    assert comments == {1: "c" * MAX_COMMENT_BYTES, 3: None}
