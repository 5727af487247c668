"""CRIU's page-server protocol, server side, sans-IO.

Why tug speaks it: with the content tracker, the frozen dump's pages only
need to cross the wire where they differ from what pre-copy already sent.
Instead of letting CRIU write the whole dump to tmpfs and reading it back,
tug plays CRIU's page server on the source (``criu dump --page-server`` /
``runc checkpoint --page-server``) and compares each page as it arrives.

Nothing here touches a socket: :meth:`PageServerParser.feed` takes received
bytes and returns :data:`Event` objects; the ``reply_*`` functions build the
bytes the caller must send back. So every rule is testable with byte strings,
and the asyncio server (``tug.engine.source.psfilter``) is only plumbing.

The wire format, as CRIU 4.2 defines it in ``criu/page-xfer.c`` (unchanged on
criu-dev since): every request is a raw ``struct page_server_iov {u32 cmd;
u64 nr_pages; u64 vaddr; u64 dst_id;}`` in host byte order with natural
padding (32 bytes, offsets 0/8/16/24 on x86-64 and arm64; tug supports only
those, so the struct below is little-endian ``=I4xQQQ``).

* ``cmd = flags << 16 | command`` (``encode_ps_cmd``); flags are pagemap
  ``PE_*`` bits, used by ``PS_IOV_ADD_F`` only.
* ``dst_id = id << 8 | type`` (``encode_pm``): type 1 is a task's pagemap (id =
  its pid in the dumped pid namespace, never 0), 2 a shared memory object's
  (id = shmid, 0 for the first SysV segment of an IPC namespace). ``decode_pm`` also accepts the type numbers older CRIUs used; so
  does this parser.
* ``PS_IOV_OPEN2`` opens the pagemap ``dst_id``; the server answers one byte,
  ``has_parent``. ``PS_IOV_OPEN`` (legacy) is the same without the answer.
* ``PS_IOV_ADD_F`` is one pagemap entry (``vaddr``, ``nr_pages``, flags); when
  flags hold ``PE_PRESENT``, ``nr_pages * 4096`` bytes of page data follow the
  header. ``PS_IOV_ADD`` (legacy) is ``ADD_F`` with ``PE_PRESENT``,
  ``PS_IOV_HOLE`` (legacy) with ``PE_PARENT`` and no data. An add for a
  ``dst_id`` other than the open one opens it implicitly, without an answer
  (``prep_loc_xfer``: "Deprecated IO w/o open").
* ``PS_IOV_PARENT`` asks whether the server has a parent pagemap for
  ``dst_id``: answered with a 4-byte int (pre-dumps only).
* ``PS_IOV_CLOSE`` / ``PS_IOV_FORCE_CLOSE`` end the session: the server
  answers a 4-byte int32 status, and CRIU's dump fails unless it is 0
  (``disconnect_from_page_server``). Nothing may follow but EOF.
* ``PS_IOV_GET`` (7) is the lazy-pages direction (the dumper serving pages);
  a dump never sends it to its page server, so it is refused here.

There is no handshake, version or length prefix: a malformed header cannot be
skipped, so any defect (unknown command or type, an entry that is empty,
unaligned, absurdly long or wraps the address space, data after CLOSE, EOF
before CLOSE) raises :class:`PageServerProtocolError` and the parser is dead.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

from tug.engine.criu.images import PE_PARENT, PE_PRESENT  # CRIU's pagemap flags: defined once
from tug.engine.errors import ProtocolError

PAGE_SIZE: Final = 4096
#: ``struct page_server_iov`` in host byte order (x86-64/arm64: little-endian), natural padding.
HEADER: Final = struct.Struct("=I4xQQQ")

PS_IOV_ADD: Final = 1
PS_IOV_HOLE: Final = 2
PS_IOV_OPEN: Final = 3
PS_IOV_OPEN2: Final = 4
PS_IOV_PARENT: Final = 5
PS_IOV_ADD_F: Final = 6
PS_IOV_GET: Final = 7
PS_IOV_CLOSE: Final = 0x1023
PS_IOV_FORCE_CLOSE: Final = 0x1024

PS_CMD_BITS: Final = 16
PS_TYPE_BITS: Final = 8
PS_TYPE_PID: Final = 1
PS_TYPE_SHMEM: Final = 2


#: Largest entry accepted, in pages. CRIU sends one entry per iovec of a page
#: pipe buffer, and a pipe holds at most PIPE_MAX_SIZE pages (page-pipe.h: 819
#: on x86-64, which the kernel rounds up to 1024, i.e. 4 MiB); 16 times that
#: leaves room for other page sizes and future CRIUs while bounding what a
#: broken peer can make us buffer (64 MiB).
MAX_ENTRY_PAGES: Final = 16384

#: Entries at least this big reuse pooled buffers; smaller ones are cheap to allocate.
_REUSE_MIN: Final = 64 << 10
_U64: Final = 1 << 64
_INT32: Final = struct.Struct("=i")


class PageServerProtocolError(ProtocolError):
    """CRIU's page-server stream broke the protocol (or ended before CLOSE)."""


