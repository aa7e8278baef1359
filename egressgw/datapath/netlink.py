"""nftables set elements over netlink: batches of element-list messages, encoded by hand.

In: element operations (add, destroy, delete) on named sets of one table. Out: applied
transactions, or ``BatchError`` with the kernel's errno and the operation it refused, in which
case the kernel aborted that whole transaction and the previous state is still in force.

The socket is a plain blocking NETLINK_NETFILTER socket: the kernel processes a batch inside
``sendmsg`` and has queued every reply by the time it returns, so a change costs one ``sendmsg``
plus one ``recv``, with no event loop involved (pyroute2's async sockets cannot run on uvloop, and
do not need to). This module never starts a subprocess.

Sizes, as the kernel enforces them (checked on Linux 6.18, tests/kernel/test_netlink_sizes.py):

- A netlink attribute's length is 16 bits, so the elements of one message are cut by their
  encoded bytes: the NFTA_SET_ELEM_LIST_ELEMENTS attribute stays at most ``_MAX_ELEMENTS_BYTES``.
  A change becomes as many messages as it needs, all in the same transaction.
- One transaction is one ``sendmsg``, and ``netlink_sendmsg`` refuses a datagram longer than
  ``sk_sndbuf - 32`` with EMSGSIZE. ``sk_sndbuf`` is twice the size requested with SO_SNDBUF(FORCE)
  and is what ``getsockopt(SO_SNDBUF)`` returns: ``buffer_bytes=212_992`` gives SO_SNDBUF 425,984
  and ``max_transaction_bytes`` 425,952. SO_SNDBUFFORCE needs CAP_NET_ADMIN (which nftables needs
  anyway); without it SO_SNDBUF is capped at net.core.wmem_max (then doubled).
- nfnetlink holds back every reply of a batch until the batch is committed or aborted, then
  queues them all at once; each costs about 830 bytes of receive buffer, so a 425,984-byte buffer
  holds about 512 and the rest are dropped (ENOBUFS). Only the last message of a transaction asks
  for an acknowledgement: its reply comes after every error of the batch, and a failing message
  is reported whether or not it asked. NETLINK_CAP_ACK keeps an error reply from echoing the
  whole (up to 64 KiB) refused message.
- An element comment travels as libnftnl user data (type NFTNL_UDATA_SET_ELEM_COMMENT, a one-byte
  length, the text with its NUL, as nft writes it). The netlink policy allows 256 bytes of user
  data, but the kernel keeps at most 254: 255 bytes are refused with EINVAL, and 256 wrap its
  one-byte length to 0, so the element goes in without its comment. A comment is therefore at
  most ``MAX_COMMENT_BYTES`` (251) bytes of UTF-8, in every set of the skeleton.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELSETELEM,
    NFT_MSG_GETSETELEM,
    NFT_MSG_NEWSETELEM,
    nft_set_elem_list_msg,
)

NETLINK_NETFILTER = 12
NFPROTO_INET = 1
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_DESTROYSETELEM = 30  # delete that ignores ENOENT (Linux 6.3+)
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_MULTI = 2
# Linux's values; Python's socket module does not export them everywhere
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SOL_NETLINK = getattr(socket, "SOL_NETLINK", 270)
NETLINK_CAP_ACK = 10
NLMSGHDR = struct.Struct("=IHHII")
# The NFTA_SET_ELEM_LIST_ELEMENTS attribute of one message, header included: its length field is
# 16 bits (at most 65,535), kept 1.5 KB below that.
_MAX_ELEMENTS_BYTES = 64_000
SOCKET_BUFFER_BYTES = 32 * 1024 * 1024
_SNDBUF_RESERVE = 32  # netlink_sendmsg: a datagram longer than sk_sndbuf - 32 gets EMSGSIZE
_USERDATA_MAX = 254  # the most user data the kernel keeps with an element (module docstring)
MAX_COMMENT_BYTES = _USERDATA_MAX - 2 - 1  # less the type and length bytes and the NUL
_RECEIVE_BYTES = 1 << 20  # more than one netlink datagram holds (dumps come in <= 32 KiB)
_TIMEOUT_S = 10  # for one send or receive on the socket


_T = TypeVar("_T")
Counted = tuple[bytes, int, int]  # a counter set's element: key, packets, bytes


class Op(Enum):
    ADD = NFT_MSG_NEWSETELEM  # create or keep an existing element (no NLM_F_EXCL)
    DELETE = NFT_MSG_DELSETELEM  # fails the batch with ENOENT if absent
    DESTROY = NFT_MSG_DESTROYSETELEM  # delete if present


class Element(NamedTuple):
    """One raw set element: key bytes as the kernel stores them (see ``keys``).

    A tuple of atoms, so the garbage collector stops tracking the hundreds of thousands the
    datapath mirrors keep: full collections over a loaded datapath then cost nothing.
    """

    key: bytes
    key_end: bytes | None = None  # interval sets (pipapo): inclusive end of the range
    data: bytes | None = None  # maps: the value
    timeout_ms: int | None = None
    comment: str | None = None  # at most MAX_COMMENT_BYTES bytes of UTF-8
    expiration_ms: int | None = None  # only set on elements read back from the kernel
    counter: tuple[int, int] | None = None  # (packets, bytes), read back from counter sets

    def as_netlink(self) -> dict[str, list[object]]:
        attrs: list[object] = [["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", self.key]]}]]
        if self.key_end is not None:
            attrs.append(["NFTA_SET_ELEM_KEY_END", {"attrs": [["NFTA_DATA_VALUE", self.key_end]]}])
        if self.data is not None:
            attrs.append(["NFTA_SET_ELEM_DATA", {"attrs": [["NFTA_DATA_VALUE", self.data]]}])
        if self.timeout_ms is not None:
            attrs.append(["NFTA_SET_ELEM_TIMEOUT", self.timeout_ms])
        if self.comment is not None:
            attrs.append(
                ["NFTA_SET_ELEM_USERDATA", [("NFTNL_UDATA_SET_ELEM_COMMENT", self.comment)]]
            )
        return {"attrs": attrs}

    def identity(self) -> tuple[bytes, bytes | None]:
        """What makes two elements the same element to the kernel."""
        return (self.key, self.key_end)


@dataclass(frozen=True, slots=True)
class Change:
    op: Op
    set_name: str
    elements: tuple[Element, ...]


class NetlinkError(Exception):
    """The kernel refused a request."""

    def __init__(self, code: int, what: str) -> None:
        self.errno = code
        super().__init__(f"{what}: {os.strerror(code)} (errno {code})")


class BatchError(NetlinkError):
    """The kernel refused a batch; the transaction was aborted, nothing of it took effect."""


class TransactionTooLarge(NetlinkError):
    """A transaction would not fit in one ``sendmsg``; nothing was sent."""

    def __init__(self, table: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            errno.EMSGSIZE,
            f"table {table}: a transaction of {size} bytes exceeds the {limit} bytes one "
            "sendmsg may carry (SO_SNDBUF - 32); use apply_steps or a larger buffer_bytes",
        )


def _header(msg: nfgen_msg, msg_type: int, flags: int, seq: int) -> None:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = NFPROTO_INET


def control_with_pyroute2(msg_type: int, seq: int) -> bytes:
    """A batch begin or end message built with pyroute2 (the reference for ``_control``)."""
    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    _header(msg, msg_type, NLM_F_REQUEST, seq)
    msg["nfgen_family"] = 0
    msg.encode()
    return bytes(msg.data)


_BATCH_RES_ID = struct.Struct("!H").pack(NFNL_SUBSYS_NFTABLES)  # nfgenmsg.res_id is big endian
_CONTROL_BODY = struct.pack("=BB", 0, 0) + _BATCH_RES_ID
_CONTROL_BYTES = NLMSGHDR.size + len(_CONTROL_BODY)
_TRANSACTION_OVERHEAD = 2 * _CONTROL_BYTES  # batch begin and end around the messages


def _control(msg_type: int, seq: int) -> bytes:
    """A batch begin or end message: every transaction pays for two, so they are packed directly."""
    return NLMSGHDR.pack(_CONTROL_BYTES, msg_type, NLM_F_REQUEST, seq, 0) + _CONTROL_BODY


def messages(buffer: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) for each netlink message in a datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(buffer):
        length, msg_type, flags, seq, _pid = NLMSGHDR.unpack_from(buffer, offset)
        if length < NLMSGHDR.size:
            break
        yield msg_type, flags, seq, buffer[offset : offset + length]
        offset += (length + 3) & ~3


def _message_flags(op: Op, ack: bool = True) -> int:
    flags: int = NLM_F_REQUEST | (NLM_F_CREATE if op is Op.ADD else 0)
    return (flags | NLM_F_ACK) if ack else flags


def encode_with_pyroute2(
    table: str, change: Change, elements: Sequence[Element], seq: int, *, ack: bool = True
) -> bytes:
    """One element-list message built with pyroute2's message classes (the reference)."""
    msg = nft_set_elem_list_msg()
    _header(msg, (NFNL_SUBSYS_NFTABLES << 8) | change.op.value, _message_flags(change.op, ack), seq)
    msg["attrs"] = [
        ["NFTA_SET_ELEM_LIST_TABLE", table],
        ["NFTA_SET_ELEM_LIST_SET", change.set_name],
        ["NFTA_SET_ELEM_LIST_ELEMENTS", [element.as_netlink() for element in elements]],
    ]
    msg.encode()
    return bytes(msg.data)


