"""A byte stream that survives its link, sans-IO: numbering, acks, resume.

Why: after the commit point the lazy fill's byte streams (CRIU's page-server
connection for post-copy, the fault and sweep channels for hybrid) run over
SSH channels. A dropped SSH connection would end them, and neither CRIU's
protocol nor tug's hybrid wire can replay a half-answered request. Rather than
teach every protocol to resume, the stream itself survives: each end numbers
the bytes it sends, keeps them until the other end acknowledges them, and
when a new channel replaces a lost one both ends say how much they received
and resend the rest (QEMU's postcopy recovery does the same for its stream).
The programs at either end of the stream never see the break.

Frames, big-endian, each starting with a one-byte type:

- ``RESUME`` (first frame on every channel, both ways):
  ``u64 received, u8 eof_received``.
- ``DATA``: ``u64 offset, u32 length, payload``; ``offset`` is the number of
  the payload's first byte and must be exactly what the receiver has, so a
  lost or repeated byte is a protocol error, never silent.
- ``ACK``: ``u64 received``: the sender may forget everything before it.
- ``EOF``: ``u64 offset``: the sender's stream ends at ``offset``.

The unacknowledged bytes are bounded by ``window``: :attr:`Tunnel.window_full`
tells the I/O layer to stop reading the local end (backpressure). Acks go
every ``ack_every`` bytes received, well below the window, so a sender never
waits on an ack that is not coming.

Nothing here does I/O: :meth:`Tunnel.send` and :meth:`Tunnel.feed` return
the bytes to write on the current channel. Any malformed input raises
:class:`TunnelError` (a :class:`ProtocolError`), never anything else.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

from tug.engine.errors import ProtocolError

RESUME: Final = 1
DATA: Final = 2
ACK: Final = 3
EOF: Final = 4

_RESUME = struct.Struct(">BQB")
_DATA = struct.Struct(">BQI")
_U64 = struct.Struct(">BQ")

#: Largest payload in one DATA frame (the reader needs a bound on what it buffers).
MAX_DATA: Final = 1 << 20
WINDOW_DEFAULT: Final = 16 << 20
ACK_EVERY_DEFAULT: Final = 256 << 10


class TunnelError(ProtocolError):
    """The peer's end of a tunnel sent something no correct end sends."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Fed:
    """What a :meth:`Tunnel.feed` call produced."""

    #: Payload for the local end, in order, each byte exactly once.
    data: bytes
    #: The peer's stream ended (after ``data``).
    eof: bool
    #: Bytes to write on the channel (acks, a resend after RESUME).
    reply: bytes


