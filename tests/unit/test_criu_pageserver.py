"""CRIU's page-server protocol, server side (sans-IO): layout, chunking, garbage, rules."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tug.engine.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT
from tug.engine.errors import MigrationError, ProtocolError
from tug.transports.criu_pageserver import (
    HEADER,
    MAX_ENTRY_PAGES,
    PAGE_SIZE,
    PS_IOV_ADD,
    PS_IOV_ADD_F,
    PS_IOV_CLOSE,
    PS_IOV_GET,
    PS_IOV_HOLE,
    PS_IOV_OPEN,
    PS_IOV_OPEN2,
    Event,
    Kind,
    Pages,
    PageServerParser,
    PageServerProtocolError,
    reply_close,
    reply_open,
    reply_parent,
)

from .psclient import Session, dst, page, plain, psi

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
P, S = Kind.PROCESS, Kind.SHMEM


def session() -> Session:
    """A dump as CRIU 4.2 sends it: two tasks, then a shmem object, then CLOSE."""
    s = Session()
    s.open(P, 1).add(P, 1, 0x400000, page(1, 0) + page(1, 1)).add(P, 1, 0x7F0000001000, page(1, 2), flags=PE_PRESENT)
    s.open(P, 2).add(P, 2, 0x400000, page(2, 0))
    s.parent(P, 3)
    s.open(S, 4242).add(S, 4242, 0, page(3, 0) + page(3, 1) + page(3, 2))
    return s.close()


def feed_all(parser: PageServerParser, wire: bytes, cuts: list[int]) -> list[tuple[object, ...]]:
    """Feed ``wire`` split at ``cuts`` and EOF; events as plain tuples (data copied at once)."""
    out: list[tuple[object, ...]] = []
    bounds = [0, *sorted(set(cuts)), len(wire)]
    for lo, hi in zip(bounds, bounds[1:]):
        out += [plain(ev) for ev in parser.feed(wire[lo:hi])]
    parser.feed_eof()
    return out


def recv_all(parser: PageServerParser, wire: bytes, sizes: list[int]) -> list[tuple[object, ...]]:
    """What the asyncio server does: payload straight into receive_buffer, the rest via feed.

    ``sizes`` are the successive recv() sizes the kernel returns (cycled).
    """
    out: list[tuple[object, ...]] = []
    pos, k = 0, 0
    while pos < len(wire):
        n = min(max(1, sizes[k % len(sizes)]) if sizes else len(wire), len(wire) - pos)
        k += 1
        buf = parser.receive_buffer()
        if buf is not None:
            with buf:
                n = min(n, len(buf))
                buf[:n] = wire[pos : pos + n]
            events: list[Event] = parser.received(n)
        else:
            events = parser.feed(wire[pos : pos + n])
        pos += n
        out += [plain(ev) for ev in events]
    parser.feed_eof()
    return out


# --- 1. layout and replies, as verified in criu/page-xfer.c -------------------------


def test_header_is_page_server_iov_with_natural_padding() -> None:
    assert HEADER.size == 32
    raw = psi(PS_IOV_ADD_F, nr_pages=0x0102, vaddr=0x7F00AABB1000, dst_id=dst(P, 77), flags=PE_PRESENT | PE_LAZY)
    assert raw[0:4] == struct.pack("<I", (PE_PRESENT | PE_LAZY) << 16 | PS_IOV_ADD_F)
    assert raw[4:8] == b"\0\0\0\0"  # padding before the first u64
    assert raw[8:16] == struct.pack("<Q", 0x0102)
    assert raw[16:24] == struct.pack("<Q", 0x7F00AABB1000)
    assert raw[24:32] == struct.pack("<Q", 77 << 8 | 1)


def test_replies() -> None:
    assert reply_open(False) == b"\x00" and reply_open(True) == b"\x01"
    assert reply_parent(False) == struct.pack("<i", 0) and reply_parent(True) == struct.pack("<i", 1)
    assert reply_close() == b"\0\0\0\0" and reply_close(-1) == b"\xff\xff\xff\xff"


def test_error_is_one_class_in_the_hierarchy() -> None:
    assert issubclass(PageServerProtocolError, ProtocolError) and issubclass(ProtocolError, MigrationError)


# --- 2. whole, byte by byte, direct receive ------------------------------------------


def test_whole_session() -> None:
    s = session()
    assert feed_all(PageServerParser(), bytes(s.wire), []) == s.expected


def test_byte_by_byte() -> None:
    s = session()
    wire = bytes(s.wire)
    assert feed_all(PageServerParser(), wire, list(range(len(wire)))) == s.expected


@pytest.mark.parametrize("sizes", [[1], [7, 4096, 3], [65536], [32, 4096], []])
def test_direct_receive(sizes: list[int]) -> None:
    s = session()
    assert recv_all(PageServerParser(), bytes(s.wire), sizes) == s.expected


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "hole", "parent", "open"]),
        st.sampled_from([P, S]),
        st.integers(1, 2**40),
        st.integers(0, 2**36),
        st.integers(1, 5),
        st.integers(0, 0xFFFF),
    ),
    max_size=12,
)


def build(program: list[tuple[str, Kind, int, int, int, int]]) -> Session:
    """A session as CRIU would send it: every entry's pagemap opened first (OPEN2)."""
    s = Session()
    current: tuple[Kind, int] | None = None
    for i, (op, kind, ident, vpage, n, flags) in enumerate(program):
        vaddr = vpage * PAGE_SIZE
        if op == "parent":
            s.parent(kind, ident)
            continue
        if op == "open" or current != (kind, ident):
            s.open(kind, ident)
            current = (kind, ident)
        if op == "hole":
            s.hole(kind, ident, vaddr, n, flags & ~PE_PRESENT)
        elif op == "add":
            s.add(kind, ident, vaddr, b"".join(page(i, k) for k in range(n)), flags | PE_PRESENT)
    return s.close(force=len(program) % 2 == 1)


