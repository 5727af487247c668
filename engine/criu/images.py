"""Read and write CRIU's ``pagemap-*.img`` files and locate pages in ``pages-*.img``.

Why this exists: without kernel soft-dirty tracking tug pre-sends a running
container's memory itself, keyed by (pid in the container's pid namespace,
virtual address). At the final frozen dump CRIU writes a full dump; tug reads
each process pagemap to learn which (pid, vaddr) every 4 KiB block of the
matching pages file holds, sends only blocks the destination does not already
have, and on the destination rebuilds byte-exact pages files plus pagemaps for
``criu restore``. So the reader must be exact and the writer must produce the
bytes CRIU itself writes. No protobuf library is used: two tiny messages do not
justify a dependency, and a hand-written codec lets us control every byte.

The format, as CRIU (4.x, unchanged since 3.x) writes it:

* A pagemap image starts with two little-endian u32 magics: ``IMG_COMMON_MAGIC``
  (0x54564319, every image but ``inventory.img``; service files such as
  ``stats-dump`` use ``IMG_SERVICE_MAGIC`` 0x55105940 instead) and then the
  image type's own magic, ``PAGEMAP_MAGIC`` 0x56084025 (shmem pagemaps share it).
* Then protobuf entries, each framed as a host-order (little-endian on the
  x86-64/arm64 hosts tug supports) u32 length followed by that many bytes: one
  ``PagemapHead {required uint32 pages_id = 1}`` then ``PagemapEntry`` records
  up to end of file. An entry is ``{required uint64 vaddr = 1; required uint32
  compat_nr_pages = 2; optional bool in_parent = 3; optional uint32 flags = 4;
  optional uint64 nr_pages = 5}``. CRIU 4.x sets vaddr, flags and nr_pages and
  leaves compat_nr_pages at 0, which protobuf-c still emits because the field is
  required; in_parent is never set. Fields are emitted in field-number order.
* The pages live in ``pages-<pages_id>.img``, a raw image: no magic, no header,
  just the 4 KiB pages of the entries flagged ``PE_PRESENT``, in pagemap order.
  Entries without ``PE_PRESENT`` occupy no bytes there: their data is in the
  parent dump (``PE_PARENT``) or is served by a lazy-pages server (``PE_LAZY``).
  ``PE_LAZY | PE_PRESENT`` (CRIU's flags for ordinary anonymous private memory in a
  plain dump) means the data is in the file *and* could have been fetched lazily.
* Process pagemaps are named ``pagemap-<vpid>.img`` (vpid: the pid inside the
  dumped tree's pid namespace); shared memory (anon shared, memfd, SysV shm) uses
  ``pagemap-shmem-<shmid>.img``, whose vaddrs are offsets into the object. All
  pagemaps of one dump draw their pages_id from one counter starting at 1
  (a page server's from 0x10001).

The one other image tug reads is CRIU's ``stats-dump`` (:func:`read_dump_stats`):
a (pre-)dump's page counts, which is how soft-dirty pre-copy learns how many
pages each round found dirty.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tug.engine.criu.protobuf import encode_varint, fields, varint_field
from tug.engine.errors import ImageFormatError  # re-exported: callers catch images.ImageFormatError

__all__ = [
    "IMG_COMMON_MAGIC",
    "IMG_SERVICE_MAGIC",
    "ImageFormatError",
    "PAGEMAP_MAGIC",
    "PAGE_SIZE",
    "PE_LAZY",
    "PE_PARENT",
    "PE_PRESENT",
    "Pagemap",
    "PagemapEntry",
    "STATS_MAGIC",
    "iter_pages",
    "page_layout",
    "pagemap_file_name",
    "pages_file_name",
    "pages_file_size",
    "process_pagemap_pid",
    "read_pagemap",
    "shmem_pagemap_id",
    "write_pagemap",
]

#: Size of the pages CRIU stores; x86-64 and the arm64 kernels tug targets use 4 KiB.
PAGE_SIZE = 4096

#: First u32 of every image but inventory.img (criu/include/magic.h).
IMG_COMMON_MAGIC = 0x54564319
#: First u32 of CRIU's service files (stats-dump, irmap-cache); never a pagemap.
IMG_SERVICE_MAGIC = 0x55105940
#: Second u32 of pagemap-*.img and pagemap-shmem-*.img.
PAGEMAP_MAGIC = 0x56084025
#: Second u32 of stats-dump / stats-restore (after IMG_SERVICE_MAGIC).
STATS_MAGIC = 0x57093306

#: The entry's pages are in the parent (previous) dump, not in this pages file.
PE_PARENT = 1 << 0
#: The entry's pages may be restored lazily (userfaultfd post-copy).
PE_LAZY = 1 << 1
#: The entry's pages are stored in this dump's pages-<pages_id>.img.
PE_PRESENT = 1 << 2

_U32_MAX = (1 << 32) - 1
_U64_LIMIT = 1 << 64
_MAGICS = struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)
_FRAME = struct.Struct("<I")


_PROCESS_PAGEMAP = re.compile(r"pagemap-([1-9][0-9]*)\.img")
_SHMEM_PAGEMAP = re.compile(r"pagemap-shmem-([1-9][0-9]*)\.img")


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """A run of ``nr_pages`` pages starting at ``vaddr``, with ``PE_*`` flags.

    Validated on construction so that every entry tug holds (read or built) can
    be written back and maps each page to exactly one address: vaddr is page
    aligned, the run is non-empty and does not wrap past 2**64, flags fit a u32.
    Unknown flag bits are kept: a newer CRIU may define more.
    """

    vaddr: int
    nr_pages: int
    flags: int

    def __post_init__(self) -> None:
        if not 0 <= self.vaddr < _U64_LIMIT or self.vaddr % PAGE_SIZE:
            raise ImageFormatError(f"pagemap entry vaddr {self.vaddr:#x} is not a page-aligned u64")
        if not 0 < self.nr_pages < _U64_LIMIT:
            raise ImageFormatError(f"pagemap entry at {self.vaddr:#x} has {self.nr_pages} pages")
        if self.end > _U64_LIMIT:
            raise ImageFormatError(f"pagemap entry at {self.vaddr:#x} runs past the end of the address space")
        if not 0 <= self.flags <= _U32_MAX:
            raise ImageFormatError(f"pagemap entry at {self.vaddr:#x} has flags {self.flags} outside u32")

    @property
    def end(self) -> int:
        """First address after the run."""
        return self.vaddr + self.nr_pages * PAGE_SIZE

    @property
    def present(self) -> bool:
        """Whether the run's bytes are in this dump's pages file."""
        return bool(self.flags & PE_PRESENT)


@dataclass(frozen=True, slots=True)
class Pagemap:
    """One pagemap image: the id of its pages file and its entries in file order.

    Entries must be ascending and must not overlap, as CRIU writes them and as
    its restore-side lookup (seek_pagemap) assumes; otherwise one page could
    have two sources and tug's (pid, vaddr) keys would be ambiguous.
    """

    pages_id: int
    entries: tuple[PagemapEntry, ...]

    def __post_init__(self) -> None:
        # Accept any iterable from callers but keep the value hashable and immutable.
        object.__setattr__(self, "entries", tuple(self.entries))
        if not 0 <= self.pages_id <= _U32_MAX:
            raise ImageFormatError(f"pages_id {self.pages_id} is outside u32")
        prev_end = 0
        for e in self.entries:
            if e.vaddr < prev_end:
                raise ImageFormatError(f"pagemap entry at {e.vaddr:#x} overlaps or precedes the one before (ends {prev_end:#x})")
            prev_end = e.end


def _decode_head(buf: bytes, pos: int, end: int) -> int:
    pages_id: int | None = None
    for number, wire, value in fields(buf, pos, end):
        if number == 1:
            pages_id = varint_field(number, wire, value, _U32_MAX)
    if pages_id is None:
        raise ImageFormatError("pagemap head lacks the required pages_id")
    return pages_id


def _decode_entry(buf: bytes, pos: int, end: int) -> PagemapEntry:
    """Decode a PagemapEntry and normalise old layouts the way CRIU's restore does.

    Images from CRIU before 2.x carried ``in_parent`` and only
    ``compat_nr_pages``; CRIU maps them to flags/nr_pages (init_compat_pagemap_entry)
    and so do we. Required fields must be present: protobuf-c refuses otherwise.
    """
    vaddr: int | None = None
    compat_nr_pages: int | None = None
    in_parent: int | None = None
    flags: int | None = None
    nr_pages: int | None = None
    for number, wire, value in fields(buf, pos, end):
        if number == 1:
            vaddr = varint_field(number, wire, value, _U64_LIMIT - 1)
        elif number == 2:
            compat_nr_pages = varint_field(number, wire, value, _U32_MAX)
        elif number == 3:
            in_parent = varint_field(number, wire, value, _U64_LIMIT - 1)
        elif number == 4:
            flags = varint_field(number, wire, value, _U32_MAX)
        elif number == 5:
            nr_pages = varint_field(number, wire, value, _U64_LIMIT - 1)
    if vaddr is None or compat_nr_pages is None:
        raise ImageFormatError("pagemap entry lacks a required field (vaddr, compat_nr_pages)")
    eff_flags = flags or 0
    if in_parent:
        eff_flags |= PE_PARENT
    elif flags is None:
        eff_flags = PE_PRESENT
    return PagemapEntry(vaddr=vaddr, nr_pages=compat_nr_pages if nr_pages is None else nr_pages, flags=eff_flags)


def _encode_entry(e: PagemapEntry) -> bytes:
    """The exact bytes protobuf-c packs for CRIU's write_pagemap_loc()."""
    return b"".join(
        (
            b"\x08", encode_varint(e.vaddr),
            b"\x10\x00",  # compat_nr_pages: required, CRIU leaves it 0
            b"\x20", encode_varint(e.flags),
            b"\x28", encode_varint(e.nr_pages),
        )
    )


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload)) + payload


