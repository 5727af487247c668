"""The hybrid fill's records: whole, byte by byte, fuzzed; answers matched strictly in order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.transports import hybrid_wire as w
from tug.transports.hybrid_wire import PAGE

PID = 5


def data(n: int, fill: int = 7) -> bytes:
    return bytes([fill]) * (n * PAGE)


SOURCE_SAYS = [
    w.Same(PID, 0x10000, 3),
    w.Pages(PID, 0x13000, 2, data(2)),
    w.Fail(PID, 0x20000, 1),
    w.Done(),
    w.Ended(True),
    w.Ended(False),
]
DEST_SAYS = [w.Get(PID, 0x10000, 5), w.Ack(123456), w.Get(PID + 1, 0x7000, 1), w.End()]


def test_whole_stream_each_way() -> None:
    assert w.Parser.at_destination().feed(b"".join(map(w.encode, SOURCE_SAYS))) == SOURCE_SAYS
    assert w.Parser.at_source().feed(b"".join(map(w.encode, DEST_SAYS))) == DEST_SAYS


def test_byte_by_byte() -> None:
    raw = b"".join(map(w.encode, SOURCE_SAYS))
    p = w.Parser.at_destination()
    got: list[w.Record] = []
    for i in range(len(raw)):
        got += p.feed(raw[i : i + 1])
    assert got == SOURCE_SAYS


def test_header_layout_is_exact() -> None:
    raw = w.encode(w.Get(PID, 0x7000, 3))
    assert raw == bytes([w.GET, 0, 0, 0]) + PID.to_bytes(4, "little") + (0x7000).to_bytes(8, "little") + (3).to_bytes(8, "little")


@pytest.mark.parametrize(
    "raw",
    [
        w.HEADER.pack(w.GET, PID, 0x1000, 1),  # a request sent to the destination
        w.HEADER.pack(99, PID, 0x1000, 1),  # unknown kind
        w.HEADER.pack(w.SAME, 0, 0x1000, 1),  # pid 0
        w.HEADER.pack(w.SAME, 1 << 31, 0x1000, 1),  # pid out of range
        w.HEADER.pack(w.SAME, PID, 0x1001, 1),  # unaligned
        w.HEADER.pack(w.SAME, PID, 0x1000, 0),  # empty
        w.HEADER.pack(w.SAME, PID, 0x1000, w.MAX_PAGES + 1),  # too long
        w.HEADER.pack(w.SAME, PID, (1 << 64) - PAGE, 2),  # wraps
        w.HEADER.pack(w.DONE, PID, 0, 0),  # DONE with a range
        w.HEADER.pack(w.ENDED, 0, 0, 2),  # a status that is neither ok nor failed
        bytes([w.SAME, 1, 0, 0]) + w.HEADER.pack(w.SAME, PID, 0x1000, 1)[4:],  # padding not zero
    ],
)
def test_malformed_records_are_protocol_errors_and_the_parser_stays_dead(raw: bytes) -> None:
    p = w.Parser.at_destination()
    with pytest.raises(w.HybridWireError):
        p.feed(raw)
    with pytest.raises(w.HybridWireError):
        p.feed(w.encode(w.Done()))


def test_encode_refuses_what_the_parser_would_refuse() -> None:
    with pytest.raises(ValueError):
        w.encode(w.Pages(PID, 0x1000, 2, data(1)))
    with pytest.raises(ValueError):
        w.encode(w.Get(0, 0x1000, 1))


def test_answers_in_request_order_and_contiguous() -> None:
    a = w.Answers()
    a.ask(w.Get(PID, 0x10000, 4))
    a.ask(w.Get(PID, 0x7000, 1))
    assert a.take(w.Same(PID, 0x10000, 1)) is None
    assert a.take(w.Pages(PID, 0x11000, 2, data(2))) is None
    done = a.take(w.Same(PID, 0x13000, 1))
    assert done is not None and done.get == w.Get(PID, 0x10000, 4) and len(done.parts) == 3
    done = a.take(w.Fail(PID, 0x7000, 1))
    assert done is not None and done.get.vaddr == 0x7000
    assert a.outstanding == 0


@pytest.mark.parametrize(
    "rec",
    [
        w.Same(PID, 0x11000, 1),  # skips the first page
        w.Same(PID, 0x10000, 5),  # more than asked
        w.Same(PID + 1, 0x10000, 1),  # another process
        w.Done(),  # the sweep's record on the fault channel
    ],
)
def test_an_answer_that_does_not_continue_the_oldest_request_is_refused(rec: w.Record) -> None:
    a = w.Answers()
    a.ask(w.Get(PID, 0x10000, 4))
    with pytest.raises(w.HybridWireError):
        a.take(rec)


def test_end_is_answered_after_every_earlier_get() -> None:
    a = w.Answers()
    a.ask(w.Get(PID, 0x10000, 1))
    a.ask(w.End())
    with pytest.raises(w.HybridWireError):
        w.Answers().take(w.Ended(True))  # nobody asked
    b = w.Answers()
    b.ask(w.Get(PID, 0x10000, 1))
    b.ask(w.End())
    with pytest.raises(w.HybridWireError):
        b.take(w.Ended(True))  # before the GET's answer
    assert isinstance(a.take(w.Same(PID, 0x10000, 1)), w.Answer)
    assert a.take(w.Ended(False)) == w.Ended(False)
    assert a.outstanding == 0


def test_an_answer_nobody_asked_for_is_refused() -> None:
    with pytest.raises(w.HybridWireError):
        w.Answers().take(w.Same(PID, 0x1000, 1))


def test_cover_fills_gaps_with_same_and_splits_long_runs() -> None:
    recs = w.cover(PID, 0x10000, 8, [(0x11000, data(2)), (0x16000, data(1))])
    assert recs == [
        w.Same(PID, 0x10000, 1),
        w.Pages(PID, 0x11000, 2, data(2)),
        w.Same(PID, 0x13000, 3),
        w.Pages(PID, 0x16000, 1, data(1)),
        w.Same(PID, 0x17000, 1),
    ]
    with pytest.raises(ValueError):
        w.cover(PID, 0x10000, 2, [(0x11000, data(2))])  # outside the range


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=40))
def test_garbage_is_a_protocol_error_or_valid_records_never_anything_else(junk: bytes, step: int) -> None:
    p = w.Parser.at_destination()
    try:
        for i in range(0, len(junk), step):
            for rec in p.feed(junk[i : i + step]):
                assert isinstance(rec, (w.Pages, w.Same, w.Fail, w.Done))
                if isinstance(rec, w.Pages):
                    assert len(rec.data) == rec.nr_pages * PAGE
    except w.HybridWireError:
        pass


ranges = st.tuples(
    st.integers(min_value=1, max_value=(1 << 31) - 1),
    st.integers(min_value=0, max_value=(1 << 47) // PAGE).map(lambda p: p * PAGE),
    st.integers(min_value=1, max_value=16),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ranges, min_size=1, max_size=8), st.data())
def test_any_covered_answer_round_trips_in_any_split(gets: list[tuple[int, int, int]], draw: st.DataObject) -> None:
    """Answers built by cover() for any changed runs parse back, split anywhere, and close each GET in order."""
    a = w.Answers()
    raw = b""
    for pid, vaddr, n in gets:
        a.ask(w.Get(pid, vaddr, n))
        changed_pages = sorted(draw.draw(st.sets(st.integers(min_value=0, max_value=n - 1))))
        changed = [(vaddr + k * PAGE, data(1, k % 251)) for k in changed_pages]
        raw += b"".join(map(w.encode, w.cover(pid, vaddr, n, changed)))
    cut = sorted(draw.draw(st.sets(st.integers(min_value=0, max_value=len(raw)), max_size=6)))
    p = w.Parser.at_destination()
    done = []
    for lo, hi in zip([0, *cut], [*cut, len(raw)], strict=True):
        for rec in p.feed(raw[lo:hi]):
            ans = a.take(rec)
            if ans is not None:
                done.append(ans.get)
    assert done == [w.Get(*g) for g in gets]
