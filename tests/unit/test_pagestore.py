"""The destination's page store: CRIU reads it in place, through a parent chain when needed.

The model every test checks against: resolving each page the top pagemap
needs through the chain (top -> parent -> ...), exactly as CRIU's restore
does, must give the bytes last written for that page, and nothing is copied.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine.criu import images
from tug.engine.destination.pagestore import PAGE, PageStore, _subtract
from tug.engine.errors import MigrationError
from tug.engine.pageset import PageSet

from ..imagechain import resolve as resolve_page


def page(tag: int) -> bytes:
    return bytes([tag % 256]) * PAGE


def dump(tmp: Path, pid: int, runs: list[tuple[int, int]], pages_id: int = 3) -> Path:
    d = tmp / "images"
    d.mkdir(exist_ok=True)
    entries = tuple(images.PagemapEntry(vaddr=v, nr_pages=n, flags=images.PE_PRESENT | images.PE_LAZY) for v, n in runs)
    (d / images.pagemap_file_name(pid)).write_bytes(images.write_pagemap(images.Pagemap(pages_id=pages_id, entries=entries)))
    return d


def resolve(level: Path, pid: int, vaddr: int) -> bytes:
    return resolve_page(level, images.pagemap_file_name(pid), vaddr)


def test_one_ascending_segment_is_renamed(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1) + page(2))
    s.write(1, 0x8000, page(3))
    s.write(1, 0x2000, page(9))  # a later round rewrites a page in place
    d = dump(tmp_path, 1, [(0x1000, 2), (0x8000, 1)])
    stats = s.rebuild(d)
    assert stats["renamed_files"] == 1 and stats["chained_processes"] == 0
    assert (d / "pages-3.img").read_bytes() == page(1) + page(9) + page(3)
    assert not (d / "parent").exists()


def test_pages_out_of_order_become_a_chain_without_copies(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x8000, page(3))
    s.write(1, 0x1000, page(1))  # arrived below the first: a second segment
    s.write(1, 0x5000, page(5))  # freed before the final dump
    seg_inodes = {p.stat().st_ino for p in (tmp_path / "store").iterdir()}
    d = dump(tmp_path, 1, [(0x1000, 1), (0x8000, 1)])
    stats = s.rebuild(d)
    assert stats == {"renamed_files": 0, "empty_files": 0, "chained_processes": 1, "chain_levels": 2, "rebuilt_pages": 2}
    assert resolve(d, 1, 0x1000) == page(1) and resolve(d, 1, 0x8000) == page(3)
    assert (d / "pages-3.img").read_bytes() == b"", "the top holds no pages"
    chained = {(tmp_path / f"chain-{k}" / "pages-3.img").stat().st_ino for k in (0, 1)}
    assert chained == seg_inodes, "segments are renamed into the chain, never copied"
    top = images.read_pagemap((d / "pagemap-1.img").read_bytes())
    assert all(e.flags == images.PE_PARENT | images.PE_LAZY for e in top.entries)


def test_missing_page_is_an_error_not_zeros(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1))
    d = dump(tmp_path, 1, [(0x1000, 2)])
    with pytest.raises(MigrationError, match="no copy of page 0x2000"):
        s.rebuild(d)


def test_images_sent_whole_are_left_alone(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    d = dump(tmp_path, 1, [(0x1000, 1)])
    (d / "pages-3.img").write_bytes(page(7))
    assert s.rebuild(d)["rebuilt_pages"] == 0
    assert (d / "pages-3.img").read_bytes() == page(7)


def test_overlapping_rewrite_mixing_old_and_new_pages(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x2000, page(2))
    s.write(1, 0x1000, page(11) + page(12) + page(13))  # 0x2000 known, 0x1000/0x3000 new
    d = dump(tmp_path, 1, [(0x1000, 3)])
    s.rebuild(d)
    assert [resolve(d, 1, v) for v in (0x1000, 0x2000, 0x3000)] == [page(11), page(12), page(13)]


def test_processes_with_different_depths_share_the_chain(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x4000, page(1))
    s.write(1, 0x1000, page(2))
    s.write(1, 0x0000, page(3))  # pid 1: three segments
    s.write(2, 0x1000, page(4) + page(5))
    s.write(2, 0x9000, page(6))
    d = dump(tmp_path, 1, [(0x0000, 2), (0x4000, 1)], pages_id=1)
    dump(tmp_path, 2, [(0x2000, 1), (0x9000, 1)], pages_id=2)  # pid 2's segment holds an unneeded page
    stats = s.rebuild(d)
    assert stats["chain_levels"] == 3 and stats["renamed_files"] == 0
    assert [resolve(d, 1, v) for v in (0x0000, 0x1000, 0x4000)] == [page(3), page(2), page(1)]
    assert [resolve(d, 2, v) for v in (0x2000, 0x9000)] == [page(5), page(6)]


def test_subtract_runs() -> None:
    assert _subtract([(0, 10)], [(2, 3), (7, 1)]) == [(0, 2), (5, 2), (8, 2)]
    assert _subtract([(0, 4), (10, 4)], [(3, 8)]) == [(0, 3), (11, 3)]
    assert _subtract([(5, 5)], []) == [(5, 5)]
    assert _subtract([(5, 5)], [(0, 100)]) == []


@settings(max_examples=150, deadline=None)
@given(
    writes=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6), st.integers(0, 255)), min_size=1, max_size=25),
    keep=st.lists(st.booleans(), min_size=46, max_size=46),
)
def test_chain_resolves_every_needed_page_to_its_last_bytes(tmp_path_factory: pytest.TempPathFactory,
                                                            writes: list[tuple[int, int, int]], keep: list[bool]) -> None:
    tmp = tmp_path_factory.mktemp("store")
    s = PageStore(tmp / "store")
    model: dict[int, bytes] = {}
    for first, n, tag in writes:
        data = b"".join(page(tag + k) for k in range(n))
        s.write(7, first * PAGE, data)
        for k in range(n):
            model[first + k] = page(tag + k)
    needed = sorted(p for p in model if keep[p])
    runs: list[tuple[int, int]] = []
    for p in needed:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    d = dump(tmp, 7, [(f * PAGE, n) for f, n in runs])
    s.rebuild(d)
    for p in needed:
        if (d / "pages-3.img").stat().st_size:  # renamed: the image itself, in pagemap order
            assert not (d / "parent").exists()
        assert resolve(d, 7, p * PAGE) == model[p], hex(p * PAGE)



def test_a_pagemap_without_pages_gets_an_empty_pages_image(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1))
    d = dump(tmp_path, 2, [], pages_id=5)  # pid 2: nothing stored, nothing needed
    assert s.rebuild(d)["empty_files"] == 1
    assert (d / "pages-5.img").read_bytes() == b""


# ---- pre-copy's pushed eager step: a lazy dump's pagemap ---------------------------


def lazy_dump(tmp: Path, pid: int, entries: list[tuple[int, int, bool]], non_lazy: bytes, pages_id: int = 3) -> Path:
    """A lazy dump's images: ``(vaddr, pages, lazy)`` entries; the non-lazy ones' bytes in its pages image."""
    d = tmp / "images"
    d.mkdir(exist_ok=True)
    pm = images.Pagemap(pages_id=pages_id, entries=tuple(
        images.PagemapEntry(vaddr=v, nr_pages=n, flags=images.PE_LAZY if lazy else images.PE_PRESENT) for v, n, lazy in entries
    ))
    (d / images.pagemap_file_name(pid)).write_bytes(images.write_pagemap(pm))
    (d / images.pages_file_name(pages_id)).write_bytes(non_lazy)
    return d


def confirmed(*ranges: tuple[int, int, int]) -> PageSet:
    out = PageSet()
    for pid, vaddr, n in ranges:
        out.add(pid, vaddr, vaddr + n * PAGE)
    return out


def test_lazy_dump_pages_come_from_the_chain_its_own_stay_in_its_image(tmp_path: Path) -> None:
    """The lazy pages resolve to the store's (confirmed) copies through the chain;
    the dump's non-lazy pages (a stack) stay in its own pages image, in order."""
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1) + page(2))
    s.write(1, 0x9000, page(9))
    s.write(1, 0x2000, page(12))  # the source's pushed frozen bytes of a changed page
    d = lazy_dump(tmp_path, 1, [(0x1000, 2, True), (0x5000, 2, False), (0x9000, 1, True)], page(50) + page(51))
    stats = s.rebuild(d, confirmed((1, 0x1000, 2), (1, 0x9000, 1)))
    assert stats["chained_processes"] == 1 and stats["rebuilt_pages"] == 3
    got = {v: resolve(d, 1, v) for v in (0x1000, 0x2000, 0x5000, 0x6000, 0x9000)}
    assert got == {0x1000: page(1), 0x2000: page(12), 0x5000: page(50), 0x6000: page(51), 0x9000: page(9)}
    top = images.read_pagemap((d / "pagemap-1.img").read_bytes())
    assert [(e.vaddr, e.flags) for e in top.entries] == [
        (0x1000, images.PE_PARENT | images.PE_LAZY), (0x5000, images.PE_PRESENT), (0x9000, images.PE_PARENT | images.PE_LAZY)
    ]  # as the classic chain marks them: an eager restore reads PE_LAZY pages like any other
    assert (d / "pages-3.img").read_bytes() == page(50) + page(51), "its own pages image is kept as it is"


