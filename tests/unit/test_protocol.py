"""Tests for the sans-IO wire protocol: round trips, chunking, garbage, state rules."""

import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tug.engine.errors import MigrationError, ProtocolError
from tug.transports.protocol import (
    MAX_FRAME_DEFAULT,
    PROTOCOL_VERSION,
    TAGS,
    Bye,
    Call,
    Connection,
    Event,
    Fail,
    Hello,
    LocalProtocolError,
    Notice,
    PeerProtocolError,
    Reply,
    Role,
    StreamAbort,
    StreamClose,
    StreamData,
    StreamOpen,
    encode_event,
    encode_stream_data,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def hello(host: str = "src", **info: Any) -> Hello:
    return Hello(version=PROTOCOL_VERSION, software="tug 0.1", host=host, info=dict(info))


def pair() -> tuple[Connection, Connection]:
    """A SOURCE and an AGENT that have exchanged Hellos."""
    src, agent = Connection(Role.SOURCE), Connection(Role.AGENT)
    assert agent.feed(src.send(hello("src", criu="4.2.1"))) == [hello("src", criu="4.2.1")]
    assert src.feed(agent.send(hello("dst", runc="1.2"))) == [hello("dst", runc="1.2")]
    return src, agent


def conversation() -> list[Event]:
    """Every event type, in an order the state machine accepts (all sent by SOURCE)."""
    return [
        hello("src", criu="4.2.1", features={"lazy_pages": True, "pagemap_scan": False}),
        Call(call_id=1, method="check", args={"container": "web", "n": -3, "f": 1.5, "none": None, "b": b"\x00"}),
        StreamOpen(stream_id=7, kind="rootfs-tar", meta={"size": 123}),
        StreamData(stream_id=7, data=b"abc" * 100),
        StreamData(stream_id=7, data=b""),
        StreamClose(stream_id=7, meta={"sha256": "00" * 32}),
        StreamOpen(stream_id=8, kind="pages", meta={}),
        StreamAbort(stream_id=8, reason="dump failed"),
        Notice(level="info", message="pre-dump 1 done", data={"pages": [1, 2, [3, {"x": b"y"}]]}),
        Call(call_id=2, method="restore", args={}),
        Bye(reason="done"),
    ]


def conversation_bytes() -> bytes:
    src = Connection(Role.SOURCE)
    return b"".join(src.send(event) for event in conversation())


def feed_chunks(conn: Connection, data: bytes, cuts: list[int]) -> tuple[list[Event], str | None]:
    """Feed ``data`` split at ``cuts``; return all events seen and the error, if any.

    Only ProtocolError is caught: any other exception fails the calling test.
    """
    events: list[Event] = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            events += conn.feed(data[lo:hi])
        conn.feed_eof()
    except ProtocolError as exc:
        assert isinstance(exc, PeerProtocolError)
        events += exc.events
        with pytest.raises(ProtocolError):  # dead for good
            conn.feed(b"\x00")
        return events, str(exc)
    return events, None


def frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def raises_peer(conn: Connection, data: bytes, match: str) -> PeerProtocolError:
    with pytest.raises(PeerProtocolError, match=match) as info:
        conn.feed(data)
    return info.value


# --- 1. round trips -----------------------------------------------------------------


def test_round_trip_every_event_type() -> None:
    src, agent = pair()
    sent: list[Event] = []

    def to_agent(event: Event) -> None:
        sent.append(event)
        assert agent.feed(src.send(event)) == [event]

    def to_source(event: Event) -> None:
        sent.append(event)
        assert src.feed(agent.send(event)) == [event]

    to_agent(Call(call_id=1, method="check", args={"container": "web"}))
    to_source(Notice(level="debug", message="checking", data={"pct": 12.5}))
    to_source(Reply(call_id=1, result={"ok": True, "criu": [4, 2, 1]}))
    to_agent(Call(call_id=2, method="restore", args={}))
    to_source(Fail(call_id=2, kind="criu", message="restore failed", details={"log": "x"}))
    to_source(Call(call_id=1, method="ping", args={}))  # the agent may call too; ids are per direction
    to_agent(Reply(call_id=1, result={}))
    to_agent(StreamOpen(stream_id=1, kind="criu-images", meta={"dir": "/tmp/x"}))
    to_source(StreamOpen(stream_id=1, kind="log", meta={}))  # stream ids are per direction too
    to_agent(StreamData(stream_id=1, data=bytes(range(256))))
    to_source(StreamData(stream_id=1, data=b"log line\n"))
    to_agent(StreamClose(stream_id=1, meta={"size": 256, "digest": b"\x01" * 32}))
    to_source(StreamAbort(stream_id=1, reason="cancelled"))
    to_agent(Bye(reason="done"))
    assert (src.closed, agent.closed) == (False, False)
    to_source(Bye(reason="done"))
    assert (src.closed, agent.closed) == (True, True)
    assert {type(e) for e in sent} | {Hello} == set(TAGS)


def test_peer_hello_and_tags() -> None:
    src, agent = Connection(Role.SOURCE), Connection(Role.AGENT)
    seen = []
    for data in (b"", src.send(hello("a", criu="4.2.1"))):
        agent.feed(data)
        seen.append(agent.peer_hello)
    assert seen == [None, hello("a", criu="4.2.1")]
    assert sorted(TAGS.values()) == list(range(1, 11))
    assert encode_event(hello())[4:6] == bytes([0x95, TAGS[Hello]])


def test_encode_stream_data_matches_generic_encoding() -> None:
    for size in (0, 1, 255, 256, 65535, 65536, 300_000):
        data = bytes([size % 251]) * size
        expected = frame([TAGS[StreamData], 2**40, data])
        assert encode_stream_data(2**40, data) == expected
        assert encode_stream_data(2**40, bytearray(data)) == expected
        assert encode_stream_data(2**40, memoryview(data)) == expected
        assert encode_event(StreamData(stream_id=2**40, data=data)) == expected


def test_send_data_fast_path() -> None:
    src, agent = pair()
    agent.feed(src.send(StreamOpen(stream_id=3, kind="pages", meta={})))
    buf = bytearray(b"x" * 1000)
    assert agent.feed(src.send_data(3, memoryview(buf)[10:20])) == [StreamData(stream_id=3, data=b"x" * 10)]
    with pytest.raises(LocalProtocolError, match="not opened"):
        src.send_data(4, b"x")
    with pytest.raises(LocalProtocolError, match="non-negative integer"):
        src.send_data(True, b"x")
    with pytest.raises(LocalProtocolError, match="contiguous"):
        src.send_data(3, memoryview(buf)[::2])


def test_four_mib_stream_data_round_trips() -> None:
    src, agent = pair()
    agent.feed(src.send(StreamOpen(stream_id=1, kind="pages", meta={})))
    payload = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    t0 = time.perf_counter()
    wire = b"".join(src.send_data(1, payload) for _ in range(4))
    events = [e for i in range(0, len(wire), 65536) for e in agent.feed(wire[i : i + 65536])]
    elapsed = time.perf_counter() - t0
    assert len(events) == 4
    assert all(isinstance(e, StreamData) and e.data == payload for e in events)
    assert agent.feed(src.send(StreamData(stream_id=1, data=payload))) == [StreamData(stream_id=1, data=payload)]
    assert elapsed < 2.0, f"16 MiB through the codec took {elapsed:.2f} s"


# --- 2. chunking --------------------------------------------------------------------


def test_whole_vs_byte_by_byte() -> None:
    wire = conversation_bytes()
    whole = Connection(Role.AGENT).feed(wire)
    assert whole == conversation()
    byte_conn = Connection(Role.AGENT)
    assert [e for i in range(len(wire)) for e in byte_conn.feed(wire[i : i + 1])] == whole


msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
str_maps = st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5)