class Tunnel:
    """One end of a resumable stream; the same class at both ends.

    Life of a channel: :meth:`attach` (returns our RESUME to write), then
    :meth:`feed` whatever the channel brings (the peer's RESUME first),
    :meth:`send` what the local end gives; :meth:`detach` when the channel is
    lost. Sends while detached or before the peer's RESUME are buffered and
    go out with the resend.
    """

    def __init__(self, *, window: int = WINDOW_DEFAULT, ack_every: int = ACK_EVERY_DEFAULT) -> None:
        if not 0 < ack_every < window:
            raise ValueError("ack_every must be positive and below window")
        self.window = window
        self.ack_every = ack_every
        #: Bytes numbered so far (what the local end gave us).
        self.sent = 0
        #: Bytes the peer confirmed; ``_unacked`` holds ``[acked, sent)``.
        self.acked = 0
        self._unacked = bytearray()
        #: Bytes of the peer's stream delivered locally.
        self.received = 0
        self._ack_sent = 0
        self.eof_sent = False
        self.eof_received = False
        self.attached = False
        #: The peer's RESUME has arrived on the current channel: sends go out directly.
        self.open = False
        self.resumes = 0
        self._buf = bytearray()

    @property
    def window_full(self) -> bool:
        return self.sent - self.acked >= self.window

    @property
    def unacked(self) -> int:
        return self.sent - self.acked

    @property
    def done(self) -> bool:
        """Both directions ended and everything we sent is confirmed."""
        return self.eof_sent and self.eof_received and self.acked == self.sent

    # ---- channel life --------------------------------------------------------

    def attach(self) -> bytes:
        """A new channel: our RESUME, the first bytes to write on it."""
        self.attached = True
        self.open = False
        self._buf.clear()
        self._ack_sent = self.received
        return _RESUME.pack(RESUME, self.received, int(self.eof_received))

    def detach(self) -> None:
        """The channel is gone: whatever of a frame it brought is dropped (the peer resends it)."""
        self.attached = False
        self.open = False
        self._buf.clear()

    # ---- sending -------------------------------------------------------------

    def send(self, data: bytes) -> bytes:
        """Number ``data`` and keep it; returns the frames to write now (maybe none)."""
        if self.eof_sent:
            raise ProtocolError("tunnel: send after our end of stream")
        if not data:
            return b""
        start = self.sent
        self._unacked += data
        self.sent += len(data)
        return _frames(start, bytes(data)) if self.open else b""

    def send_eof(self) -> bytes:
        """Our stream ends here; returns the frame to write now (maybe none)."""
        if self.eof_sent:
            return b""
        self.eof_sent = True
        return _U64.pack(EOF, self.sent) if self.open else b""

    # ---- receiving -----------------------------------------------------------

    def feed(self, data: bytes) -> Fed:
        """Bytes from the channel; raises :class:`TunnelError` on anything malformed."""
        if not self.attached:
            raise ProtocolError("tunnel: data from a channel that is not attached")
        self._buf += data
        out = bytearray()
        reply = bytearray()
        eof = False
        pos = 0
        buf = self._buf
        while pos < len(buf):
            kind = buf[pos]
            if not self.open and kind != RESUME:
                raise TunnelError(f"tunnel: frame type {kind} before the peer's RESUME")
            if kind == RESUME:
                if len(buf) - pos < _RESUME.size:
                    break
                _, got, got_eof = _RESUME.unpack_from(buf, pos)
                pos += _RESUME.size
                if self.open:
                    raise TunnelError("tunnel: a second RESUME on one channel")
                reply += self._resume(got, got_eof)
            elif kind == DATA:
                if len(buf) - pos < _DATA.size:
                    break
                _, offset, length = _DATA.unpack_from(buf, pos)
                if length == 0 or length > MAX_DATA:
                    raise TunnelError(f"tunnel: DATA of {length} bytes (1..{MAX_DATA})")
                if offset != self.received:
                    raise TunnelError(f"tunnel: DATA at byte {offset}, expected {self.received} (a byte lost or repeated)")
                if self.eof_received:
                    raise TunnelError("tunnel: DATA after the peer's end of stream")
                if len(buf) - pos < _DATA.size + length:
                    break
                start = pos + _DATA.size
                out += buf[start : start + length]
                pos = start + length
                self.received += length
            elif kind in (ACK, EOF):
                if len(buf) - pos < _U64.size:
                    break
                _, n = _U64.unpack_from(buf, pos)
                pos += _U64.size
                if kind == ACK:
                    self._ack(n)
                else:
                    if n != self.received or self.eof_received:
                        raise TunnelError(f"tunnel: end of stream at byte {n}, having {self.received}")
                    self.eof_received = True
                    eof = True
            else:
                raise TunnelError(f"tunnel: unknown frame type {kind}")
        del buf[:pos]
        if self.open and (self.received - self._ack_sent >= self.ack_every or (eof and self.received > self._ack_sent)):
            reply += self.ack()
        return Fed(data=bytes(out), eof=eof, reply=bytes(reply))

    def ack(self) -> bytes:
        """An ACK of everything received (the I/O layer may send one when idle)."""
        if not self.open or self._ack_sent == self.received:
            return b""
        self._ack_sent = self.received
        return _U64.pack(ACK, self.received)

    def _ack(self, n: int) -> None:
        if not self.acked <= n <= self.sent:
            raise TunnelError(f"tunnel: ACK of byte {n}, outside {self.acked}..{self.sent}")
        del self._unacked[: n - self.acked]
        self.acked = n

    def _resume(self, got: int, got_eof: int) -> bytes:
        if got_eof not in (0, 1):
            raise TunnelError(f"tunnel: RESUME with end-of-stream flag {got_eof}")
        if got_eof and not self.eof_sent:
            raise TunnelError("tunnel: the peer claims our end of stream, which we never sent")
        if got_eof and got != self.sent:
            raise TunnelError(f"tunnel: the peer claims our end of stream at byte {got}, sent {self.sent}")
        self._ack(got)
        self.open = True
        self.resumes += 1
        out = _frames(self.acked, bytes(self._unacked)) if self._unacked else b""
        if self.eof_sent and not got_eof:
            out += _U64.pack(EOF, self.sent)
        return out


def _frames(offset: int, data: bytes) -> bytes:
    parts = []
    view = memoryview(data)
    for i in range(0, len(data), MAX_DATA):
        chunk = view[i : i + MAX_DATA]
        parts.append(_DATA.pack(DATA, offset + i, len(chunk)))
        parts.append(bytes(chunk))
    return b"".join(parts)
