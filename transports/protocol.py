"""The tug wire protocol, sans-IO: frames, events and the rules both peers obey.

Modeled on h11: nothing here touches a socket, a channel or an event loop. The
transport hands received bytes to :meth:`Connection.feed` and writes the bytes
:meth:`Connection.send` returns, so every rule can be exercised with plain byte
strings, and the source and the agent cannot disagree about the protocol
because they run this very module.

A frame is a 4-byte big-endian length followed by a msgpack array
``[tag, field1, field2, ...]`` whose fields follow the event's dataclass order.
Each direction opens with :class:`Hello`; besides negotiating the version, that
lets the first few bytes tell a tug agent apart from a shell complaining that
``python3`` is missing, which is the most common way a migration fails to start.
"""

import dataclasses
import enum
import struct
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import msgpack

from tug.engine.errors import ProtocolError

#: 2: file records end with a digest trailer and page runs carry a digest
#: (tug.engine.records, tug.engine.pagestream): stream payloads a version-1
#: peer would misread, so the handshake refuses the mix.
PROTOCOL_VERSION: Final[int] = 2
MAX_FRAME_DEFAULT: Final[int] = 16 * 1024 * 1024

# No Hello is anywhere near this big; keeping the first frame this small means
# any printable first byte (>= 0x09 ...) announces a length it cannot have.
_HELLO_MAX: Final = 1024 * 1024
_EXCERPT: Final = 200  # bytes of non-protocol data quoted in an error
_MAX_DEPTH: Final = 100  # metadata is shallow; the bound caps a hostile frame's cost
_HEADER: Final = struct.Struct(">I")
# Printable ASCII plus every byte that can occur in UTF-8 (error messages may be localised).
_TEXT_BYTES: Final = bytes(range(0x20, 0x7F)) + b"\t\n\r" + bytes(range(0x80, 0xC0)) + bytes(range(0xC2, 0xF5))


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids: a bug here, not in the peer.

    :meth:`Connection.send` checks before it changes any state, so the
    connection remains usable after this is raised.
    """


class PeerProtocolError(ProtocolError):
    """The peer broke the protocol; the receiving half of the connection is dead.

    ``events`` holds the events that the failing :meth:`Connection.feed` call
    decoded before the bad frame: a peer often reports its trouble (a
    :class:`Notice` or :class:`Fail`) just before it goes wrong, and that report
    should not be lost with the exception.
    """

    def __init__(self, message: str, events: "list[Event] | None" = None) -> None:
        super().__init__(message)
        self.events: list[Event] = list(events or [])


class Role(enum.Enum):
    """Which end of the migration this is; only used to make errors say who erred."""

    SOURCE = "source"
    AGENT = "agent"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """First event in each direction. ``version`` must stay the first field forever."""

    version: int
    software: str
    host: str
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """Ask the peer to do something; it answers with one Reply or Fail."""

    call_id: int
    method: str
    args: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    call_id: int
    result: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Fail:
    """Error answer to a Call; ``kind`` is a MigrationError ``kind`` so it can be re-raised faithfully."""

    call_id: int
    kind: str
    message: str
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpen:
    """Bulk data travels in streams so a Call's reply never waits behind gigabytes of pages."""

    stream_id: int
    kind: str
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StreamData:
    stream_id: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StreamClose:
    """Normal end of a stream; ``meta`` lets the receiver verify size or digest."""

    stream_id: int
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StreamAbort:
    stream_id: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """Log or progress line from the peer; fire-and-forget, so it never blocks a phase."""

    level: str
    message: str
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    """Orderly end of one direction, so EOF after it is known not to be a crash."""

    reason: str


Event: TypeAlias = Hello | Call | Reply | Fail | StreamOpen | StreamData | StreamClose | StreamAbort | Notice | Bye

# Tags are part of the wire format: never renumber, only add.
TAGS: Final[dict[type[Event], int]] = {
    Hello: 1, Call: 2, Reply: 3, Fail: 4, StreamOpen: 5,
    StreamData: 6, StreamClose: 7, StreamAbort: 8, Notice: 9, Bye: 10,
}  # fmt: skip


class _Invalid(Exception):
    """Internal: carries a message to the public entry point, which picks Local or Peer."""


class _Undecodable(_Invalid):
    """Not a tug frame at all, as opposed to a tug frame with a bad field."""


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code}, which tug does not use")


def _describe(value: object) -> str:
    if isinstance(value, str | bytes | bytearray):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, list | tuple | dict):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"{type(value).__name__} {repr(value)[:40]}"


