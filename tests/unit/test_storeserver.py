"""The agent's lazy page server: a page store's pages, announced lazy, served over CRIU's protocol.

A real PageStore on tmpfs, real sockets; the client speaks the lazy-pages
daemon's side (``tug.transports.criu_lazy`` builds and checks the bytes).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tug.engine.criu import images
from tug.engine.destination.pagestore import PAGE, PageStore
from tug.engine.destination.storeserver import StorePageServer
from tug.engine.errors import MigrationError
from tug.transports.criu_lazy import ANSWER_CMD, LazyWatch
from tug.transports.criu_pageserver import HEADER, PS_IOV_CLOSE, PS_IOV_GET

PID = 7
LAZY = images.PE_PRESENT | images.PE_LAZY


def page(vaddr: int) -> bytes:
    return vaddr.to_bytes(8, "little") * (PAGE // 8)


def filled_store(root: Path) -> PageStore:
    store = PageStore(root)
    # Round 0: 0x10000..0x20000 ascending; a later round rewrites one page and adds one below (a new segment).
    store.write(PID, 0x10000, b"".join(page(0x10000 + k * PAGE) for k in range(16)))
    store.write(PID, 0x13000, page(0x13000)[::-1])
    store.write(PID, 0x8000, page(0x8000))
    return store


def get(nr: int, vaddr: int) -> bytes:
    return HEADER.pack(PS_IOV_GET, nr, vaddr, PID)


def test_rebuild_lazy_announces_lazy_pages_and_copies_the_rest(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store")
    imgs = tmp_path / "images"
    imgs.mkdir()
    pm = images.Pagemap(pages_id=1, entries=(
        images.PagemapEntry(vaddr=0x8000, nr_pages=1, flags=images.PE_PRESENT),  # CRIU restores it itself
        images.PagemapEntry(vaddr=0x10000, nr_pages=16, flags=LAZY),
    ))  # fmt: skip
    (imgs / images.pagemap_file_name(PID)).write_bytes(images.write_pagemap(pm))
    stats = store.rebuild_lazy(imgs)
    assert stats == {"lazy_pages": 16, "copied_pages": 1}
    out = images.read_pagemap((imgs / images.pagemap_file_name(PID)).read_bytes())
    assert [e.flags for e in out.entries] == [images.PE_PRESENT, images.PE_LAZY]
    assert (imgs / images.pages_file_name(1)).read_bytes() == page(0x8000)


def test_rebuild_lazy_refuses_a_page_the_store_lacks(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "store")
    imgs = tmp_path / "images"
    imgs.mkdir()
    pm = images.Pagemap(pages_id=1, entries=(images.PagemapEntry(vaddr=0x10000, nr_pages=17, flags=LAZY),))
    (imgs / images.pagemap_file_name(PID)).write_bytes(images.write_pagemap(pm))
    with pytest.raises(MigrationError, match="no copy of page 0x20000"):
        store.rebuild_lazy(imgs)


async def exchange(server: StorePageServer, requests: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(requests)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data


async def test_serves_runs_in_order_and_says_goodbye(tmp_path: Path) -> None:
    server = StorePageServer(filled_store(tmp_path / "store"), "c", admit=lambda ours, peer: None)
    await server.start()
    reqs = get(1, 0x13000) + get(16, 0x10000) + get(4, 0x8000) + HEADER.pack(PS_IOV_CLOSE, 0, 0, 0)
    answer = await exchange(server, reqs)
    watch = LazyWatch()
    watch.requests(reqs, 0.0)
    served = watch.answers(answer, 1.0)
    # The 16-page request is one contiguous run in round 0's segment; the page
    # below it lives alone in another segment: 1 of the 4 asked.
    assert [(s.asked, s.pages) for s in served] == [(1, 1), (16, 16), (4, 1)]
    assert watch.closed
    body = answer[HEADER.size : HEADER.size + PAGE]
    assert HEADER.unpack_from(answer)[0] == ANSWER_CMD and body == page(0x13000)[::-1], "the newest copy is served"
    assert server.stats() == {"store_requests": 3, "store_faults": 1, "store_pages": 18}
    await server.close()


async def test_a_page_the_store_lacks_ends_the_session(tmp_path: Path) -> None:
    server = StorePageServer(filled_store(tmp_path / "store"), "c", admit=lambda ours, peer: None)
    await server.start()
    assert await exchange(server, get(1, 0x40000)) == b""
    assert server.error is not None and "lacks" in server.error
    await server.close()


async def test_refuses_whoever_is_not_criu_and_waits_on(tmp_path: Path) -> None:
    server = StorePageServer(filled_store(tmp_path / "store"), "c", admit=lambda ours, peer: "not CRIU")
    await server.start()
    assert await exchange(server, get(1, 0x13000)) == b""
    assert server.refused == ["not CRIU"] and server.requests == 0
    await server.close()