class Kind(enum.Enum):
    """What a pagemap describes: a task's private memory or a shared memory object."""

    PROCESS = "process"
    SHMEM = "shmem"


#: ``decode_pm``: current type numbers and those of CRIU 1.0 .. 3.2.
_TYPES: Final = {
    PS_TYPE_PID: Kind.PROCESS, 10: Kind.PROCESS, 11: Kind.PROCESS, 16: Kind.PROCESS, 17: Kind.PROCESS,
    PS_TYPE_SHMEM: Kind.SHMEM, 27: Kind.SHMEM, 28: Kind.SHMEM, 29: Kind.SHMEM, 32: Kind.SHMEM,
    33: Kind.SHMEM, 34: Kind.SHMEM,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Open:
    """A pagemap was opened. ``reply``: the client waits for :func:`reply_open`."""

    kind: Kind
    id: int
    reply: bool


@dataclass(frozen=True, slots=True)
class Pages:
    """An entry with data (``PE_PRESENT``): ``data`` holds its ``nr_pages`` pages.

    ``data`` is a view into the parser's buffer, valid until the next call
    into the parser: copy what you keep (the parser reuses the buffer only
    once every view of it is released, so a kept view is safe, just costly).
    """

    kind: Kind
    id: int
    vaddr: int
    nr_pages: int
    flags: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Hole:
    """An entry without data (``PE_PARENT``, or ``PE_LAZY`` alone)."""

    kind: Kind
    id: int
    vaddr: int
    nr_pages: int
    flags: int


@dataclass(frozen=True, slots=True)
class ParentQuery:
    """``PS_IOV_PARENT``: answer with :func:`reply_parent`."""

    kind: Kind
    id: int


@dataclass(frozen=True, slots=True)
class Close:
    """End of the session: answer with :func:`reply_close`, then expect EOF."""

    force: bool


Event: TypeAlias = Open | Pages | Hole | ParentQuery | Close


def reply_open(has_parent: bool) -> bytes:
    """The answer to ``PS_IOV_OPEN2``: one byte (``char has_parent``)."""
    return b"\x01" if has_parent else b"\x00"


def reply_parent(has_parent: bool) -> bytes:
    """The answer to ``PS_IOV_PARENT``: an ``int`` (0 or 1) in host byte order."""
    return _INT32.pack(1 if has_parent else 0)


def reply_close(status: int = 0) -> bytes:
    """The answer to ``PS_IOV_CLOSE``: ``int32_t status``; non-zero fails the dump."""
    return _INT32.pack(status)


def _released(buf: bytearray) -> bool:
    """True if no view of ``buf`` is alive, so it may be overwritten.

    CPython refuses to resize a bytearray with live exports; growing and
    shrinking by one byte probes that (after the first probe the spare
    capacity makes it O(1)).
    """
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class PageServerParser:
    """Protocol state of one page-server session (one dump), server side.

    Feed it bytes with :meth:`feed`; or, to let large payloads land in place
    without a copy, receive straight into :meth:`receive_buffer` and report
    the count with :meth:`received`. Call :meth:`feed_eof` when the peer
    closes. Replies are the caller's job: the events say when one is due.
    """

    def __init__(self, *, max_entry_pages: int = MAX_ENTRY_PAGES) -> None:
        if not 0 < max_entry_pages < (1 << 40):
            raise ValueError(f"max_entry_pages out of range: {max_entry_pages}")
        self.max_entry_pages = max_entry_pages
        self._hdr = bytearray(HEADER.size)
        self._hdr_have = 0
        self._payload = bytearray()  # where the current entry's data goes
        self._pool: tuple[bytearray, ...] = ()  # reusable buffers for large entries
        self._want = 0  # bytes of the current entry's data still to come (0: reading a header)
        self._have = 0  # bytes of the current entry's data received
        self._entry: tuple[Kind, int, int, int, int] | None = None  # (kind, id, vaddr, nr_pages, flags)
        self._open: int | None = None  # dst_id of the pagemap open now
        self._closed = False
        self._error: str | None = None

    @property
    def closed(self) -> bool:
        """True once CLOSE arrived: only EOF may follow."""
        return self._closed

    @property
    def in_payload(self) -> bool:
        """True between an entry's header and the end of its data."""
        return self._want > 0

    # ---- input ----------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data``; returns the events it completed, in order."""
        self._check_alive()
        events: list[Event] = []
        with memoryview(data) as view:
            try:
                pos, end = 0, len(view)
                while pos < end:
                    if self._closed:
                        raise PageServerProtocolError("data after PS_IOV_CLOSE")
                    if self._want:
                        take = min(self._want, end - pos)
                        self._payload[self._have : self._have + take] = view[pos : pos + take]
                        pos += take
                        self._got(take, events)
                    else:
                        take = min(HEADER.size - self._hdr_have, end - pos)
                        self._hdr[self._hdr_have : self._hdr_have + take] = view[pos : pos + take]
                        self._hdr_have += take
                        pos += take
                        if self._hdr_have == HEADER.size:
                            self._hdr_have = 0
                            self._header(events)
            except PageServerProtocolError as exc:
                self._error = str(exc)
                raise
        return events

    def receive_buffer(self) -> memoryview | None:
        """Where the rest of the current entry's data may be received directly.

        None while a header is expected (use :meth:`feed` then). Release the
        view (``with``) before calling into the parser again.
        """
        self._check_alive()
        if not self._want:
            return None
        return memoryview(self._payload)[self._have : self._have + self._want]

    def received(self, n: int) -> list[Event]:
        """``n`` bytes were written into the last :meth:`receive_buffer`."""
        self._check_alive()
        if not 0 < n <= self._want:
            raise ValueError(f"received {n} bytes into a buffer of {self._want}")
        events: list[Event] = []
        self._got(n, events)
        return events

    def feed_eof(self) -> None:
        """The peer closed its side: fine after CLOSE, a protocol error before."""
        self._check_alive()
        if self._closed:
            return
        if self._want:
            what = f"in the data of an entry ({self._have} of {self._have + self._want} bytes)"
        elif self._hdr_have:
            what = f"in a request header ({self._hdr_have} of {HEADER.size} bytes)"
        else:
            what = "before PS_IOV_CLOSE"
        self._error = f"connection closed {what}"
        raise PageServerProtocolError(self._error)

    # ---- internals ------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._error is not None:
            raise PageServerProtocolError(f"page-server session already failed: {self._error}")

    def _got(self, n: int, events: list[Event]) -> None:
        self._have += n
        self._want -= n
        if self._want:
            return
        assert self._entry is not None
        kind, ident, vaddr, nr_pages, flags = self._entry
        self._entry = None
        size, self._have = self._have, 0
        events.append(Pages(kind, ident, vaddr, nr_pages, flags, memoryview(self._payload)[:size]))

    def _target(self, dst_id: int, events: list[Event], *, implicit: bool) -> tuple[Kind, int]:
        kind = _TYPES.get(dst_id & ((1 << PS_TYPE_BITS) - 1))
        if kind is None:
            raise PageServerProtocolError(f"unknown pagemap type {dst_id & 0xFF} in dst_id {dst_id:#x}")
        ident = dst_id >> PS_TYPE_BITS
        # A task's id is its pid, never 0; a SysV segment's is its shmid,
        # and the first segment of a fresh IPC namespace has shmid 0.
        if ident == 0 and kind is Kind.PROCESS:
            raise PageServerProtocolError(f"{kind.value} pagemap id 0 in dst_id {dst_id:#x}")
        if implicit and self._open != dst_id:
            self._open = dst_id
            events.append(Open(kind, ident, reply=False))
        return kind, ident

    def _header(self, events: list[Event]) -> None:
        raw, nr_pages, vaddr, dst_id = HEADER.unpack(self._hdr)
        cmd, flags = raw & ((1 << PS_CMD_BITS) - 1), raw >> PS_CMD_BITS
        if cmd in (PS_IOV_OPEN, PS_IOV_OPEN2):
            kind, ident = self._target(dst_id, events, implicit=False)
            self._open = dst_id
            events.append(Open(kind, ident, reply=cmd == PS_IOV_OPEN2))
        elif cmd == PS_IOV_PARENT:
            events.append(ParentQuery(*self._target(dst_id, events, implicit=False)))
        elif cmd in (PS_IOV_ADD_F, PS_IOV_ADD, PS_IOV_HOLE):
            if cmd == PS_IOV_ADD:
                flags = PE_PRESENT
            elif cmd == PS_IOV_HOLE:
                flags = PE_PARENT
            if not 0 < nr_pages <= self.max_entry_pages:
                raise PageServerProtocolError(f"entry at {vaddr:#x} has {nr_pages} pages (limit {self.max_entry_pages})")
            if vaddr % PAGE_SIZE or vaddr + nr_pages * PAGE_SIZE > _U64:
                raise PageServerProtocolError(f"entry at {vaddr:#x} of {nr_pages} pages is unaligned or wraps")
            kind, ident = self._target(dst_id, events, implicit=True)
            if flags & PE_PRESENT:
                self._begin_payload(nr_pages * PAGE_SIZE)
                self._entry = (kind, ident, vaddr, nr_pages, flags)
            else:
                events.append(Hole(kind, ident, vaddr, nr_pages, flags))
        elif cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
            self._closed = True
            events.append(Close(force=cmd == PS_IOV_FORCE_CLOSE))
        elif cmd == PS_IOV_GET:
            raise PageServerProtocolError("PS_IOV_GET: this page server receives a dump, it serves no lazy pages")
        else:
            raise PageServerProtocolError(f"unknown page-server command {cmd:#x} (cmd word {raw:#x})")

    def _begin_payload(self, size: int) -> None:
        """Make room for ``size`` bytes in a buffer no live view refers to.

        Large payloads reuse one of two pooled buffers (two: the previous
        entry's event may still be pending when the next begins); small ones
        get a buffer of their own, so that several small entries parsed from
        one read never pin the large buffers.
        """
        buf = None
        if size >= _REUSE_MIN:
            buf = next((b for b in self._pool if len(b) >= size and _released(b)), None)
            if buf is None:
                buf = bytearray(size)
                self._pool = tuple(sorted((*self._pool, buf), key=len, reverse=True)[:2])
        self._payload = buf if buf is not None else bytearray(size)
        self._want, self._have = size, 0
