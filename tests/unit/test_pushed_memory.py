"""Pre-copy's pushed eager step without CRIU: the source's push, the agent's verdicts, the rebuild.

Real sockets, a real PageStore on tmpfs, the real content tracker; the frozen
processes are played by a dict of pages (test_hybrid_servers.FakeFrozen). The
destination may restore only from pages the source confirmed: every lazy page
of the dump must come out as its frozen bytes, and a push that did not arrive
whole, or left a page out, refuses the restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tug.engine.criu import images
from tug.engine.destination.pagestore import PAGE, PageStore
from tug.engine.destination.verdicts import PushedMemory
from tug.engine.errors import MigrationError
from tug.engine.source import frozenserver
from tug.engine.source.frozenserver import FrozenServer
from tug.engine.source.strategies.pushed import lazy_runs
from tug.engine.source.trackers.shadow import ContentTracker
from tug.transports import hybrid_wire as w

from ..imagechain import resolve
from .test_hybrid_servers import FROZEN, PID, SENT, FakeFrozen

#: What the lazy dump left lazy: every frozen page (0x10000.. and the new 0x20000).
RUNS = [(PID, 0x10000, 16), (PID, 0x20000, 1)]


def lazy_images(d: Path, runs: list[tuple[int, int, int]]) -> Path:
    d.mkdir(exist_ok=True)
    entries = tuple(images.PagemapEntry(vaddr=v, nr_pages=n, flags=images.PE_LAZY) for _, v, n in runs)
    (d / images.pagemap_file_name(PID)).write_bytes(images.write_pagemap(images.Pagemap(pages_id=1, entries=entries)))
    (d / images.pages_file_name(1)).write_bytes(b"")
    return d


@contextlib.asynccontextmanager
async def _pushing(tmp: Path, runs: list[tuple[int, int, int]], frozen: dict[int, bytes] = FROZEN
                   ) -> AsyncIterator[tuple[PushedMemory, asyncio.Task[None], PageStore, FrozenServer]]:
    """The source pushes ``runs`` of ``frozen`` memory to the agent's PushedMemory over its store (``SENT`` from the rounds)."""
    store = PageStore(tmp / "store")
    tracker = ContentTracker()
    for vaddr, data in sorted(SENT.items()):
        store.write(PID, vaddr, data)
        tracker.diff(PID, vaddr, data)
    source = FrozenServer(FakeFrozen({PID: dict(frozen)}), tracker)
    pushed: asyncio.Future[asyncio.Task[None]] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        pushed.set_result(task)  # type: ignore[arg-type]
        try:
            await source.push(reader, writer, runs)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    dest = PushedMemory(store, "c", server.sockets[0].getsockname()[1])
    try:
        await dest.connect()
        yield dest, await pushed, store, source
    finally:
        await dest.close()
        server.close()
        store.close()


@pytest.mark.parametrize("window", [frozenserver.PUSH_WINDOW, 3 * (w.HEADER.size + PAGE)])
def test_every_lazy_page_restores_as_its_frozen_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    """Changed and new pages cross as bytes, the rest as SAME; the push returns only
    once all of it is acknowledged, and the rebuilt images resolve to the frozen memory
    (also with a window so small that every few records wait for an ack, and
    batches cut after each page of data)."""
    if window < frozenserver.PUSH_WINDOW:
        monkeypatch.setattr(frozenserver, "PUSH_BYTES", PAGE)
    monkeypatch.setattr(frozenserver, "PUSH_WINDOW", window)

    async def run() -> None:
        async with _pushing(tmp_path, RUNS) as (dest, task, store, source):
            async with asyncio.timeout(10):
                await task
            verdicts = dest.complete()  # the source returned: everything was applied here
            assert source.stats.pages_sent == 2 and source.stats.pages_same == 15
            assert verdicts.fetched_pages == 2
            d = lazy_images(tmp_path / "images", RUNS)
            store.rebuild(d, verdicts.confirmed)
            for _, vaddr, n in RUNS:
                for k in range(n):
                    a = vaddr + k * PAGE
                    assert resolve(d, images.pagemap_file_name(PID), a) == FROZEN[a], hex(a)

    asyncio.run(run())


