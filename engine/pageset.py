"""A set of pages per process, kept as one byte per page in small blocks.

Both hosts track which of a container's pages are in some state: the uffd
tracker on the source, the pages the destination holds; the hybrid page
server on the destination, the pages the source has confirmed. Hundreds of
thousands of pages change state at once (a confirmation of every unchanged
page), so a Python ``set`` of page numbers cost tens of ms per GiB each time;
here a range is a few slice assignments and a check of a whole block one
``find``.
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE = 4096
#: Pages per block: 64 pages = 256 KiB of address space.
BLOCK = 64
_ALL = b"\x01" * BLOCK


class PageSet:
    """Per process (pid in the container): a set of pages, as byte ranges in and out.

    One byte per page of address space ever added, in blocks of BLOCK
    pages, so a whole block checks with one ``find``.
    """

    def __init__(self) -> None:
        self._pids: dict[int, dict[int, bytearray]] = {}

    def pages(self, pid: int) -> int:
        return sum(b.count(1) for b in self._pids.get(pid, {}).values())

    def forget_pid(self, pid: int) -> None:
        self._pids.pop(pid, None)

    def _walk(self, pid: int, lo: int, hi: int, create: bool = False) -> Iterator[tuple[int, bytearray | None, int, int]]:
        """The blocks [lo, hi) touches: (first page, block or None if never added, slot, pages)."""
        blocks = self._pids.setdefault(pid, {}) if create else self._pids.get(pid, {})
        page, end = lo // PAGE, hi // PAGE
        while page < end:
            index, slot = divmod(page, BLOCK)
            cnt = min(BLOCK - slot, end - page)
            blk = blocks.get(index)
            if blk is None and create:
                blk = blocks[index] = bytearray(BLOCK)
            yield page, blk, slot, cnt
            page += cnt

    def add(self, pid: int, lo: int, hi: int) -> None:
        for _, blk, s, n in self._walk(pid, lo, hi, create=True):
            assert blk is not None
            blk[s : s + n] = _ALL[:n]

    def forget(self, pid: int, lo: int, hi: int) -> None:
        for _, blk, s, n in self._walk(pid, lo, hi):
            if blk is not None:
                blk[s : s + n] = bytes(n)

    def missing(self, pid: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Runs [a, b) of [lo, hi) not held, ascending and maximal."""
        runs: list[tuple[int, int]] = []
        for page, blk, slot, cnt in self._walk(pid, lo, hi):
            if blk is not None and blk.find(0, slot, slot + cnt) < 0:
                continue
            for k in range(cnt):
                if blk is not None and blk[slot + k]:
                    continue
                a = (page + k) * PAGE
                if runs and runs[-1][1] == a:
                    runs[-1] = (runs[-1][0], a + PAGE)
                else:
                    runs.append((a, a + PAGE))
        return runs

    def leading(self, pid: int, lo: int, hi: int, *, held: bool) -> int:
        """How many pages from ``lo`` (up to ``hi``) are in the set (``held``), or are not."""
        n = 0
        for _, blk, slot, cnt in self._walk(pid, lo, hi):
            if blk is None:
                if held:
                    return n
                at = -1
            else:
                at = blk.find(0 if held else 1, slot, slot + cnt)
            if at >= 0:
                return n + at - slot
            n += cnt
        return n

    def count(self, pid: int, lo: int, hi: int) -> int:
        """How many pages of [lo, hi) are in the set."""
        return sum(blk.count(1, s, s + n) for _, blk, s, n in self._walk(pid, lo, hi) if blk is not None)
