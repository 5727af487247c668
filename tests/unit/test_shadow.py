"""The block-structured shadow against a page dict that is obviously right.

The final step trusts the tracker to say "unchanged" only for byte-identical
pages, so the fast shadow must give exactly the answers of the naive one, on
any sequence of calls, including runs that start and end mid-block, cross
blocks, overlap earlier runs, and compare without recording.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

#: The tracker as it was (one dict entry per page, compared page by page): the
#: benchmark measures it, this test holds the new one to its answers.
from bench.micro_tracker import DictTracker
from tug.engine.source.trackers.shadow import BLOCK_PAGES, PAGE, ContentTracker

ZERO = bytes(PAGE)
#: Page contents by variant. 0-2 are the same at every address (a zero page,
#: one differing byte at either end); 3-4 embed the page's address, so that
#: comparing against the wrong slot of the shadow cannot go unnoticed.
N_VARIANTS = 5


def page_bytes(variant: int, page_no: int) -> bytes:
    if variant == 0:
        return ZERO
    if variant == 1:
        return b"\x01" + ZERO[1:]
    if variant == 2:
        return ZERO[1:] + b"\x01"
    return struct.pack("<QQ", page_no, variant) + ZERO[16 + variant :] + bytes([variant]) * variant


# Page numbers: a low range and one near the top of a 47-bit address space.
BASES = (0, (1 << 35) - 3 * BLOCK_PAGES - 5)


Write = tuple[int, int, int]  # (first page, pages, variant)
Op = tuple[int, int, int, list[Write], bool]


@st.composite
def operations(draw: st.DrawFn) -> Op:
    """(pid, first page, pages, writes before the diff, record).

    Ranges start anywhere in a few blocks and run up to three blocks, so they
    cross block boundaries and overlap earlier ranges; short ones leave
    blocks with holes between recorded pages. Writes are single
    pages or stretches, which may start before the range and run past its
    end, so a changed run often spans recorded and never-recorded pages.
    """
    pid = draw(st.sampled_from((1, 2, 7)))
    start = draw(st.sampled_from(BASES)) + draw(st.integers(0, 3 * BLOCK_PAGES))
    npages = draw(st.one_of(st.integers(0, 12), st.integers(0, 3 * BLOCK_PAGES)))
    write = st.tuples(
        st.integers(start - BLOCK_PAGES // 2, start + npages),
        st.one_of(st.just(1), st.integers(1, BLOCK_PAGES + 8)),
        st.integers(0, N_VARIANTS - 1),
    )
    return pid, start, npages, draw(st.lists(write, max_size=5)), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(operations(), min_size=1, max_size=25))
def test_block_shadow_matches_page_dict(ops: list[Op]) -> None:
    # The "live memory" of each process: page number -> variant (0 if never
    # written), so consecutive diffs see mostly unchanged pages, as rounds do.
    memory: dict[tuple[int, int], int] = {}
    fast, ref = ContentTracker(), DictTracker()
    for pid, start, npages, writes, record in ops:
        for first, count, variant in writes:
            for p in range(first, first + count):
                memory[(pid, p)] = variant
        data = b"".join(page_bytes(memory.get((pid, p), 0), p) for p in range(start, start + npages))
        got = fast.diff(pid, start * PAGE, data, record=record)
        want = ref.diff(pid, start * PAGE, data, record=record)
        assert got.scanned == want.scanned
        assert got.changed == want.changed
        assert fast.pages == len(ref.shadow)
        assert fast.shadow_bytes == fast.pages * PAGE, "a block holds its recorded pages and nothing else"
    assert dict(fast.shadow) == ref.shadow
    assert len(fast.shadow) == fast.pages


def test_unrecorded_zero_page_in_a_block_hole_is_changed() -> None:
    """A hole in a block's buffer holds zeros; a zero page there was never sent."""
    t = ContentTracker()
    t.diff(1, 0, b"\x01" * PAGE)
    t.diff(1, 5 * PAGE, b"\x01" * PAGE)
    assert [(v, len(d) // PAGE) for v, d in t.diff(1, 0, bytes(6 * PAGE)).changed] == [(0, 6)]
    assert t.pages == 6
    assert t.diff(1, 0, bytes(6 * PAGE)).changed == []


def test_record_false_leaves_the_shadow_alone() -> None:
    t = ContentTracker()
    assert len(t.diff(3, 0x10000, bytes(3 * PAGE), record=False).changed) == 1
    assert t.pages == 0 and t.shadow_bytes == 0 and dict(t.shadow) == {}
    t.diff(3, 0x10000, bytes(3 * PAGE))
    res = t.diff(3, 0x10000, b"\x02" * (3 * PAGE), record=False)
    assert [(v, len(d)) for v, d in res.changed] == [(0x10000, 3 * PAGE)]
    assert t.shadow[(3, 0x11000)] == bytes(PAGE)


def test_runs_join_across_blocks_and_split_at_unchanged_pages() -> None:
    t = ContentTracker()
    base = (BLOCK_PAGES - 2) * PAGE  # two pages before a block boundary
    data = bytearray(b"\x07" * (6 * PAGE))
    assert [(v, len(d) // PAGE) for v, d in t.diff(9, base, bytes(data)).changed] == [(base, 6)]
    for i in (1, 2, 3, 5):  # 1 | 2 3 straddle the boundary, 4 unchanged, 5
        data[i * PAGE + PAGE - 1] ^= 0xFF
    got = t.diff(9, base, bytes(data)).changed
    assert [(v, len(d) // PAGE) for v, d in got] == [(base + PAGE, 3), (base + 5 * PAGE, 1)]
    assert got[0][1] == bytes(data[PAGE : 4 * PAGE])


def test_memory_follows_the_pages_recorded() -> None:
    """A block holds the pages recorded, not 256 KiB, whatever their slots."""
    t = ContentTracker()
    t.diff(1, 3 * PAGE, b"\x03" * PAGE)
    assert t.shadow_bytes == PAGE
    t.diff(1, 0, b"\x00" * PAGE)  # goes before slot 3
    t.diff(1, 9 * PAGE, b"\x09" * PAGE)  # and after it
    assert t.shadow_bytes == 3 * PAGE and t.pages == 3
    assert [t.shadow[(1, s * PAGE)][0] for s in (0, 3, 9)] == [0, 3, 9]
    t.diff(1, 2 * PAGE, b"\x02" * (3 * PAGE))  # 2 new, 3 rewritten, 4 new
    assert t.shadow_bytes == 5 * PAGE and t.pages == 5
    assert [t.shadow[(1, s * PAGE)][0] for s in (0, 2, 3, 4, 9)] == [0, 2, 2, 2, 9]
    t.diff(1, 0, b"\x01" * (BLOCK_PAGES * PAGE))
    assert t.shadow_bytes == BLOCK_PAGES * PAGE and t.pages == BLOCK_PAGES


def test_unaligned_vaddr_is_refused() -> None:
    with pytest.raises(ValueError):
        ContentTracker().diff(1, 0x1001, bytes(PAGE))
