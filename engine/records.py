"""File records on "rootfs" and "images" streams, each with its own digest.

A record is ``[u32 n][n bytes: msgpack entry][entry.size bytes of data]
[end u8][crc32 u32]``. Pure code, shared by the source (:class:`Encoder`)
and the agent (:class:`RecordDecoder`).

The size comes first (from the source's scan) so that data can stream
without a length per chunk; the trailer comes last so that the source
digests the bytes it actually sent, as it sends them, without reading a
file twice. The digest (:mod:`tug.engine.integrity`) covers the whole
record, header and end byte included: a damaged path, mode or size is
caught like damaged data.

``end`` says what the data is. ``INTACT``: the file as scanned, which the
receiver commits once its digest verifies. ``CHANGED``: the file no longer
matched its scan when it was read (it shrank, grew, was rewritten or
replaced while the container ran), so the data, completed with zeros to the
announced size, is not the file: the receiver verifies the record and
discards it, and the next pass sends the file as it then is. The source
sends ``CHANGED`` only while the container runs; once it is frozen a file
that differs from its scan is an error (see
:func:`tug.engine.source.transfer.send_entries`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Mapping

import msgpack

from tug.engine import integrity
from tug.engine.errors import ProtocolError
from tug.engine.rootfs import FILE, Entry

_LEN = struct.Struct(">I")
_TRAILER = struct.Struct(">BI")
#: Longest msgpack entry accepted (a path of up to 4 KiB and a link of up to 4 KiB fit easily).
MAX_HEADER = 1 << 20


class End(enum.IntEnum):
    """How a record's data relates to the file it announced (module doc)."""

    INTACT = 0
    CHANGED = 1


def encode_header(entry: Entry) -> bytes:
    body: bytes = msgpack.packb(entry.to_wire(), use_bin_type=True)
    return _LEN.pack(len(body)) + body


class Encoder:
    """One outgoing record: its header, then each chunk as sent, then its trailer."""

    __slots__ = ("header", "_digest", "sent")

    def __init__(self, entry: Entry) -> None:
        self.header = encode_header(entry)
        self._digest = integrity.Digest(self.header)
        self.sent = 0  # data bytes so far

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        """Account for a chunk of data that is sent (in this order)."""
        self._digest.update(chunk)
        self.sent += len(chunk)

    def trailer(self, end: End) -> bytes:
        return _TRAILER.pack(end, integrity.digest(bytes((end,)), self._digest.value))


def encode_record(entry: Entry, data: bytes, end: End = End.INTACT) -> bytes:
    """A whole record (tests and tools; the source streams with :class:`Encoder`)."""
    if len(data) != entry.size:
        raise ValueError(f"record for {entry.path!r} announces {entry.size} bytes, has {len(data)}")
    enc = Encoder(entry)
    enc.add(data)
    return enc.header + data + enc.trailer(end)


class RecordDecoder:
    """Splits the record stream back into (entry, data chunk, end) pieces.

    ``end`` is None for data chunks; each record finishes with one piece
    whose chunk is empty and whose ``end`` is the record's :class:`End`,
    yielded only once its digest verified (else IntegrityError naming
    ``what`` and the path). Only headers and trailers are buffered; file data
    is handed on as views of the caller's bytes, so a 1 MiB chunk goes from
    the frame to ``os.write`` without another copy, and is digested after
    the receiver took it (the bytes it wrote).
    """

    def __init__(self, what: str = "file") -> None:
        self.what = what
        self._hdr = bytearray()
        self._tail = bytearray()
        self._entry: Entry | None = None
        self._digest = integrity.Digest()
        self._left = 0
        #: Records and data bytes decoded so far (checked against the stream's close).
        self.records = 0
        self.bytes = 0

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[Entry, memoryview, End | None]]:
        view = memoryview(data)
        while view:
            entry = self._entry
            if entry is None:
                # Fill the 4-byte length, then the header it announces.
                want = 4 if len(self._hdr) < 4 else 4 + self._header_len()
                take = want - len(self._hdr)
                self._hdr += view[:take]
                view = view[take:]
                if len(self._hdr) < 4 or len(self._hdr) < 4 + self._header_len():
                    continue
                try:
                    item = msgpack.unpackb(bytes(self._hdr[4:]), raw=False)
                except Exception as exc:  # msgpack raises several unrelated types
                    raise ProtocolError(f"bad {self.what} record header: {exc}") from None
                entry = Entry.from_wire(item)
                if entry.kind != FILE:
                    raise ProtocolError(f"record for a non-file: {entry.path!r}")
                self._digest = integrity.Digest(self._hdr)
                self._hdr.clear()
                self._entry, self._left = entry, entry.size
                continue
            if self._left:
                take = min(self._left, len(view))
                chunk, view = view[:take], view[take:]
                self._left -= take
                yield entry, chunk, None
                self._digest.update(chunk)
                self.bytes += take
                continue
            take = _TRAILER.size - len(self._tail)
            self._tail += view[:take]
            view = view[take:]
            if len(self._tail) < _TRAILER.size:
                continue
            flag, expected = _TRAILER.unpack(self._tail)
            got = integrity.digest(self._tail[:1], self._digest.value)
            self._tail.clear()
            self._entry = None
            if got != expected:
                raise integrity.mismatch(f"{self.what} {entry.path!r}", expected, got)
            try:
                end = End(flag)
            except ValueError:
                raise ProtocolError(f"{self.what} record for {entry.path!r} ends with unknown flag {flag}") from None
            self.records += 1
            yield entry, memoryview(b""), end

    def _header_len(self) -> int:
        (n,) = _LEN.unpack_from(self._hdr)
        if n > MAX_HEADER:
            raise ProtocolError(f"{self.what} record header too large")
        return int(n)

    def finish(self) -> None:
        if self._entry is not None or self._hdr:
            raise ProtocolError(f"{self.what} stream ended in the middle of a record")

    def close(self, meta: Mapping[str, object]) -> None:
        """The stream's end: no record cut short, and every record and byte its sender counted arrived."""
        self.finish()
        integrity.verify_totals(f"the stream of {self.what}s", meta, files=self.records, bytes=self.bytes)