@FAST
@given(args=str_maps, payload=st.binary(max_size=3000), data=st.data())
def test_any_chunking_gives_same_events(args: dict[str, Any], payload: bytes, data: st.DataObject) -> None:
    src = Connection(Role.SOURCE)
    sent: list[Event] = [
        hello(extra=args),
        Call(call_id=5, method="m", args=args),
        StreamOpen(stream_id=0, kind="k", meta=args),
        StreamData(stream_id=0, data=payload),
        StreamClose(stream_id=0, meta={}),
        Notice(level="info", message="n", data=args),
        Bye(reason=""),
    ]
    wire = b"".join(src.send(e) for e in sent)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    assert feed_chunks(Connection(Role.AGENT), wire, cuts) == (sent, None)


# --- 3. garbage never escapes as anything but ProtocolError -------------------------


@FAST
@given(garbage=st.binary(max_size=600), data=st.data())
def test_garbage_only_raises_protocol_error(garbage: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=10))
    feed_chunks(Connection(Role.AGENT), garbage, cuts)


@FAST
@given(garbage=st.binary(max_size=600), data=st.data())
def test_garbage_after_hello_only_raises_protocol_error(garbage: bytes, data: st.DataObject) -> None:
    wire = encode_event(hello()) + garbage
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    events, _ = feed_chunks(Connection(Role.AGENT), wire, cuts)
    assert events[:1] == [hello()]