# The fast path encodes the same bytes as pyroute2 (tests/unit/test_datapath_netlink.py compares
# them) with attribute numbers read from pyroute2's own maps: building pyroute2's message objects
# costs 0.4-1.6 ms for 8 elements, struct packing about 20 microseconds.
def _attribute_numbers(nla_map: Sequence[tuple[str, str]]) -> dict[str, int]:
    return {name: number for number, (name, *_rest) in enumerate(nla_map)}


_LIST = _attribute_numbers(nft_set_elem_list_msg.nla_map)
_ELEM = _attribute_numbers(nft_set_elem_list_msg.set_elem.nla_map)
_DATA = _attribute_numbers(nft_set_elem_list_msg.set_elem.data_attributes.nla_map)
_UDATA_COMMENT = nft_set_elem_list_msg.set_elem.set_elem_udata.udata_types.index(
    "NFTNL_UDATA_SET_ELEM_COMMENT"
)
_ELEMENTS = _LIST["NFTA_SET_ELEM_LIST_ELEMENTS"]
_KEY = _ELEM["NFTA_SET_ELEM_KEY"]
_KEY_END = _ELEM["NFTA_SET_ELEM_KEY_END"]
_MAP_DATA = _ELEM["NFTA_SET_ELEM_DATA"]
_TIMEOUT = _ELEM["NFTA_SET_ELEM_TIMEOUT"]
_USERDATA = _ELEM["NFTA_SET_ELEM_USERDATA"]
_VALUE = _DATA["NFTA_DATA_VALUE"]
_NLA = struct.Struct("=HH")
_NFGEN = struct.Struct("=BBH")
_U64 = struct.Struct(">Q")
_UDATA = struct.Struct("BB")


