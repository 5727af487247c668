"""The resumable tunnel: whole, byte by byte, fuzzed; a resume never loses or repeats a byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine.errors import ProtocolError
from tug.transports.tunnel import ACK, DATA, EOF, MAX_DATA, RESUME, Fed, Tunnel, TunnelError


class Pair:
    """Two ends and the bytes in flight between them, delivered when asked."""

    def __init__(self, window: int = 1 << 16, ack_every: int = 1 << 10) -> None:
        self.a = Tunnel(window=window, ack_every=ack_every)
        self.b = Tunnel(window=window, ack_every=ack_every)
        self.to_a = bytearray()
        self.to_b = bytearray()
        self.got_a = bytearray()
        self.got_b = bytearray()
        self.eof_a = self.eof_b = False

    def connect(self) -> None:
        self.to_b += self.a.attach()
        self.to_a += self.b.attach()

    def cut(self, keep_to_a: int, keep_to_b: int) -> None:
        """The channel breaks: only a prefix of what was in flight arrives."""
        self.deliver(keep_to_a, keep_to_b)
        self.to_a.clear()
        self.to_b.clear()
        self.a.detach()
        self.b.detach()

    def _take(self, end: Tunnel, fed: Fed, got: bytearray) -> bool:
        got += fed.data
        (self.to_b if end is self.a else self.to_a).extend(fed.reply)
        return fed.eof

    def deliver(self, n_a: int | None = None, n_b: int | None = None, step: int = 0) -> None:
        for _ in range(100):
            if not self.to_a and not self.to_b:
                return
            if self.to_a and (n_a is None or n_a > 0):
                k = len(self.to_a) if n_a is None else min(n_a, len(self.to_a))
                chunk = bytes(self.to_a[:k])
                del self.to_a[:k]
                n_a = None if n_a is None else n_a - k
                for i in range(0, len(chunk), step or len(chunk)):
                    self.eof_a |= self._take(self.a, self.a.feed(chunk[i : i + (step or len(chunk))]), self.got_a)
            if self.to_b and (n_b is None or n_b > 0):
                k = len(self.to_b) if n_b is None else min(n_b, len(self.to_b))
                chunk = bytes(self.to_b[:k])
                del self.to_b[:k]
                n_b = None if n_b is None else n_b - k
                for i in range(0, len(chunk), step or len(chunk)):
                    self.eof_b |= self._take(self.b, self.b.feed(chunk[i : i + (step or len(chunk))]), self.got_b)
            if n_a == 0 and n_b == 0:
                return


def test_whole_stream_both_ways() -> None:
    p = Pair()
    p.connect()
    p.to_b += p.a.send(b"hello ") + p.a.send(b"world") + p.a.send_eof()
    p.to_a += p.b.send(b"x" * 5000)
    p.deliver()
    assert bytes(p.got_b) == b"hello world" and p.eof_b
    assert bytes(p.got_a) == b"x" * 5000 and not p.eof_a
    assert p.b.acked == 5000  # acks every 1 KiB, and the last at once when asked
    p.to_a += p.b.send_eof()
    p.deliver()
    p.to_b += p.a.ack()
    p.to_a += p.b.ack()
    p.deliver()
    assert p.a.done and p.b.done


def test_byte_by_byte() -> None:
    p = Pair()
    p.connect()
    payload = bytes(range(256)) * 20
    p.to_b += p.a.send(payload) + p.a.send_eof()
    p.deliver(step=1)
    assert bytes(p.got_b) == payload and p.eof_b


def test_sends_before_the_peers_resume_wait_for_it() -> None:
    a, b = Tunnel(), Tunnel()
    assert a.send(b"early") == b""  # not attached yet: kept, sent with the resume
    first = a.attach()
    assert a.send(b" too") == b""  # attached, but the peer's RESUME has not come
    b.attach()
    assert b.feed(first).data == b""
    fed = a.feed(_resume_of(b))
    assert b.feed(fed.reply).data == b"early too"


def _resume_of(t: Tunnel) -> bytes:
    return bytes([RESUME]) + t.received.to_bytes(8, "big") + bytes([int(t.eof_received)])


def test_data_from_a_detached_channel_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Tunnel().feed(b"\x01")


def test_resume_resends_exactly_what_was_lost() -> None:
    p = Pair(ack_every=1 << 20 - 1, window=1 << 21)
    p.connect()
    p.deliver()
    p.to_b += p.a.send(b"a" * 3000)
    p.cut(0, 1000)  # the channel dies with most of it in flight
    assert len(p.got_b) < 3000
    p.to_b += p.a.send(b"b" * 10)  # while detached: kept
    p.connect()
    p.deliver()
    assert bytes(p.got_b) == b"a" * 3000 + b"b" * 10
    assert p.a.resumes == 2


@pytest.mark.parametrize(
    "frame",
    [
        bytes([DATA]) + (0).to_bytes(8, "big") + (1).to_bytes(4, "big") + b"x",  # before RESUME
        bytes([9]),
        bytes([RESUME]) + (5).to_bytes(8, "big") + b"\x00",  # claims bytes never sent
        bytes([RESUME]) + (0).to_bytes(8, "big") + b"\x02",
        bytes([RESUME]) + (0).to_bytes(8, "big") + b"\x01",  # claims our EOF, never sent
    ],
)
def test_malformed_first_frames(frame: bytes) -> None:
    t = Tunnel()
    t.attach()
    with pytest.raises(TunnelError):
        t.feed(frame)


def _opened() -> Tunnel:
    t = Tunnel()
    t.attach()
    t.feed(bytes([RESUME]) + (0).to_bytes(8, "big") + b"\x00")
    return t


@pytest.mark.parametrize(
    "frame",
    [
        bytes([DATA]) + (1).to_bytes(8, "big") + (1).to_bytes(4, "big") + b"x",  # a byte skipped
        bytes([DATA]) + (0).to_bytes(8, "big") + (0).to_bytes(4, "big"),
        bytes([DATA]) + (0).to_bytes(8, "big") + (MAX_DATA + 1).to_bytes(4, "big"),
        bytes([ACK]) + (1).to_bytes(8, "big"),  # acks a byte never sent
        bytes([EOF]) + (3).to_bytes(8, "big"),
        bytes([RESUME]) + (0).to_bytes(8, "big") + b"\x00",  # a second RESUME
    ],
)
def test_malformed_frames_after_resume(frame: bytes) -> None:
    with pytest.raises(TunnelError):
        _opened().feed(frame)


def test_repeated_data_is_refused() -> None:
    t = _opened()
    one = bytes([DATA]) + (0).to_bytes(8, "big") + (2).to_bytes(4, "big") + b"ab"
    assert t.feed(one).data == b"ab"
    with pytest.raises(TunnelError):
        t.feed(one)


def test_window_full_until_acked() -> None:
    p = Pair(window=4096, ack_every=1024)
    p.connect()
    p.deliver()
    p.to_b += p.a.send(b"z" * 4096)
    assert p.a.window_full
    p.deliver()
    assert not p.a.window_full and bytes(p.got_b) == b"z" * 4096


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_protocol_error_and_nothing_else(garbage: bytes) -> None:
    for t in (Tunnel(), _opened()):
        if not t.attached:
            t.attach()
        try:
            t.feed(garbage)
        except TunnelError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "cut", "deliver"]),
            st.binary(min_size=0, max_size=3000),
            st.integers(0, 5000),
            st.integers(0, 5000),
        ),
        max_size=30,
    ),
    st.integers(1, 64),
)
def test_resumes_never_lose_or_repeat_a_byte(ops: list[tuple[str, bytes, int, int]], step: int) -> None:
    p = Pair(window=1 << 22, ack_every=700)
    p.connect()
    sent_a = bytearray()
    sent_b = bytearray()
    for op, data, k1, k2 in ops:
        if op == "a":
            p.to_b += p.a.send(data)
            sent_a += data
        elif op == "b":
            p.to_a += p.b.send(data)
            sent_b += data
        elif op == "cut":
            p.cut(k1, k2)
            assert bytes(p.got_b) == bytes(sent_a[: len(p.got_b)])
            p.connect()
        else:
            p.deliver(k1, k2, step=step)
    p.to_b += p.a.send_eof()
    p.to_a += p.b.send_eof()
    p.deliver(step=step)
    assert bytes(p.got_b) == bytes(sent_a) and p.eof_b
    assert bytes(p.got_a) == bytes(sent_b) and p.eof_a
    assert p.a.unacked <= len(sent_a) and p.b.unacked <= len(sent_b)