@FAST
@given(garbage=st.binary(min_size=1, max_size=60), tag=st.sampled_from(sorted(TAGS.values())), data=st.data())
def test_frames_of_random_msgpack_only_raise_protocol_error(garbage: bytes, tag: int, data: st.DataObject) -> None:
    """Well-framed bodies with a real tag get past the framing and into field validation."""
    fields = data.draw(st.lists(msgpack_values | st.just(msgpack.ExtType(5, b"x")), max_size=5))
    wire = encode_event(hello()) + frame([tag, *fields]) + struct.pack(">I", len(garbage)) + garbage
    feed_chunks(Connection(Role.AGENT), wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))


mutation = st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6), st.integers(1, 255))


@FAST
@given(mutations=st.lists(mutation, min_size=1, max_size=4), data=st.data())
def test_mutated_streams_only_raise_protocol_error(mutations: list[tuple[str, int, int]], data: st.DataObject) -> None:
    wire = bytearray(conversation_bytes())
    for op, where, value in mutations:
        i = where % (len(wire) + 1)
        if op == "insert":
            wire.insert(i, value)
        elif i < len(wire):
            if op == "flip":
                wire[i] ^= value
            else:
                del wire[i]
    wire_bytes = bytes(wire)
    cuts = data.draw(st.lists(st.integers(0, len(wire_bytes)), max_size=20))
    chunked_events, chunked_error = feed_chunks(Connection(Role.AGENT), wire_bytes, cuts)
    whole_events, whole_error = feed_chunks(Connection(Role.AGENT), wire_bytes, [])
    # Chunking never changes what is decoded or whether it fails. (Compared
    # by repr: a flipped bit can decode as a float NaN, which != itself.)
    assert repr(chunked_events) == repr(whole_events)
    assert (chunked_error is None) == (whole_error is None)


def test_deeply_nested_map_is_a_protocol_error() -> None:
    deep: Any = 1
    for _ in range(500):
        deep = [deep]
    wire = encode_event(hello()) + frame([TAGS[Notice], "info", "x", {"k": deep}])
    raises_peer(Connection(Role.AGENT), wire, "nested more than")
    with pytest.raises(LocalProtocolError, match="nested more than"):
        encode_event(Notice(level="info", message="x", data={"k": deep}))


# --- 4. state rules -----------------------------------------------------------------