@FAST
@given(program=ops, data=st.data())
def test_any_chunking_gives_the_same_events(program: list[tuple[str, Kind, int, int, int, int]], data: st.DataObject) -> None:
    s = build(program)
    wire = bytes(s.wire)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    assert feed_all(PageServerParser(), wire, cuts) == s.expected
    sizes = data.draw(st.lists(st.integers(1, 3 * PAGE_SIZE), min_size=1, max_size=8))
    assert recv_all(PageServerParser(), wire, sizes) == s.expected


# --- 3. garbage only ever raises PageServerProtocolError --------------------------------


def survive(wire: bytes, cuts: list[int]) -> str | None:
    """Feed garbage; only PageServerProtocolError may come out, and then the parser is dead."""
    parser = PageServerParser()
    try:
        feed_all(parser, wire, cuts)
    except PageServerProtocolError as exc:
        with pytest.raises(PageServerProtocolError, match="already failed"):
            parser.feed(b"\0")
        with pytest.raises(PageServerProtocolError):
            parser.feed_eof()
        return str(exc)
    return None


@FAST
@given(garbage=st.binary(max_size=800), data=st.data())
def test_garbage_only_raises_protocol_error(garbage: bytes, data: st.DataObject) -> None:
    survive(garbage, data.draw(st.lists(st.integers(0, len(garbage)), max_size=10)))


@FAST
@given(
    cmd=st.integers(0, 2**32 - 1),
    nr=st.integers(0, 2**64 - 1) | st.integers(0, 40),
    vaddr=st.integers(0, 2**64 - 1) | st.integers(0, 2**20).map(lambda p: p * PAGE_SIZE),
    dst_id=st.integers(0, 2**64 - 1) | st.integers(0, 2**20).map(lambda i: i << 8 | 1),
    tail=st.binary(max_size=300),
)
def test_random_headers_only_raise_protocol_error(cmd: int, nr: int, vaddr: int, dst_id: int, tail: bytes) -> None:
    """Structured garbage: real-looking headers get past the framing into the checks."""
    wire = HEADER.pack(cmd, nr, vaddr, dst_id) + tail
    survive(wire, [])
    survive(wire, list(range(0, len(wire), 5)))


mutation = st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6), st.integers(1, 255))


