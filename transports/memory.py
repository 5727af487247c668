"""An in-memory, flow-controlled byte pipe pair for tests of the session layer."""

from __future__ import annotations

import asyncio


class MemoryStream:
    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes]) -> None:
        self._in = inbox
        self._out = outbox
        self._eof = False

    async def read(self) -> bytes:
        if self._eof:
            return b""
        data = await self._in.get()
        if not data:
            self._eof = True
        return data

    async def write(self, data: bytes) -> None:
        if data:
            await self._out.put(data)

    async def close(self) -> None:
        await self._out.put(b"")


def memory_pair(maxsize: int = 16) -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends; the bounded queues give real backpressure."""
    a_to_b: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
    b_to_a: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
    return MemoryStream(b_to_a, a_to_b), MemoryStream(a_to_b, b_to_a)