@pytest.mark.parametrize("said", [None, [(1, 0x1000, 2)], [(1, 0x2000, 2)], [(2, 0x1000, 3)]])
def test_lazy_page_the_source_never_confirmed_refuses_the_restore(tmp_path: Path, said: list[tuple[int, int, int]] | None) -> None:
    """The store's copy of a page the source did not vouch for may be stale: no restore from it."""
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1) + page(2) + page(3))
    d = lazy_dump(tmp_path, 1, [(0x1000, 3, True)], b"")
    with pytest.raises(MigrationError, match="never confirmed page"):
        s.rebuild(d, confirmed(*said) if said is not None else None)
    assert not (d / "parent").exists()


def test_lazy_dump_page_missing_from_the_store_is_an_error(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1))
    d = lazy_dump(tmp_path, 1, [(0x1000, 2, True)], b"")
    with pytest.raises(MigrationError, match="no copy of page 0x2000"):
        s.rebuild(d, confirmed((1, 0x1000, 2)))


def test_lazy_dump_entry_neither_present_nor_lazy_is_refused(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1) + page(2))
    d = lazy_dump(tmp_path, 1, [(0x1000, 1, True)], b"")
    pm = images.read_pagemap((d / "pagemap-1.img").read_bytes())
    odd = images.PagemapEntry(vaddr=0x2000, nr_pages=1, flags=images.PE_PARENT)
    (d / "pagemap-1.img").write_bytes(images.write_pagemap(images.Pagemap(pages_id=3, entries=(*pm.entries, odd))))
    with pytest.raises(MigrationError, match="neither present nor lazy"):
        s.rebuild(d, confirmed((1, 0x1000, 2)))


def test_a_lazy_restore_after_the_push_needs_no_rebuild_only_confirmed_pages(tmp_path: Path) -> None:
    """Served lazily from the store, a lazy dump's images stay as CRIU wrote them;
    every lazy page must still be confirmed by the source and held here."""
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1) + page(2))
    d = lazy_dump(tmp_path, 1, [(0x1000, 2, True), (0x5000, 1, False)], page(50))
    before = sorted((p.name, p.read_bytes()) for p in d.iterdir())
    assert s.check_pushed(d, confirmed((1, 0x1000, 2))) == {"lazy_pages": 2}
    assert sorted((p.name, p.read_bytes()) for p in d.iterdir()) == before and not (d / "parent").exists()
    with pytest.raises(MigrationError, match="never confirmed page 0x2000"):
        s.check_pushed(d, confirmed((1, 0x1000, 1)))
    s2 = PageStore(tmp_path / "store2")
    s2.write(1, 0x1000, page(1))
    with pytest.raises(MigrationError, match="no copy of page 0x2000"):
        s2.check_pushed(d, confirmed((1, 0x1000, 2)))