# --- public API ---------------------------------------------------------------


def read_pagemap(data: bytes | bytearray | memoryview) -> Pagemap:
    """Parse a ``pagemap-*.img`` (process or shmem); any defect raises ImageFormatError.

    Unknown protobuf fields are skipped (and not kept: ``write_pagemap`` emits
    only what CRIU 4.x writes). A truncated frame anywhere is an error: CRIU
    writes whole records, so a short file means a torn copy.
    """
    buf = bytes(data)
    end = len(buf)
    if end < 8:
        raise ImageFormatError("pagemap image is shorter than its magic header")
    if buf[:8] != _MAGICS:
        common, kind = struct.unpack_from("<II", buf)
        raise ImageFormatError(f"not a pagemap image: magics {common:#010x} {kind:#010x}")
    pos = 8
    pages_id: int | None = None
    entries: list[PagemapEntry] = []
    while pos < end:
        if end - pos < 4:
            raise ImageFormatError(f"truncated record length at offset {pos}")
        (size,) = _FRAME.unpack_from(buf, pos)
        pos += 4
        if size > end - pos:
            raise ImageFormatError(f"record at offset {pos - 4} claims {size} bytes, {end - pos} remain")
        if pages_id is None:
            pages_id = _decode_head(buf, pos, pos + size)
        else:
            entries.append(_decode_entry(buf, pos, pos + size))
        pos += size
    if pages_id is None:
        raise ImageFormatError("pagemap image has no head record")
    return Pagemap(pages_id=pages_id, entries=tuple(entries))


