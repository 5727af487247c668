"""CRIU's ``stats-dump`` image: what a (pre-)dump scanned, skipped and wrote.

The soft-dirty tracker's rounds report these numbers to the convergence policy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tug.engine.criu.images import IMG_SERVICE_MAGIC, STATS_MAGIC
from tug.engine.criu.protobuf import FRAME, WT_LEN, fields, fields_at, varint_field
from tug.engine.errors import ImageFormatError

_U64_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True, kw_only=True)
class DumpStats:
    """CRIU's ``dump_stats_entry`` (images/stats.proto), times in microseconds.

    For a dump with a parent: ``pages_scanned`` pages were looked at,
    ``pages_skipped_parent`` were unchanged since the parent (sent as holes),
    ``pages_written`` were sent. The ``shpages_*`` counts are the same for
    shared memory (anonymous shared, SysV shm, memfd).
    """

    freezing_time_us: int
    frozen_time_us: int
    memdump_time_us: int
    memwrite_time_us: int
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int
    pages_lazy: int
    shpages_scanned: int = 0
    shpages_skipped_parent: int = 0
    shpages_written: int = 0

    @property
    def dirty_pages(self) -> int:
        """Pages the dump had to send: private and shared memory."""
        return self.pages_written + self.shpages_written


#: dump_stats_entry field number -> DumpStats attribute.
_DUMP_STATS_FIELDS = {
    1: "freezing_time_us",
    2: "frozen_time_us",
    3: "memdump_time_us",
    4: "memwrite_time_us",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    9: "pages_lazy",
    12: "shpages_scanned",
    13: "shpages_skipped_parent",
    14: "shpages_written",
}
_DUMP_STATS_REQUIRED = ("freezing_time_us", "frozen_time_us", "memdump_time_us", "memwrite_time_us",
                        "pages_scanned", "pages_skipped_parent", "pages_written", "pages_lazy")


def read_dump_stats(data: bytes | bytearray | memoryview) -> DumpStats:
    """Parse CRIU's ``stats-dump`` (written into the dump's work dir).

    Layout: ``IMG_SERVICE_MAGIC``, ``STATS_MAGIC``, then one framed
    ``stats_entry`` whose field 1 is the ``dump_stats_entry``. A
    ``stats-restore`` (field 2 only) or anything else raises ImageFormatError.
    """
    buf = bytes(data)
    if len(buf) < 12:
        raise ImageFormatError("stats image is shorter than its header")
    service, kind = struct.unpack_from("<II", buf)
    if (service, kind) != (IMG_SERVICE_MAGIC, STATS_MAGIC):
        raise ImageFormatError(f"not a CRIU stats image: magics {service:#010x} {kind:#010x}")
    (size,) = FRAME.unpack_from(buf, 8)
    if size > len(buf) - 12:
        raise ImageFormatError(f"stats record claims {size} bytes, {len(buf) - 12} remain")
    dump: tuple[int, int] | None = None
    for number, wire, value, start in fields_at(buf, 12, 12 + size):
        if number == 1:
            if wire != WT_LEN:
                raise ImageFormatError(f"stats_entry.dump has wire type {wire}, expected a message")
            dump = (start, start + value)
    if dump is None:
        raise ImageFormatError("stats image holds no dump statistics (a stats-restore?)")
    values: dict[str, int] = {}
    for number, wire, value in fields(buf, *dump):
        name = _DUMP_STATS_FIELDS.get(number)
        if name is not None:
            values[name] = varint_field(number, wire, value, _U64_LIMIT - 1)
    missing = [n for n in _DUMP_STATS_REQUIRED if n not in values]
    if missing:
        raise ImageFormatError(f"dump statistics lack required fields: {', '.join(missing)}")
    return DumpStats(**values)
