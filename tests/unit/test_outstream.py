"""The sender's side of a stream (:class:`tug.transports.session.OutStream`):
what leaves is exactly what was written, in order, in frames the transport
can take whole (never smaller than BATCH but for the last), whatever mix of
small headers and large runs the writer makes."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tug.transports import protocol as p
from tug.transports.session import BATCH, CHUNK, OutStream

from .test_protocol import pair


class FakeSession:
    """What OutStream uses of a Session: its protocol state and a writer that keeps each write."""

    def __init__(self) -> None:
        self.conn, self.peer = pair()
        self.writes: list[bytes] = []
        self._out: dict[int, Any] = {}

    async def _write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.writes.append(data)

    async def _send(self, event: p.Event) -> None:
        await self._write(self.conn.send(event))


def run(sizes: list[int]) -> tuple[bytes, FakeSession, list[p.Event]]:
    session = FakeSession()
    opened = session.conn.send(p.StreamOpen(stream_id=5, kind="pages", meta={}))
    out = OutStream(session, 5)  # type: ignore[arg-type]
    written = bytearray()

    async def go() -> None:
        for i, size in enumerate(sizes):
            data = bytes([i % 251]) * size
            written.extend(data)
            await out.write(data if i % 2 else memoryview(data))
        await out.close()

    asyncio.run(go())
    events = session.peer.feed(opened + b"".join(session.writes))
    return bytes(written), session, events


SIZES = st.lists(
    st.one_of(st.integers(0, 64), st.integers(BATCH - 2, BATCH + 2), st.integers(BATCH, 3 * CHUNK + 5)),
    max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=SIZES)
def test_what_leaves_is_what_was_written_in_frames_of_at_least_batch(sizes: list[int]) -> None:
    written, session, events = run(sizes)
    data = [e for e in events if isinstance(e, p.StreamData)]
    assert b"".join(e.data for e in data) == written
    assert isinstance(events[-1], p.StreamClose)
    assert all(len(e.data) >= BATCH for e in data[:-1]), [len(e.data) for e in data]
    assert all(len(e.data) <= CHUNK for e in data)


def test_a_run_after_its_header_shares_the_first_frame() -> None:
    """A 20-byte header then a 4 MiB run: four frames of CHUNK (the header
    rides in the first), the 20-byte tail batched until the close."""
    written, session, events = run([20, 4 * CHUNK])
    sizes = [len(e.data) for e in events if isinstance(e, p.StreamData)]
    assert sizes == [CHUNK, CHUNK, CHUNK, CHUNK, 20]
