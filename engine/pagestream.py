"""Framing of page runs on a "pages" stream: [pid u32][vaddr u64][npages u32] + pages.

Pure code, shared by the source (encode) and the agent (decode). A fixed
16-byte header per run keeps the hot path to one struct call; runs are
coalesced by the tracker, so headers cost well under 1% of the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from tug.engine.errors import ProtocolError

PAGE = 4096
_HDR = struct.Struct(">IQI")
MAX_RUN_PAGES = 1 << 16


def encode_header(pid: int, vaddr: int, npages: int) -> bytes:
    return _HDR.pack(pid, vaddr, npages)


class RunDecoder:
    """Yields (pid, vaddr of this piece, piece) for each stretch of page data.

    A run's data may arrive split across feeds; pieces are always whole pages
    so the receiver can write them straight to the store.
    """

    def __init__(self) -> None:
        self._hdr = bytearray()
        self._pid = 0
        self._vaddr = 0
        self._left = 0  # bytes of the current run still to come
        self._partial = bytearray()  # a page cut by a feed boundary

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
        view = memoryview(data)
        while view:
            if self._left == 0:
                take = _HDR.size - len(self._hdr)
                self._hdr += view[:take]
                view = view[take:]
                if len(self._hdr) < _HDR.size:
                    return
                self._pid, self._vaddr, npages = _HDR.unpack(self._hdr)
                self._hdr.clear()
                if npages == 0 or npages > MAX_RUN_PAGES or self._vaddr % PAGE:
                    raise ProtocolError(f"bad page run header: pid {self._pid} vaddr {self._vaddr:#x} pages {npages}")
                self._left = npages * PAGE
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
                    self._vaddr += PAGE
                continue
            take = min(len(view), self._left)
            whole = take - take % PAGE
            if whole:
                yield self._pid, self._vaddr, view[:whole]
                self._vaddr += whole
                self._left -= whole
                view = view[whole:]
            else:
                self._partial += view[:take]
                self._left -= take
                view = view[take:]

    def finish(self) -> None:
        if self._left or self._hdr or self._partial:
            raise ProtocolError("pages stream ended in the middle of a run")
