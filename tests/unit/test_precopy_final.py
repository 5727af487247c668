"""ContentRounds.final_dump: the filter between a (scripted) CRIU dump and the "pages" stream.

The dump is a fake that connects to the filter like CRIU does (or fails like
it); the session is a stub that keeps what the stream carried. What is
checked is the wiring migration.py relies on: the delta's framing, the pages
images to rebuild, and which error is raised when the dump fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, cast

import pytest

from tug.engine.api import MigrationOptions
from tug.engine.errors import CriuError, MigrationError, TransportError
from tug.engine.events import Event, TransferProgress
from tug.engine.pagestream import RunDecoder
from tug.engine.source.context import SourceContext
from tug.engine.source.trackers.content import ContentRounds
from tug.policies import parse_policy
from tug.transports.criu_pageserver import PAGE_SIZE, Kind, PageServerProtocolError

from .psclient import Session, page

P = Kind.PROCESS
BASE = 0x7F0000000000


class StubStream:
    def __init__(self, fail: bool) -> None:
        self.data = bytearray()
        self.closed: dict[str, Any] | None = None
        self.aborted: str | None = None
        self.fail = fail

    async def write(self, data: bytes | memoryview) -> None:
        if self.fail:
            raise TransportError("connection to the agent lost (test)")
        self.data += data

    async def close(self, meta: dict[str, Any] | None = None) -> None:
        self.closed = dict(meta or {})

    async def abort(self, reason: str) -> None:
        self.aborted = reason


class StubMigration:
    """The session and context a content tracker's final dump uses: streams are recorded."""

    def __init__(self, fail_stream: bool = False) -> None:
        self.streams: list[tuple[str, dict[str, Any], StubStream]] = []
        self.fail_stream = fail_stream
        self.progress: list[TransferProgress] = []
        self.ctx = SourceContext(
            name="c", session=cast(Any, self), agent=None, runc=cast(Any, None), work=Path("/nonexistent"),
            opts=MigrationOptions(), emit=self._emit,
        )
        self.timings = self.ctx.timings
        self.notes = self.ctx.notes

    def _emit(self, ev: Event) -> None:
        if isinstance(ev, TransferProgress):
            self.progress.append(ev)

    @property
    def metered(self) -> int:
        return self.progress[-1].bytes_done if self.progress else 0

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> StubStream:
        stream = StubStream(self.fail_stream)
        self.streams.append((kind, meta, stream))
        return stream


async def precopy(tmp_path: Path, fail_stream: bool = False) -> tuple[ContentRounds, StubMigration]:
    m = StubMigration(fail_stream)
    pc = ContentRounds(m.ctx, parse_policy("phaul"))
    pc.tracker.diff(1, BASE, page(1, 0) + page(1, 1))  # what the rounds sent
    pc.only_criu_peers = False  # fake_criu below is this test process
    await pc.prepare_final(tmp_path / "images")
    return pc, m


def criu_session() -> Session:
    return Session().open(P, 1).add(P, 1, BASE, page(1, 0) + page(9, 1) + page(1, 2)).open(P, 2).add(P, 2, BASE, page(2, 0)).close()


async def fake_criu(address: str, wire: bytes, replies: int) -> None:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(wire)
        await writer.drain()
        got = await reader.readexactly(replies)
        if wire.endswith(Session().close().wire) and got[-4:] != b"\0\0\0\0":
            raise CriuError("page server said no")
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise CriuError(f"criu dump failed: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_the_delta_streams_framed_and_the_pagemaps_are_left_for_the_images(tmp_path: Path) -> None:
    pc, m = await precopy(tmp_path)
    s = criu_session()
    await pc.final_dump(lambda addr: fake_criu(cast(str, addr), bytes(s.wire), replies=2 + 4), None)
    ((kind, meta, stream),) = m.streams
    assert (kind, meta) == ("pages", {"container": "c", "round": "final"})
    runs = [(pid, vaddr, bytes(piece)) for pid, vaddr, piece in RunDecoder().feed(bytes(stream.data))]
    assert runs == [(1, BASE + PAGE_SIZE, page(9, 1) + page(1, 2)), (2, BASE, page(2, 0))]
    assert stream.closed == {"round": "final", "runs": 2, "bytes": 3 * PAGE_SIZE} and m.metered == 3 * PAGE_SIZE
    assert pc.final_delta_bytes == 3 * PAGE_SIZE
    assert pc.rebuilt_pages() == {"pages-65537.img", "pages-65538.img"}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["pagemap-1.img", "pagemap-2.img"]
    assert "delta_ms" in m.timings and any("4 pages from CRIU, 3 changed" in n for n in m.notes)
    pc.close()


async def test_criu_failing_first_raises_crius_error(tmp_path: Path) -> None:
    pc, m = await precopy(tmp_path)
    s = Session().open(P, 1).add(P, 1, BASE, page(1, 0))

    async def dump(addr: str | None) -> None:
        await fake_criu(cast(str, addr), bytes(s.wire), replies=1)  # leaves without CLOSE
        raise CriuError("criu dump failed: Can't dump socket (test)")

    with pytest.raises(CriuError, match="Can't dump socket"):
        await pc.final_dump(dump, None)
    assert m.streams[0][2].closed is None and pc.rebuilt_pages() == set()


async def test_our_failure_first_is_raised_with_crius_as_a_note(tmp_path: Path) -> None:
    pc, _ = await precopy(tmp_path)
    with pytest.raises(PageServerProtocolError, match="unknown page-server command") as info:
        await pc.final_dump(lambda addr: fake_criu(cast(str, addr), b"\x77" * 32, replies=1), None)
    assert any("CRIU's dump failed as a consequence" in n for n in info.value.__notes__)


async def test_a_broken_link_is_raised_not_crius_broken_pipe(tmp_path: Path) -> None:
    pc, _ = await precopy(tmp_path, fail_stream=True)
    with pytest.raises(TransportError, match="agent lost"):
        await pc.final_dump(lambda addr: fake_criu(cast(str, addr), bytes(criu_session().wire), replies=2 + 4), None)


async def test_a_dump_that_fails_before_connecting(tmp_path: Path) -> None:
    pc, _ = await precopy(tmp_path)

    async def dump(addr: str | None) -> None:
        raise CriuError("criu dump failed: no such process (test)")

    with pytest.raises(CriuError, match="no such process"):
        await pc.final_dump(dump, None)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", int(cast(Any, pc)._filter.port))


async def test_a_dump_that_never_connects_but_succeeds(tmp_path: Path) -> None:
    pc, _ = await precopy(tmp_path)

    async def dump(addr: str | None) -> None:
        return None

    with pytest.raises(MigrationError, match="without sending its memory"):
        await pc.final_dump(dump, None)
