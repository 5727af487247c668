"""CRIU's ``stats-dump`` and ``stats-restore`` images: what a dump or restore did, and how long it took.

The soft-dirty tracker's rounds report the dump's numbers to the convergence
policy; every migration's report splits its frozen window with both (where
the time went inside CRIU, and what runc and tug add around it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreStats:
    """CRIU's ``restore_stats_entry``, times in microseconds."""

    forking_time_us: int
    restore_time_us: int
    pages_compared: int
    pages_skipped_cow: int
    pages_restored: int = 0


_RESTORE_STATS_FIELDS = {
    1: "pages_compared",
    2: "pages_skipped_cow",
    3: "forking_time_us",
    4: "restore_time_us",
    5: "pages_restored",
}
_RESTORE_STATS_REQUIRED = ("pages_compared", "pages_skipped_cow", "forking_time_us", "restore_time_us")


def read_dump_stats(data: bytes | bytearray | memoryview) -> DumpStats:
    """Parse CRIU's ``stats-dump`` (written into the dump's work dir).

    Layout: ``IMG_SERVICE_MAGIC``, ``STATS_MAGIC``, then one framed
    ``stats_entry`` whose field 1 is the ``dump_stats_entry``. A
    ``stats-restore`` (field 2 only) or anything else raises ImageFormatError.
    """
    return DumpStats(**_entry(data, 1, "dump", _DUMP_STATS_FIELDS, _DUMP_STATS_REQUIRED))


def read_restore_stats(data: bytes | bytearray | memoryview) -> RestoreStats:
    """Parse CRIU's ``stats-restore`` (field 2 of the same ``stats_entry``)."""
    return RestoreStats(**_entry(data, 2, "restore", _RESTORE_STATS_FIELDS, _RESTORE_STATS_REQUIRED))


def _entry(
    data: bytes | bytearray | memoryview, field: int, what: str, names: dict[int, str], required: tuple[str, ...]
) -> dict[str, int]:
    buf = bytes(data)
    if len(buf) < 12:
        raise ImageFormatError("stats image is shorter than its header")
    service, kind = struct.unpack_from("<II", buf)
    if (service, kind) != (IMG_SERVICE_MAGIC, STATS_MAGIC):
        raise ImageFormatError(f"not a CRIU stats image: magics {service:#010x} {kind:#010x}")
    (size,) = FRAME.unpack_from(buf, 8)
    if size > len(buf) - 12:
        raise ImageFormatError(f"stats record claims {size} bytes, {len(buf) - 12} remain")
    span: tuple[int, int] | None = None
    for number, wire, value, start in fields_at(buf, 12, 12 + size):
        if number == field:
            if wire != WT_LEN:
                raise ImageFormatError(f"stats_entry.{what} has wire type {wire}, expected a message")
            span = (start, start + value)
    if span is None:
        raise ImageFormatError(f"stats image holds no {what} statistics")
    values: dict[str, int] = {}
    for number, wire, value in fields(buf, *span):
        name = names.get(number)
        if name is not None:
            values[name] = varint_field(number, wire, value, _U64_LIMIT - 1)
    missing = [n for n in required if n not in values]
    if missing:
        raise ImageFormatError(f"{what} statistics lack required fields: {', '.join(missing)}")
    return values


def criu_dump_steps(work_dir: Path) -> dict[str, float]:
    """Where CRIU's own time went in the dump whose work dir is ``work_dir``, in ms (empty if unknown).

    ``criu_frozen_ms`` is the time CRIU held the processes (memdump within
    it); the rest of a dump's wall time is runc, CRIU's start-up and its work
    before freezing (``criu_freezing_ms``) and after.
    """
    try:
        st = read_dump_stats((work_dir / "stats-dump").read_bytes())
    except (OSError, ImageFormatError):
        return {}
    return {
        "criu_freezing_ms": st.freezing_time_us / 1000,
        "criu_frozen_ms": st.frozen_time_us / 1000,
        "criu_memdump_ms": st.memdump_time_us / 1000,
        "criu_memwrite_ms": st.memwrite_time_us / 1000,
    }


def criu_restore_steps(work_dir: Path) -> dict[str, float]:
    """CRIU's own restore and forking times in ms from ``work_dir/stats-restore`` (empty if unknown)."""
    try:
        st = read_restore_stats((work_dir / "stats-restore").read_bytes())
    except (OSError, ImageFormatError):
        return {}
    return {"criu_restore_ms": st.restore_time_us / 1000, "criu_forking_ms": st.forking_time_us / 1000}