@FAST
@given(mutations=st.lists(mutation, min_size=1, max_size=4), data=st.data())
def test_mutated_sessions_only_raise_protocol_error(mutations: list[tuple[str, int, int]], data: st.DataObject) -> None:
    wire = bytearray(session().wire)
    for op, where, value in mutations:
        i = where % (len(wire) + 1)
        if op == "insert":
            wire.insert(i, value)
        elif i < len(wire):
            if op == "flip":
                wire[i] ^= value
            else:
                del wire[i]
    raw = bytes(wire)
    chunked = survive(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    whole = survive(raw, [])
    assert (chunked is None) == (whole is None)


# --- 4. rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (psi(0x99), "unknown page-server command 0x99"),
        (psi(0), "unknown page-server command 0x0"),
        (psi(PS_IOV_GET, nr_pages=1, dst_id=dst(P, 1)), "PS_IOV_GET"),
        (psi(PS_IOV_OPEN2, dst_id=5 << 8 | 3), "unknown pagemap type 3"),
        (psi(PS_IOV_OPEN2, dst_id=0 << 8 | 1), "pagemap id 0"),
        (psi(PS_IOV_ADD_F, nr_pages=0, dst_id=dst(P, 1), flags=PE_PRESENT), "has 0 pages"),
        (psi(PS_IOV_ADD_F, nr_pages=MAX_ENTRY_PAGES + 1, dst_id=dst(P, 1), flags=PE_PRESENT), "limit"),
        (psi(PS_IOV_ADD_F, nr_pages=2**63, dst_id=dst(P, 1), flags=PE_PARENT), "limit"),
        (psi(PS_IOV_ADD_F, nr_pages=1, vaddr=0x1234, dst_id=dst(P, 1), flags=PE_PRESENT), "unaligned"),
        (psi(PS_IOV_ADD_F, nr_pages=2, vaddr=2**64 - PAGE_SIZE, dst_id=dst(P, 1), flags=PE_PARENT), "wraps"),
        (psi(PS_IOV_CLOSE) + b"x", "data after PS_IOV_CLOSE"),
        (psi(PS_IOV_CLOSE) + psi(PS_IOV_CLOSE), "data after PS_IOV_CLOSE"),
        (b"", "before PS_IOV_CLOSE"),
        (psi(PS_IOV_OPEN2, dst_id=dst(P, 1)), "before PS_IOV_CLOSE"),
        (psi(PS_IOV_OPEN2, dst_id=dst(P, 1))[:31], "in a request header \\(31 of 32"),
        (psi(PS_IOV_ADD_F, nr_pages=2, dst_id=dst(P, 1), flags=PE_PRESENT) + b"x" * 5000, "5000 of 8192"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed(wire: bytes, match: str) -> None:
    for cuts in ([], list(range(len(wire)))):
        with pytest.raises(PageServerProtocolError, match=match):
            feed_all(PageServerParser(), wire, cuts)


def test_smaller_entry_limit() -> None:
    wire = psi(PS_IOV_ADD_F, nr_pages=5, dst_id=dst(P, 1), flags=PE_PARENT)
    with pytest.raises(PageServerProtocolError, match="limit 4"):
        PageServerParser(max_entry_pages=4).feed(wire)
    assert [plain(e) for e in PageServerParser(max_entry_pages=5).feed(wire)][-1] == ("hole", P, 1, 0, 5, PE_PARENT)


def test_legacy_commands_and_types() -> None:
    """PS_IOV_OPEN/ADD/HOLE and the type numbers of CRIU 1.x-3.x (decode_pm)."""
    wire = (
        psi(PS_IOV_OPEN, dst_id=9 << 8 | 11)
        + psi(PS_IOV_ADD, nr_pages=1, vaddr=PAGE_SIZE, dst_id=9 << 8 | 11)
        + page(9, 0)
        + psi(PS_IOV_HOLE, nr_pages=3, vaddr=8 * PAGE_SIZE, dst_id=9 << 8 | 11)
        + psi(PS_IOV_ADD, nr_pages=1, dst_id=4 << 8 | 34)  # implicit open of shmem 4
        + page(4, 0)
        + psi(PS_IOV_CLOSE)
    )
    assert feed_all(PageServerParser(), wire, []) == [
        ("open", P, 9, False),
        ("pages", P, 9, PAGE_SIZE, 1, PE_PRESENT, page(9, 0)),
        ("hole", P, 9, 8 * PAGE_SIZE, 3, PE_PARENT),
        ("open", S, 4, False),
        ("pages", S, 4, 0, 1, PE_PRESENT, page(4, 0)),
        ("close", False),
    ]


def test_eof_after_close_is_fine_and_closed_says_so() -> None:
    parser = PageServerParser()
    parser.feed(psi(PS_IOV_OPEN2, dst_id=dst(P, 1)))
    assert not parser.closed
    parser.feed(psi(PS_IOV_CLOSE))
    assert parser.closed
    parser.feed_eof()


def test_received_checks_its_count() -> None:
    parser = PageServerParser()
    assert parser.receive_buffer() is None
    parser.feed(psi(PS_IOV_ADD_F, nr_pages=1, dst_id=dst(P, 1), flags=PE_PRESENT))
    assert parser.in_payload
    with pytest.raises(ValueError):
        parser.received(PAGE_SIZE + 1)
    with pytest.raises(ValueError):
        parser.received(0)


# --- 5. buffers ----------------------------------------------------------------------


def test_payload_buffers_are_reused_once_released_and_never_overwritten_while_held() -> None:
    parser = PageServerParser()
    parser.feed(psi(PS_IOV_OPEN2, dst_id=dst(P, 1)))
    n = 32  # 128 KiB: large enough for the pooled buffers

    def entry(tag: int, pages: int = n) -> Pages:
        wire = psi(PS_IOV_ADD_F, nr_pages=pages, dst_id=dst(P, 1), flags=PE_PRESENT) + b"".join(page(tag, k) for k in range(pages))
        (ev,) = parser.feed(wire)
        assert isinstance(ev, Pages)
        return ev

    first = entry(1)
    held = first.data[:PAGE_SIZE]  # a consumer that keeps a view
    a = first.data.obj
    del first
    second = entry(2)
    b = second.data.obj
    assert b is not a, "a held view must keep its buffer"
    assert bytes(held) == page(1, 0)
    del held, second
    third = entry(3)
    assert third.data.obj is a or third.data.obj is b, "a released buffer is reused"
    assert bytes(third.data) == b"".join(page(3, k) for k in range(n))
    del third
    small = entry(4, pages=2)
    assert small.data.obj is not a and small.data.obj is not b, "small entries never pin the pooled buffers"
    fifth = entry(5)
    assert fifth.data.obj is a or fifth.data.obj is b, "the pool still serves large entries"


def test_throughput() -> None:
    """64 MiB in 4 MiB entries: chunked feed and direct receive both well above link rates."""
    entry = b"".join(page(5, k) for k in range(1024))
    one = psi(PS_IOV_ADD_F, nr_pages=1024, dst_id=dst(P, 1), flags=PE_PRESENT | PE_LAZY) + entry
    wire = psi(PS_IOV_OPEN2, dst_id=dst(P, 1)) + one * 16 + psi(PS_IOV_CLOSE)
    t0 = time.perf_counter()
    parser = PageServerParser()
    n = 0
    for i in range(0, len(wire), 1 << 18):
        for ev in parser.feed(wire[i : i + (1 << 18)]):
            if isinstance(ev, Pages):
                n += len(ev.data)
    parser.feed_eof()
    fed = time.perf_counter() - t0
    assert n == 64 << 20
    assert fed < 2.0, f"64 MiB through feed() took {fed:.2f} s"


def test_sysv_segment_with_shmid_0_is_a_shmem_pagemap() -> None:
    """The first SysV segment of a fresh IPC namespace has shmid 0, and CRIU
    sends its pagemap as shmem id 0: accepted, whole and byte by byte (a
    task's pagemap id, its pid, is never 0: refused above)."""
    s = Session()
    s.open(P, 1).add(P, 1, 0x400000, page(1, 0))
    s.open(S, 0).add(S, 0, 0, page(3, 0) + page(3, 1))
    s.close()
    wire = bytes(s.wire)
    assert feed_all(PageServerParser(), wire, []) == s.expected
    assert feed_all(PageServerParser(), wire, list(range(len(wire)))) == s.expected