def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + bytes(-length % 4)


def _value(number: int, raw: bytes) -> bytes:
    return _nla(number, _nla(_VALUE, raw))


def _comment(text: str) -> bytes:
    raw = text.encode() + b"\0"
    if len(raw) > MAX_COMMENT_BYTES + 1:
        raise ValueError(
            f"element comment of {len(raw) - 1} bytes (UTF-8) is longer than the "
            f"{MAX_COMMENT_BYTES} bytes the kernel keeps with an element: {text[:40]!r}..."
        )
    return _nla(_USERDATA, _UDATA.pack(_UDATA_COMMENT, len(raw)) + raw)


def _element_attrs(element: Element) -> bytes:
    """The attributes of one list item: key, key end, map data, timeout, comment."""
    attrs = _value(_KEY, element.key)
    if element.key_end is not None:
        attrs += _value(_KEY_END, element.key_end)
    if element.data is not None:
        attrs += _value(_MAP_DATA, element.data)
    if element.timeout_ms is not None:
        attrs += _nla(_TIMEOUT, _U64.pack(element.timeout_ms))
    if element.comment is not None:
        attrs += _comment(element.comment)
    return attrs


@functools.lru_cache(maxsize=256)
def _list_head(table: str, set_name: str) -> bytes:
    """The part of an element-list message before its elements: the same for every change."""
    return (
        _NFGEN.pack(NFPROTO_INET, 0, 0)
        + _nla(_LIST["NFTA_SET_ELEM_LIST_TABLE"], table.encode() + b"\0")
        + _nla(_LIST["NFTA_SET_ELEM_LIST_SET"], set_name.encode() + b"\0")
    )


