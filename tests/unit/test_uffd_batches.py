"""How the uffd rounds batch the reads of written pages (pure logic)."""

from __future__ import annotations

from tug.engine.source.trackers.shadow import CHUNK_PAGES, PAGE
from tug.engine.source.trackers.uffdrounds import read_batches, read_runs


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

    def read(self, vaddr: int, npages: int) -> bytes:
        if vaddr == 0x2000:
            return b""
        if vaddr == 0x5000:
            return b"x" * (PAGE + 100)
        return bytes([vaddr >> 12]) * (npages * PAGE)


def test_read_runs_keeps_whole_pages_and_drops_vanished_ones() -> None:
    got = read_runs(_Mem(), [(0x1000, 1), (0x2000, 1), (0x5000, 2)])  # type: ignore[arg-type]
    assert [(v, len(d)) for v, d in got] == [(0x1000, PAGE), (0x5000, PAGE)]
