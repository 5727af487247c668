"""CRIU's lazy-pages exchange, watched from the middle, sans-IO.

In a post-copy migration the destination's ``criu lazy-pages`` daemon asks the
source's lazy dump (``criu dump --lazy-pages``) for pages, and tug relays that
connection over its SSH link. The relay does not change a byte; it watches,
to report what the commit point costs: how many pages were fetched after the
destination ran, how many requests were faults, how long each took.

The exchange, from CRIU 4.2's ``criu/page-xfer.c`` and ``criu/uffd.c`` (same
32-byte ``struct page_server_iov`` as :mod:`tug.transports.criu_pageserver`):

* The daemon sends ``PS_IOV_GET`` (7) requests: ``nr_pages`` > 0 from
  ``vaddr`` of the process ``dst_id``: its pid in the dumped namespace, plain
  (``request_remote_pages`` passes the pid; unlike the dump direction, no
  ``encode_pm`` type bits). It sends several before the first answer; answers come strictly
  in request order. A fault asks for one page; the background fill for more.
* The dump answers each with a header ``PS_IOV_ADD_F | PE_PRESENT << 16`` with
  the same ``vaddr`` and ``dst_id`` and ``0 < nr_pages <= asked`` (fewer when
  the run ends sooner), then ``nr_pages * 4096`` bytes of data. It never
  answers zero pages: it closes the connection instead.
* At the end the daemon sends ``PS_IOV_CLOSE`` (or ``FORCE_CLOSE``); the dump
  answers a 4-byte status.

:class:`LazyWatch` takes the bytes of each direction as they pass with the
time they passed, and returns one :class:`Served` per completed answer. A
stream that breaks these rules raises :class:`LazyProtocolError`, after which
the watch is dead (the relay goes on: watching is not policing, CRIU checks
its own input).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Final

from tug.engine.criu.images import PE_PRESENT
from tug.engine.errors import ProtocolError
from tug.transports.criu_pageserver import (
    HEADER,
    MAX_ENTRY_PAGES,
    PAGE_SIZE,
    PS_CMD_BITS,
    PS_IOV_ADD_F,
    PS_IOV_CLOSE,
    PS_IOV_FORCE_CLOSE,
    PS_IOV_GET,
)

#: The header of every answer with pages.
ANSWER_CMD: Final = PS_IOV_ADD_F | PE_PRESENT << PS_CMD_BITS
#: The status that answers a close.
STATUS_SIZE: Final = 4
_STATUS: Final = struct.Struct("=i")


class LazyProtocolError(ProtocolError):
    """The lazy-pages exchange broke CRIU's rules (see module doc)."""


@dataclass(frozen=True, slots=True)
class Request:
    nr_pages: int
    vaddr: int
    dst_id: int
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """One request answered: ``pages`` of the ``asked`` arrived after ``latency_s``."""

    asked: int
    pages: int
    vaddr: int
    dst_id: int
    latency_s: float

    @property
    def fault(self) -> bool:
        """CRIU asks for exactly one page when a process faults on it."""
        return self.asked == 1


@dataclass(frozen=True, slots=True)
class Get:
    """A ``PS_IOV_GET``: ``nr_pages`` from ``vaddr`` of the process ``pid`` (dumped namespace)."""

    nr_pages: int
    vaddr: int
    pid: int
    dst_id: int


@dataclass(frozen=True, slots=True)
class Goodbye:
    """``PS_IOV_CLOSE``: answer :func:`goodbye_answer`, then nothing more comes."""