def _body(head: bytes, items: Sequence[bytes]) -> bytes:
    """Everything after the netlink header; list items are numbered from 1, as pyroute2 does."""
    listed = b"".join([_NLA.pack(_NLA.size + len(a), i) + a for i, a in enumerate(items, 1)])
    return head + _NLA.pack(_NLA.size + len(listed), _ELEMENTS) + listed


def encode_elements(
    table: str, change: Change, elements: Sequence[Element], seq: int, *, ack: bool = True
) -> bytes:
    """One element-list message holding ``elements`` (see ``encode_change`` to split a change).

    Raises ValueError if they do not fit in one message or a comment is too long.
    """
    items = [_element_attrs(element) for element in elements]
    size = _NLA.size + sum(_NLA.size + len(a) for a in items)
    if size > 0xFFFF:
        raise ValueError(
            f"{len(items)} elements take {size} bytes, more than one netlink attribute holds"
        )
    body = _body(_list_head(table, change.set_name), items)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | change.op.value
    flags = _message_flags(change.op, ack)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


_UNLIMITED = 1 << 62  # a plan of one transaction; apply() checks its size afterwards


class _Message(NamedTuple):
    """One element-list message without its netlink header: change[start:end] of a plan."""

    change: int  # index of the change in the planned sequence
    start: int
    end: int
    kind: int
    flags: int  # without NLM_F_ACK: only the last message of a transaction asks for one
    body: bytes


def _plan(
    table: str,
    changes: Iterable[Change],
    transaction_bytes: int,
    elements_bytes: int = _MAX_ELEMENTS_BYTES,
) -> list[list[_Message]]:
    """Cut ``changes`` into messages and the messages into transactions, keeping their order.

    A message ends when its elements attribute would pass ``elements_bytes``, or when the
    transaction it is in would pass ``transaction_bytes``; the next element then starts a new
    message, and a new transaction if the current one is full. Raises TransactionTooLarge if one
    element alone does not fit in a transaction.
    """
    transactions: list[list[_Message]] = []
    current: list[_Message] = []
    used = _TRANSACTION_OVERHEAD  # bytes of the current transaction, its closed messages
    for index, change in enumerate(changes):
        if not change.elements:
            continue
        head = _list_head(table, change.set_name)
        overhead = NLMSGHDR.size + len(head) + _NLA.size  # a message with no elements
        kind = (NFNL_SUBSYS_NFTABLES << 8) | change.op.value
        flags = _message_flags(change.op, ack=False)
        items: list[bytes] = []
        start = 0
        size = 0  # bytes of the open message's list items
        for position, element in enumerate(change.elements):
            attrs = _element_attrs(element)
            item = _NLA.size + len(attrs)
            if items and (
                _NLA.size + size + item > elements_bytes
                or used + overhead + size + item > transaction_bytes
            ):
                current.append(_Message(index, start, position, kind, flags, _body(head, items)))
                used += overhead + size
                items, start, size = [], position, 0
            if not items and used + overhead + item > transaction_bytes:
                if _TRANSACTION_OVERHEAD + overhead + item > transaction_bytes:
                    raise TransactionTooLarge(
                        table, _TRANSACTION_OVERHEAD + overhead + item, transaction_bytes
                    )
                transactions.append(current)
                current, used = [], _TRANSACTION_OVERHEAD
            items.append(attrs)
            size += item
        end = len(change.elements)
        current.append(_Message(index, start, end, kind, flags, _body(head, items)))
        used += overhead + size
    if current:
        transactions.append(current)
    return transactions


