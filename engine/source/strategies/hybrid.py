"""Hybrid: pre-copy rounds, then the final step as post-copy, never sending a page twice.

The rounds are pre-copy's, with the content tracker or the uffd tracker: the
destination's page store ends up holding exactly what the tracker recorded
as sent (the shadow; the held pages, made exact by the uffd tracker's final
scan at the freeze, which needs no shadow at all). The frozen dump is then
CRIU's ``--lazy-pages`` dump (source/lazydump.py): the memory stays in the
stopped processes, so neither the dump nor the restore moves it inside the
downtime. The destination restores lazily; its ``criu lazy-pages`` daemon
asks the agent's hybrid page server (destination/hybridserver.py), which
answers from the store every page the source confirmed unchanged and gets
the rest from the source's frozen-memory service (source/frozenserver.py):
its fault channel for what the daemon asks first, its sweep for everything
else. Both channels are reverse forwards over tug's SSH link, admitted only
for the agent's own connections.

CRIU's lazy server is asked for nothing: it just holds the processes stopped.
Once the destination holds every page, tug says goodbye to it the way the
daemon would (``PS_IOV_CLOSE``) and CRIU ends the dump. The commit point is
post-copy's: the destination's processes running.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tug.engine.errors import MigrationError, PreconditionError, ProtocolError, TransportError
from tug.engine.progress import Meter
from tug.engine.source.context import DumpFn
from tug.engine.source.frozenmemory import FrozenMemory, NotFrozen
from tug.engine.source.frozenserver import FrozenServer
from tug.engine.source.lazydump import LazyDump, tracer_of
from tug.engine.source.strategies.base import RestoreMode
from tug.engine.source.strategies.postcopy import FINISH_TIMEOUT_S, ask_admission, lazy_bytes
from tug.engine.source.strategies.precopy import Precopy, choose_tracker
from tug.engine.source.trackers.content import ContentRounds
from tug.engine.source.trackers.uffdrounds import UffdRounds
from tug.transports.criu_pageserver import PAGE_SIZE
from tug.transports.forward import PortForward

if TYPE_CHECKING:
    from tug.transports.ssh import AgentProcess

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Hybrid(Precopy):
    name = "hybrid"
    dump_keeps_serving = True
    serves_fill = True
    #: The phase whose progress shows the memory moving from the frozen processes.
    memory_phase = "fill"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.dump: LazyDump | None = None
        self.forwards: list[PortForward] = []
        self.relay_ids: list[int] = []
        self.server: FrozenServer | None = None
        self._memory: asyncio.Task[FrozenMemory] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep_task: asyncio.Task[None] | None = None
        self.serve_error: str | None = None
        self._dump_ended = False
        self._dumped = asyncio.Event()
        #: A channel's connection from the destination arrived (its serving task exists).
        self._connected = asyncio.Event()
        self.meter: Meter | None = None
        self._lazy_bytes = 0

    async def preflight(self) -> None:
        if self.opts.tracker not in ("auto", "content", "uffd"):
            raise PreconditionError("hybrid needs to know what the destination holds: use --tracker content or uffd")
        # auto: uffd where it works (no shadow: the source needs no second copy
        # of the memory), else content; never soft-dirty, whose pre-dump
        # images never reach the page store.
        self._tracker = await choose_tracker(self.opts.tracker, allow_soft_dirty=False)

    @property
    def dump_to_destination(self) -> bool:
        return False

    def restore_mode(self, lazy_possible: bool) -> RestoreMode:
        if not lazy_possible:
            raise PreconditionError("hybrid needs userfaultfd on the destination (see tug doctor there), and --lazy-restore")
        return RestoreMode.LAZY_REMOTE

    async def prepare_final(self, images_dir: Path) -> None:
        """Before the freeze: the lazy dump's settings and both forwards (their listeners on the destination)."""
        agent = self.ctx.agent
        if agent is None:
            raise TransportError("hybrid needs the SSH connection to the destination's agent")
        self.dump = LazyDump(self.ctx.runc, self.ctx.name, image_dir=images_dir, work_dir=self.ctx.work / "criu")
        # runc starts now, its CRIU held until the freeze (criu/gate.py).
        await self.dump.spawn()
        # The agent connects the channels now: their set-up (SSH channels,
        # admissions) stays out of the frozen window.
        await self._connect_channels(agent)
        await self.dump.at_gate(self.ctx.opts.timeout("checkpoint"))

    async def _connect_channels(self, agent: AgentProcess) -> None:
        for what, serve in (("fault", self._serve_faults), ("sweep", self._sweep)):
            fwd = await agent.reverse_forward(
                what=f"the frozen source's {what} channel", admit_remote=self._admit, connect_local=self._connector(serve),
                resumable=True,
            )
            self.forwards.append(fwd)
        res = await self.ctx.session.call("hybrid_connect", container=self.ctx.name, ports=[f.remote_port for f in self.forwards])
        relays = res.get("relays")
        if not (isinstance(relays, list) and len(relays) == 2 and all(type(r) is int for r in relays)):
            raise ProtocolError("hybrid_connect answered no relay ids")
        self.relay_ids = [int(r) for r in relays]

    async def final_dump(self, dump: DumpFn, page_server: str | None) -> None:
        assert self.dump is not None
        await self.dump.start(timeout=self.ctx.opts.timeout("checkpoint"))
        self._lazy_bytes = await asyncio.to_thread(lazy_bytes, self.dump.image_dir)
        self.meter = Meter(self.memory_phase, "memory", self._lazy_bytes, self.ctx.emit)
        # The processes are stopped for good: open their memory while the images travel.
        self._memory = asyncio.create_task(self._open_memory(), name="tug-hybrid-memory")
        self._dumped.set()

    async def _open_memory(self) -> FrozenMemory:
        assert self.dump is not None
        await self.dump.hold()
        pids = await self.ctx.runc.pids(self.ctx.name)
        if not pids:
            raise MigrationError(f"no process of {self.ctx.name} found after its lazy dump")
        tracer = tracer_of(pids[0])
        if tracer is None:
            raise NotFrozen(f"{self.ctx.name}'s processes are not held by CRIU after its lazy dump")
        memory = await asyncio.to_thread(FrozenMemory.open, pids, lambda: tracer_of(pids[0]) == tracer)
        assert isinstance(self._rounds, ContentRounds)
        if isinstance(self._rounds, UffdRounds):
            # The uffd tracker's final scan, out of the frozen window: the
            # processes stay stopped (CRIU holds them) and nothing is served
            # before it. A write CRIU itself makes only adds a page to what
            # is sent from the frozen memory. Registered they stay: the
            # unregister (25 ms per GiB) waits for the tracker's close.
            await self._rounds.freeze_scan(in_window=False)
        self.server = FrozenServer(memory, self._rounds.page_filter(), on_end=self._end_dump)
        self.server.hot = self._rounds.rewritten
        self.server.on_progress = self._progress
        return memory

    def _progress(self, pages: int) -> None:
        """Pages whose frozen content the destination now has (confirmed or sent)."""
        if self.meter is not None:
            left = self._lazy_bytes - self.meter.done
            self.meter.add(max(0, min(pages * PAGE_SIZE, left)))

    def rebuilt_pages(self) -> set[str]:
        return set()  # the lazy dump's images are small: they go whole

    async def restore_args(self) -> dict[str, Any]:
        return {"hybrid_ports": [f.remote_port for f in self.forwards]}

    def relayed(self) -> list[tuple[PortForward, int]]:
        return list(zip(self.forwards, self.relay_ids, strict=True))

    async def _admit(self, peer_port: int) -> str | None:
        return await ask_admission(self.ctx, self.forwards[0].remote_port if self.forwards else 0, peer_port)

    def _connector(self, serve: Serve) -> Callable[[], Awaitable[socket.socket]]:
        """A forward's local end: one end of a socket pair whose other end ``serve`` answers."""

        async def connect() -> socket.socket:
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=ours)
            task = asyncio.create_task(self._run(serve, reader, writer), name="tug-hybrid-serve")
            self._tasks.append(task)
            if serve == self._sweep:
                self._sweep_task = task
            self._connected.set()
            return theirs

        return connect

    async def _run(self, serve: Serve, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._dumped.wait()  # the channels connect before the freeze
            assert self._memory is not None
            await self._memory
            await serve(reader, writer)
        except (MigrationError, OSError) as exc:
            self.serve_error = self.serve_error or str(exc)
            self.ctx.note(f"serving the frozen memory failed: {exc}", "warning")
        finally:
            writer.close()

    async def _serve_faults(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.server is not None
        await self.server.serve_faults(reader, writer)

    async def _sweep(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.server is not None
        await self.server.sweep(reader, writer)

    async def _stop_serving(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for fwd in self.forwards:
            fwd.close()
        if self._memory is not None:
            self._memory.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                (await self._memory).close()

    async def _end_dump(self) -> bool:
        """The destination's daemon has every page: end the lazy dump before it hears so.

        Its goodbye waits for this (hybrid_wire's END): if tug died before,
        the destination's fill fails and its copy is frozen, as post-copy's
        does when the daemon's goodbye cannot reach CRIU.
        """
        if self.dump is None:
            return False
        if self._sweep_task is not None:
            # Every page is there: the sweep (if still going) must not read
            # the memory once CRIU has let go of the processes.
            self._sweep_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweep_task
        try:
            await self.dump.goodbye()
            await self.dump.finish(FINISH_TIMEOUT_S)
        except MigrationError as exc:
            self.ctx.note(f"the lazy dump did not end cleanly after the fill: {exc}", "warning")
            return False
        self._dump_ended = True
        return True

    async def after_fill(self) -> None:
        if self.meter is not None:
            self.meter.add(0, final=True)
        await self._stop_serving()
        if self.dump is not None and not self._dump_ended:
            await self.dump.goodbye()
            await self.dump.finish(FINISH_TIMEOUT_S)

    async def release_source(self) -> None:
        await self._stop_serving()
        if self.dump is not None:
            await self.dump.stop()

    def fill_stats(self) -> dict[str, Any]:
        if self.server is None:
            return {}
        st = self.server.stats
        out: dict[str, Any] = {
            "source_gets": st.gets, "source_fault_gets": st.fault_gets, "source_pages_sent": st.pages_sent,
            "source_pages_same": st.pages_same, "sweep_pages_sent": st.sweep_pages_sent,
            "sweep_pages_same": st.sweep_pages_same,
        }  # fmt: skip
        if st.sweep_done_s is not None:
            out["sweep_ms"] = st.sweep_done_s * 1000
        return out

    def close(self) -> None:
        super().close()
        if self.dump is not None:
            self.dump.abandon()
        for fwd in self.forwards:
            fwd.close()
