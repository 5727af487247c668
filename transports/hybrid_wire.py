"""The hybrid fill's wire protocol between the frozen source and the destination, sans-IO.

In a hybrid migration the destination already holds what pre-copy sent (its
page store) and the source holds the truth (the frozen memory, and the
content tracker's shadow of what was sent). Only the source can say whether
a page changed since it was sent, so the destination's page server
(``engine/destination/hybridserver.py``) and the source's frozen-memory
service (``engine/source/frozenserver.py``) talk over two connections:

* the **fault channel**: the destination asks ``GET`` (pid, vaddr, n) for
  pages the lazy-pages daemon wants and the store cannot vouch for; the
  source answers, strictly in request order, with a sequence of ``PAGES``
  (the frozen bytes follow) and ``SAME`` (the store's copy is the frozen
  content) records that covers exactly the asked range from its start, in
  ascending order, or ``FAIL`` for the rest of it (no such page: the
  migration fails, never a wrong page).
  Last comes ``END`` (the destination's daemon has every page): the source
  ends its lazy dump as CRIU supports (which re-freezes the processes) and
  answers ``ENDED``; only then does the daemon hear that its goodbye was
  taken, so a source lost before that fails the fill (module
  ``engine/destination/hybridserver.py``).
* the **sweep channel**: the source pushes, unasked, ``PAGES`` for every page
  that changed and ``SAME`` for unchanged ranges, then ``DONE``; the
  destination returns ``ACK`` (bytes consumed) so that at most a window of
  sweep data is ever queued ahead of a fault's answer on the shared link.

Every record is one 24-byte little-endian header ``{u8 kind; 3 pad; u32 pid;
u64 vaddr; u64 nr_pages}`` (for ``ACK``, ``nr_pages`` holds a byte count),
then for ``PAGES`` ``nr_pages * 4096`` bytes. pid is the process's pid in
the container's namespace (CRIU's name for it). Anything malformed raises
:class:`HybridWireError` and the parser is dead: there is no resync.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

from tug.engine.errors import ProtocolError

PAGE: Final = 4096
HEADER: Final = struct.Struct("<B3xIQQ")

GET: Final = 1
PAGES: Final = 2
SAME: Final = 3
DONE: Final = 4
ACK: Final = 5
FAIL: Final = 6
END: Final = 7
ENDED: Final = 8

#: Largest range in one record (4 MiB: CRIU's largest background request).
MAX_PAGES: Final = 1024
_PID_LIMIT: Final = 1 << 31
_U64: Final = 1 << 64


class HybridWireError(ProtocolError):
    """The hybrid fill's stream broke the protocol (module doc)."""


@dataclass(frozen=True, slots=True)
class Get:
    pid: int
    vaddr: int
    nr_pages: int


@dataclass(frozen=True, slots=True)
class Pages:
    """The frozen content of ``nr_pages`` pages from ``vaddr`` (``data``: bytes of its own)."""

    pid: int
    vaddr: int
    nr_pages: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Same:
    """The destination's stored copy of these pages is their frozen content."""

    pid: int
    vaddr: int
    nr_pages: int


@dataclass(frozen=True, slots=True)
class Fail:
    """The source has no such pages (unknown pid, unmapped address)."""

    pid: int
    vaddr: int
    nr_pages: int


@dataclass(frozen=True, slots=True)
class Done:
    """The sweep has covered every page of every process."""


@dataclass(frozen=True, slots=True)
class Ack:
    bytes: int


@dataclass(frozen=True, slots=True)
class End:
    """The destination holds every page: end the lazy dump (after every earlier GET)."""


@dataclass(frozen=True, slots=True)
class Ended:
    """The source's answer to END: ``ok`` when its dump ended as CRIU supports."""

    ok: bool


Record: TypeAlias = Get | Pages | Same | Fail | Done | Ack | End | Ended
#: Records without a page range: (kind, what its nr_pages field may hold).
_BARE: Final = {DONE: "nothing", ACK: "a byte count", END: "nothing", ENDED: "a status"}
#: A record that says something about a range of pages.
Ranged: TypeAlias = Pages | Same | Fail


def _check_range(pid: int, vaddr: int, nr_pages: int) -> str | None:
    if not 0 < pid < _PID_LIMIT:
        return f"bad pid {pid}"
    if not 0 < nr_pages <= MAX_PAGES:
        return f"bad page count {nr_pages} (limit {MAX_PAGES})"
    if vaddr % PAGE or vaddr + nr_pages * PAGE > _U64:
        return f"range at {vaddr:#x} of {nr_pages} pages is unaligned or wraps"
    return None


def encode(rec: Record) -> bytes:
    """The bytes of one record (ranges are checked: a bug here must not reach the wire)."""
    if isinstance(rec, Done):
        return HEADER.pack(DONE, 0, 0, 0)
    if isinstance(rec, Ack):
        return HEADER.pack(ACK, 0, 0, rec.bytes)
    if isinstance(rec, End):
        return HEADER.pack(END, 0, 0, 0)
    if isinstance(rec, Ended):
        return HEADER.pack(ENDED, 0, 0, 0 if rec.ok else 1)
    why = _check_range(rec.pid, rec.vaddr, rec.nr_pages)
    if why is not None:
        raise ValueError(why)
    if isinstance(rec, Pages):
        if len(rec.data) != rec.nr_pages * PAGE:
            raise ValueError(f"{len(rec.data)} bytes of data for {rec.nr_pages} pages")
        return HEADER.pack(PAGES, rec.pid, rec.vaddr, rec.nr_pages) + rec.data
    kind = GET if isinstance(rec, Get) else SAME if isinstance(rec, Same) else FAIL
    return HEADER.pack(kind, rec.pid, rec.vaddr, rec.nr_pages)


