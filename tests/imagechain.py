"""Reading pages the way CRIU's restore does: through a chain of parent images.

tug's destination page store hands CRIU its pages as parent images (see
engine/pagestore.py); tests that check page contents resolve them here, the
same way: a page marked present is in this level's pages file, one marked
PE_PARENT is looked up in ``parent`` (a relative symlink), and so on down.
"""

from __future__ import annotations

import os
from pathlib import Path

from tug.engine.criu import images

PAGE = images.PAGE_SIZE


def resolve(level: Path, name: str, vaddr: int) -> bytes:
    """The bytes of page ``vaddr`` of pagemap ``name`` (e.g. ``pagemap-1.img``) as restored."""
    pm_path = level / name
    if pm_path.exists():
        pm = images.read_pagemap(pm_path.read_bytes())
        offset = 0
        for e in pm.entries:
            if e.vaddr <= vaddr < e.end:
                if e.present:
                    with open(level / images.pages_file_name(pm.pages_id), "rb") as f:
                        f.seek(offset + (vaddr - e.vaddr))
                        return f.read(PAGE)
                assert e.flags & images.PE_PARENT, e
                break
            if e.present:
                offset += e.nr_pages * PAGE
        else:
            raise AssertionError(f"{vaddr:#x} is not in {pm_path}")
    parent = level / "parent"
    assert parent.is_symlink() and not os.readlink(parent).startswith("/"), "parent links must be relative"
    return resolve(level / os.readlink(parent), name, vaddr)


def restored_pages(images_dir: Path, name: str) -> dict[int, bytes]:
    """Every page the top pagemap ``name`` names, resolved through the chain."""
    pm = images.read_pagemap((images_dir / name).read_bytes())
    return {
        e.vaddr + k * PAGE: resolve(images_dir, name, e.vaddr + k * PAGE) for e in pm.entries for k in range(e.nr_pages)
    }
