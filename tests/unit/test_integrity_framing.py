"""The digests' wire format, sans-IO: file records and page runs inside protocol frames.

Streams are framed by the source's real encoders, carried in StreamData
frames of the real protocol Connection, fed to the agent's Connection whole,
byte by byte and cut anywhere (Hypothesis), and decoded by the agent's real
decoders: what comes out is what went in, and any single flipped bit, in a
header, in the data or in a digest, is an error, never a silently different
file or page.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tug.engine import integrity, pagestream, records
from tug.engine.errors import IntegrityError, ProtocolError
from tug.engine.rootfs import FILE, Entry
from tug.transports import protocol as p
from tug.transports.session import error_from_fail, fail_from_error

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAGE = pagestream.PAGE


def E(path: str, size: int, mtime: int = 7) -> Entry:
    return Entry(path, FILE, 0o644, 0, 0, size, mtime, "")


FILES = {"etc/hosts": b"127.0.0.1 localhost\n", "empty": b"", "bin/big": bytes(range(256)) * 30, "z": b"x"}
TOTAL = sum(map(len, FILES.values()))
RUNS = [(7, 0x4000, bytes(range(256)) * 48), (9, 0x7F0000001000, b"\x01" * PAGE), (7, 0x10000, bytes(PAGE))]


def record_stream(files: dict[str, bytes]) -> bytes:
    return b"".join(records.encode_record(E(path, len(data)), data) for path, data in files.items())


def run_stream(runs: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(pagestream.encode_header(pid, vaddr, data) + data for pid, vaddr, data in runs)


def decode_records(stream: bytes) -> dict[str, bytes]:
    """The agent's view of a record stream; raises on any error (IntegrityError or ProtocolError)."""
    dec, out = records.RecordDecoder(), {}
    for entry, chunk, end in dec.feed(stream):
        out[entry.path] = out.get(entry.path, b"") + bytes(chunk)
        assert end in (None, records.End.INTACT)
    dec.close({"files": dec.records, "bytes": dec.bytes})
    return out


def decode_runs(stream: bytes) -> list[tuple[int, int, bytes]]:
    dec, out = pagestream.RunDecoder(), []
    for pid, vaddr, piece in dec.feed(stream):
        if out and out[-1][0] == pid and out[-1][1] + len(out[-1][2]) == vaddr:
            out[-1] = (pid, out[-1][1], out[-1][2] + bytes(piece))
        else:
            out.append((pid, vaddr, bytes(piece)))
    dec.finish()
    return out


def over_the_wire(payload: bytes, cuts: list[int] | None, frame: int = 1000) -> bytes:
    """``payload`` sent as a stream by a source Connection in frames of ``frame`` bytes, and
    received by an agent Connection fed in pieces cut at ``cuts`` (None: byte by byte):
    the StreamData it decodes."""
    src, agent = p.Connection(p.Role.SOURCE), p.Connection(p.Role.AGENT)
    hello = p.Hello(version=p.PROTOCOL_VERSION, software="t", host="h", info={})
    wire = src.send(hello) + src.send(p.StreamOpen(stream_id=1, kind="rootfs", meta={}))
    wire += b"".join(src.send_data(1, payload[i : i + frame]) for i in range(0, len(payload), frame))
    wire += src.send(p.StreamClose(stream_id=1, meta={}))
    got = bytearray()
    pos = 0
    for cut in (list(range(1, len(wire))) if cuts is None else sorted(cuts)) + [len(wire)]:
        for ev in agent.feed(wire[pos:cut]):
            if isinstance(ev, p.StreamData):
                got += ev.data
        pos = max(pos, cut)
    return bytes(got)


def test_records_and_runs_whole_and_byte_by_byte() -> None:
    stream, runs = record_stream(FILES), run_stream(RUNS)
    assert decode_records(over_the_wire(stream, [])) == FILES
    assert decode_records(over_the_wire(stream, None, frame=1)) == FILES
    assert decode_runs(over_the_wire(runs, [])) == RUNS
    assert decode_runs(over_the_wire(runs, None, frame=3)) == RUNS


@FAST
@given(cuts=st.lists(st.integers(0, 30000), max_size=40), frame=st.integers(1, 30000))
def test_records_and_runs_cut_anywhere(cuts: list[int], frame: int) -> None:
    assert decode_records(over_the_wire(record_stream(FILES), cuts, frame)) == FILES
    assert decode_runs(over_the_wire(run_stream(RUNS), cuts, frame)) == RUNS


