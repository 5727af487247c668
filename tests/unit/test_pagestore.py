"""The destination's page store: exact images, and the zero-copy fast path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tug.engine import images
from tug.engine.errors import MigrationError
from tug.engine.pagestore import PAGE, PageStore


def page(tag: int) -> bytes:
    return bytes([tag % 256]) * PAGE


def dump(tmp: Path, pid: int, runs: list[tuple[int, int]], pages_id: int = 3) -> Path:
    d = tmp / "images"
    d.mkdir(exist_ok=True)
    entries = tuple(images.PagemapEntry(vaddr=v, nr_pages=n, flags=images.PE_PRESENT) for v, n in runs)
    (d / images.pagemap_file_name(pid)).write_bytes(images.write_pagemap(images.Pagemap(pages_id=pages_id, entries=entries)))
    return d


def test_same_layout_is_renamed_not_copied(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1) + page(2))
    s.write(1, 0x8000, page(3))
    s.write(1, 0x2000, page(9))  # a later round rewrites a page in place
    d = dump(tmp_path, 1, [(0x1000, 2), (0x8000, 1)])
    stats = s.rebuild(d)
    assert stats["renamed_files"] == 1 and stats["rebuilt_files"] == 0
    assert (d / "pages-3.img").read_bytes() == page(1) + page(9) + page(3)


def test_changed_layout_is_rebuilt_in_pagemap_order(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x8000, page(3))
    s.write(1, 0x1000, page(1))  # arrived out of address order
    s.write(1, 0x5000, page(5))  # freed before the final dump
    d = dump(tmp_path, 1, [(0x1000, 1), (0x8000, 1)])
    stats = s.rebuild(d)
    assert stats["rebuilt_files"] == 1 and stats["renamed_files"] == 0
    assert (d / "pages-3.img").read_bytes() == page(1) + page(3)


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
    assert (d / "pages-3.img").read_bytes() == page(11) + page(12) + page(13)


def test_a_pagemap_without_pages_gets_an_empty_pages_image(tmp_path: Path) -> None:
    s = PageStore(tmp_path / "store")
    s.write(1, 0x1000, page(1))
    d = dump(tmp_path, 2, [], pages_id=5)  # pid 2: nothing stored, nothing needed
    assert s.rebuild(d)["rebuilt_files"] == 1
    assert (d / "pages-5.img").read_bytes() == b""