def test_a_run_the_frozen_processes_do_not_map_refuses_the_restore(tmp_path: Path) -> None:
    """The source cannot vouch for a page it does not have: it sends nothing for
    the range around it (here the whole entry from 0x10000), and the destination
    refuses to restore rather than use its stored copies."""

    async def run() -> None:
        frozen = {a: p for a, p in FROZEN.items() if a != 0x14000}
        async with _pushing(tmp_path, RUNS, frozen) as (dest, task, store, _):
            async with asyncio.timeout(10):
                await task
            verdicts = dest.complete()
            with pytest.raises(MigrationError, match="never confirmed page 0x10000 of pid 9"):
                store.rebuild(lazy_images(tmp_path / "images", RUNS), verdicts.confirmed)

    asyncio.run(run())


def test_a_push_cut_short_is_no_basis_for_a_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's end closes mid-push: the source's push fails (it never waits
    forever), and what the agent got is refused."""
    monkeypatch.setattr(frozenserver, "PUSH_WINDOW", 64 << 10)
    new = {0x100000 + k * PAGE: bytes([k % 251]) * PAGE for k in range(4096)}  # 16 MiB the rounds never sent

    async def run() -> None:
        async with _pushing(tmp_path, [(PID, 0x100000, 4096)], {**FROZEN, **new}) as (dest, task, _, _):
            await dest.close()
            with pytest.raises((w.HybridWireError, ConnectionError)):
                async with asyncio.timeout(10):
                    await task
            with pytest.raises(MigrationError, match="has not arrived whole"):
                dest.complete()

    asyncio.run(run())


def test_garbage_on_the_push_channel_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        store = PageStore(tmp_path / "store")

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"\x07" * 64)  # not a record the destination accepts
            await writer.drain()
            await reader.read()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        dest = PushedMemory(store, "c", server.sockets[0].getsockname()[1])
        try:
            await dest.connect()
            async with asyncio.timeout(10):
                while dest.error is None:
                    await asyncio.sleep(0.01)
            with pytest.raises(MigrationError, match="pushed memory broke"):
                dest.complete()
        finally:
            await dest.close()
            server.close()
            store.close()

    asyncio.run(run())


def test_only_the_agents_own_connection_is_admitted(tmp_path: Path) -> None:
    async def run() -> tuple[bool, bool]:
        async with _pushing(tmp_path, RUNS) as (dest, task, _, _):
            await task
            other = socket.create_connection(("127.0.0.1", dest.port))
            try:
                assert dest.own_port is not None
                return await dest.is_own(dest.own_port), await dest.is_own(other.getsockname()[1])
            finally:
                other.close()

    assert asyncio.run(run()) == (True, False)


def test_lazy_runs_are_the_lazy_only_entries_of_process_pagemaps(tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    pm = images.Pagemap(pages_id=1, entries=(
        images.PagemapEntry(vaddr=0x1000, nr_pages=2, flags=images.PE_LAZY),
        images.PagemapEntry(vaddr=0x5000, nr_pages=1, flags=images.PE_PRESENT),  # a stack page: in the image
        images.PagemapEntry(vaddr=0x9000, nr_pages=3, flags=images.PE_LAZY),
    ))
    (d / images.pagemap_file_name(7)).write_bytes(images.write_pagemap(pm))
    shm = images.Pagemap(pages_id=2, entries=(images.PagemapEntry(vaddr=0, nr_pages=1, flags=images.PE_LAZY),))
    (d / "pagemap-shmem-5.img").write_bytes(images.write_pagemap(shm))
    assert lazy_runs(d) == [(7, 0x1000, 2), (7, 0x9000, 3)]