class Parser:
    """Bytes in, records out; ``accept``: the kinds this side may receive."""

    def __init__(self, accept: frozenset[int]) -> None:
        self.accept = accept
        self._buf = bytearray()
        self._dead: str | None = None

    @classmethod
    def at_source(cls) -> Parser:
        return cls(frozenset({GET, ACK, END}))

    @classmethod
    def at_destination(cls) -> Parser:
        return cls(frozenset({PAGES, SAME, FAIL, DONE, ENDED}))

    def _die(self, why: str) -> HybridWireError:
        self._dead = why
        return HybridWireError(why)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        if self._dead is not None:
            raise HybridWireError(f"hybrid stream already broken: {self._dead}")
        self._buf += data
        out: list[Record] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER.size:
            kind, pid, vaddr, n = HEADER.unpack_from(buf, pos)
            if buf[pos + 1 : pos + 4] != b"\0\0\0":
                raise self._die("non-zero padding in a record header")
            if kind not in self.accept:
                raise self._die(f"unexpected record kind {kind}")
            if kind in _BARE:
                if pid or vaddr or (kind in (DONE, END) and n) or (kind == ENDED and n > 1):
                    raise self._die(f"record kind {kind} carries a range or a bad value")
                out.append(Done() if kind == DONE else Ack(n) if kind == ACK else End() if kind == END else Ended(n == 0))
                pos += HEADER.size
                continue
            why = _check_range(pid, vaddr, n)
            if why is not None:
                raise self._die(why)
            if kind == PAGES:
                end = pos + HEADER.size + n * PAGE
                if len(buf) < end:
                    break
                out.append(Pages(pid, vaddr, n, bytes(buf[pos + HEADER.size : end])))
                pos = end
                continue
            out.append(Get(pid, vaddr, n) if kind == GET else Same(pid, vaddr, n) if kind == SAME else Fail(pid, vaddr, n))
            pos += HEADER.size
        del buf[:pos]
        return out


@dataclass(frozen=True, slots=True)
class Answer:
    """A GET fully answered: its records, which cover it exactly, in order."""

    get: Get
    parts: tuple[Ranged, ...]


class Answers:
    """The fault channel's client side: which answer belongs to which GET.

    :meth:`ask` records a request (and gives its bytes); :meth:`take` checks
    each arriving record against the oldest open request, which must be
    covered contiguously from its start, and returns the :class:`Answer`
    once it is. A record for anything else is a protocol error.
    """

    def __init__(self) -> None:
        self._open: collections.deque[Get | End] = collections.deque()
        self._next = 0  # vaddr the head request's next record must start at
        self._parts: list[Ranged] = []

    @property
    def outstanding(self) -> int:
        return len(self._open)

    def ask(self, get: Get | End) -> bytes:
        """Record a request (a GET, or the END that follows the last one); its bytes."""
        data = encode(get)
        if not self._open and isinstance(get, Get):
            self._next = get.vaddr
        self._open.append(get)
        return data

    def take(self, rec: Record) -> Answer | Ended | None:
        """An arriving record: the Answer it completes, the Ended that answers END, or None."""
        if not self._open:
            raise HybridWireError(f"an answer nobody asked for: {rec}")
        head = self._open[0]
        if isinstance(head, End) or isinstance(rec, Ended):
            if not (isinstance(head, End) and isinstance(rec, Ended)):
                raise HybridWireError(f"{type(rec).__name__} does not answer the oldest request, {type(head).__name__}")
            self._open.popleft()
            self._set_next()
            return rec
        if not isinstance(rec, (Pages, Same, Fail)):
            raise HybridWireError(f"{type(rec).__name__} on the fault channel")
        assert isinstance(head, Get)
        end = head.vaddr + head.nr_pages * PAGE
        if rec.pid != head.pid or rec.vaddr != self._next or rec.vaddr + rec.nr_pages * PAGE > end:
            raise HybridWireError(
                f"answer {rec.nr_pages} pages at {rec.vaddr:#x} of pid {rec.pid} does not continue "
                f"the request for {head.nr_pages} at {head.vaddr:#x} of pid {head.pid}"
            )
        self._parts.append(rec)
        self._next = rec.vaddr + rec.nr_pages * PAGE
        if self._next < end:
            return None
        self._open.popleft()
        parts, self._parts = tuple(self._parts), []
        self._set_next()
        return Answer(head, parts)

    def _set_next(self) -> None:
        if self._open and isinstance(self._open[0], Get):
            self._next = self._open[0].vaddr


def cover(pid: int, vaddr: int, nr_pages: int, changed: list[tuple[int, bytes]]) -> list[Pages | Same]:
    """The records that answer a range, given its changed runs (ascending, inside it).

    Gaps between changed runs are SAME; changed runs become PAGES, split at
    MAX_PAGES. Raises ValueError if a run lies outside the range or overlaps.
    """
    if not 0 < nr_pages <= MAX_PAGES:
        raise ValueError(f"a range of {nr_pages} pages")
    out: list[Pages | Same] = []
    at = vaddr
    end = vaddr + nr_pages * PAGE
    for run_vaddr, data in changed:
        run_end = run_vaddr + len(data)
        if run_vaddr < at or run_end > end or len(data) % PAGE or not data:
            raise ValueError(f"changed run at {run_vaddr:#x} is outside {vaddr:#x}+{nr_pages} or overlaps")
        if run_vaddr > at:
            out.append(Same(pid, at, (run_vaddr - at) // PAGE))
        for off in range(0, len(data), MAX_PAGES * PAGE):
            piece = data[off : off + MAX_PAGES * PAGE]
            out.append(Pages(pid, run_vaddr + off, len(piece) // PAGE, piece))
        at = run_end
    if at < end:
        out.append(Same(pid, at, (end - at) // PAGE))
    return out
