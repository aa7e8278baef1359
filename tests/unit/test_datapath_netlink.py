"""Element-list messages and transactions, without a kernel.

The fast encoder writes exactly the bytes pyroute2's message classes write, comments included;
changes are cut into messages by encoded bytes (a netlink attribute's length is 16 bits) and into
transactions that fit one ``sendmsg``; ``NftSocket`` runs here over a fake socket that answers
like nfnetlink does.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket
import struct
from collections import deque
from typing import cast

import pytest
from pyroute2.netlink import NLM_F_ACK
from pyroute2.netlink.nfnetlink.nftsocket import nft_set_elem_list_msg

from egressgw.datapath import keys
from egressgw.datapath.netlink import (
    MAX_COMMENT_BYTES,
    NETLINK_CAP_ACK,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NLMSG_ERROR,
    NLMSGHDR,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_NETLINK,
    BatchError,
    Change,
    Element,
    NetlinkError,
    NftSocket,
    Op,
    TransactionTooLarge,
    _control,
    _decode_counted,
    _decode_elements,
    _plan,
    control_with_pyroute2,
    encode_change,
    encode_elements,
    encode_with_pyroute2,
    messages,
)
from egressgw.datapath.state import Box, Learned

ADDR = ipaddress.ip_address("198.51.100.7")
ADDR6 = ipaddress.ip_address("2001:db8::7")
CASES = [
    Change(Op.ADD, "allow4", tuple(Learned(7, ADDR, 6, (p, p)).element(60_000) for p in range(8))),
    Change(Op.DESTROY, "allow4", (Learned(7, ADDR, 6, (443, 443)).element(),)),
    Change(Op.ADD, "allow4_range", (Learned(7, ADDR, 6, (1000, 2000)).element(5_000),)),
    Change(Op.ADD, "allow4_any", (Learned(9, ADDR).element(2**40),)),
    Change(Op.DELETE, "workloads4", (Element(key=ADDR.packed, data=bytes([0, 0, 3, 232])),)),
    Change(Op.ADD, "allow6_net", (Box.of(3, ipaddress.ip_network("2001:db8::/64")).element(),)),
    Change(
        Op.ADD,
        "identities",
        tuple(
            Element(key=keys.mark(i), comment=comment)
            for i, comment in enumerate(["payments/api", "x" * 251, "é" * 125, "a/b" * 33])
        ),
    ),
    Change(
        Op.ADD,
        "workloads6",
        (Element(key=ADDR6.packed, data=keys.mark(7), comment="payments/api-7f9c"),),
    ),
    Change(
        Op.ADD,
        "allow6_range",
        (Learned(7, ADDR6, 17, (53, 60)).element(30_000)._replace(comment="db.example.com"),),
    ),
]


@pytest.mark.parametrize("change", CASES, ids=[f"{c.op.name}-{c.set_name}" for c in CASES])
@pytest.mark.parametrize("ack", [True, False])
def test_fast_encoder_matches_pyroute2_byte_for_byte(change: Change, ack: bool) -> None:
    fast = encode_elements("egressgw", change, change.elements, 4242, ack=ack)
    assert fast == encode_with_pyroute2("egressgw", change, change.elements, 4242, ack=ack)


@pytest.mark.parametrize("change", CASES, ids=[f"{c.op.name}-{c.set_name}" for c in CASES])
def test_encoded_elements_decode_to_the_same_elements(change: Change) -> None:
    raw = encode_elements("egressgw", change, change.elements, 1)
    assert list(_decode_elements(raw)) == list(change.elements)


# One element of a counter set as Linux 6.18 dumped it on x86-64 (mark 0x3e3d, 111,524 packets,
# 11,152,400 bytes): key, then the counter expression with two unpadded big-endian u64.
DUMPED_COUNTED = bytes.fromhex(
    "3c0001000c000100080001003d3e00002c0007000c000100636f756e746572001c0002000c000100"
    "0000000000aa2c100c000200000000000001b3a4"
)


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def _counted_item(mark: int, packets: int, octets: int, *, padded: bool = False) -> bytes:
    """A counter-set element; ``padded``: each u64 after an NFTA_COUNTER_PAD, as Linux writes
    it on CPUs without efficient unaligned access."""
    pad = _attr(3, b"") if padded else b""
    counter = pad + _attr(1, struct.pack(">Q", octets)) + pad + _attr(2, struct.pack(">Q", packets))
    expr = _attr(1, b"counter\0") + _attr(2, counter)
    return _attr(1, _attr(1, _attr(1, keys.mark(mark))) + _attr(7, expr))


def _dumped(*items: bytes) -> bytes:
    body = (
        struct.pack("=BBH", 1, 0, 0)
        + _attr(1, b"egressgw\0")
        + _attr(2, b"acct_accepted\0")
        + _attr(3, b"".join(items))
    )
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), 0x0A0C, 2, 9, 0) + body


def test_counters_read_from_the_kernels_layout_are_the_elements_counters() -> None:
    raw = _dumped(DUMPED_COUNTED, _counted_item(7, 3, 180), _counted_item(2**31, 2**40, 2**63))
    expected = [(keys.mark(0x3E3D), 111_524, 11_152_400), (keys.mark(7), 3, 180)]
    expected.append((keys.mark(2**31), 2**40, 2**63))
    assert _decode_counted(raw) == expected
    assert [(e.key, *(e.counter or ())) for e in _decode_elements(raw)] == expected


def test_counters_in_another_layout_are_read_attribute_by_attribute() -> None:
    no_counter = _attr(1, _attr(1, _attr(1, keys.mark(5))))
    raw = _dumped(_counted_item(7, 3, 180), _counted_item(8, 4, 240, padded=True), no_counter)
    expected = [(keys.mark(7), 3, 180), (keys.mark(8), 4, 240), (keys.mark(5), 0, 0)]
    assert _decode_counted(raw) == expected
    assert [e.counter for e in _decode_elements(raw)] == [(3, 180), (4, 240), None]


def test_an_empty_comment_is_kept_as_nft_would_write_it() -> None:
    # pyroute2 cannot encode an empty comment; nft writes its NUL alone
    change = Change(Op.ADD, "identities", (Element(key=keys.mark(1), comment=""),))
    raw = encode_elements("egressgw", change, change.elements, 1)
    assert b"\x00\x01\x00" in raw
    assert list(_decode_elements(raw)) == list(change.elements)


@pytest.mark.parametrize("kind", [NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END])
def test_batch_control_messages_match_pyroute2(kind: int) -> None:
    assert _control(kind, 77) == control_with_pyroute2(kind, 77)


@pytest.mark.parametrize("comment", ["x" * (MAX_COMMENT_BYTES + 1), "é" * 126, "y" * 300])
def test_a_comment_the_kernel_would_not_keep_is_refused_with_its_length(comment: str) -> None:
    change = Change(Op.ADD, "identities", (Element(key=keys.mark(1), comment=comment),))
    with pytest.raises(ValueError, match=f"comment of {len(comment.encode())} bytes"):
        encode_elements("egressgw", change, change.elements, 1)
    with pytest.raises(ValueError, match="251"):
        encode_change("egressgw", change, 1)


# -- cutting changes into messages by bytes ---------------------------------------------------


def interval6(count: int) -> Change:
    nets = (ipaddress.ip_network(f"2001:db8:{i // 256:x}:{i % 256:x}::/64") for i in range(count))
    return Change(Op.ADD, "allow6_net", tuple(Box.of(7, net).element() for net in nets))


def learned_range6(count: int) -> Change:
    hosts = (ipaddress.IPv6Address(int(ADDR6) + i) for i in range(count))
    return Change(
        Op.ADD,
        "allow6_range",
        tuple(Learned(7, host, 6, (8000, 8100)).element(3_600_000) for host in hosts),
    )


def identities(count: int, comment_bytes: int = 200, first: int = 1) -> Change:
    return Change(
        Op.ADD,
        "identities",
        tuple(
            Element(key=keys.mark(i), comment=f"namespace-{i}/".ljust(comment_bytes, "n"))
            for i in range(first, first + count)
        ),
    )


def elements_attribute_length(message: bytes) -> int:
    """The length field of NFTA_SET_ELEM_LIST_ELEMENTS, read from the raw message."""
    offset = NLMSGHDR.size + 4  # nfgenmsg
    while offset < len(message):
        length, kind = struct.unpack_from("=HH", message, offset)
        if kind & 0x3FFF == 3:
            return int(length)
        offset += (length + 3) & ~3
    raise AssertionError("no elements attribute")


BIG = {
    "3000-ipv6-intervals": interval6(3000),
    "3000-learned-ipv6-ranges": learned_range6(3000),
    "2000-identities-200-byte-comments": identities(2000),
}


@pytest.mark.parametrize("name", BIG)
def test_a_large_change_is_cut_into_messages_whose_elements_fit_an_attribute(name: str) -> None:
    change = BIG[name]
    with pytest.raises(ValueError, match="more than one netlink attribute holds"):
        encode_elements("egressgw", change, change.elements, 1)  # was struct.error
    messages = encode_change("egressgw", change, 100)
    assert len(messages) > 1
    decoded: list[Element] = []
    for offset, message in enumerate(messages):
        length, _kind, flags, seq, _pid = NLMSGHDR.unpack_from(message)
        assert (length, seq) == (len(message), 100 + offset) and flags & NLM_F_ACK
        assert elements_attribute_length(message) < 65_536
        chunk = list(_decode_elements(message))
        assert message == encode_elements("egressgw", change, chunk, 100 + offset)
        decoded += chunk
    assert decoded == list(change.elements)


def test_a_message_cut_by_bytes_is_what_pyroute2_writes_for_its_elements() -> None:
    change = identities(600)
    messages = encode_change("egressgw", change, 1)
    start = 0
    for offset, message in enumerate(messages):
        count = len(list(_decode_elements(message)))
        chunk = change.elements[start : start + count]
        assert message == encode_with_pyroute2("egressgw", change, chunk, 1 + offset)
        start += count
    assert start == len(change.elements)


# -- packing messages into transactions -------------------------------------------------------


def test_transactions_keep_the_order_of_every_element_and_respect_the_limit() -> None:
    changes = [
        identities(300, first=1),
        Change(Op.DESTROY, "allow6_range", learned_range6(50).elements),
        interval6(900),
        Change(Op.ADD, "audit", (Element(key=keys.mark(5)),)),
        Change(Op.ADD, "allow6_range", learned_range6(700).elements),
        Change(Op.DELETE, "identities", identities(20, first=1).elements),
    ]
    limit = 40_000
    transactions = _plan("egressgw", changes, limit)
    assert len(transactions) > 5
    carried: list[tuple[int, Element]] = []
    for transaction in transactions:
        size = 40 + sum(NLMSGHDR.size + len(message.body) for message in transaction)
        assert size <= limit
        for message in transaction:
            assert message.flags & NLM_F_ACK == 0
            header = NLMSGHDR.pack(NLMSGHDR.size + len(message.body), message.kind, 1, 0, 0)
            elements = list(_decode_elements(header + message.body))
            assert elements == list(changes[message.change].elements[message.start : message.end])
            carried += [(message.change, element) for element in elements]
    assert carried == [(i, e) for i, change in enumerate(changes) for e in change.elements]
    # greedy: a transaction ends only when the next element would not fit in it
    for transaction, following in itertools.pairwise(transactions):
        size = 40 + sum(NLMSGHDR.size + len(message.body) for message in transaction)
        next_element = changes[following[0].change].elements[following[0].start]
        one = Change(Op.ADD, changes[following[0].change].set_name, (next_element,))
        smallest = len(encode_elements("egressgw", one, one.elements, 1))
        assert size + smallest > limit


def test_an_element_that_cannot_fit_in_any_transaction_is_refused_before_anything() -> None:
    with pytest.raises(TransactionTooLarge) as refused:
        _plan("egressgw", [identities(2)], 300)
    assert refused.value.errno == errno.EMSGSIZE and refused.value.limit == 300


# -- NftSocket over a fake nfnetlink ----------------------------------------------------------


class FakeNetfilter:
    """A NETLINK_NETFILTER socket as nfnetlink answers a batch: replies are queued in ``send``.

    Every element-list message is an operation; the ones whose set and first element key are in
    ``refuse`` fail with that errno, and then the whole transaction changes nothing.
    """

    def __init__(self, force: bool = True) -> None:
        self.options: list[tuple[int, int, object]] = []
        self.sndbuf = 0
        self.force = force
        self.sent: list[bytes] = []
        self.replies: deque[bytes | OSError] = deque()
        self.refuse: dict[tuple[str, bytes], int] = {}
        self.commit_error = 0
        self.ack_room: int | None = None  # how many replies fit in the receive buffer
        self.state: dict[str, set[bytes]] = {}
        self.transactions: list[list[tuple[str, int, list[Element]]]] = []

    def setsockopt(self, level: int, option: int, value: object) -> None:
        if option in (SO_SNDBUFFORCE, SO_RCVBUFFORCE) and not self.force:
            raise PermissionError(errno.EPERM, "needs CAP_NET_ADMIN")
        self.options.append((level, option, value))
        if option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
            assert isinstance(value, int)
            self.sndbuf = max(2 * value, 4608)  # as the kernel keeps it

    def getsockopt(self, level: int, option: int) -> int:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_SNDBUF)
        return self.sndbuf

    def bind(self, address: object) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, data: bytes) -> int:
        if len(data) > self.sndbuf - 32:
            raise OSError(errno.EMSGSIZE, "Message too long")
        self.sent.append(data)
        parsed = list(messages(data))
        begin = parsed[0]
        assert begin[0] == NFNL_MSG_BATCH_BEGIN and parsed[-1][0] == NFNL_MSG_BATCH_END
        operations = []
        replies: list[bytes] = []
        failed = False
        for _kind, flags, seq, raw in parsed[1:-1]:
            msg = nft_set_elem_list_msg(raw)
            msg.decode()
            set_name = msg.get_attr("NFTA_SET_ELEM_LIST_SET")
            elements = list(_decode_elements(raw))
            operations.append((set_name, _kind & 0xFF, elements))
            code = self.refuse.get((set_name, elements[0].key), 0)
            failed = failed or code != 0
            if code or flags & NLM_F_ACK:
                replies.append(self.reply(seq, -code, raw))
        if not failed and self.commit_error:
            replies.insert(0, self.reply(begin[2], -self.commit_error, begin[3]))
            failed = True
        if not failed:
            self.transactions.append(operations)
            for set_name, _op, elements in operations:
                self.state.setdefault(set_name, set()).update(e.key for e in elements)
        if self.ack_room is not None and len(replies) > self.ack_room:
            replies = replies[: self.ack_room]
            self.replies.append(OSError(errno.ENOBUFS, "No buffer space available"))
        self.replies.extend(replies)
        return len(data)

    @staticmethod
    def reply(seq: int, code: int, request: bytes) -> bytes:
        body = struct.pack("=i", code) + request[: NLMSGHDR.size]
        return NLMSGHDR.pack(NLMSGHDR.size + len(body), NLMSG_ERROR, 0x100, seq, 0) + body

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if not self.replies:
            raise BlockingIOError(errno.EAGAIN, "nothing queued")
        reply = self.replies.popleft()
        if isinstance(reply, OSError):
            raise reply
        buffer[: len(reply)] = reply
        return len(reply)


@pytest.fixture
def fake() -> FakeNetfilter:
    return FakeNetfilter()


def nft_socket(fake: FakeNetfilter, buffer_bytes: int = 212_992) -> NftSocket:
    return NftSocket("egressgw", buffer_bytes, sock=cast(socket.socket, fake))


def test_buffers_are_forced_to_the_requested_size_and_the_limit_read_back(
    fake: FakeNetfilter,
) -> None:
    sock = nft_socket(fake)
    assert (socket.SOL_SOCKET, 32, 212_992) in fake.options  # SO_SNDBUFFORCE
    assert (socket.SOL_SOCKET, 33, 212_992) in fake.options  # SO_RCVBUFFORCE
    assert (SOL_NETLINK, NETLINK_CAP_ACK, 1) in fake.options
    assert sock.send_buffer_bytes == 425_984
    assert sock.max_transaction_bytes == 425_952


def test_without_cap_net_admin_the_capped_buffer_options_are_used() -> None:
    fake = FakeNetfilter(force=False)
    nft_socket(fake, 1 << 20)
    assert (socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20) in fake.options
    assert (socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20) in fake.options


def test_apply_sends_one_transaction_with_one_acknowledgement(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake)
    changes = [identities(400), Change(Op.ADD, "allow6_net", interval6(1000).elements)]
    assert sock.apply(changes) == 1400
    assert len(fake.sent) == 1
    flags = [flags for _kind, flags, _seq, _raw in messages(fake.sent[0])]
    assert len(flags) > 4
    assert [f & NLM_F_ACK for f in flags[1:-1]] == [0] * (len(flags) - 3) + [NLM_F_ACK]
    assert len(fake.state["identities"]) == 400 and len(fake.state["allow6_net"]) == 1000


def test_apply_larger_than_one_transaction_raises_before_sending(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake)
    with pytest.raises(TransactionTooLarge) as refused:
        sock.apply([interval6(6000)])
    assert refused.value.errno == errno.EMSGSIZE
    assert refused.value.limit == 425_952 and refused.value.size > 425_952
    assert f"{refused.value.size} bytes" in str(refused.value)
    assert fake.sent == []


def test_apply_steps_reports_each_transaction_and_keeps_the_order(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake, 16_384)  # 32,736 bytes a transaction
    steps = [
        [identities(300)],
        [interval6(500), Change(Op.ADD, "audit", (Element(key=keys.mark(3)),))],
        [Change(Op.DESTROY, "identities", identities(250).elements)],
    ]
    reported: list[tuple[int, Change]] = []  # (transactions sent so far, change)
    assert sock.apply_steps(steps, lambda c: reported.append((len(fake.sent), c))) == 1051
    assert len(fake.sent) == len(fake.transactions) > 3
    assert all(len(data) <= sock.max_transaction_bytes for data in fake.sent)
    # the kernel saw every element operation in the order of the steps
    expected = [(c.op.value, c.set_name, e) for step in steps for c in step for e in c.elements]
    sent = [(op, s, e) for t in fake.transactions for s, op, elements in t for e in elements]
    assert sent == expected
    # after each transaction, one report per change it carried (merging its messages), in order
    for number, transaction in enumerate(fake.transactions, start=1):
        merged: list[tuple[int, str, list[Element]]] = []
        for set_name, op, elements in transaction:
            if merged and merged[-1][:2] == (op, set_name):
                merged[-1][2].extend(elements)
            else:
                merged.append((op, set_name, list(elements)))
        reports = [(c.op.value, c.set_name, list(c.elements)) for n, c in reported if n == number]
        assert reports == merged
    # a change carried whole is reported as itself
    assert reported[0][1] is steps[0][0] or len(reported[0][1].elements) < 300


def test_apply_steps_stops_at_the_failed_transaction(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake, 16_384)
    steps = [[identities(150, first=i * 150 + 1)] for i in range(6)]
    plan = _plan("egressgw", [c for step in steps for c in step], sock.max_transaction_bytes)
    third = plan[2][0]
    absent = Change(Op.DELETE, "identities", (Element(key=keys.mark(99_999)),))
    fake.refuse[("identities", keys.mark(third.change * 150 + third.start + 1))] = errno.ENOENT
    reported: list[Change] = []
    with pytest.raises(BatchError) as failure:
        sock.apply_steps([*steps, [absent]], reported.append)
    assert failure.value.errno == errno.ENOENT and "identities" in str(failure.value)
    assert len(fake.sent) == 3 and len(fake.transactions) == 2
    committed = [e.key for c in reported for e in c.elements]
    assert committed == [e.key for t in fake.transactions for _s, _o, es in t for e in es]
    assert set(committed) == fake.state["identities"]


def test_every_error_is_read_and_the_socket_stays_usable(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake)
    changes = [
        Change(Op.DELETE, "identities", (Element(key=keys.mark(i)),)) for i in range(1, 1001)
    ]
    for i in range(1, 1001):
        fake.refuse[("identities", keys.mark(i))] = errno.ENOENT
    with pytest.raises(BatchError, match="delete 1 element"):
        sock.apply(changes)
    assert not fake.replies  # drained: nothing left to confuse the next transaction
    fake.refuse.clear()
    assert sock.apply([identities(3)]) == 3


def test_dropped_replies_after_an_error_still_report_the_error(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake)
    fake.ack_room = 500
    changes = [
        Change(Op.DELETE, "identities", (Element(key=keys.mark(i)),)) for i in range(1, 1001)
    ]
    for i in range(1, 1001):
        fake.refuse[("identities", keys.mark(i))] = errno.ENOENT
    with pytest.raises(BatchError) as failure:
        sock.apply(changes)
    assert failure.value.errno == errno.ENOENT
    assert not fake.replies


def test_dropped_replies_without_an_error_leave_the_outcome_unknown(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake)
    fake.ack_room = 0
    with pytest.raises(NetlinkError) as failure:
        sock.apply([identities(3)])
    assert failure.value.errno == errno.ENOBUFS and "unknown" in str(failure.value)


def test_a_failed_commit_is_reported_against_the_batch(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake)
    fake.commit_error = errno.ENOMEM
    with pytest.raises(BatchError) as failure:
        sock.apply([identities(3)])
    assert failure.value.errno == errno.ENOMEM and "transaction" in str(failure.value)
    assert not fake.replies


def test_late_replies_of_an_earlier_batch_are_skipped(fake: FakeNetfilter) -> None:
    sock = nft_socket(fake)
    fake.replies.append(FakeNetfilter.reply(123_456, -errno.ENOENT, bytes(16)))
    assert sock.apply([identities(2)]) == 2
