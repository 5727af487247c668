"""The lazy-pages watch: whole input, byte by byte, and fuzzed (garbage is a protocol error, nothing else)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.transports.criu_lazy import (
    ANSWER_CMD,
    Get,
    Goodbye,
    LazyProtocolError,
    LazyRequests,
    LazyWatch,
    Served,
    goodbye_answer,
    pages_answer,
)
from tug.transports.criu_pageserver import HEADER, PAGE_SIZE, PS_IOV_CLOSE, PS_IOV_GET

PID = 1  # PS_IOV_GET carries the plain pid


def get(nr: int, vaddr: int) -> bytes:
    return HEADER.pack(PS_IOV_GET, nr, vaddr, PID)


def answer(nr: int, vaddr: int) -> bytes:
    return HEADER.pack(ANSWER_CMD, nr, vaddr, PID) + bytes([nr % 251]) * (nr * PAGE_SIZE)


REQUESTS = get(1, 0x7000) + get(16, 0x10000) + HEADER.pack(PS_IOV_CLOSE, 0, 0, 0)
# The background request gets 9 of its 16 pages (its run ends there).
ANSWERS = answer(1, 0x7000) + answer(9, 0x10000) + b"\0\0\0\0"


def test_whole_exchange() -> None:
    w = LazyWatch()
    w.requests(REQUESTS, now=1.0)
    assert w.outstanding == 3
    served = w.answers(ANSWERS, now=1.5)
    assert served == [
        Served(asked=1, pages=1, vaddr=0x7000, dst_id=PID, latency_s=0.5),
        Served(asked=16, pages=9, vaddr=0x10000, dst_id=PID, latency_s=0.5),
    ]
    assert served[0].fault and not served[1].fault
    assert w.closed


def test_byte_by_byte() -> None:
    w = LazyWatch()
    for i in range(len(REQUESTS)):
        w.requests(REQUESTS[i : i + 1], now=0.0)
    served: list[Served] = []
    for i in range(len(ANSWERS)):
        served += w.answers(ANSWERS[i : i + 1], now=float(i))
    assert [(s.asked, s.pages) for s in served] == [(1, 1), (16, 9)]
    # Each completes with its last data byte.
    assert served[0].latency_s == HEADER.size + PAGE_SIZE - 1
    assert w.closed


@pytest.mark.parametrize(
    ("requests", "answers", "why"),
    [
        (get(1, 0x7000), HEADER.pack(ANSWER_CMD, 2, 0x7000, PID), "for a request of 1"),  # more than asked
        (get(4, 0x7000), HEADER.pack(ANSWER_CMD, 0, 0x7000, PID), "0 pages"),  # zero pages
        (get(1, 0x7000), HEADER.pack(ANSWER_CMD, 1, 0x8000, PID), "at 0x8000"),  # another address
        (get(1, 0x7000), HEADER.pack(ANSWER_CMD, 1, 0x7000, PID + 1), "for a request"),  # another process
        (b"", answer(1, 0x7000), "nobody asked"),
        (get(0, 0x7000), b"", "bad request"),
        (get(1, 0x7001), b"", "bad request"),
        (HEADER.pack(3, 1, 0, PID), b"", "unexpected command"),
    ],
)
def test_broken_streams(requests: bytes, answers: bytes, why: str) -> None:
    w = LazyWatch()
    with pytest.raises(LazyProtocolError, match=why):
        w.requests(requests, now=0.0)
        w.answers(answers, now=0.0)
    with pytest.raises(LazyProtocolError, match="already broken"):
        w.answers(b"\0", now=0.0)


def test_a_request_after_the_close_is_refused() -> None:
    w = LazyWatch()
    with pytest.raises(LazyProtocolError, match="after the close"):
        w.requests(HEADER.pack(PS_IOV_CLOSE, 0, 0, 0) + get(1, 0), now=0.0)


@given(st.binary(max_size=200), st.binary(max_size=5000), st.integers(1, 64))
def test_garbage_is_a_protocol_error_or_nothing(requests: bytes, answers: bytes, chunk: int) -> None:
    w = LazyWatch()
    try:
        for i in range(0, len(requests), chunk):
            w.requests(requests[i : i + chunk], now=0.0)
        for i in range(0, len(answers), chunk):
            for s in w.answers(answers[i : i + chunk], now=0.0):
                assert 0 < s.pages <= s.asked
    except LazyProtocolError:
        pass


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 16)), min_size=1, max_size=8), st.integers(7, 9000))
def test_valid_exchanges_in_any_chunking(runs: list[tuple[int, int]], chunk: int) -> None:
    reqs = b"".join(get(asked, 0x100000 * (i + 1)) for i, (asked, _) in enumerate(runs))
    answers = b"".join(answer(min(got, asked), 0x100000 * (i + 1)) for i, (asked, got) in enumerate(runs))
    w = LazyWatch()
    w.requests(reqs, now=0.0)
    served = []
    for i in range(0, len(answers), chunk):
        served += w.answers(answers[i : i + chunk], now=1.0)
    assert [(s.asked, s.pages) for s in served] == [(asked, min(got, asked)) for asked, got in runs]
    assert w.outstanding == 0


# ---- the serving side (tug's own lazy page server on the destination) ----


def test_requests_whole_and_byte_by_byte() -> None:
    whole = LazyRequests().feed(REQUESTS)
    assert whole == [Get(1, 0x7000, 1, PID), Get(16, 0x10000, 1, PID), Goodbye()]
    r = LazyRequests()
    events = []
    for i in range(len(REQUESTS)):
        events += r.feed(REQUESTS[i : i + 1])
    assert events == whole
    assert pages_answer(whole[1], 9) == HEADER.pack(ANSWER_CMD, 9, 0x10000, PID)
    assert goodbye_answer() == b"\0\0\0\0"
    with pytest.raises(ValueError):
        pages_answer(whole[0], 2)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (get(0, 0x7000), "bad request"),
        (get(1, 0x7001), "bad request"),
        (HEADER.pack(PS_IOV_GET, 1, 0x7000, 0), "no such pid"),
        (HEADER.pack(PS_IOV_GET, 1, 0x7000, 1 << 40), "no such pid"),
        (HEADER.pack(PS_IOV_GET, 2, (1 << 64) - 4096, PID), "bad request"),  # wraps
        (HEADER.pack(3, 1, 0, PID), "unexpected command"),
        (HEADER.pack(PS_IOV_CLOSE, 0, 0, 0) + get(1, 0), "after the close"),
    ],
)
def test_bad_requests(data: bytes, why: str) -> None:
    r = LazyRequests()
    with pytest.raises(LazyProtocolError, match=why):
        r.feed(data)
    with pytest.raises(LazyProtocolError, match="already broken"):
        r.feed(b"")


@given(st.binary(max_size=400), st.integers(1, 64))
def test_request_garbage_is_a_protocol_error_or_valid_events(data: bytes, chunk: int) -> None:
    r = LazyRequests()
    try:
        for i in range(0, len(data), chunk):
            for ev in r.feed(data[i : i + chunk]):
                assert isinstance(ev, Goodbye) or (ev.nr_pages > 0 and ev.vaddr % PAGE_SIZE == 0 and ev.pid > 0)
    except LazyProtocolError:
        pass