def write_pagemap(pm: Pagemap) -> bytes:
    """Serialise ``pm`` exactly as CRIU 4.x writes a pagemap image.

    For any pagemap CRIU 4.x wrote, ``write_pagemap(read_pagemap(b)) == b``.
    """
    parts = [_MAGICS, _frame(b"\x08" + encode_varint(pm.pages_id))]
    parts.extend(_frame(_encode_entry(e)) for e in pm.entries)
    return b"".join(parts)


def pages_file_name(pages_id: int) -> str:
    """Name of the raw pages image a pagemap points at (CRIU's "pages-%u.img")."""
    if not 0 <= pages_id <= _U32_MAX:
        raise ImageFormatError(f"pages_id {pages_id} is outside u32")
    return f"pages-{pages_id}.img"


def pagemap_file_name(pid: int) -> str:
    """Name of a process pagemap image for ``pid`` (its pid in the dumped pid namespace)."""
    if pid <= 0:
        raise ImageFormatError(f"invalid pid {pid} for a pagemap name")
    return f"pagemap-{pid}.img"


def process_pagemap_pid(filename: str) -> int | None:
    """``"pagemap-12.img"`` -> 12; shmem pagemaps and any other name -> None.

    Only CRIU's canonical spelling matches (no directory part, no leading zeros),
    so a pid and its file name map one to one.
    """
    m = _PROCESS_PAGEMAP.fullmatch(filename)
    return int(m.group(1)) if m else None


def shmem_pagemap_id(filename: str) -> int | None:
    """``"pagemap-shmem-4242.img"`` -> 4242 (the shmem object's id); otherwise None."""
    m = _SHMEM_PAGEMAP.fullmatch(filename)
    return int(m.group(1)) if m else None


def page_layout(pm: Pagemap, *, skip_absent: bool = False) -> list[tuple[int, int, int]]:
    """Runs ``(vaddr, nr_pages, offset in pages file)`` in file order.

    Only ``PE_PRESENT`` entries have bytes in the pages file (``PE_LAZY`` alone
    does not matter: ordinary anonymous memory is ``PE_PRESENT | PE_LAZY``). An
    entry without ``PE_PRESENT`` means some pages live elsewhere (parent dump or
    lazy-pages server), which a full dump for tug never produces: that raises
    ImageFormatError, unless ``skip_absent`` asks to leave such entries out.
    """
    runs: list[tuple[int, int, int]] = []
    offset = 0
    for e in pm.entries:
        if not e.present:
            if skip_absent:
                continue
            raise ImageFormatError(
                f"pagemap entry at {e.vaddr:#x} ({e.nr_pages} pages, flags {e.flags:#x}) has no data in {pages_file_name(pm.pages_id)}"
            )
        runs.append((e.vaddr, e.nr_pages, offset))
        offset += e.nr_pages * PAGE_SIZE
    return runs


def iter_pages(pm: Pagemap, *, skip_absent: bool = False) -> Iterator[tuple[int, int]]:
    """Each page as ``(vaddr, offset in pages file)``, in file order (see page_layout)."""
    for vaddr, nr_pages, offset in page_layout(pm, skip_absent=skip_absent):
        for i in range(nr_pages):
            yield vaddr + i * PAGE_SIZE, offset + i * PAGE_SIZE


def pages_file_size(pm: Pagemap) -> int:
    """Exact size of ``pages-<pages_id>.img``: the bytes of every PE_PRESENT entry."""
    return PAGE_SIZE * sum(e.nr_pages for e in pm.entries if e.present)
