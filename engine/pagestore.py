"""The destination's store of pre-copied pages, and the rebuild of CRIU's pages images.

Per process, pages are kept in one dense tmpfs file in order of first arrival,
with an index page number -> file offset; a page sent again overwrites its
slot. Round 0 streams each process's memory in ascending address order, which
is exactly the order of CRIU's ``pages-<id>.img``. So when the frozen dump has
the same pages as the store (a steady-state service), the store file *is* the
pages image and is renamed into place: no copy inside the downtime window.
Otherwise the image is rebuilt with ``copy_file_range`` in pagemap order.

Either way, a page the pagemap needs but the store lacks is an error, never a
hole of zeros: correctness does not depend on the fast path.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import images
from .errors import MigrationError

PAGE = 4096


class _ProcessPages:
    __slots__ = ("fd", "path", "index", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.index: dict[int, int] = {}  # page number -> byte offset in the file
        self.size = 0

    def write(self, vaddr: int, data: memoryview) -> None:
        first = vaddr // PAGE
        n = len(data) // PAGE
        start = self.index.get(first)
        if start is not None and all(self.index.get(first + k) == start + k * PAGE for k in range(n)):
            _pwrite_all(self.fd, data, start)  # overwrite in place
            return
        if all(first + k not in self.index for k in range(n)):
            _pwrite_all(self.fd, data, self.size)  # new pages: append
            for k in range(n):
                self.index[first + k] = self.size + k * PAGE
            self.size += n * PAGE
            return
        for k in range(n):  # mixed: page by page
            self.write((first + k) * PAGE, data[k * PAGE : (k + 1) * PAGE])


def _pwrite_all(fd: int, data: memoryview, off: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], off + done)


class PageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._procs: dict[int, _ProcessPages] = {}
        self.pages_written = 0

    def write(self, pid: int, vaddr: int, data: bytes | memoryview) -> None:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = _ProcessPages(self.root / f"{pid}.pages")
        view = memoryview(data)
        proc.write(vaddr, view)
        self.pages_written += len(view) // PAGE

    def holds(self, pid: int) -> int:
        proc = self._procs.get(pid)
        return len(proc.index) if proc else 0

    def rebuild(self, images_dir: Path) -> dict[str, int]:
        """Put every process's missing pages-<id>.img in place from the store."""
        stats = {"rebuilt_files": 0, "rebuilt_pages": 0, "renamed_files": 0}
        for pm_path in sorted(images_dir.glob("pagemap-*.img")):
            pid = images.process_pagemap_pid(pm_path.name)
            if pid is None:
                continue
            pm = images.read_pagemap(pm_path.read_bytes())
            target = images_dir / images.pages_file_name(pm.pages_id)
            if target.exists():
                continue  # sent whole
            proc = self._procs.get(pid)
            layout = images.page_layout(pm)
            offsets = self._offsets(pid, proc, layout)
            pages = len(offsets)
            if not offsets:
                target.write_bytes(b"")  # a pagemap without pages: CRIU's pages image is empty too
                stats["rebuilt_files"] += 1
            elif proc is not None and pages * PAGE == proc.size and all(o == i * PAGE for i, o in enumerate(offsets)):
                os.close(proc.fd)
                os.rename(proc.path, target)  # the store is already the image
                del self._procs[pid]
                stats["renamed_files"] += 1
            else:
                assert proc is not None
                self._copy_out(proc, offsets, target)
                stats["rebuilt_files"] += 1
            stats["rebuilt_pages"] += pages
        return stats

    @staticmethod
    def _offsets(pid: int, proc: _ProcessPages | None, layout: list[tuple[int, int, int]]) -> list[int]:
        offsets: list[int] = []
        index = proc.index if proc is not None else {}
        for vaddr, n, _ in layout:
            first = vaddr // PAGE
            for k in range(n):
                off = index.get(first + k)
                if off is None:
                    raise MigrationError(
                        f"page store has no copy of page {(first + k) * PAGE:#x} of pid {pid}: "
                        "source and destination disagree"
                    )
                offsets.append(off)
        return offsets

    @staticmethod
    def _copy_out(proc: _ProcessPages, offsets: list[int], target: Path) -> None:
        tmp = target.with_suffix(".tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            i = 0
            while i < len(offsets):  # coalesce stretches contiguous in the store
                j = i + 1
                while j < len(offsets) and offsets[j] == offsets[j - 1] + PAGE:
                    j += 1
                _copy(proc.fd, out, (j - i) * PAGE, offsets[i], i * PAGE)
                i = j
        finally:
            os.close(out)
        os.replace(tmp, target)

    def close(self) -> None:
        for proc in self._procs.values():
            os.close(proc.fd)
        self._procs.clear()


def _copy(src: int, dst: int, count: int, src_off: int, dst_off: int) -> None:
    while count:
        n = os.copy_file_range(src, dst, count, src_off, dst_off)
        if n <= 0:
            raise MigrationError("copy_file_range made no progress while rebuilding a pages image")
        count -= n
        src_off += n
        dst_off += n
