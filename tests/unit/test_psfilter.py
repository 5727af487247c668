"""The filtering page server over real loopback TCP, driven by a scripted client.

Real CRIU is in tests/e2e/test_psfilter_criu.py; here every path can be
forced: changed/unchanged/new pages, shmem, backpressure, a client that
vanishes, garbage, a failing sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

import pytest
import uvloop

from tug.engine.criu import images
from tug.engine.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT
from tug.engine.errors import MigrationError, TransportError
from tug.engine.source.psfilter import FIRST_PAGES_ID, QUEUE_DEPTH, FilterServer
from tug.engine.source.trackers.shadow import ContentTracker
from tug.transports.criu_pageserver import PAGE_SIZE, Kind, PageServerProtocolError

from .psclient import Session, page

P, S = Kind.PROCESS, Kind.SHMEM
PL = PE_PRESENT | PE_LAZY
BASE = 0x7F0000000000


class Collect:
    """A sink that records every run; optionally blocked until released."""

    def __init__(self, *, blocked: bool = False, fail_after: int | None = None) -> None:
        self.runs: list[tuple[int, int, bytes]] = []
        self.gate = asyncio.Event()
        if not blocked:
            self.gate.set()
        self.fail_after = fail_after

    async def __call__(self, pid: int, vaddr: int, data: bytes) -> None:
        await self.gate.wait()
        if self.fail_after is not None and len(self.runs) >= self.fail_after:
            raise TransportError("link lost (test)")
        assert isinstance(data, bytes)
        self.runs.append((pid, vaddr, data))

    def pages(self) -> dict[tuple[int, int], bytes]:
        out = {}
        for pid, vaddr, data in self.runs:
            for k in range(len(data) // PAGE_SIZE):
                key = (pid, vaddr + k * PAGE_SIZE)
                assert key not in out, f"page {key} reported twice"
                out[key] = data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
        return out


async def client(port: int, wire: bytes, *, replies: int) -> bytes:
    """Send ``wire`` like CRIU, then read ``replies`` bytes of answers and close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(wire)
        await writer.drain()
        return await reader.readexactly(replies) if replies else b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def cut_off(reader: asyncio.StreamReader) -> None:
    """CRIU's side sees its connection end (EOF or reset): its dump fails instead of hanging."""
    async with asyncio.timeout(5):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass


def prefilled() -> ContentTracker:
    """pid 1 was sent pages 0..7 of BASE by earlier rounds."""
    t = ContentTracker()
    t.diff(1, BASE, b"".join(page(1, k) for k in range(8)))
    return t


async def test_a_dump_is_filtered_and_its_images_written(tmp_path: Path) -> None:
    tracker = prefilled()
    fs = FilterServer.listen(tracker, tmp_path, only_criu=False)
    sink = Collect()
    changed = page(9, 3)
    s = Session().open(P, 1)
    # Pages 0..7: unchanged but page 3; page 8 was never sent.
    s.add(P, 1, BASE, b"".join(changed if k == 3 else page(1, k) for k in range(8)) + page(1, 8), flags=PL)
    s.add(P, 1, BASE + 0x100000, page(1, 100), flags=PE_PRESENT)
    s.open(P, 2).add(P, 2, BASE, page(2, 0) + page(2, 1))
    s.parent(P, 3)
    s.open(S, 77).add(S, 77, 0, page(7, 0) + page(7, 1)).add(S, 77, 5 * PAGE_SIZE, page(7, 5))
    s.close()
    serve = asyncio.create_task(fs.serve(sink))
    replies = await client(fs.port, bytes(s.wire), replies=3 + 4 + 4)
    stats = await serve
    # OPEN2 answers: no parent, three times; PARENT: 0; CLOSE: status 0.
    assert replies == b"\0\0" + struct.pack("<i", 0) + b"\0" + struct.pack("<i", 0)
    assert fs.complete and fs.connected and not fs.disconnected

    assert sink.pages() == {
        (1, BASE + 3 * PAGE_SIZE): changed,
        (1, BASE + 8 * PAGE_SIZE): page(1, 8),
        (1, BASE + 0x100000): page(1, 100),
        (2, BASE): page(2, 0),
        (2, BASE + PAGE_SIZE): page(2, 1),
    }
    assert sink.runs[:2] == [(1, BASE + 3 * PAGE_SIZE, changed), (1, BASE + 8 * PAGE_SIZE, page(1, 8))]
    assert (stats.processes, stats.pages, stats.changed_pages) == (2, 12, 5)
    assert (stats.shmem_objects, stats.shmem_pages) == (1, 3)

    pm1 = images.read_pagemap((tmp_path / "pagemap-1.img").read_bytes())
    pm2 = images.read_pagemap((tmp_path / "pagemap-2.img").read_bytes())
    shm = images.read_pagemap((tmp_path / "pagemap-shmem-77.img").read_bytes())
    assert pm1.entries == (images.PagemapEntry(BASE, 9, PL), images.PagemapEntry(BASE + 0x100000, 1, PE_PRESENT))
    assert pm2.entries == (images.PagemapEntry(BASE, 2, PL),)
    assert shm.entries == (images.PagemapEntry(0, 2, PL), images.PagemapEntry(5 * PAGE_SIZE, 1, PL))
    assert [pm1.pages_id, pm2.pages_id, shm.pages_id] == [FIRST_PAGES_ID, FIRST_PAGES_ID + 1, FIRST_PAGES_ID + 2]
    # Shared memory whole; process pages files are the destination's to rebuild.
    assert (tmp_path / images.pages_file_name(shm.pages_id)).read_bytes() == page(7, 0) + page(7, 1) + page(7, 5)
    assert fs.process_pages_files == {images.pages_file_name(pm1.pages_id), images.pages_file_name(pm2.pages_id)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pagemap-1.img", "pagemap-2.img", "pagemap-shmem-77.img", images.pages_file_name(shm.pages_id)]
    )
    assert tracker.shadow[(1, BASE + 3 * PAGE_SIZE)] == page(1, 3), "the final diff does not record"