@FAST
@given(data=st.data())
def test_any_flipped_bit_in_a_record_stream_is_an_error(data: st.DataObject) -> None:
    stream = bytearray(record_stream(FILES))
    pos = data.draw(st.integers(0, len(stream) - 1))
    stream[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises((IntegrityError, ProtocolError)):
        decode_records(bytes(stream))


@FAST
@given(data=st.data())
def test_any_flipped_bit_in_a_run_stream_is_an_error(data: st.DataObject) -> None:
    stream = bytearray(run_stream(RUNS))
    pos = data.draw(st.integers(0, len(stream) - 1))
    stream[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises((IntegrityError, ProtocolError)):
        decode_runs(bytes(stream))


def test_a_flipped_data_byte_names_the_file_and_both_digests() -> None:
    stream = bytearray(record_stream(FILES))
    stream[stream.index(b"localhost")] ^= 0x20
    with pytest.raises(IntegrityError) as info:
        decode_records(bytes(stream))
    err = info.value
    assert (err.subject, err.check) == ("file 'etc/hosts'", "crc32") and err.expected != err.got
    assert f"crc32 expected {err.expected:#010x}, got {err.got:#010x}" in str(err)


def test_a_flipped_page_byte_names_the_run() -> None:
    stream = bytearray(run_stream(RUNS))
    stream[stream.index(b"\x01" * PAGE) + 100] ^= 0x01
    with pytest.raises(IntegrityError) as info:
        decode_runs(bytes(stream))
    assert info.value.subject == "page run of pid 9 at 0x7f0000001000 (1 pages)"


def test_the_run_is_verified_once_its_last_piece_was_handed_on() -> None:
    """A run's pieces reach the store before its digest can be known; the error follows its last piece."""
    stream = bytearray(run_stream(RUNS[:1]))
    stream[-1] ^= 0xFF
    dec, pieces = pagestream.RunDecoder(), []
    with pytest.raises(IntegrityError):
        for piece in dec.feed(bytes(stream[: -PAGE])):
            pieces.append(piece)
        for piece in dec.feed(bytes(stream[-PAGE:])):
            pieces.append(piece)
    assert sum(len(x[2]) for x in pieces) == len(RUNS[0][2])


def test_a_changed_record_is_verified_and_marked() -> None:
    e = E("log", 6)
    stream = records.encode_record(e, b"abc\0\0\0", records.End.CHANGED)
    ends = [end for _, _, end in records.RecordDecoder().feed(stream) if end is not None]
    assert ends == [records.End.CHANGED]
    bad = bytearray(stream)
    bad[-5] = records.End.INTACT  # the end flag is covered by the digest
    with pytest.raises(IntegrityError):
        list(records.RecordDecoder().feed(bytes(bad)))


def test_a_record_cannot_be_built_short_or_long() -> None:
    with pytest.raises(ValueError):
        records.encode_record(E("f", 10), b"12345")


@pytest.mark.parametrize("meta", [{"files": 5, "bytes": TOTAL}, {"files": 4, "bytes": TOTAL + 1}, {"files": 4}])
def test_the_close_counts_catch_a_missing_record(meta: dict[str, Any]) -> None:
    dec = records.RecordDecoder("rootfs file")
    list(dec.feed(record_stream(FILES)))
    dec.close({"files": 4, "bytes": TOTAL})  # what was sent
    dec = records.RecordDecoder("rootfs file")
    list(dec.feed(record_stream(FILES)))
    with pytest.raises((IntegrityError, ProtocolError)):
        dec.close(meta)


def test_the_close_counts_catch_a_missing_run() -> None:
    dec = pagestream.RunDecoder()
    list(dec.feed(run_stream(RUNS[:2])))
    with pytest.raises(IntegrityError, match="runs expected 3, got 2"):
        dec.close({"runs": 3, "bytes": dec.bytes + PAGE})


def test_integrity_error_crosses_the_session_with_its_details() -> None:
    sent = integrity.mismatch("rootfs file 'a'", 0x1234, 0x5678)
    back = error_from_fail(fail_from_error(3, sent))
    assert isinstance(back, IntegrityError) and str(back) == str(sent)
    assert (back.subject, back.check, back.expected, back.got) == ("rootfs file 'a'", "crc32", 0x1234, 0x5678)
    size = integrity.size_mismatch("image file 'core-1.img'", 100, 10)
    back = error_from_fail(fail_from_error(4, size))
    assert isinstance(back, IntegrityError) and (back.check, back.expected, back.got) == ("size", 100, 10)
