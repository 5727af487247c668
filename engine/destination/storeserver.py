"""The agent's own lazy page server: CRIU's lazy-pages daemon fed from the page store.

After pre-copy the destination already holds the container's memory, in the
page store's segments (pagestore.py). CRIU's lazy-pages daemon can only read
flat local images or ask a page server, so the agent is that page server: the
daemon runs with ``--page-server`` pointed at this one, on loopback, and each
``PS_IOV_GET`` is answered with the longest run the store holds contiguously
(CRIU accepts fewer pages than it asked for and asks again for the rest).
Nothing crosses the network: the source's frozen dump has already delivered
every changed page into the store.

Only root's CRIU may connect (the page store is the container's memory):
anything else is refused and the server waits on. It serves one daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from tug.engine.criu.uncork import peer_is_criu
from tug.engine.destination.pagestore import PAGE, PageStore
from tug.engine.errors import MigrationError
from tug.transports.criu_lazy import Get, Goodbye, LazyProtocolError, LazyRequests, goodbye_answer, pages_answer
from tug.transports.forward import LOOPBACK

log = logging.getLogger("tug.agent")


class StorePageServer:
    def __init__(
        self,
        store: PageStore,
        container: str,
        admit: Callable[[tuple[str, int], tuple[str, int]], str | None] = peer_is_criu,
    ) -> None:
        self.store = store
        self.container = container
        #: Vets a connection (our end, the peer's end): None admits it.
        self.admit = admit
        self.port = 0
        self.refused: list[str] = []
        self.requests = 0
        self.faults = 0
        self.pages = 0
        #: Why serving stopped early (a protocol error, a page the store lacks).
        self.error: str | None = None
        self._server: asyncio.Server | None = None
        self._session: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ours, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
        why = "a second connection" if self._session is not None else None
        if why is None:
            why = await asyncio.to_thread(self.admit, (ours[0], ours[1]), (peer[0], peer[1]))
        if why is not None:
            self.refused.append(why)
            log.warning("page store server for %s refused a connection: %s", self.container, why)
            writer.close()
            return
        if self._server is not None:  # one daemon: nobody else may connect from now on
            self._server.close()
        self._session = asyncio.current_task()
        try:
            await self._serve(reader, writer)
        except (LazyProtocolError, MigrationError, OSError) as exc:
            self.error = str(exc)
            log.error("page store server for %s: %s", self.container, exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = LazyRequests()
        while data := await reader.read(1 << 16):
            for ev in parser.feed(data):
                if isinstance(ev, Goodbye):
                    await writer.drain()
                    await self._before_goodbye()
                    writer.write(goodbye_answer())
                    await writer.drain()
                    return
                writer.write(await self._reply(ev))
            await writer.drain()

    async def _before_goodbye(self) -> None:
        """The daemon has every page; its goodbye is answered once this returns."""

    async def _reply(self, get: Get) -> bytes:
        """The answer to one request (the hybrid server may first ask the source)."""
        return self._answer(get)

    def _answer(self, get: Get) -> bytes:
        run = self.store.run_at(get.pid, get.vaddr // PAGE, get.nr_pages)
        if run is None:
            raise MigrationError(f"the lazy-pages daemon asked for page {get.vaddr:#x} of pid {get.pid}, which the store lacks")
        fd, offset, count = run
        data = os.pread(fd, count * PAGE, offset)
        if len(data) != count * PAGE:
            raise MigrationError(f"page store file of pid {get.pid} is short at {offset}")
        self.requests += 1
        self.faults += get.nr_pages == 1
        self.pages += count
        return pages_answer(get, count) + data

    def stats(self) -> dict[str, Any]:
        return {"store_requests": self.requests, "store_faults": self.faults, "store_pages": self.pages}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._session is not None and not self._session.done():
            self._session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._session
