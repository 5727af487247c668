"""The driver's bookkeeping (events, notes, bytes, the report) and what it
does when a phase fails: the one-copy rule applied, then cleanup.

The base of :class:`tug.engine.source.migration.Migration`, kept apart so that
the failure paths can be read (and reviewed) on their own; the rule itself
and its helpers are in :mod:`.rollback`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tug.engine.errors import MigrationError
from tug.engine.events import Event, MigrationReport, Note, PhaseStarted
from tug.engine.fsutil import remove_tree
from tug.engine.phases import Phase, PhaseMachine
from tug.engine.source.rollback import (
    ABORT_TIMEOUT,
    Destination,
    abort_destination,
    frozen_message,
    may_resume_source,
    refreeze_source,
    resume_source,
    sweep_destination,
)

if TYPE_CHECKING:
    from tug.engine.criu.pageserver import RemotePageServer
    from tug.engine.hostcfg import HostConfig
    from tug.engine.options import MigrationOptions
    from tug.engine.runtime.endpoint import SourceEndpoint
    from tug.engine.runtime.runc import Runc
    from tug.engine.source.strategies import Strategy
    from tug.engine.source.tally import Tally
    from tug.transports.session import Session
    from tug.transports.ssh import AgentProcess, SshTarget


class FailureHandling:
    # Set by the driver (migration.py).
    name: str
    target: SshTarget
    opts: MigrationOptions
    host: HostConfig
    runc: Runc
    machine: PhaseMachine
    tally: Tally
    strategy: Strategy
    session: Session | None
    agent: AgentProcess | None
    net: SourceEndpoint | None
    final_ps: RemotePageServer | None
    work: Path
    dest: Destination
    paused: bool
    lazy: bool
    changed: bool
    left_frozen: bool
    stream_dump: bool
    on_event: Callable[[Event], None] | None

    def emit(self, ev: Event) -> None:
        if self.on_event is not None:
            self.on_event(ev)

    def note(self, message: str, level: str = "info") -> None:
        self.tally.notes.append(message)
        self.emit(Note(level=level, message=message))

    def wire_bytes(self) -> int:
        """Payload bytes on the wire so far: the session and every forward."""
        s = self.session
        forwarded = self.agent.forwarded_bytes if self.agent is not None else 0
        return forwarded + (0 if s is None else s.bytes_sent + s.bytes_received)

    def _report(self, outcome: str, exc: BaseException | None = None, phase: str = "") -> MigrationReport:
        return self.tally.report(
            container=self.name, source=self.host.name, destination=str(self.target), strategy=self.strategy.name,
            outcome=outcome, phases=self.machine.durations(), bytes_total=self.wire_bytes(),
            rounds=self.strategy.events, tracker=self.strategy.tracker, dump_streamed=self.stream_dump,
            page_server_bytes=self.final_ps.wire_bytes if self.final_ps is not None else 0, exc=exc, phase=phase,
            commit_point=None if self.tally.running_at is None else ("running" if self.lazy else "confirmed"),
        )

    async def _fail(self, exc: BaseException) -> MigrationReport:
        failed_in = self.machine.phase.value
        if self.machine.phase is Phase.INIT:
            self.machine.advance(Phase.FAILED)
            return self._report("aborted", exc, failed_in)
        if self.machine.can_roll_back:
            self.machine.advance(Phase.ROLLBACK)
            if self.changed:
                self.emit(PhaseStarted(phase=Phase.ROLLBACK.value, at_s=time.monotonic() - self.tally.t0))
        try:
            outcome = await self._undo()
        except (MigrationError, TimeoutError) as rb:
            outcome = "failed"
            self.note(f"rollback incomplete: {rb or type(rb).__name__}", "warning")
        if self.machine.phase is not Phase.FAILED:
            self.machine.advance(Phase.FAILED)
        return self._report(outcome, exc, failed_in)

    async def _undo(self) -> str:
        """Apply the one-copy rule (source/rollback.py); returns the outcome."""
        returned: list[bytes] | None = None
        if self.paused and self.strategy.dump_keeps_serving:
            # First: a dump still serving memory holds the processes itself,
            # with the freezer thawed. Ended, CRIU re-freezes them; if it died
            # instead, they would run: freeze them again.
            await self.strategy.release_source()
            await refreeze_source(self.runc, self.name, self.note)
        if self.dest is Destination.UNKNOWN:
            # The agent cancels a restore still running and says whether the copy ran.
            said, returned = await self._abort()
            self.dest = said or Destination.UNKNOWN
        if not may_resume_source(self.dest):
            self.left_frozen = self.paused
            self.note(frozen_message(self.dest, self.name, self.target.host, str(self.target)), "warning")
            return "failed"
        if self.paused:
            # First, and bounded on its own: it depends on nothing the peer does.
            async with asyncio.timeout(self.opts.timeout(Phase.ROLLBACK.value)):
                await resume_source(self.runc, self.name)
            self.paused = False
            self.note(f"source container {self.name!r} resumed")
        if returned is None:
            said, returned = await self._abort()
            if said is None and self.session is not None:
                await sweep_destination(self.target, self.opts, self.host, self.name, self.note)
        if self.net is not None and self.net.locked:
            self.tally.held_frames = await self.net.unlock(returned)
        return "rolled-back" if self.changed else "aborted"

    async def _abort(self) -> tuple[Destination | None, list[bytes]]:
        timeout = min(ABORT_TIMEOUT, self.opts.timeout(Phase.ROLLBACK.value))
        return await abort_destination(self.session, self.name, self.target.host, self.note, timeout=timeout)

    async def _close(self) -> None:
        if self.final_ps is not None:
            self.final_ps.close()
        self.strategy.close()
        if self.session is not None:
            with contextlib.suppress(MigrationError):
                await self.session.close()
        if self.agent is not None:
            await self.agent.close()
        if self.net is not None:
            if self.left_frozen:
                await self.net.abandon()  # the lock stays engaged: tug recover lifts it
            else:
                await self.net.close()
        remove_tree(self.work)
