"""The hybrid fill end to end without CRIU: the agent's page server, the source's frozen-memory service.

Real sockets, a real PageStore on tmpfs, the real content tracker; only the
frozen processes are played by a dict of pages. The client speaks the
lazy-pages daemon's side of CRIU's protocol. Whatever the order in which the
sweep and the requests meet, every page served must be the frozen one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.engine.destination.hybridserver import HybridPageServer
from tug.engine.destination.pagestore import PAGE, PageStore
from tug.engine.procfs import Region
from tug.engine.source.frozenmemory import FrozenMemory, NotFrozen
from tug.engine.source.frozenserver import FrozenServer
from tug.engine.source.trackers.shadow import ContentTracker
from tug.transports import hybrid_wire as w
from tug.transports.criu_lazy import LazyWatch
from tug.transports.criu_pageserver import HEADER, PS_IOV_CLOSE, PS_IOV_GET

PID = 9


def page(vaddr: int, gen: int = 0) -> bytes:
    return (vaddr + gen).to_bytes(8, "little") * (PAGE // 8)


def _regions(addrs: list[int]) -> list[Region]:
    """The contiguous runs of ``addrs`` as private mappings."""
    out: list[Region] = []
    for a in addrs:
        if out and out[-1].end == a:
            out[-1] = Region(out[-1].start, a + PAGE, "rw-p", "")
        else:
            out.append(Region(a, a + PAGE, "rw-p", ""))
    return out


class FakeFrozen(FrozenMemory):
    """Frozen processes as pid -> vaddr -> page (what /proc/PID/mem would read)."""

    def __init__(self, pages: dict[int, dict[int, bytes]]) -> None:
        self.pages = pages
        self.procs = dict.fromkeys(pages)  # type: ignore[arg-type]
        self.regions = {pid: _regions(sorted(have)) for pid, have in pages.items()}
        self.still_frozen = lambda: True

    def covered(self, pid: int, vaddr: int, npages: int) -> bool:
        return all(vaddr + k * PAGE in self.pages.get(pid, {}) for k in range(npages))

    def read(self, pid: int, vaddr: int, npages: int, *, check: bool = True) -> bytes | None:
        got = [self.pages.get(pid, {}).get(vaddr + k * PAGE) for k in range(npages)]
        return None if any(p is None for p in got) else b"".join(p for p in got if p is not None)

    def present(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, int, int]]:
        have = self.pages.get(pid, {})
        runs: list[tuple[int, int, int]] = []
        for a in (vaddr + k * PAGE for k in range(npages)):
            if a not in have:
                continue
            if runs and runs[-1][1] + runs[-1][2] * PAGE == a:
                runs[-1] = (pid, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((pid, a, 1))
        return runs

    def sweep_runs(self, pid: int) -> list[tuple[int, int]]:
        addrs = sorted(self.pages[pid])
        runs: list[tuple[int, int]] = []
        for a in addrs:
            if runs and runs[-1][0] + runs[-1][1] * PAGE == a and runs[-1][1] < 4:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((a, 1))
        return sorted(runs, reverse=True)

    def close(self) -> None:
        pass


SENT = {0x10000 + k * PAGE: page(0x10000 + k * PAGE) for k in range(16)}
# Frozen: one page rewritten after the last round, one page new since.
FROZEN = {**SENT, 0x13000: page(0x13000, 1), 0x20000: page(0x20000, 2)}


async def _serve(handler, port_box: list[int]) -> asyncio.Server:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port_box.append(server.sockets[0].getsockname()[1])
    return server


async def _daemon(port: int, asks: list[tuple[int, int, int]]) -> dict[tuple[int, int], bytes]:
    """Plays the lazy-pages daemon: asks each range until it has every page; returns what it got."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    watch = LazyWatch()
    got: dict[tuple[int, int], bytes] = {}
    try:
        for pid, vaddr, n in asks:
            while n:
                req = HEADER.pack(PS_IOV_GET, n, vaddr, pid)
                watch.requests(req, 0.0)
                writer.write(req)
                hdr = await reader.readexactly(HEADER.size)
                body = await reader.readexactly(HEADER.unpack(hdr)[1] * PAGE)
                (served,) = watch.answers(hdr + body, 0.0)
                for k in range(served.pages):
                    got[(pid, vaddr + k * PAGE)] = body[k * PAGE : (k + 1) * PAGE]
                n -= served.pages
                vaddr += served.pages * PAGE
        writer.write(HEADER.pack(PS_IOV_CLOSE, 0, 0, 0))
        assert await reader.readexactly(4) == b"\0\0\0\0"
    finally:
        writer.close()
    return got


