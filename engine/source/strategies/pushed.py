"""Pre-copy's eager final step without CRIU reading the memory: the changed pages are pushed.

The classic eager step (``--eager``, :class:`~.precopy.Precopy`) has CRIU
dump the whole frozen memory into tug's filtering page server, which sends
on only what changed since the rounds: on the source, CRIU reads every page
and splices it over loopback inside the downtime, for the few it keeps
(most of what eager cost beyond hybrid; the benchmark's "The third"). The
tracker knows those few at the freeze already. So, for a container whose
tracker feeds the destination's page store (content or uffd), and for each
member of a group on its own (its lazy dump, channel and push):

- the frozen dump is hybrid's lazy dump (:mod:`tug.engine.source.lazydump`):
  CRIU dumps everything but the memory and holds the stopped processes;
- while the images travel, tug pushes the verdict of every page that dump
  left lazy over one reverse forward (:meth:`FrozenServer.push`): the frozen
  bytes of the pages the tracker cannot vouch for, SAME for the rest; the
  destination applies them to its page store (``destination/verdicts.py``);
- once the destination acknowledged the last verdict, the lazy dump ends as
  CRIU supports, which puts the processes back under the freezer: the source
  is where a classic eager dump leaves it;
- the destination restores from its page store, and refuses to unless the
  source confirmed every lazy page held there: lazily where it has
  userfaultfd (the dump's pagemaps already say which pages are lazy; the
  agent's store server answers the lazy-pages daemon, nothing crosses the
  network any more), else eagerly through the store's chain.

The commit point is the classic one: every page is on the destination
before its processes run, so until then any failure resumes the source, and
once they run the source is no longer needed. A group's members are
restored held once all of them were pushed (restore runs after transfer),
so the commit point is the group's, as with the classic step.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tug.engine.criu import images
from tug.engine.errors import MigrationError
from tug.engine.source.strategies.base import RestoreMode
from tug.engine.source.strategies.hybrid import Hybrid
from tug.engine.source.strategies.postcopy import FINISH_TIMEOUT_S
from tug.transports.forward import PortForward

if TYPE_CHECKING:
    from tug.transports.ssh import AgentProcess

#: How long the destination's connection to the push channel may take to arrive (before the freeze).
CONNECT_TIMEOUT_S = 10.0


def lazy_runs(images_dir: Path) -> list[tuple[int, int, int]]:
    """``(pid, vaddr, pages)`` of every page a lazy dump left in the processes (its lazy-only entries)."""
    runs: list[tuple[int, int, int]] = []
    for path in sorted(images_dir.glob("pagemap-*.img")):
        pid = images.process_pagemap_pid(path.name)
        if pid is None:
            continue
        for e in images.read_pagemap(path.read_bytes()).entries:
            if e.flags & images.PE_LAZY and not e.present:
                runs.append((pid, e.vaddr, e.nr_pages))
    return runs


class PushedPrecopy(Hybrid):
    name = "precopy"
    memory_phase = "transfer"
    #: The frozen source is done once the push is: the fill (if any) is the destination's own.
    serves_fill = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        #: Every verdict was acknowledged by the destination.
        self.pushed = False

    def restore_mode(self, lazy_possible: bool) -> RestoreMode:
        # Every page is on the destination before its processes run; with
        # userfaultfd there they run before the pages are loaded, served from
        # the local page store (as the classic eager step's pages are).
        return RestoreMode.LAZY_LOCAL if lazy_possible else RestoreMode.EAGER

    async def _connect_channels(self, agent: AgentProcess) -> None:
        fwd = await agent.reverse_forward(
            what="the frozen source's push channel", admit_remote=self._admit, connect_local=self._connector(self._push),
        )
        self.forwards.append(fwd)
        await self.ctx.session.call("push_connect", container=self.ctx.name, port=fwd.remote_port)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._connected.wait()
        except TimeoutError:
            raise MigrationError(
                f"the destination's connection to the push channel did not arrive within {CONNECT_TIMEOUT_S:g} s"
            ) from None

    async def _push(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.server is not None and self.dump is not None
        runs = await asyncio.to_thread(lazy_runs, self.dump.image_dir)
        await self.server.push(reader, writer, runs)
        self.pushed = True

    async def finish_memory(self) -> None:
        """Every verdict acknowledged, then the lazy dump ends: the source is frozen as after a classic dump."""
        assert self.dump is not None
        if self._tasks:
            await asyncio.wait(self._tasks)  # each ends pushed, or failed (serve_error)
        if not self.pushed:
            raise MigrationError(
                f"pushing the frozen memory of {self.ctx.name} failed: {self.serve_error or 'the channel closed early'}"
            )
        if self.meter is not None:
            self.meter.add(0, final=True)
        t0 = time.monotonic()
        await self.dump.goodbye()
        await self.dump.finish(FINISH_TIMEOUT_S)
        self._dump_ended = True
        await self._stop_serving()
        await self._check_paused()
        self.ctx.timings["dump_end_ms"] = (time.monotonic() - t0) * 1000
        if self.server is not None:
            st = self.server.stats
            if st.sweep_done_s is not None:
                self.ctx.timings["push_ms"] = st.sweep_done_s * 1000
            self.ctx.note(
                f"memory of {self.ctx.name!r} pushed from its frozen processes: {st.pages_sent} pages sent "
                f"({st.bytes_sent / 2**20:.1f} MiB), {st.pages_same} confirmed unchanged in the page store"
            )

    async def _check_paused(self) -> None:
        """CRIU put the processes back under the freezer (its cgroup read; runc asked only without one)."""
        freezer = self.ctx.runc.freezer(self.ctx.name)
        if freezer is not None:
            if await asyncio.to_thread(freezer.frozen):
                return
            status = "not frozen"
        else:
            status = (await self.ctx.runc.require(self.ctx.name)).status
            if status == "paused":
                return
        raise MigrationError(f"container {self.ctx.name!r} is {status} after its lazy dump ended; expected paused")

    async def restore_args(self) -> dict[str, Any]:
        return {"pushed": True}

    def relayed(self) -> list[tuple[PortForward, int]]:
        return []  # nothing runs on the destination before the push is complete: a lost link rolls back

    def fill_stats(self) -> dict[str, Any]:
        return {}