def test_first_event_must_be_hello() -> None:
    raises_peer(Connection(Role.AGENT), encode_event(Bye(reason="x")), "first event must be Hello")
    with pytest.raises(LocalProtocolError, match="first event must be Hello"):
        Connection(Role.SOURCE).send(Bye(reason="x"))


def test_second_hello() -> None:
    src, agent = pair()
    raises_peer(agent, encode_event(hello()), "second Hello")
    with pytest.raises(LocalProtocolError, match="second Hello"):
        src.send(hello())


def test_version_mismatch() -> None:
    old = Hello(version=PROTOCOL_VERSION + 1, software="tug 9", host="h", info={})
    raises_peer(
        Connection(Role.AGENT),
        encode_event(old),
        f"peer speaks tug protocol version {PROTOCOL_VERSION + 1}, this side speaks {PROTOCOL_VERSION}",
    )
    # A future Hello may have more fields; the version is still what gets reported.
    future = frame([TAGS[Hello], 7, "tug 7", "h", {}, "new field", 42])
    raises_peer(Connection(Role.AGENT), future, "peer speaks tug protocol version 7")
    with pytest.raises(LocalProtocolError, match="Hello.version must be"):
        Connection(Role.SOURCE).send(old)


def test_a_peer_without_digests_is_refused_at_the_handshake() -> None:
    """Version 2 put digests inside stream payloads (file records, page runs):
    a version-1 peer would misread them, so the mix ends at the Hello, whole or byte by byte."""
    assert PROTOCOL_VERSION == 2
    v1 = encode_event(Hello(version=1, software="tug 0.1", host="h", info={}))
    raises_peer(Connection(Role.AGENT), v1, "peer speaks tug protocol version 1, this side speaks 2")
    conn = Connection(Role.SOURCE)
    for b in v1[:-1]:
        assert conn.feed(bytes([b])) == []
    raises_peer(conn, v1[-1:], "peer speaks tug protocol version 1, this side speaks 2")


def test_reply_to_unknown_call() -> None:
    src, agent = pair()
    raises_peer(src, encode_event(Reply(call_id=9, result={})), "call 9")
    src, agent = pair()
    raises_peer(src, encode_event(Fail(call_id=9, kind="x", message="m", details={})), "call 9")
    with pytest.raises(LocalProtocolError, match="call 9"):
        agent.send(Reply(call_id=9, result={}))


def test_reply_must_answer_the_other_sides_call() -> None:
    src, agent = pair()
    agent.feed(src.send(Call(call_id=1, method="m", args={})))
    with pytest.raises(LocalProtocolError):
        src.send(Reply(call_id=1, result={}))  # answering our own call
    src.feed(agent.send(Reply(call_id=1, result={})))
    with pytest.raises(LocalProtocolError, match="call 1"):
        agent.send(Reply(call_id=1, result={}))  # answered once only
    raises_peer(src, encode_event(Reply(call_id=1, result={})), "call 1")


def test_call_id_reuse() -> None:
    src, agent = pair()
    agent.feed(src.send(Call(call_id=1, method="m", args={})))
    raises_peer(agent, encode_event(Call(call_id=1, method="m", args={})), "reused call id 1")
    with pytest.raises(LocalProtocolError, match="reused call id 1"):
        src.send(Call(call_id=1, method="m", args={}))
    src, agent = pair()
    agent.feed(src.send(Call(call_id=1, method="m", args={})))
    src.feed(agent.send(Reply(call_id=1, result={})))
    agent.feed(src.send(Call(call_id=1, method="again", args={})))  # fine once answered


@pytest.mark.parametrize(
    "event",
    [
        StreamData(stream_id=4, data=b"x"),
        StreamClose(stream_id=4, meta={}),
        StreamAbort(stream_id=4, reason="r"),
    ],
)
def test_stream_events_need_an_open_stream(event: Event) -> None:
    src, agent = pair()
    raises_peer(agent, encode_event(event), "stream 4, which it has not opened")
    with pytest.raises(LocalProtocolError, match="not opened"):
        src.send(event)
    # A stream the *other* direction opened does not count.
    src, agent = pair()
    agent.feed(src.send(StreamOpen(stream_id=4, kind="k", meta={})))
    with pytest.raises(LocalProtocolError, match="not opened"):
        agent.send(event)