def encode_change(table: str, change: Change, seq: int) -> list[bytes]:
    """The element-list messages of one change, each within the attribute size limit.

    Sequence numbers count up from ``seq``; every message asks for an acknowledgement.
    """
    messages = _plan(table, [change], _UNLIMITED)
    out = []
    for offset, message in enumerate(messages[0] if messages else ()):
        length = NLMSGHDR.size + len(message.body)
        flags = message.flags | NLM_F_ACK
        out.append(NLMSGHDR.pack(length, message.kind, flags, seq + offset, 0) + message.body)
    return out


class NftSocket:
    """A netfilter netlink socket bound to the network namespace it was opened in.

    ``buffer_bytes`` is the send and receive buffer size requested (SO_SNDBUFFORCE, or SO_SNDBUF
    capped at net.core.wmem_max without CAP_NET_ADMIN); ``max_transaction_bytes`` is what the
    kernel then accepts in one transaction. ``sock`` is an already created NETLINK_NETFILTER
    socket to use instead of a new one (it is configured and bound the same way).
    """

    def __init__(
        self,
        table: str,
        buffer_bytes: int = SOCKET_BUFFER_BYTES,
        *,
        sock: socket.socket | None = None,
    ) -> None:
        self.table = table
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock = sock
        for forced, capped in (
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, buffer_bytes)
            except OSError:  # *BUFFORCE needs CAP_NET_ADMIN; fall back to the capped size
                sock.setsockopt(socket.SOL_SOCKET, capped, buffer_bytes)
        # error replies without the refused message (before Linux 4.3 they echo it: larger, fine)
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        # the kernel doubles the requested size; getsockopt returns the doubled sk_sndbuf
        self.send_buffer_bytes: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.max_transaction_bytes: int = self.send_buffer_bytes - _SNDBUF_RESERVE
        # a blocking socket with kernel timeouts: settimeout() would add a poll(2) before every
        # send and receive
        timeout = struct.pack("ll", _TIMEOUT_S, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        self._seq = 0
        self._lock = threading.Lock()
        # one receive buffer for the socket's life: a fresh megabyte per recv() would be mapped,
        # faulted in and unmapped again for every acknowledgement
        self._buffer = bytearray(_RECEIVE_BYTES)
        self._view = memoryview(self._buffer)

    def _recv(self, wait: bool = True) -> bytes:
        """One datagram; without ``wait``, BlockingIOError when nothing is queued."""
        if not wait:
            size = self._sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            return self._view[:size].tobytes()
        try:
            size = self._sock.recv_into(self._buffer)
        except BlockingIOError as exc:  # SO_RCVTIMEO ran out
            raise TimeoutError(f"table {self.table}: no answer from the kernel") from exc
        return self._view[:size].tobytes()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except BlockingIOError as exc:  # SO_SNDTIMEO ran out
            raise TimeoutError(f"table {self.table}: the kernel took no message") from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NftSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def _encode(self, change: Change, elements: Sequence[Element], seq: int) -> bytes:
        """One element-list message for this table (loadtest/datapath.py times it)."""
        return encode_elements(self.table, change, elements, seq)

    def apply(self, changes: Iterable[Change]) -> int:
        """Send every change as one transaction; return the number of elements touched.

        Raises ``TransactionTooLarge`` (nothing sent) if the changes do not fit in one
        transaction, and ``BatchError`` naming the first operation the kernel refused.
        """
        planned = changes if isinstance(changes, list | tuple) else list(changes)
        with self._lock:
            transactions = _plan(self.table, planned, _UNLIMITED)
            if not transactions:
                return 0
            messages = transactions[0]
            self._transact(planned, messages)
            return sum(message.end - message.start for message in messages)

    def apply_steps(
        self, steps: Sequence[Sequence[Change]], committed: Callable[[Change], None]
    ) -> int:
        """Send changes larger than one transaction as several, in order; return the elements.

        The changes of all steps are cut into messages and packed greedily, in their order, into
        transactions of at most ``max_transaction_bytes``: a change may be split between two
        transactions (its first elements go first) and a step need not start a transaction,
        but the kernel sees every element operation in the order of ``steps``. After each
        transaction is acknowledged, ``committed`` gets, in order, one ``Change`` per change it
        carried with the elements it carried, so a mirror can follow the kernel exactly; it runs
        with this socket's lock held and must not use the socket (if it raises, nothing more is
        sent).

        Raises ``TransactionTooLarge`` before sending anything if a single element does not fit
        in a transaction. Raises ``BatchError`` if a transaction fails: the transactions before
        it stay committed (and were reported), nothing of the failed one or later took effect.
        """
        changes = [change for step in steps for change in step]
        with self._lock:
            transactions = _plan(self.table, changes, self.max_transaction_bytes)
            count = 0
            for messages in transactions:
                self._transact(changes, messages)
                for change in _carried(changes, messages):
                    count += len(change.elements)
                    committed(change)
            return count

    def _transact(self, changes: Sequence[Change], messages: Sequence[_Message]) -> None:
        """Send ``messages`` as one transaction and wait for the kernel's verdict."""
        begin = self._next_seq()
        parts = [_control(NFNL_MSG_BATCH_BEGIN, begin)]
        sent: dict[int, _Message] = {}
        seq = begin
        last = len(messages) - 1
        for position, message in enumerate(messages):
            seq = self._next_seq()
            flags = (message.flags | NLM_F_ACK) if position == last else message.flags
            parts.append(
                NLMSGHDR.pack(NLMSGHDR.size + len(message.body), message.kind, flags, seq, 0)
            )
            parts.append(message.body)
            sent[seq] = message
        parts.append(_control(NFNL_MSG_BATCH_END, self._next_seq()))
        data = b"".join(parts)
        if len(data) > self.max_transaction_bytes:
            raise TransactionTooLarge(self.table, len(data), self.max_transaction_bytes)
        self._send(data)
        self._collect(changes, begin, sent, seq)

    def _collect(
        self, changes: Sequence[Change], begin: int, sent: dict[int, _Message], last: int
    ) -> None:
        """Read replies up to the acknowledgement of message ``last``.

        Errors come in message order before that acknowledgement (a failed commit, reported
        against the batch begin, before them). Once the kernel reported a failure, or replies
        were dropped, everything it will send is already queued: read it without waiting.
        """
        failure: BatchError | None = None
        wait = True
        done = False
        while not done:
            try:
                buffer = self._recv(wait)
            except BlockingIOError:
                break  # nothing more queued
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                wait = False  # the receive buffer overflowed: the last replies are gone
                continue
            for msg_type, _flags, seq, raw in messages(buffer):
                if msg_type != NLMSG_ERROR or (seq != begin and seq not in sent):
                    continue  # late replies of an earlier, failed batch
                (code,) = struct.unpack_from("=i", raw, NLMSGHDR.size)
                if code and failure is None:
                    what = _describe(changes, sent[seq]) if seq in sent else "transaction"
                    failure = BatchError(-code, f"table {self.table}: {what}")
                done = done or seq == last
            if failure is not None:
                wait = False
        if failure is not None:
            raise failure
        if not done:
            raise NetlinkError(
                errno.ENOBUFS,
                f"table {self.table}: the kernel's replies overflowed the receive buffer; "
                "whether the transaction took effect is unknown",
            )

    def dump(self, set_name: str) -> list[Element]:
        """Every element of one set, with timeouts and remaining lifetimes."""
        return self._dump(set_name, _decode_elements)

    def dump_counters(self, set_name: str) -> list[Counted]:
        """(key, packets, bytes) of every element of a set whose elements have counters.

        The same figures as ``dump`` gives in ``Element.counter`` (0 for an element without a
        counter), read without building an ``Element`` per element: a scrape reads two such
        sets of one element per identity (see ``_decode_counted``).
        """
        return self._dump(set_name, _decode_counted)

    def _dump(self, set_name: str, decode: Callable[[bytes], Iterable[_T]]) -> list[_T]:
        """Everything ``decode`` finds in the element-list messages of one set's dump."""
        with self._lock:
            seq = self._next_seq()
            flags = NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK
            body = _list_head(self.table, set_name)
            kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
            self._send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body)
            found: list[_T] = []
            while True:
                buffer = self._recv()
                for msg_type, _flags, reply_seq, raw in messages(buffer):
                    if reply_seq != seq:
                        continue
                    if msg_type == NLMSG_DONE:
                        return found
                    if msg_type == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", raw, NLMSGHDR.size)
                        if code:
                            raise NetlinkError(-code, f"dump {self.table}/{set_name}")
                        return found
                    found.extend(decode(raw))


