"""A process's SysV shared memory attachments, taken out of its ``mm-PID.img``.

Why: CRIU restores the containers of a pod one by one, and only the first
restore into their shared IPC namespace makes the namespace's SysV objects.
CRIU maps an attached segment only through the record its own restore made
when it created that segment (``criu/ipc_ns.c``, ``criu/shmem.c``), so a later
member's restore cannot map a segment that already exists. For such a member
tug takes the SysV VMAs out of its mm images (CRIU then leaves those address
ranges empty) and attaches the segments itself before the process runs
(destination/sysvattach.py). This module is the pure part: reading an mm
image, cutting the SysV VMAs out byte for byte, and the plan of what to
attach where. Everything else in the image is kept exactly as CRIU wrote it.

The rules of a SysV VMA chain are CRIU's own (``open_shmem_sysv``): one
``shmat`` maps a whole segment, its later VMAs (``pgoff`` > 0) only differ in
protection and follow without a hole; a chain starts at ``pgoff`` 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tug.engine.criu.protobuf import FRAME, WT_LEN, field_spans, fields, varint_field
from tug.engine.errors import ImageFormatError

IMG_COMMON_MAGIC = 0x54564319
MM_MAGIC = 0x57492820
_MAGICS = struct.pack("<II", IMG_COMMON_MAGIC, MM_MAGIC)
#: ``mm_entry.vmas`` (images/mm.proto).
MM_VMAS = 14
#: ``vma_entry.status`` bit of a SysV shared memory attachment (criu/include/image.h).
VMA_AREA_SYSVIPC = 1 << 10
PAGE = 4096
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
O_ACCMODE = 3
O_RDWR = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class SysvVma:
    """One VMA of an attached segment, as dumped."""

    start: int
    end: int
    pgoff: int
    shmid: int
    prot: int
    #: The file status flags of the attachment (O_RDONLY / O_RDWR), None in old images.
    fdflags: int | None
    madv: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Attach:
    """One ``shmat`` to redo: the segment ``shmid`` at ``start``, then each VMA's protection."""

    shmid: int
    start: int
    end: int
    #: Attach read-only (every VMA of the chain was attached without write access).
    readonly: bool
    vmas: tuple[SysvVma, ...]


def _sysv_vma(buf: bytes, pos: int, end: int) -> SysvVma | None:
    """The VMA at buf[pos:end] if it is a SysV attachment, else None."""
    got: dict[int, int] = {}
    for number, wire, value in fields(buf, pos, end):
        if number in (1, 2, 3, 4, 9):
            got[number] = varint_field(number, wire, value, _U64)
        elif number in (5, 7, 10):
            got[number] = varint_field(number, wire, value, _U32)
    if not got.get(7, 0) & VMA_AREA_SYSVIPC:
        return None
    if any(n not in got for n in (1, 2, 3, 4, 5)):
        raise ImageFormatError("a SysV VMA lacks a required field (start, end, pgoff, shmid, prot)")
    start, end_, pgoff = got[1], got[2], got[3]
    if start % PAGE or end_ % PAGE or end_ <= start or pgoff % PAGE:
        raise ImageFormatError(f"SysV VMA {start:#x}-{end_:#x} (pgoff {pgoff:#x}) is not whole pages")
    return SysvVma(start=start, end=end_, pgoff=pgoff, shmid=got[4], prot=got[5], fdflags=got.get(10), madv=got.get(9, 0))


def chains(vmas: list[SysvVma]) -> list[Attach]:
    """Group a process's SysV VMAs into attachments (CRIU's rules, see the module doc)."""
    out: list[Attach] = []
    current: list[SysvVma] = []

    def close() -> None:
        if current:
            writable = any(v.fdflags is None or v.fdflags & O_ACCMODE == O_RDWR for v in current)
            out.append(Attach(shmid=current[0].shmid, start=current[0].start, end=current[-1].end,
                              readonly=not writable, vmas=tuple(current)))

    for v in sorted(vmas, key=lambda v: v.start):
        if v.pgoff == 0:
            close()
            current = [v]
            continue
        if not current or current[-1].end != v.start or current[0].shmid != v.shmid \
                or v.pgoff != v.start - current[0].start:
            raise ImageFormatError(f"SysV VMA {v.start:#x}-{v.end:#x} of segment {v.shmid} does not continue "
                                   "an attachment (a hole or a misordered chunk, which CRIU does not restore either)")
        current.append(v)
    close()
    return out


def strip_sysv(data: bytes) -> tuple[bytes, list[Attach]]:
    """``data`` (an mm image) without its SysV VMAs, and the attachments they were.

    The image is returned unchanged (the same bytes) when it has none.
    """
    if len(data) < 12 or data[:8] != _MAGICS:
        raise ImageFormatError("not an mm image")
    (size,) = FRAME.unpack_from(data, 8)
    end = 12 + size
    if end != len(data):
        raise ImageFormatError(f"mm image: one record of {size} bytes expected, the file has {len(data) - 12}")
    keep: list[bytes] = []
    found: list[SysvVma] = []
    for number, wire, _, payload, start, stop in field_spans(data, 12, end):
        if number == MM_VMAS and wire == WT_LEN:
            vma = _sysv_vma(data, payload, stop)
            if vma is not None:
                found.append(vma)
                continue
        keep.append(data[start:stop])
    if not found:
        return data, []
    body = b"".join(keep)
    return _MAGICS + FRAME.pack(len(body)) + body, chains(found)