def test_stream_lifecycle() -> None:
    src, agent = pair()
    agent.feed(src.send(StreamOpen(stream_id=4, kind="k", meta={})))
    raises_peer(agent, encode_event(StreamOpen(stream_id=4, kind="k", meta={})), "already open")
    with pytest.raises(LocalProtocolError, match="already open"):
        src.send(StreamOpen(stream_id=4, kind="k", meta={}))
    src.send(StreamClose(stream_id=4, meta={}))
    with pytest.raises(LocalProtocolError, match="not opened"):
        src.send(StreamData(stream_id=4, data=b""))
    src.send(StreamOpen(stream_id=4, kind="k", meta={}))  # reusable after close
    src.send(StreamAbort(stream_id=4, reason="r"))
    with pytest.raises(LocalProtocolError, match="not opened"):
        src.send_data(4, b"")


def test_nothing_after_bye() -> None:
    src, agent = pair()
    agent.feed(src.send(Bye(reason="done")))
    raises_peer(agent, encode_event(Notice(level="info", message="m", data={})), "Notice after Bye")
    with pytest.raises(LocalProtocolError, match="after Bye"):
        src.send(Notice(level="info", message="m", data={}))
    with pytest.raises(LocalProtocolError, match="after Bye"):
        src.send(Bye(reason="again"))
    # The other direction is still open.
    src.feed(agent.send(Notice(level="info", message="still here", data={})))


def test_oversized_frame_fails_on_the_length_alone() -> None:
    src, agent = pair()
    raises_peer(agent, struct.pack(">I", MAX_FRAME_DEFAULT + 1), "over the limit of 16777216")
    small = Connection(Role.AGENT, max_frame=1024)
    small.feed(encode_event(hello()))
    raises_peer(small, struct.pack(">I", 1025), "frame of 1025 bytes")
    small = Connection(Role.AGENT, max_frame=1024)
    small.feed(encode_event(hello()))
    assert small.feed(struct.pack(">I", 1024)) == []  # at the limit: waits for the body
    # Before the Hello, binary junk with an impossible length fails at once too.
    raises_peer(Connection(Role.AGENT), b"\xff\xff\xff\xff", "non-protocol data")


def test_send_refuses_oversized_frame() -> None:
    src = Connection(Role.SOURCE, max_frame=1024)
    src.send(hello())
    src.send(StreamOpen(stream_id=1, kind="k", meta={}))
    with pytest.raises(LocalProtocolError, match="exceeds max_frame"):
        src.send(StreamData(stream_id=1, data=b"x" * 1024))
    with pytest.raises(LocalProtocolError, match="exceeds max_frame"):
        src.send_data(1, b"x" * 1024)
    src.send(StreamData(stream_id=1, data=b"x" * 1000))


@pytest.mark.parametrize(
    "text",
    [
        b"bash: python3: command not found\n",
        b"sh: 1: exec: /usr/bin/python3: not found\r\n",
        b"Traceback (most recent call last):\n  File \"<string>\", line 1\nModuleNotFoundError: No module named 'tug'\n",
        "bash: python3: Kommando nicht gefunden\n".encode(),
    ],
)
def test_non_protocol_text_is_quoted(text: bytes) -> None:
    first_line = text.decode().splitlines()[0]
    exc = raises_peer(Connection(Role.AGENT), text, "peer sent non-protocol data")
    assert first_line in str(exc)
    assert isinstance(exc, MigrationError) and exc.kind == "protocol"
    # Trickling in a byte at a time quotes the same line, not just the first 4 bytes.
    conn = Connection(Role.AGENT)
    with pytest.raises(PeerProtocolError) as info:
        for i in range(len(text)):
            conn.feed(text[i : i + 1])
    assert first_line in str(info.value)