@contextlib.asynccontextmanager
async def _pair(store_dir: Path, sent: dict[int, bytes], frozen: dict[int, bytes], hot: set[int] | None,
                sweep_first: bool) -> AsyncIterator[tuple[int, HybridPageServer, FrozenServer]]:
    """A frozen source (``frozen`` memory; ``sent`` went in the rounds) and the
    destination's hybrid server over its page store, on real sockets: yields
    the port the daemon asks at."""
    store = PageStore(store_dir)
    tracker = ContentTracker()
    for vaddr, data in sorted(sent.items()):
        store.write(PID, vaddr, data)
        tracker.diff(PID, vaddr, data)
    source = FrozenServer(FakeFrozen({PID: dict(frozen)}), tracker)
    if hot is not None:
        source.hot = {PID: {v // PAGE for v in hot}}
    if sweep_first:
        source.running.set()  # as if a GET had come: the sweep runs before the daemon asks
    ports: list[int] = []
    servers = [await _serve(source.serve_faults, ports), await _serve(source.sweep, ports)]
    hyb = HybridPageServer(store, "c", ports[0], ports[1])
    hyb.admit = lambda ours, peer: None
    try:
        yield await hyb.start(), hyb, source
    finally:
        await hyb.close()
        for s in servers:
            s.close()
        store.close()


async def _hybrid(tmp_path: Path, asks: list[tuple[int, int, int]], *, sweep_first: bool = False):  # type: ignore[no-untyped-def]
    async with _pair(tmp_path / "store", SENT, FROZEN, {0x13000} if sweep_first else None, sweep_first) as (port, hyb, source):
        if sweep_first:
            async with asyncio.timeout(10):
                while not hyb.sweep_done:
                    await asyncio.sleep(0.01)
        got = await _daemon(port, asks)
        return got, hyb, source


@pytest.mark.parametrize("sweep_first", [False, True])
def test_every_page_served_is_the_frozen_one(tmp_path: Path, sweep_first: bool) -> None:
    asks = [(PID, 0x13000, 1), (PID, 0x10000, 16), (PID, 0x20000, 1)]
    got, hyb, source = asyncio.run(_hybrid(tmp_path, asks, sweep_first=sweep_first))
    for (pid, vaddr), data in got.items():
        assert data == FROZEN[vaddr], hex(vaddr)
    assert len(got) == 17
    st = hyb.stats()
    assert st["store_pages"] + st["source_pages"] == 17 + 1  # page 0x13000 was asked twice
    assert st["source_pages"] >= 3  # 0x13000 (twice: a fault, then in the range) and 0x20000
    assert hyb.error is None
    # Only the changed pages' bytes crossed: the source sent no page twice on one channel.
    assert source.stats.pages_sent <= 2 + 2


def test_a_page_the_source_lacks_ends_serving_never_a_wrong_page(tmp_path: Path) -> None:
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        asyncio.run(_hybrid(tmp_path, [(PID, 0x30000, 1)]))


def test_an_unknown_pid_ends_serving(tmp_path: Path) -> None:
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        asyncio.run(_hybrid(tmp_path, [(PID + 1, 0x10000, 1)]))


def test_the_agents_own_connections_are_recognised(tmp_path: Path) -> None:
    async def run() -> tuple[bool, bool]:
        store = PageStore(tmp_path / "store")
        tracker = ContentTracker()
        source = FrozenServer(FakeFrozen({PID: dict(FROZEN)}), tracker)
        ports: list[int] = []
        servers = [await _serve(source.serve_faults, ports), await _serve(source.sweep, ports)]
        hyb = HybridPageServer(store, "c", ports[0], ports[1])
        try:
            await hyb.start()
            other = socket.create_connection(("127.0.0.1", ports[0]))
            mine = next(iter(hyb.own_ports))
            return await hyb.is_own(mine), await hyb.is_own(other.getsockname()[1])
        finally:
            await hyb.close()
            for s in servers:
                s.close()
            store.close()

    assert asyncio.run(run()) == (True, False)


def test_frozen_memory_reads_real_pages_even_without_prot_read_and_nothing_outside() -> None:
    """A real process (this one): /proc/PID/mem as the source reads a stopped container's memory."""
    import ctypes
    import mmap
    import os

    from tug.engine.source.frozenmemory import NotFrozen
    from tug.engine.source.trackers.shadow import ProcessMemory

    n = 4
    buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pattern = b"".join(page(k * PAGE, 3) for k in range(n))
    buf[:] = pattern
    anchor = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(anchor)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(addr), n * PAGE, 0) == 0  # PROT_NONE: CRIU still dumps its pages
    frozen = True
    proc = ProcessMemory(os.getpid())
    mem = FrozenMemory([proc], still_frozen=lambda: frozen)
    try:
        assert mem.read(proc.ns_pid, addr, n) == pattern
        assert mem.read(proc.ns_pid + 1, addr, 1) is None  # no such process
        assert mem.read(proc.ns_pid, 0x1000, 1) is None  # not mapped
        frozen = False
        with pytest.raises(NotFrozen):
            mem.read(proc.ns_pid, addr, 1)
    finally:
        mem.close()
        libc.mprotect(ctypes.c_void_p(addr), n * PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
        del anchor
        buf.close()


async def _random_fill(tmp: Path, sent: dict[int, bytes], frozen: dict[int, bytes], hot: set[int],
                       asks: list[tuple[int, int]], sweep_first: bool) -> dict[tuple[int, int], bytes]:
    async with _pair(tmp, sent, frozen, hot, sweep_first) as (port, _hyb, _source):
        return await _daemon(port, [(PID, v, n) for v, n in asks])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_store_and_frozen_memory_serve_only_frozen_pages(tmp_path_factory: pytest.TempPathFactory,
                                                              data: st.DataObject) -> None:
    """Random pre-copied pages, random changes, new and dropped pages, random requests and sweep order."""
    base = 0x400000
    slots = data.draw(st.sets(st.integers(min_value=0, max_value=47), min_size=1, max_size=48))
    frozen = {base + k * PAGE: page(base + k * PAGE, data.draw(st.integers(0, 2))) for k in slots}
    sent_slots = data.draw(st.sets(st.sampled_from(sorted(slots)))) | data.draw(st.sets(st.integers(48, 55), max_size=3))
    sent = {base + k * PAGE: page(base + k * PAGE) for k in sent_slots}  # generation 0: what pre-copy sent
    hot = {v for v in frozen if data.draw(st.booleans())}
    # The daemon asks for runs of pages the frozen process has (as CRIU's pagemap would say).
    order = data.draw(st.permutations(sorted(frozen)))
    asks = [(v, data.draw(st.integers(1, 4))) for v in order[: data.draw(st.integers(1, len(order)))]]
    asks = [(v, next(k for k in range(n, 0, -1) if all(v + j * PAGE in frozen for j in range(k)))) for v, n in asks]
    got = asyncio.run(_random_fill(tmp_path_factory.mktemp("store"), sent, frozen, hot, asks, data.draw(st.booleans())))
    assert got and all(got[(PID, v)] == frozen[v] for _, v in got), "a page served that is not the frozen one"


class SlowSweep(FakeFrozen):
    def sweep_runs(self, pid: int) -> list[tuple[int, int]]:
        import time

        time.sleep(0.3)  # the daemon gets every page through GETs before the sweep gets going
        return super().sweep_runs(pid)


def test_the_source_may_stop_its_sweep_once_the_daemon_has_every_page(tmp_path: Path) -> None:
    """END arrives while the sweep still runs: the source ends it (as the strategy does), the fill succeeds."""

    async def run() -> tuple[dict[tuple[int, int], bytes], dict[str, object]]:
        store = PageStore(tmp_path / "store")
        tracker = ContentTracker()
        for vaddr, data in SENT.items():
            store.write(PID, vaddr, data)
            tracker.diff(PID, vaddr, data)
        sweeps: list[asyncio.Task[None]] = []

        async def sweep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sweeps.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await source.sweep(reader, writer)
            finally:
                writer.close()

        async def on_end() -> bool:
            for t in sweeps:
                t.cancel()
            await asyncio.gather(*sweeps, return_exceptions=True)
            await asyncio.sleep(0.1)  # ending CRIU's dump takes a while: the sweep's close arrives first
            return True

        source = FrozenServer(SlowSweep({PID: dict(FROZEN)}), tracker, on_end=on_end)
        ports: list[int] = []
        servers = [await _serve(source.serve_faults, ports), await _serve(sweep, ports)]
        hyb = HybridPageServer(store, "c", ports[0], ports[1])
        hyb.admit = lambda ours, peer: None
        try:
            port = await hyb.start()
            got = await _daemon(port, [(PID, 0x10000, 16), (PID, 0x20000, 1)])
            return got, hyb.stats()
        finally:
            await hyb.close()
            for s in servers:
                s.close()
            store.close()

    got, stats = asyncio.run(run())
    assert all(data == FROZEN[vaddr] for (_, vaddr), data in got.items()) and len(got) == 17
    assert stats["source_ended"] is True and stats["sweep_done"] is False


class Vouching:
    """A page filter that holds every sent page as it is, like the uffd tracker after its final scan."""

    def __init__(self, held: set[int]) -> None:
        self.held = held
        self.content = ContentTracker()

    def needs_data(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for a in range(vaddr, vaddr + npages * PAGE, PAGE):
            if a in self.held:
                continue
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], a + PAGE)
            else:
                runs.append((a, a + PAGE))
        return runs

    def diff(self, pid: int, vaddr: int, data: bytes, *, record: bool = True):  # type: ignore[no-untyped-def]
        return self.content.diff(pid, vaddr, data, record=record)


class CountingFrozen(FakeFrozen):
    def __init__(self, pages: dict[int, dict[int, bytes]]) -> None:
        super().__init__(pages)
        self.read_pages: list[int] = []

    def read(self, pid: int, vaddr: int, npages: int, *, check: bool = True) -> bytes | None:
        self.read_pages.extend(vaddr + k * PAGE for k in range(npages))
        return super().read(pid, vaddr, npages, check=check)


def test_pages_the_filter_vouches_for_are_answered_same_without_a_read() -> None:
    """With the uffd tracker the frozen server reads only the pages written since sent."""
    held = set(SENT) - {0x13000}  # written again before the freeze: not held
    frozen = CountingFrozen({PID: dict(FROZEN)})
    server = FrozenServer(frozen, Vouching(held))
    recs = server.answer(w.Get(PID, 0x10000, 16))
    assert frozen.read_pages == [0x13000]
    pages = [r for r in recs if isinstance(r, w.Pages)]
    assert [(r.vaddr, r.data) for r in pages] == [(0x13000, FROZEN[0x13000])]
    assert sum(r.nr_pages for r in recs) == 16
    # Still held by CRIU is checked even when nothing is read: SAME is a claim about the frozen memory.
    frozen.still_frozen = lambda: False
    with pytest.raises(NotFrozen):
        server.answer(w.Get(PID, 0x10000, 2))
    # And after reads: the one check after a batch of reads covers what they read.
    with pytest.raises(NotFrozen):
        server.answer(w.Get(PID, 0x12000, 3))
    assert frozen.read_pages[-1] == 0x13000


def test_the_hot_set_is_swept_in_whole_blocks_clipped_to_the_mappings() -> None:
    """A scattered hot set is swept a MAX_PAGES block at a time, never outside a mapping."""
    blk = w.MAX_PAGES * PAGE
    pages = {a: page(a) for a in [*range(blk - 4 * PAGE, blk + 8 * PAGE, PAGE), *range(5 * blk, 5 * blk + 3 * PAGE, PAGE)]}
    server = FrozenServer(FakeFrozen({PID: pages}), ContentTracker())
    server.hot = {PID: {(blk - 2 * PAGE) // PAGE, (blk + 5 * PAGE) // PAGE, (blk + 6 * PAGE) // PAGE, 5 * blk // PAGE}}
    assert server.hot_blocks(PID) == [(blk - 4 * PAGE, 4), (blk, 8), (5 * blk, 3)]
    recs = [r for v, n in server.hot_blocks(PID) for r in server._present_chunk(PID, v, n)]
    # Nothing was sent in rounds (empty tracker): every present page of those blocks goes as data.
    assert sorted((r.vaddr, r.nr_pages) for r in recs if isinstance(r, w.Pages)) == [(blk - 4 * PAGE, 4), (blk, 8), (5 * blk, 3)]
    assert server._present_chunk(PID, blk, 8) == []  # answered once
