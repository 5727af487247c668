"""How the uffd rounds batch the reads of written pages, and read them into reused buffers."""

from __future__ import annotations

import ctypes
import os

from tug.engine.source.trackers.shadow import CHUNK_PAGES, PAGE, ProcessMemory
from tug.engine.source.trackers.uffdrounds import ReadBuffers, read_batches, read_runs


def test_scattered_pages_share_a_batch_and_big_runs_are_split() -> None:
    scattered = [(k * 2 * PAGE, (k * 2 + 1) * PAGE) for k in range(3000)]
    batches = list(read_batches(scattered))
    assert [sum(n for _, n in b) for b in batches] == [CHUNK_PAGES, CHUNK_PAGES, 3000 - 2 * CHUNK_PAGES]
    assert [p for b in batches for p in b] == [(lo, 1) for lo, _ in scattered]

    big = [(0, (2 * CHUNK_PAGES + 5) * PAGE)]
    assert list(read_batches(big)) == [[(0, CHUNK_PAGES)], [(CHUNK_PAGES * PAGE, CHUNK_PAGES)], [(2 * CHUNK_PAGES * PAGE, 5)]]
    assert list(read_batches([])) == []


def test_no_batch_exceeds_a_chunk() -> None:
    runs = [(k * 100 * PAGE, (k * 100 + 1 + k % 7 * 13) * PAGE) for k in range(500)]
    batches = list(read_batches(runs))
    assert all(sum(n for _, n in b) <= CHUNK_PAGES for b in batches)
    assert sum(n for b in batches for _, n in b) == sum((hi - lo) // PAGE for lo, hi in runs)


class _Mem:
    """A process whose mapping at 0x2000 vanished and whose read at 0x5000 came back short."""

    def read_into(self, vaddr: int, into: memoryview) -> int:
        if vaddr == 0x2000:
            return 0
        n = PAGE + 100 if vaddr == 0x5000 else len(into)
        into[:n] = bytes([vaddr >> 12]) * n
        return n


def test_read_runs_keeps_whole_pages_and_drops_vanished_ones() -> None:
    buf = bytearray(CHUNK_PAGES * PAGE)
    got = read_runs(_Mem(), [(0x1000, 1), (0x2000, 1), (0x5000, 2), (0x9000, 3)], buf)  # type: ignore[arg-type]
    assert [(v, len(d)) for v, d in got] == [(0x1000, PAGE), (0x5000, PAGE), (0x9000, 3 * PAGE)]
    assert [bytes(d) == bytes([v >> 12]) * len(d) for v, d in got] == [True] * 3
    # One after the other in the one buffer: nothing allocated per read.
    assert all(isinstance(d, memoryview) and d.obj is buf for _, d in got)
    assert bytes(buf[: 5 * PAGE]) == bytes([1]) * PAGE + bytes([5]) * PAGE + bytes([9]) * 3 * PAGE


def test_read_runs_reads_a_real_process_memory() -> None:
    """This process's own pages, through /proc/self/mem as the rounds read a container's."""
    raw = (ctypes.c_char * (6 * PAGE))()
    base = -(-ctypes.addressof(raw) // PAGE) * PAGE  # the whole pages inside it
    pattern = bytes(range(256)) * (4 * PAGE // 256)
    ctypes.memmove(base, pattern, len(pattern))
    mem = ProcessMemory(os.getpid())
    try:
        buf = bytearray(CHUNK_PAGES * PAGE)
        got = read_runs(mem, [(base + 2 * PAGE, 2), (base, 1)], buf)
    finally:
        mem.close()
    assert [(v, bytes(d)) for v, d in got] == [(base + 2 * PAGE, pattern[2 * PAGE :]), (base, pattern[:PAGE])]


def test_read_buffers_are_used_again() -> None:
    pool = ReadBuffers(PAGE)
    a = pool.take()
    b = pool.take()
    assert a is not b and len(a) == PAGE
    pool.give(a)
    assert pool.take() is a
