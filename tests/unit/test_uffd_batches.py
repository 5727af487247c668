"""How the uffd rounds batch the reads of written pages, and read them into reused buffers."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time

import pytest

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
    """A process whose mapping at 0x2000 vanished and whose read at 0x5000 came back short
    (the vectored read of the batch gets through the first piece only)."""

    def read_vectored(self, pieces: list[tuple[int, int]], into: bytearray) -> int:
        vaddr, size = pieces[0]
        into[:size] = bytes([vaddr >> 12]) * size
        return size + 10  # and a little of the next piece

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


def _mapping(npages: int) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, npages * PAGE)
    for i in range(npages):
        m[i * PAGE : (i + 1) * PAGE] = bytes([i + 1]) * PAGE
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_one_vectored_read_then_proc_mem_for_what_it_could_not_read() -> None:
    """Pages 2-3 of 6 made unreadable (PROT_NONE), page 5 unmapped: the
    vectored read stops at page 2; /proc/PID/mem reads 2-3 anyway (as before:
    the kernel's FOLL_FORCE) and leaves 5 out; 0-1 and 4 come as they are."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    m, base = _mapping(6)
    assert libc.mprotect(ctypes.c_void_p(base + 2 * PAGE), 2 * PAGE, 0) == 0
    assert libc.munmap(ctypes.c_void_p(base + 5 * PAGE), PAGE) == 0
    mem = ProcessMemory(os.getpid())
    try:
        batch = [(base, 2), (base + 2 * PAGE, 2), (base + 4 * PAGE, 1), (base + 5 * PAGE, 1)]
        assert mem.read_vectored([(v, n * PAGE) for v, n in batch], bytearray(CHUNK_PAGES * PAGE)) == 2 * PAGE
        got = read_runs(mem, batch, bytearray(CHUNK_PAGES * PAGE))
    finally:
        mem.close()
        libc.mprotect(ctypes.c_void_p(base + 2 * PAGE), 2 * PAGE, 3)
    assert [(v - base, bytes(d)) for v, d in got] == [
        (0, bytes([1]) * PAGE + bytes([2]) * PAGE),
        (2 * PAGE, bytes([3]) * PAGE + bytes([4]) * PAGE),
        (4 * PAGE, bytes([5]) * PAGE),
    ]


def test_a_vectored_read_counts_only_while_the_process_lives() -> None:
    """The pidfd says the process exited: nothing read counts (its pid could be another's)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        m, base = _mapping(2)
        os.write(w, base.to_bytes(8, "little"))
        time.sleep(30)
        os._exit(0)
    os.close(w)
    base = int.from_bytes(os.read(r, 8), "little")
    os.close(r)
    mem = ProcessMemory(pid)
    try:
        buf = bytearray(2 * PAGE)
        assert mem.read_vectored([(base, 2 * PAGE)], buf) == 2 * PAGE and buf == bytes([1]) * PAGE + bytes([2]) * PAGE
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert mem.read_vectored([(base, 2 * PAGE)], buf) == 0
    finally:
        mem.close()
    with pytest.raises(ProcessLookupError):
        ProcessMemory(pid)


def test_read_buffers_are_used_again() -> None:
    pool = ReadBuffers(PAGE)
    a = pool.take()
    b = pool.take()
    assert a is not b and len(a) == PAGE
    pool.give(a)
    assert pool.take() is a