def test_non_protocol_text_without_newline_is_reported_at_eof() -> None:
    conn = Connection(Role.AGENT)
    assert conn.feed(b"bash: python3: command not found") == []
    with pytest.raises(PeerProtocolError, match="non-protocol data: 'bash: python3: command not found'"):
        conn.feed_eof()


def test_non_protocol_excerpt_is_truncated() -> None:
    exc = raises_peer(Connection(Role.AGENT), b"x" * 5000, "non-protocol data")
    assert len(str(exc)) < 300 and str(exc).endswith("...")


def test_text_after_hello_is_quoted() -> None:
    src, agent = pair()
    exc = raises_peer(src, b"Traceback (most recent call last):\n", "non-protocol data")
    assert "Traceback (most recent call last):" in str(exc)


def test_valid_frame_of_wrong_shape_before_hello_is_quoted() -> None:
    raises_peer(Connection(Role.AGENT), b"\x00\x00\x00\x05hello", r"non-protocol data: '\\x00\\x00\\x00\\x05hello'")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([TAGS[Call], True, "m", {}], "call_id must be a non-negative integer"),
        ([TAGS[Call], -1, "m", {}], "call_id must be a non-negative integer"),
        ([TAGS[Call], 1.0, "m", {}], "call_id must be a non-negative integer"),
        ([TAGS[Call], 1, b"m", {}], "method must be a string"),
        ([TAGS[Call], 1, "m", []], "args must be a map"),
        ([TAGS[Call], 1, "m", {b"k": 1}], "args must have string keys"),
        ([TAGS[Call], 1, "m", {"k": {b"ok": msgpack.ExtType(1, b"")}}], "extension type"),
        ([TAGS[Call], 1, "m", {"k": msgpack.Timestamp(1, 0)}], "extension type"),
        ([TAGS[Call], 1, "m"], "Call frame has 2 fields, expected 3"),
        ([TAGS[Call], 1, "m", {}, 5], "Call frame has 4 fields, expected 3"),
        ([TAGS[StreamData], 1, "text"], "data must be bytes"),
        ([99, 1], "unknown event tag"),
        (["2", 1], "unknown event tag"),
        ([True, 1], "unknown event tag"),
        ([[1], 1], "unknown event tag"),
        ([], "non-empty array"),
        ({"tag": 2}, "non-empty array"),
    ],
)
def test_malformed_frames(body: Any, match: str) -> None:
    _, agent = pair()
    raises_peer(agent, frame(body), match)


@pytest.mark.parametrize(
    "raw_body",
    [
        b"",  # empty
        b"\x94\x02\x01\xa1m",  # truncated inside the body
        b"\x91\x0a\xc0",  # trailing data after the array
        b"\x92\x0a\xa2\xff\xfe",  # invalid UTF-8
        b"\x92\x09\x81\x01\x02",  # int map key
        b"\x92\x0a\xd4\x05\x00",  # ext type
    ],
)
def test_undecodable_bodies(raw_body: bytes) -> None:
    _, agent = pair()
    raises_peer(agent, struct.pack(">I", len(raw_body)) + raw_body, "malformed frame|non-empty array")


@pytest.mark.parametrize(
    "event",
    [
        Call(call_id=-1, method="m", args={}),
        Call(call_id=1, method=3, args={}),  # type: ignore[arg-type]
        Call(call_id=1, method="m", args={1: "x"}),  # type: ignore[dict-item]
        Call(call_id=1, method="m", args={"k": {1, 2}}),
        Call(call_id=1, method="m", args={"k": object()}),
        Call(call_id=1, method="m", args={"k": 2**64}),
        Call(call_id=1, method="m", args={"k": msgpack.ExtType(1, b"")}),
        Call(call_id=1, method="\udc80", args={}),
        StreamData(stream_id=1, data=bytearray(b"x")),  # type: ignore[arg-type]
    ],
)
def test_send_validates_fields_and_keeps_state(event: Event) -> None:
    src, agent = pair()
    src.send(StreamOpen(stream_id=1, kind="k", meta={}))
    with pytest.raises(LocalProtocolError):
        src.send(event)
    # Nothing changed: the same id is still free, the connection still usable.
    src.send(Call(call_id=1, method="m", args={}))
    src.send(StreamData(stream_id=1, data=b"x"))


