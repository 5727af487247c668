"""Framing of page runs on a "pages" stream: [pid u32][vaddr u64][npages u32][crc32 u32] + pages.

Pure code, shared by the source (encode) and the agent (decode). A fixed
20-byte header per run keeps the hot path to one struct call; runs are
coalesced by the tracker, so headers cost well under 1% of the bytes.

The digest (:mod:`tug.engine.integrity`) covers the header's first 16 bytes
and the run's pages, so a damaged address is caught like a damaged page: the
source has the whole run in hand when it frames it, and the decoder checks
the digest over the pieces it handed to the store once the run's last piece
is written, raising :class:`tug.engine.errors.IntegrityError` naming the run
(pid, vaddr).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping

from tug.engine import integrity
from tug.engine.errors import ProtocolError

PAGE = 4096
_RUN = struct.Struct(">IQI")  # what the digest covers, with the pages
_DIGEST = struct.Struct(">I")
HEADER_SIZE = _RUN.size + _DIGEST.size
MAX_RUN_PAGES = 1 << 16


def encode_header(pid: int, vaddr: int, data: bytes | bytearray | memoryview) -> bytes:
    """The header of the run ``data`` (whole pages) at ``vaddr`` of ``pid``, with its digest."""
    run = _RUN.pack(pid, vaddr, len(data) // PAGE)
    return run + _DIGEST.pack(integrity.digest(data, integrity.digest(run)))


def run_subject(pid: int, vaddr: int, npages: int) -> str:
    return f"page run of pid {pid} at {vaddr:#x} ({npages} pages)"


class RunDecoder:
    """Yields (pid, vaddr of this piece, piece) for each stretch of page data.

    A run's data may arrive split across feeds; pieces are always whole pages
    so the receiver can write them straight to the store. Each piece is
    digested after the receiver took it (the bytes it stored); a run whose
    digest differs raises IntegrityError right after its last piece.
    """

    def __init__(self) -> None:
        self._hdr = bytearray()
        self._pid = 0
        self._start = 0  # vaddr of the current run
        self._vaddr = 0  # vaddr of its next piece
        self._npages = 0
        self._expected = 0
        self._crc = 0  # digest of the current run so far
        self._left = 0  # bytes of the current run still to come
        self._partial = bytearray()  # a page cut by a feed boundary
        #: Runs verified and page bytes stored so far (checked against the stream's close).
        self.runs = 0
        self.bytes = 0

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
        view = memoryview(data)
        while view:
            if self._left == 0:
                take = HEADER_SIZE - len(self._hdr)
                self._hdr += view[:take]
                view = view[take:]
                if len(self._hdr) < HEADER_SIZE:
                    return
                self._pid, self._vaddr, self._npages = _RUN.unpack_from(self._hdr)
                (self._expected,) = _DIGEST.unpack_from(self._hdr, _RUN.size)
                self._crc = integrity.digest(self._hdr[: _RUN.size])
                self._hdr.clear()
                self._start = self._vaddr
                if self._npages == 0 or self._npages > MAX_RUN_PAGES or self._vaddr % PAGE:
                    raise ProtocolError(f"bad page run header: pid {self._pid} vaddr {self._vaddr:#x} pages {self._npages}")
                self._left = self._npages * PAGE
                continue
            if self._partial:
                take = min(PAGE - len(self._partial), len(view), self._left)
                self._partial += view[:take]
                view = view[take:]
                self._left -= take
                if len(self._partial) == PAGE:
                    page = memoryview(bytes(self._partial))
                    self._partial.clear()
                    yield self._pid, self._vaddr, page
                    self._took(page)
                continue
            take = min(len(view), self._left)
            whole = take - take % PAGE
            if whole:
                self._left -= whole
                piece, view = view[:whole], view[whole:]
                yield self._pid, self._vaddr, piece
                self._took(piece)
            else:
                self._partial += view[:take]
                self._left -= take
                view = view[take:]

    def _took(self, piece: memoryview) -> None:
        """The receiver took ``piece``: digest it; after the run's last piece, verify the run."""
        self._vaddr += len(piece)
        self.bytes += len(piece)
        self._crc = integrity.digest(piece, self._crc)
        if self._left == 0 and not self._partial:
            if self._crc != self._expected:
                raise integrity.mismatch(run_subject(self._pid, self._start, self._npages), self._expected, self._crc)
            self.runs += 1

    def finish(self) -> None:
        if self._left or self._hdr or self._partial:
            raise ProtocolError("pages stream ended in the middle of a run")

    def close(self, meta: Mapping[str, object]) -> None:
        """The stream's end: no run cut short, and every run and byte its sender counted arrived."""
        self.finish()
        integrity.verify_totals("the pages stream", meta, runs=self.runs, bytes=self.bytes)
