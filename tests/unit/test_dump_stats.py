"""CRIU's stats-dump reader, against files real CRIU 4.2.1 wrote on this platform.

Both samples were written by real dumps here and their values cross-checked
with ``protoc --decode_raw`` (on the bytes after the 12-byte header):

* PLAIN: ``criu dump -t PID -D img`` of a ``sleep`` in its own pid namespace;
  pages_written 31 matched its pages-1.img of 126976 bytes.
* STREAMED: ``runc checkpoint --leave-running --page-server 127.0.0.1:PORT`` of a
  64 MiB lab demo container; pages_written 16469 matched the 67457024-byte
  pages-65537.img the page server wrote.
"""

from __future__ import annotations

import struct

import pytest

from tug.engine.criu.images import IMG_SERVICE_MAGIC, STATS_MAGIC
from tug.engine.criu.stats import DumpStats, read_dump_stats, read_restore_stats
from tug.engine.errors import ImageFormatError

PLAIN = bytes.fromhex(
    "40591055" "06330957"  # IMG_SERVICE_MAGIC, STATS_MAGIC
    "20000000"  # one record of 32 bytes: stats_entry{dump = 1: {...}}
    "0a1e086410f22c188205207a283a3000381f4000480050065806600068007000"
)
STREAMED = bytes.fromhex(
    "40591055" "06330957" "29000000"
    "0a2708be0210c4821a18e5d80720c2a707289d8101300038d580014000480050085808600068007000"
)


def test_plain_dump_stats() -> None:
    st = read_dump_stats(PLAIN)
    assert st == DumpStats(
        freezing_time_us=100, frozen_time_us=5746, memdump_time_us=642, memwrite_time_us=122,
        pages_scanned=58, pages_skipped_parent=0, pages_written=31, pages_lazy=0,
        shpages_scanned=0, shpages_skipped_parent=0, shpages_written=0,
    )
    assert st.dirty_pages == 31


def test_streamed_dump_stats() -> None:
    st = read_dump_stats(STREAMED)
    assert (st.pages_scanned, st.pages_skipped_parent, st.pages_written) == (16541, 0, 16469)
    assert st.frozen_time_us == 426308 and st.memwrite_time_us == 119746
    assert st.dirty_pages * 4096 == 67457024


def _image(dump: bytes, *, field: int = 1) -> bytes:
    entry = bytes([field << 3 | 2, len(dump)]) + dump
    return struct.pack("<III", IMG_SERVICE_MAGIC, STATS_MAGIC, len(entry)) + entry


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varints(fields: dict[int, int]) -> bytes:
    """A message of varint fields (key = number << 3 | wire type 0)."""
    return b"".join(_varint(number << 3) + _varint(value) for number, value in fields.items())


REQUIRED = {1: 1, 2: 2, 3: 3, 4: 4, 5: 1000, 6: 900, 7: 100, 9: 0}


def test_shared_memory_counts_as_dirty_and_unknown_fields_are_skipped() -> None:
    st = read_dump_stats(_image(_varints({**REQUIRED, 12: 50, 13: 40, 14: 10, 99: 7})))
    assert (st.pages_skipped_parent, st.shpages_skipped_parent) == (900, 40)
    assert st.dirty_pages == 110


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "shorter"),
        (PLAIN[:11], "shorter"),
        (struct.pack("<II", 0x54564319, STATS_MAGIC) + PLAIN[8:], "not a CRIU stats image"),
        (PLAIN[:-1], "claims 32 bytes"),
        (_image(_varints({1: 1, 2: 2, 3: 3}), field=2), "no dump statistics"),  # a stats-restore
        (_image(_varints({k: v for k, v in REQUIRED.items() if k != 7})), "pages_written"),
        (struct.pack("<III", IMG_SERVICE_MAGIC, STATS_MAGIC, 2) + b"\x08\x01", "expected a message"),
    ],
)
def test_malformed_stats_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(ImageFormatError, match=match):
        read_dump_stats(data)


def test_restore_stats() -> None:
    st = read_restore_stats(_image(_varints({1: 10, 2: 20, 3: 3000, 4: 4000, 5: 7}), field=2))
    assert (st.forking_time_us, st.restore_time_us, st.pages_compared, st.pages_skipped_cow, st.pages_restored) == (
        3000, 4000, 10, 20, 7
    )
    with pytest.raises(ImageFormatError, match="no restore statistics"):
        read_restore_stats(_image(_varints({1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 9: 9})))
    with pytest.raises(ImageFormatError, match="lack required fields: restore_time_us"):
        read_restore_stats(_image(_varints({1: 10, 2: 20, 3: 3000}), field=2))
