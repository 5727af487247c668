"""Post-copy: freeze, dump all but the memory, restore at once, memory follows.

The downtime no longer grows with memory: the frozen window holds CRIU's
dump of everything else (source/lazydump.py), the small images' trip, and a
lazy restore. The destination's ``criu lazy-pages`` daemon then fetches every
page from the frozen source through a reverse forward over tug's SSH link:
the pages its processes fault on first, the rest in the background.

The commit point is the destination's processes running: from then on they
may answer clients, so the source never resumes (the driver's one-copy rule).
It stays frozen, serving pages, until the destination holds them all, and is
then removed. What the fill cost (faults, their latency, bytes) is watched on
the relay (:mod:`tug.transports.criu_lazy`) and lands in the report.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

from tug.engine.criu.images import PE_LAZY, read_pagemap
from tug.engine.errors import PreconditionError, ProtocolError, TransportError
from tug.engine.progress import Meter
from tug.engine.source.context import DumpFn, SourceContext
from tug.engine.source.lazydump import LazyDump
from tug.engine.source.strategies.base import RestoreMode, Strategy
from tug.transports.criu_lazy import LazyProtocolError, LazyWatch
from tug.transports.criu_pageserver import PAGE_SIZE
from tug.transports.forward import PortForward

#: How long CRIU may take to end after the destination holds every page.
FINISH_TIMEOUT_S = 30.0


def lazy_bytes(images: Path) -> int:
    """Bytes of memory the dump left to be fetched lazily (its PE_LAZY pagemap entries)."""
    total = 0
    for img in images.glob("pagemap-*.img"):
        for e in read_pagemap(img.read_bytes()).entries:
            if e.flags & PE_LAZY:
                total += e.nr_pages * PAGE_SIZE
    return total


async def ask_admission(ctx: SourceContext, port: int, peer_port: int) -> str | None:
    """May the destination's process at ``peer_port`` use the forward on ``port``? Its agent decides."""
    res = await ctx.session.call("admit_lazy_peer", container=ctx.name, port=port, peer_port=peer_port)
    refused = res.get("refused")
    if refused is not None and not isinstance(refused, str):
        raise ProtocolError("admit_lazy_peer answered a non-string reason")
    if refused:
        ctx.note(f"the destination's connection to the frozen memory was refused: {refused}", "warning")
    return refused


class Postcopy(Strategy):
    name = "postcopy"
    dump_keeps_serving = True
    serves_fill = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.dump: LazyDump | None = None
        self.forward: PortForward | None = None
        self.watch = LazyWatch()
        self.requests = 0
        self.pages = 0
        self.watch_error: str | None = None
        self.meter: Meter | None = None
        self.relay_id = 0
        self.relay_port = 0

    @property
    def dump_to_destination(self) -> bool:
        return False

    def restore_mode(self, lazy_possible: bool) -> RestoreMode:
        if not lazy_possible:
            raise PreconditionError(
                "postcopy needs userfaultfd on the destination (see tug doctor there), and --lazy-restore"
            )
        return RestoreMode.LAZY_REMOTE

    async def prepare_final(self, images_dir: Path) -> None:
        # Before the freeze: the destination's listener exists, so the frozen
        # window pays no round trip for it.
        agent = self.ctx.agent
        if agent is None:
            raise TransportError("postcopy needs the SSH connection to the destination's agent")
        self.dump = LazyDump(self.ctx.runc, self.ctx.name, image_dir=images_dir, work_dir=self.ctx.work / "criu")
        # runc starts now, its CRIU held until the freeze (criu/gate.py).
        await self.dump.spawn()
        self.forward = await agent.reverse_forward(
            what="the source's lazy dump", admit_remote=self._admit, connect_local=self._connect, resumable=True
        )
        self.forward.tap = self._tap
        # The daemon reaches the forward through the agent's relay, which
        # outlives a lost link (engine/destination/relay.py).
        relay = await self.ctx.session.call("relay_open", container=self.ctx.name, port=self.forward.remote_port)
        self.relay_id, self.relay_port = int(relay["relay"]), int(relay["port"])
        await self.dump.at_gate(self.ctx.opts.timeout("checkpoint"))

    async def final_dump(self, dump: DumpFn, page_server: str | None) -> None:
        assert self.dump is not None
        await self.dump.start(timeout=self.ctx.opts.timeout("checkpoint"))
        lazy = await asyncio.to_thread(lazy_bytes, self.dump.image_dir)
        self.meter = Meter("fill", "memory", lazy, self.ctx.emit)

    async def restore_args(self) -> dict[str, Any]:
        assert self.forward is not None
        return {"lazy_source_port": self.relay_port}

    def relayed(self) -> list[tuple[PortForward, int]]:
        return [(self.forward, self.relay_id)] if self.forward is not None else []

    async def _admit(self, peer_port: int) -> str | None:
        """Only root's CRIU on the destination may fetch the frozen memory (its agent checks)."""
        assert self.forward is not None
        return await ask_admission(self.ctx, self.forward.remote_port, peer_port)

    async def _connect(self) -> socket.socket:
        if self.dump is None or not self.dump.running:
            raise TransportError("the lazy dump is not serving")
        return await self.dump.connect()

    def _tap(self, from_destination: bool, data: bytes) -> None:
        if self.watch_error is not None:
            return
        now = time.monotonic()
        try:
            if from_destination:
                self.watch.requests(data, now)
                return
            for served in self.watch.answers(data, now):
                self.requests += 1
                self.pages += served.pages
                if self.meter is not None:
                    self.meter.add(served.pages * PAGE_SIZE, final=self.watch.outstanding == 0)
        except LazyProtocolError as exc:
            self.watch_error = str(exc)

    async def after_fill(self) -> None:
        if self.dump is not None:
            await self.dump.finish(FINISH_TIMEOUT_S)
        if self.watch_error is not None:
            self.ctx.note(f"the lazy-pages traffic was not understood ({self.watch_error}): fault counts are partial",
                          "warning")

    async def release_source(self) -> None:
        if self.dump is not None:
            await self.dump.stop()
        if self.forward is not None:
            self.forward.close()

    def fill_stats(self) -> dict[str, Any]:
        return {"remote_requests": self.requests, "remote_pages": self.pages}

    def close(self) -> None:
        if self.dump is not None:
            self.dump.abandon()
        if self.forward is not None:
            self.forward.close()