def _check_id(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise _Invalid(f"{where} must be a non-negative integer, got {_describe(value)}")


def _check_str(value: object, where: str) -> None:
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be a string, got {_describe(value)}")


def _check_bytes(value: object, where: str) -> None:
    if not isinstance(value, bytes):
        raise _Invalid(f"{where} must be bytes, got {_describe(value)}")


def _check_map(value: object, where: str) -> None:
    """Walk the whole tree iteratively: a hostile frame must not hit the recursion limit."""
    if not isinstance(value, dict):
        raise _Invalid(f"{where} must be a map, got {_describe(value)}")
    if not all(isinstance(key, str) for key in value):
        raise _Invalid(f"{where} must have string keys")
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Invalid(f"{where} is nested more than {_MAX_DEPTH} levels deep")
        items: Any = node.values() if isinstance(node, dict) else node
        if isinstance(node, dict) and not all(isinstance(key, str | bytes) for key in node):
            raise _Invalid(f"{where} has a map key that is neither string nor bytes")
        for item in items:
            if item is None or isinstance(item, str | bytes | float | bool):
                continue
            if isinstance(item, int):
                if not -(2**63) <= item < 2**64:
                    raise _Invalid(f"{where} holds an integer out of msgpack's range")
            elif isinstance(item, msgpack.ExtType | msgpack.Timestamp):
                raise _Invalid(f"{where} holds a msgpack extension type, which tug does not use")
            elif isinstance(item, dict | list | tuple):
                stack.append((item, depth + 1))
            else:
                raise _Invalid(f"{where} holds a {type(item).__name__}, which msgpack cannot carry")


_Check: TypeAlias = Callable[[object, str], None]
_CHECKS: Final[dict[object, _Check]] = {int: _check_id, str: _check_str, bytes: _check_bytes, dict[str, Any]: _check_map}


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    tag: int
    make: Callable[..., Event]
    fields: tuple[tuple[str, _Check], ...]


_SPECS: Final = {
    cls: _Spec(tag, cls, tuple((f.name, _CHECKS[f.type]) for f in dataclasses.fields(cls))) for cls, tag in TAGS.items()
}
_SPECS_BY_TAG: Final = {spec.tag: spec for spec in _SPECS.values()}
_STREAM_DATA_PREFIX: Final = bytes([0x93, TAGS[StreamData]])  # fixarray(3), fixint tag


def _version_mismatch(version: int) -> _Invalid:
    return _Invalid(f"peer speaks tug protocol version {version}, this side speaks {PROTOCOL_VERSION}")


def _decode_body(body: memoryview) -> Event:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except Exception as exc:  # msgpack raises ValueError, TypeError and its own types
        raise _Undecodable(f"malformed frame: {exc}") from None
    if not isinstance(obj, list) or not obj:
        raise _Undecodable(f"frame body must be a non-empty array, got {_describe(obj)}")
    tag, fields = obj[0], obj[1:]
    spec = _SPECS_BY_TAG.get(tag) if type(tag) is int else None
    if spec is None:
        raise _Undecodable(f"unknown event tag {_describe(tag)}")
    name = spec.make.__name__
    # A newer Hello may grow fields; report the version rather than its shape.
    if spec.tag == TAGS[Hello] and fields and type(fields[0]) is int and fields[0] != PROTOCOL_VERSION:
        raise _version_mismatch(fields[0])
    if len(fields) != len(spec.fields):
        raise _Invalid(f"{name} frame has {len(fields)} fields, expected {len(spec.fields)}")
    for (field, check), value in zip(spec.fields, fields):
        check(value, f"{name}.{field}")
    return spec.make(**{field: value for (field, _), value in zip(spec.fields, fields)})


def _bin_header(size: int) -> bytes:
    if size < 0x100:
        return bytes((0xC4, size))
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def _encode(event: Event) -> bytes:
    spec = _SPECS.get(type(event))
    if spec is None:
        raise _Invalid(f"not a tug protocol event: {_describe(event)}")
    name = type(event).__name__
    values = [getattr(event, field) for field, _ in spec.fields]
    for (field, check), value in zip(spec.fields, values):
        check(value, f"{name}.{field}")
    if isinstance(event, StreamData):
        return _encode_stream_data(event.stream_id, event.data)
    try:
        body: bytes = msgpack.packb([spec.tag, *values], use_bin_type=True)
    except Exception as exc:  # e.g. a str holding lone surrogates
        raise _Invalid(f"cannot encode {name}: {exc}") from None
    return _HEADER.pack(len(body)) + body


def _encode_stream_data(stream_id: int, *parts: bytes | bytearray | memoryview) -> bytes:
    """One StreamData frame whose data is ``parts`` end to end (each part copied once, into the frame)."""
    size = 0
    for part in parts:
        if not isinstance(part, bytes | bytearray | memoryview):
            raise _Invalid(f"StreamData.data must be bytes, got {_describe(part)}")
        with memoryview(part) as view:
            size += view.nbytes
            contiguous = view.c_contiguous
        if not contiguous:
            raise _Invalid("StreamData.data must be contiguous buffers")
    if size >= 2**32:
        raise _Invalid("StreamData.data must be less than 4 GiB")
    head = _STREAM_DATA_PREFIX + msgpack.packb(stream_id) + _bin_header(size)
    return b"".join((_HEADER.pack(len(head) + size), head, *parts))  # the only copy of data


def encode_event(event: Event) -> bytes:
    """Frame one event with no state checks: for tests and tools that craft traffic."""
    try:
        return _encode(event)
    except _Invalid as exc:
        raise LocalProtocolError(str(exc)) from None


def encode_stream_data(stream_id: int, data: bytes | bytearray | memoryview, *more: bytes | bytearray | memoryview) -> bytes:
    """Frame a StreamData without building the event; byte-identical to :func:`encode_event`
    of the data ``data + b"".join(more)``.

    This is the hot path of a migration, so the data is copied exactly once, into
    the returned frame: a sender that holds a run's small header and its pages
    in separate buffers frames them together without joining them first.
    :meth:`Connection.send_data` is the same plus state checks.
    """
    try:
        _check_id(stream_id, "StreamData.stream_id")
        return _encode_stream_data(stream_id, data, *more)
    except _Invalid as exc:
        raise LocalProtocolError(str(exc)) from None


def _looks_like_text(data: bytes) -> bool:
    return not data.translate(None, _TEXT_BYTES)


def _excerpt(data: bytes) -> str:
    text = data[:_EXCERPT].decode("utf-8", "replace").rstrip()
    return repr(text) + ("..." if len(data) > _EXCERPT else "")


class _Half:
    """What one direction of the connection has done so far."""

    __slots__ = ("name", "hello", "bye", "calls", "streams")

    def __init__(self, name: str) -> None:
        self.name = name
        self.hello: Hello | None = None
        self.bye = False
        self.calls: set[int] = set()  # Calls this direction sent that await an answer
        self.streams: set[int] = set()  # streams this direction opened and has not ended


def _advance(sender: _Half, receiver: _Half, event: Event, *, from_peer: bool) -> None:
    """Apply one event to the state, checking everything before changing anything."""
    who, what = sender.name, type(event).__name__
    if sender.bye:
        raise _Invalid(f"{who} sent {what} after Bye")
    if sender.hello is None:
        if not isinstance(event, Hello):
            raise _Invalid(f"{who}'s first event must be Hello, not {what}")
        if event.version != PROTOCOL_VERSION:
            if from_peer:
                raise _version_mismatch(event.version)
            raise _Invalid(f"Hello.version must be {PROTOCOL_VERSION}, not {event.version}")
        sender.hello = event
        return
    match event:
        case Hello():
            raise _Invalid(f"{who} sent a second Hello")
        case Call(call_id=call_id):
            if call_id in sender.calls:
                raise _Invalid(f"{who} reused call id {call_id} while that call is outstanding")
            sender.calls.add(call_id)
        case Reply(call_id=call_id) | Fail(call_id=call_id):
            if call_id not in receiver.calls:
                raise _Invalid(f"{who} sent {what} for call {call_id}, which {receiver.name} has no outstanding Call for")
            receiver.calls.remove(call_id)
        case StreamOpen(stream_id=stream_id):
            if stream_id in sender.streams:
                raise _Invalid(f"{who} opened stream {stream_id}, which is already open")
            sender.streams.add(stream_id)
        case StreamData(stream_id=stream_id) | StreamClose(stream_id=stream_id) | StreamAbort(stream_id=stream_id):
            if stream_id not in sender.streams:
                raise _Invalid(f"{who} sent {what} on stream {stream_id}, which it has not opened")
            if not isinstance(event, StreamData):
                sender.streams.remove(stream_id)
        case Bye():
            sender.bye = True
        case Notice():
            pass


class Connection:
    """Protocol state for one end of one connection.

    The two directions are independent: after the peer breaks the protocol this
    side may still send (a Bye saying why, typically), and a refused
    :meth:`send` leaves the state untouched.
    """

    def __init__(self, role: Role, *, max_frame: int = MAX_FRAME_DEFAULT) -> None:
        if not 64 <= max_frame < 2**32:
            raise ValueError(f"max_frame must be between 64 and 2**32 - 1, not {max_frame}")
        self.role = role
        self.max_frame = max_frame
        peer = Role.AGENT if role is Role.SOURCE else Role.SOURCE
        self._us = _Half(role.value)
        self._peer = _Half(peer.value)
        self._buf = bytearray()
        self._pos = 0  # start of the first unparsed frame in _buf
        self._eof = False
        self._error: str | None = None

    @property
    def peer_hello(self) -> Hello | None:
        return self._peer.hello

    @property
    def closed(self) -> bool:
        """True once nothing can flow either way: failed, or both directions ended."""
        return self._error is not None or (self._us.bye and (self._peer.bye or self._eof))

    def send(self, event: Event) -> bytes:
        try:
            frame = _encode(event)
            if len(frame) - 4 > self.max_frame:
                raise _Invalid(f"{type(event).__name__} frame of {len(frame) - 4} bytes exceeds max_frame")
            _advance(self._us, self._peer, event, from_peer=False)
        except _Invalid as exc:
            raise LocalProtocolError(str(exc)) from None
        return frame

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *more: bytes | bytearray | memoryview
    ) -> bytes:
        """Hot path for bulk data: no event object, bytearray/memoryview accepted as
        is, and several buffers framed as one (see :func:`encode_stream_data`)."""
        if self._us.bye or stream_id not in self._us.streams:
            # Let the general path produce the precise complaint.
            return self.send(StreamData(stream_id=stream_id, data=b"".join((data, *more))))
        frame = encode_stream_data(stream_id, data, *more)
        if len(frame) - 4 > self.max_frame:
            raise LocalProtocolError(f"StreamData frame of {len(frame) - 4} bytes exceeds max_frame")
        return frame

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise PeerProtocolError(f"connection already failed: {self._error}")
        events: list[Event] = []
        try:
            if self._eof:
                raise _Invalid("data received after EOF")
            self._buf += data
            self._parse(events)
        except _Invalid as exc:
            self._fail(str(exc))
            raise PeerProtocolError(str(exc), events) from None
        return events

    def feed_eof(self) -> None:
        """EOF without Bye is allowed (the caller sees ``peer_hello`` / no Bye); EOF mid-frame is not."""
        if self._error is not None:
            raise PeerProtocolError(f"connection already failed: {self._error}")
        self._eof = True
        pending = bytes(self._buf[self._pos : self._pos + _EXCERPT + 1])
        if not pending:
            return
        if self._peer.hello is None and _looks_like_text(pending):
            message = f"peer sent non-protocol data: {_excerpt(pending)}"
        else:
            message = f"connection closed in the middle of a frame ({len(self._buf) - self._pos} bytes of it received)"
        self._fail(message)
        raise PeerProtocolError(message)

    def _fail(self, message: str) -> None:
        self._error = message
        self._buf = bytearray()
        self._pos = 0

    def _parse(self, events: list[Event]) -> None:
        buf = self._buf
        try:
            while len(buf) - self._pos >= 4:
                start = self._pos + 4
                (size,) = _HEADER.unpack_from(buf, self._pos)
                limit = self.max_frame if self._peer.hello else min(self.max_frame, _HELLO_MAX)
                if size > limit:
                    if self._bad_length(size, limit):
                        return
                if len(buf) - start < size:
                    return
                with memoryview(buf) as view, view[start : start + size] as body:
                    try:
                        event = _decode_body(body)
                    except _Undecodable:
                        if self._peer.hello is None:
                            head = bytes(view[self._pos : self._pos + _EXCERPT + 1])
                            raise _Invalid(f"peer sent non-protocol data: {_excerpt(head)}") from None
                        raise
                self._pos = start + size
                _advance(self._peer, self._us, event, from_peer=True)
                events.append(event)
        finally:
            # Drop consumed frames once per feed, not per frame: CPython trims a
            # bytearray's front without copying, and leftovers are at most a frame.
            if self._pos:
                del buf[: self._pos]
                self._pos = 0

    def _bad_length(self, size: int, limit: int) -> bool:
        """Raise for an impossible length, or return True to wait for more of a text line.

        Before the peer's Hello, printable bytes almost surely come from a shell
        or a traceback; waiting for the end of the line (or enough of it) makes the
        error quote the same text however the bytes happened to be chunked.
        """
        head = bytes(self._buf[self._pos : self._pos + _EXCERPT + 1])
        if self._peer.hello is None:
            if _looks_like_text(head) and b"\n" not in head and len(head) <= _EXCERPT:
                return True
            raise _Invalid(f"peer sent non-protocol data: {_excerpt(head)}")
        message = f"peer announced a frame of {size} bytes, over the limit of {limit}"
        if _looks_like_text(head[:4]):  # e.g. the agent died and Python printed a traceback
            message = f"peer sent non-protocol data: {_excerpt(head)} ({message})"
        raise _Invalid(message)