class LazyRequests:
    """The serving side's parser: bytes from a lazy-pages daemon in, :class:`Get` / :class:`Goodbye` out."""

    def __init__(self, *, max_pages: int = MAX_ENTRY_PAGES) -> None:
        self.max_pages = max_pages
        self._buf = bytearray()
        self._closed = False
        self._dead: str | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Get | Goodbye]:
        if self._dead is not None:
            raise LazyProtocolError(f"lazy-pages stream already broken: {self._dead}")
        self._buf += data
        out: list[Get | Goodbye] = []
        while len(self._buf) >= HEADER.size:
            cmd, nr_pages, vaddr, dst_id = HEADER.unpack_from(self._buf)
            del self._buf[: HEADER.size]
            why = None
            if self._closed:
                why = "a request after the close"
            elif cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                self._closed = True
                out.append(Goodbye())
                continue
            elif cmd != PS_IOV_GET:
                why = f"unexpected command {cmd:#x} from the lazy-pages daemon"
            elif not 0 < nr_pages <= self.max_pages or vaddr % PAGE_SIZE or vaddr + nr_pages * PAGE_SIZE > 1 << 64:
                why = f"bad request: {nr_pages} pages at {vaddr:#x}"
            elif not 0 < dst_id < 1 << 31:
                why = f"bad request: no such pid ({dst_id:#x})"
            if why is not None:
                self._dead = why
                raise LazyProtocolError(why)
            out.append(Get(nr_pages, vaddr, dst_id, dst_id))
        return out


def pages_answer(get: Get, nr_pages: int) -> bytes:
    """The header that precedes ``nr_pages`` (``0 <`` ... ``<= get.nr_pages``) pages from ``get.vaddr``."""
    if not 0 < nr_pages <= get.nr_pages:
        raise ValueError(f"an answer carries 1..{get.nr_pages} pages, not {nr_pages}")
    return HEADER.pack(ANSWER_CMD, nr_pages, get.vaddr, get.dst_id)


def goodbye_answer(status: int = 0) -> bytes:
    return _STATUS.pack(status)


class LazyWatch:
    def __init__(self, *, max_pages: int = MAX_ENTRY_PAGES) -> None:
        self._requests = LazyRequests(max_pages=max_pages)
        self._answers = bytearray()
        self._pending: collections.deque[Request | None] = collections.deque()  # None: a close
        self._data_left = 0  # bytes of page data still to come for the head request
        self._answer: tuple[Request, int] | None = None  # head request and pages it got
        self._closed = False
        self._dead: str | None = None

    @property
    def closed(self) -> bool:
        """The daemon said goodbye and the dump answered."""
        return self._closed and not self._pending

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def _check(self) -> None:
        if self._dead is not None:
            raise LazyProtocolError(f"lazy-pages stream already broken: {self._dead}")

    def _die(self, why: str) -> LazyProtocolError:
        self._dead = why
        return LazyProtocolError(why)

    def requests(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes from the lazy-pages daemon to the dump."""
        self._check()
        try:
            events = self._requests.feed(data)
        except LazyProtocolError as exc:
            raise self._die(str(exc)) from None
        for ev in events:
            if isinstance(ev, Goodbye):
                self._closed = True
                self._pending.append(None)
            else:
                self._pending.append(Request(ev.nr_pages, ev.vaddr, ev.dst_id, now))

    def answers(self, data: bytes | bytearray | memoryview, now: float) -> list[Served]:
        """Bytes from the dump to the lazy-pages daemon; the answers they complete."""
        self._check()
        out: list[Served] = []
        view = memoryview(data)
        while view:
            if self._data_left:
                n = min(self._data_left, len(view))
                self._data_left -= n
                view = view[n:]
                if not self._data_left:
                    assert self._answer is not None
                    req, pages = self._answer
                    self._answer = None
                    out.append(Served(asked=req.nr_pages, pages=pages, vaddr=req.vaddr, dst_id=req.dst_id,
                                      latency_s=now - req.at))
                continue
            if not self._pending:
                raise self._die("an answer nobody asked for")
            head = self._pending[0]
            need = STATUS_SIZE if head is None else HEADER.size
            take = min(need - len(self._answers), len(view))
            self._answers += view[:take]
            view = view[take:]
            if len(self._answers) < need:
                break
            self._pending.popleft()
            if head is None:
                self._answers.clear()
                continue
            cmd, nr_pages, vaddr, dst_id = HEADER.unpack_from(self._answers)
            self._answers.clear()
            if cmd != ANSWER_CMD or vaddr != head.vaddr or dst_id != head.dst_id or not 0 < nr_pages <= head.nr_pages:
                raise self._die(
                    f"answer {cmd:#x} {nr_pages} pages at {vaddr:#x} for a request of {head.nr_pages} at {head.vaddr:#x}"
                )
            self._answer = (head, nr_pages)
            self._data_left = nr_pages * PAGE_SIZE
        return out
