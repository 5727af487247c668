"""The protobuf wire format, as much of it as CRIU's images need.

CRIU writes its images with protobuf-c; tug reads and writes the few it
touches (pagemaps, stats) with this codec instead of generated code: every
field is bounds-checked, so a malformed image is an ImageFormatError, never
a crash or a huge allocation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from tug.engine.errors import ImageFormatError

_U64_LIMIT = 1 << 64
#: The length prefix of every framed protobuf message in an image.
FRAME = struct.Struct("<I")

# Protobuf wire types; 3 and 4 (groups) are not supported by protobuf-c either.
WT_VARINT = 0
WT_FIXED64 = 1
WT_LEN = 2
WT_FIXED32 = 5


def encode_varint(value: int) -> bytes:
    """Base-128 little-endian varint of an unsigned value below 2**64."""
    if not 0 <= value < _U64_LIMIT:
        raise ImageFormatError(f"value {value} does not fit a protobuf uint64")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at ``pos`` (not reading at or past ``end``); return (value, next pos).

    At most 10 bytes and 64 bits, as protobuf allows; anything longer cannot be
    a field CRIU wrote and would let garbage pass as a huge number.
    """
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise ImageFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise ImageFormatError("varint longer than 10 bytes")
    if value >= _U64_LIMIT:
        raise ImageFormatError("varint exceeds 64 bits")
    return value, pos


def fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (field number, wire type, varint value or 0) for each field in a message.

    Non-varint fields (which none of our known fields are) are skipped by their
    wire type, so records from a newer CRIU with extra fields still parse.
    """
    for number, wire, value, _, _, _ in field_spans(buf, pos, end):
        yield number, wire, value


def fields_at(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Like :func:`fields`, plus where a length-delimited field's payload starts.

    For a length-delimited field the value is its length and the fourth item
    its payload's offset (nested messages such as ``StatsEntry.dump``); for
    other fields the fourth item is -1.
    """
    for number, wire, value, payload, _, _ in field_spans(buf, pos, end):
        yield number, wire, value, payload


def field_spans(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Like :func:`fields_at`, plus each field's whole extent: where its key
    starts and where the field ends (to copy a record's fields byte for byte)."""
    while pos < end:
        start = pos
        key, pos = decode_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or number > 0x1FFFFFFF:
            raise ImageFormatError(f"invalid protobuf field number {number}")
        if wire == WT_VARINT:
            value, pos = decode_varint(buf, pos, end)
            yield number, wire, value, -1, start, pos
            continue
        if wire == WT_FIXED64:
            skip = 8
        elif wire == WT_FIXED32:
            skip = 4
        elif wire == WT_LEN:
            skip, pos = decode_varint(buf, pos, end)
        else:
            raise ImageFormatError(f"unsupported protobuf wire type {wire} for field {number}")
        if skip > end - pos:
            raise ImageFormatError(f"protobuf field {number} runs past the end of its record")
        yield number, wire, (skip if wire == WT_LEN else 0), (pos if wire == WT_LEN else -1), start, pos + skip
        pos += skip


def varint_field(number: int, wire: int, value: int, limit: int) -> int:
    """Check a known field's wire type and range (protobuf-c rejects a mismatch too)."""
    if wire != WT_VARINT:
        raise ImageFormatError(f"protobuf field {number} has wire type {wire}, expected varint")
    if value > limit:
        raise ImageFormatError(f"protobuf field {number} value {value} is out of range")
    return value
