"""A tiny client side of CRIU's page-server protocol, for tests only.

It writes what ``criu/page-xfer.c`` sends (``send_psi``: the raw struct, then
spliced page data), so tests can drive the sans-IO parser and the asyncio
filter server without CRIU. Real CRIU is exercised in
``tests/e2e/test_psfilter_criu.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tug.engine.criu.images import PE_LAZY, PE_PRESENT
from tug.transports.criu_pageserver import (
    HEADER,
    PAGE_SIZE,
    PS_IOV_ADD_F,
    PS_IOV_CLOSE,
    PS_IOV_FORCE_CLOSE,
    PS_IOV_OPEN2,
    PS_IOV_PARENT,
    PS_TYPE_PID,
    PS_TYPE_SHMEM,
    Close,
    Event,
    Hole,
    Kind,
    Open,
    Pages,
    ParentQuery,
)

TYPE = {Kind.PROCESS: PS_TYPE_PID, Kind.SHMEM: PS_TYPE_SHMEM}


def psi(cmd: int, *, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0, flags: int = 0) -> bytes:
    """One ``struct page_server_iov`` as CRIU sends it."""
    return HEADER.pack(flags << 16 | cmd, nr_pages, vaddr, dst_id)


def dst(kind: Kind, ident: int) -> int:
    return ident << 8 | TYPE[kind]


def page(tag: int, index: int) -> bytes:
    """A recognisable page: tag and index, then a pattern."""
    head = tag.to_bytes(4, "little") + index.to_bytes(8, "little")
    return head + bytes((tag * 7 + index + j) & 0xFF for j in range(PAGE_SIZE - len(head)))


@dataclass
class Session:
    """Builds a client byte stream and the events the server must decode from it."""

    wire: bytearray = field(default_factory=bytearray)
    expected: list[tuple[object, ...]] = field(default_factory=list)

    def open(self, kind: Kind, ident: int) -> Session:
        self.wire += psi(PS_IOV_OPEN2, dst_id=dst(kind, ident))
        self.expected.append(("open", kind, ident, True))
        return self

    def parent(self, kind: Kind, ident: int) -> Session:
        self.wire += psi(PS_IOV_PARENT, dst_id=dst(kind, ident))
        self.expected.append(("parent", kind, ident))
        return self

    def add(self, kind: Kind, ident: int, vaddr: int, data: bytes, flags: int = PE_PRESENT | PE_LAZY) -> Session:
        assert len(data) % PAGE_SIZE == 0 and data
        n = len(data) // PAGE_SIZE
        self.wire += psi(PS_IOV_ADD_F, nr_pages=n, vaddr=vaddr, dst_id=dst(kind, ident), flags=flags)
        self.wire += data
        self.expected.append(("pages", kind, ident, vaddr, n, flags, data))
        return self

    def hole(self, kind: Kind, ident: int, vaddr: int, nr_pages: int, flags: int) -> Session:
        assert not flags & PE_PRESENT
        self.wire += psi(PS_IOV_ADD_F, nr_pages=nr_pages, vaddr=vaddr, dst_id=dst(kind, ident), flags=flags)
        self.expected.append(("hole", kind, ident, vaddr, nr_pages, flags))
        return self

    def close(self, force: bool = False) -> Session:
        self.wire += psi(PS_IOV_FORCE_CLOSE if force else PS_IOV_CLOSE)
        self.expected.append(("close", force))
        return self


def plain(ev: Event) -> tuple[object, ...]:
    """An event as a comparable tuple; Pages data copied (the view is borrowed)."""
    if isinstance(ev, Open):
        return ("open", ev.kind, ev.id, ev.reply)
    if isinstance(ev, ParentQuery):
        return ("parent", ev.kind, ev.id)
    if isinstance(ev, Pages):
        assert len(ev.data) == ev.nr_pages * PAGE_SIZE
        return ("pages", ev.kind, ev.id, ev.vaddr, ev.nr_pages, ev.flags, bytes(ev.data))
    if isinstance(ev, Hole):
        return ("hole", ev.kind, ev.id, ev.vaddr, ev.nr_pages, ev.flags)
    assert isinstance(ev, Close)
    return ("close", ev.force)