async def test_a_slow_sink_stops_the_reading(tmp_path: Path) -> None:
    """Backpressure: with the sink stuck, only about QUEUE_DEPTH entries are read and diffed."""
    entry_pages = 1024  # CRIU's usual 4 MiB entry
    entries = 48
    fs = FilterServer.listen(ContentTracker(), tmp_path, only_criu=False)
    sink = Collect(blocked=True)
    s = Session().open(P, 1)
    data = b"".join(page(1, k) for k in range(entry_pages))
    for i in range(entries):
        s.add(P, 1, BASE + i * entry_pages * PAGE_SIZE, data)
    s.close()
    serve = asyncio.create_task(fs.serve(sink))
    send = asyncio.create_task(client(fs.port, bytes(s.wire), replies=1 + 4))
    await asyncio.sleep(1.0)
    assert not send.done(), "the client must be held up by TCP"
    read_entries = fs.stats.pages // entry_pages
    assert read_entries <= QUEUE_DEPTH + 2, f"{read_entries} entries read while the sink was stuck"
    sink.gate.set()
    await send
    stats = await serve
    assert stats.changed_pages == entries * entry_pages and len(sink.runs) == entries


async def test_criu_leaving_before_close_is_a_disconnect(tmp_path: Path) -> None:
    fs = FilterServer.listen(ContentTracker(), tmp_path, only_criu=False)
    serve = asyncio.create_task(fs.serve(Collect()))
    s = Session().open(P, 1).add(P, 1, BASE, page(1, 0))
    await client(fs.port, bytes(s.wire) + bytes(s.wire[:10]), replies=1)  # ends inside a request header
    with pytest.raises(PageServerProtocolError, match="connection closed in a request header"):
        await serve
    assert fs.disconnected and not fs.complete
    assert not (tmp_path / "pagemap-1.img").exists()


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\x99" + bytes(31), "unknown page-server command"),
        (bytes(Session().open(P, 1).hole(P, 1, BASE, 4, PE_PARENT).wire), "no parent dump"),
        (bytes(Session().open(P, 1).open(P, 1).wire), "opened the pagemap of process 1 twice"),
        (bytes(Session().open(P, 1).add(P, 1, BASE + PAGE_SIZE, page(1, 1)).add(P, 1, BASE, page(1, 0)).close().wire), "overlaps or precedes"),
    ],
    ids=["garbage", "hole", "reopen", "descending"],
)
async def test_bad_streams_fail_and_cut_criu_off(tmp_path: Path, wire: bytes, match: str) -> None:
    fs = FilterServer.listen(ContentTracker(), tmp_path, only_criu=False)
    serve = asyncio.create_task(fs.serve(Collect()))
    reader, writer = await asyncio.open_connection("127.0.0.1", fs.port)
    writer.write(wire)
    with pytest.raises(MigrationError, match=match):
        await serve
    assert not fs.disconnected, "our error, not CRIU's"
    await cut_off(reader)
    writer.close()


async def test_a_failing_sink_fails_serve_and_cuts_criu_off(tmp_path: Path) -> None:
    fs = FilterServer.listen(ContentTracker(), tmp_path, only_criu=False)
    serve = asyncio.create_task(fs.serve(Collect(fail_after=1)))
    s = Session().open(P, 1)
    for i in range(64):
        s.add(P, 1, BASE + i * 2 * PAGE_SIZE, page(1, i))  # never sent: all changed, one run each
    reader, writer = await asyncio.open_connection("127.0.0.1", fs.port)
    writer.write(bytes(s.wire))
    with pytest.raises(TransportError, match="link lost"):
        await serve
    assert not fs.disconnected
    await cut_off(reader)
    writer.close()


async def test_cancelled_before_criu_connects(tmp_path: Path) -> None:
    fs = FilterServer.listen(ContentTracker(), tmp_path, only_criu=False)
    port = fs.port
    serve = asyncio.create_task(fs.serve(Collect()))
    await asyncio.sleep(0.05)
    serve.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serve
    assert not fs.connected
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # nobody listens any more


def test_under_uvloop(tmp_path: Path) -> None:
    """The CLI runs uvloop, whose sock_* methods are its own: the main paths again there."""

    async def main() -> None:
        await test_a_dump_is_filtered_and_its_images_written(tmp_path / "ok")
        await test_a_slow_sink_stops_the_reading(tmp_path / "slow")
        await test_criu_leaving_before_close_is_a_disconnect(tmp_path / "gone")
        await test_a_failing_sink_fails_serve_and_cuts_criu_off(tmp_path / "sink")
        await test_cancelled_before_criu_connects(tmp_path / "cancel")

    uvloop.run(main())


async def test_only_criu_may_connect(tmp_path: Path) -> None:
    """Anything but a criu process is refused, and the server waits on for CRIU."""
    fs = FilterServer.listen(ContentTracker(), tmp_path)  # the default: only CRIU
    serve = asyncio.create_task(fs.serve(Collect()))
    reader, writer = await asyncio.open_connection("127.0.0.1", fs.port)
    assert await asyncio.wait_for(reader.read(), 10) == b"", "this test process is not CRIU: cut off"
    writer.close()
    assert fs.refused and fs.refused[0].endswith("not only criu") and not fs.connected
    serve.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serve
    fs.close()