def test_send_rejects_non_events() -> None:
    with pytest.raises(LocalProtocolError, match="not a tug protocol event"):
        Connection(Role.SOURCE).send("hello")  # type: ignore[arg-type]


def test_events_before_the_error_are_kept() -> None:
    src, agent = pair()
    wire = src.send(Notice(level="error", message="about to crash", data={})) + b"\xff" * 8
    exc = raises_peer(agent, wire, "over the limit")
    assert exc.events == [Notice(level="error", message="about to crash", data={})]


def test_dead_after_error() -> None:
    src, agent = pair()
    raises_peer(agent, struct.pack(">I", MAX_FRAME_DEFAULT + 1), "over the limit")
    assert agent.closed
    raises_peer(agent, encode_event(Notice(level="info", message="m", data={})), "already failed")
    with pytest.raises(PeerProtocolError, match="already failed"):
        agent.feed_eof()
    src.feed(agent.send(Bye(reason="protocol error")))  # this side may still say why


def test_eof_rules() -> None:
    src, agent = pair()
    agent.feed_eof()  # EOF between frames without Bye is allowed
    agent.feed_eof()
    raises_peer(agent, b"x", "after EOF")

    src, agent = pair()
    wire = src.send(Notice(level="info", message="m", data={}))
    assert agent.feed(wire[:-1]) == []
    with pytest.raises(PeerProtocolError, match="middle of a frame"):
        agent.feed_eof()

    quiet = Connection(Role.AGENT)
    quiet.feed_eof()  # peer exited without a word; peer_hello tells the caller
    assert quiet.peer_hello is None


def test_closed() -> None:
    src, agent = pair()
    agent.feed(src.send(Bye(reason="done")))
    assert (src.closed, agent.closed) == (False, False)
    src.feed_eof()
    assert (src.closed, agent.closed) == (True, False)  # we said Bye and the peer hung up
    agent.send(Bye(reason="done"))
    assert (src.closed, agent.closed) == (True, True)


def test_max_frame_argument_is_checked() -> None:
    with pytest.raises(ValueError):
        Connection(Role.SOURCE, max_frame=2**32)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.binary(max_size=3000), min_size=1, max_size=5), kinds=st.lists(st.sampled_from("bav"), min_size=5, max_size=5))
def test_stream_data_from_parts_is_the_frame_of_their_join(parts: list[bytes], kinds: list[str]) -> None:
    """A run's header and its pages framed from separate buffers: the same bytes on the wire."""
    typed = [bytearray(b) if k == "a" else memoryview(b) if k == "v" else b for b, k in zip(parts, kinds)]
    expected = encode_stream_data(7, b"".join(parts))
    assert encode_stream_data(7, *typed) == expected
    src, agent = pair()
    agent.feed(src.send(StreamOpen(stream_id=7, kind="pages", meta={})))
    assert src.send_data(7, *typed) == expected
    assert agent.feed(expected) == [StreamData(stream_id=7, data=b"".join(parts))]


def test_stream_data_parts_are_checked_each() -> None:
    src, _ = pair()
    src.send(StreamOpen(stream_id=1, kind="pages", meta={}))
    with pytest.raises(LocalProtocolError, match="contiguous"):
        src.send_data(1, b"head", memoryview(b"abcdef")[::2])
    with pytest.raises(LocalProtocolError, match="must be bytes"):
        src.send_data(1, b"head", "text")  # type: ignore[arg-type]