def _describe(changes: Sequence[Change], message: _Message) -> str:
    change = changes[message.change]
    count = message.end - message.start
    return f"{change.op.name.lower()} {count} element(s) {change.set_name}"


def _carried(changes: Sequence[Change], messages: Sequence[_Message]) -> Iterator[Change]:
    """One Change per change in ``messages`` (in order), with the elements they carry."""
    position = 0
    while position < len(messages):
        first = messages[position]
        while position + 1 < len(messages) and messages[position + 1].change == first.change:
            position += 1
        end = messages[position].end
        change = changes[first.change]
        if first.start == 0 and end == len(change.elements):
            yield change
        else:
            yield Change(change.op, change.set_name, change.elements[first.start : end])
        position += 1


# Dumps are decoded with struct too: pyroute2's message objects each refer to themselves
# (``nlmsg_base.chain = [self]``), so every decoded message, attribute and element is garbage that
# only the cyclic collector frees, and the daemon freezes what is alive or not yet collected
# (``runtime.Daemon._collect_young``): each scrape of the counters leaked ~100k objects.
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_EXPIRATION = _ELEM["NFTA_SET_ELEM_EXPIRATION"]
_EXPR = _ELEM["NFTA_SET_ELEM_EXPR"]
_EXPRESSIONS = _ELEM["NFTA_SET_ELEM_EXPRESSIONS"]
_EXPR_NAME, _EXPR_DATA = 1, 2  # NFTA_EXPR_NAME, NFTA_EXPR_DATA
_COUNTER_BYTES, _COUNTER_PACKETS = 1, 2  # NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS


def attributes(raw: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in ``raw[start:end]``."""
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(raw, start)
        if length < _NLA.size or start + length > end:
            return
        yield kind & _NLA_TYPE_MASK, start + _NLA.size, start + length
        start += (length + 3) & ~3


def _data_value(raw: bytes, start: int, end: int) -> bytes | None:
    for kind, first, last in attributes(raw, start, end):
        if kind == _VALUE:
            return raw[first:last]
    return None


def _counter(raw: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(packets, bytes) if the expression ``raw[start:end]`` is a counter."""
    name, data = b"", None
    for kind, first, last in attributes(raw, start, end):
        if kind == _EXPR_NAME:
            name = raw[first:last].rstrip(b"\0")
        elif kind == _EXPR_DATA:
            data = (first, last)
    if name != b"counter" or data is None:
        return None
    values = {kind: _U64.unpack_from(raw, first)[0] for kind, first, _ in attributes(raw, *data)}
    return (values.get(_COUNTER_PACKETS, 0), values.get(_COUNTER_BYTES, 0))


def _comment_of(raw: bytes, start: int, end: int) -> str | None:
    """The comment in libnftnl user data: (type, length, value) records."""
    comment = None
    while start + _UDATA.size <= end:
        kind, length = _UDATA.unpack_from(raw, start)
        start += _UDATA.size
        if start + length > end:
            return None
        if kind == _UDATA_COMMENT:
            value = raw[start : start + length]
            comment = (value[:-1] if value.endswith(b"\0") else value).decode()
        start += length
    return comment


def _decode_elements(raw: bytes) -> Iterator[Element]:
    """The elements of one dumped element-list message (header included)."""
    for kind, first, last in attributes(raw, NLMSGHDR.size + _NFGEN.size, len(raw)):
        if kind == _ELEMENTS:
            for _index, start, end in attributes(raw, first, last):
                yield _decode_element(raw, start, end)


def _decode_element(raw: bytes, start: int, end: int) -> Element:
    key = key_end = data = comment = None
    timeout = expiration = None
    counter = None
    for kind, first, last in attributes(raw, start, end):
        if kind == _KEY:
            key = _data_value(raw, first, last)
        elif kind == _KEY_END:
            key_end = _data_value(raw, first, last)
        elif kind == _MAP_DATA:
            data = _data_value(raw, first, last)
        elif kind == _TIMEOUT:
            (timeout,) = _U64.unpack_from(raw, first)
        elif kind == _EXPIRATION:
            (expiration,) = _U64.unpack_from(raw, first)
        elif kind == _USERDATA:
            comment = _comment_of(raw, first, last)
        elif kind == _EXPR:
            counter = _counter(raw, first, last) or counter
        elif kind == _EXPRESSIONS:
            for _listed, lfirst, llast in attributes(raw, first, last):
                counter = _counter(raw, lfirst, llast) or counter
    return Element(
        key=key or b"",
        key_end=key_end,
        data=data,
        timeout_ms=timeout,
        expiration_ms=expiration,
        comment=comment,
        counter=counter,
    )


# A counter set's element with a 4-byte key (a mark), as Linux dumps it: the list item, the key
# (NFTA_SET_ELEM_KEY > NFTA_DATA_VALUE), then one expression (NFTA_SET_ELEM_EXPR > NAME
# "counter", DATA > BYTES, PACKETS, both big-endian u64, unpadded where the CPU reads unaligned
# 64-bit values). Every header is checked against this layout; any other layout (another key
# size, padding, more attributes) is decoded attribute by attribute instead.
_COUNTED_KEY_BYTES = 4
_COUNTED_ITEM = struct.Struct(">12s4s24sQ4sQ")
_COUNTED_PREFIX = (
    _NLA.pack(_COUNTED_ITEM.size, 1)
    + _NLA.pack(2 * _NLA.size + _COUNTED_KEY_BYTES, _KEY)
    + _NLA.pack(_NLA.size + _COUNTED_KEY_BYTES, _VALUE)
)
_COUNTED_MIDDLE = (
    _NLA.pack(44, _EXPR)
    + _NLA.pack(12, _EXPR_NAME)
    + b"counter\0"
    + _NLA.pack(28, _EXPR_DATA)
    + _NLA.pack(12, _COUNTER_BYTES)
)
_COUNTED_PACKETS = _NLA.pack(12, _COUNTER_PACKETS)


def _decode_counted(raw: bytes) -> list[Counted]:
    """(key, packets, bytes) of each element of one dumped element-list message.

    Elements in the kernel's usual layout are unpacked with one ``struct`` call per message,
    which is what makes a scrape of 30,000 identities cheap; a message with any element in
    another layout is decoded as ``dump`` decodes it, so both give the same figures.
    """
    found: list[Counted] = []
    for kind, first, last in attributes(raw, NLMSGHDR.size + _NFGEN.size, len(raw)):
        if kind != _ELEMENTS:
            continue
        if (last - first) % _COUNTED_ITEM.size == 0:
            fast = [
                (key, packets, octets)
                for prefix, key, middle, octets, packets_header, packets in (
                    _COUNTED_ITEM.iter_unpack(raw[first:last])
                )
                if prefix == _COUNTED_PREFIX
                and middle == _COUNTED_MIDDLE
                and packets_header == _COUNTED_PACKETS
            ]
            if len(fast) * _COUNTED_ITEM.size == last - first:
                found.extend(fast)
                continue
        for _index, start, end in attributes(raw, first, last):
            element = _decode_element(raw, start, end)
            packets, octets = element.counter or (0, 0)
            found.append((element.key, packets, octets))
    return found
