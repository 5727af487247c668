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
from typing import TYPE_CHECKING

from tug.engine.errors import MigrationError
from tug.engine.events import Event, MigrationReport, Note, PhaseStarted
from tug.engine.fsutil import remove_tree
from tug.engine.phases import Phase, PhaseMachine
from tug.engine.source.member import Member, group_destination
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
    from tug.engine.hostcfg import HostConfig
    from tug.engine.options import MigrationOptions
    from tug.engine.runtime.runc import Runc
    from tug.engine.source.strategies import Strategy
    from tug.engine.source.tally import Tally
    from tug.transports.session import Session
    from tug.transports.ssh import AgentProcess, SshTarget


class FailureHandling:
    # Set by the driver (migration.py).
    members: list[Member]
    target: SshTarget
    opts: MigrationOptions
    host: HostConfig
    runc: Runc
    machine: PhaseMachine
    tally: Tally
    session: Session | None
    agent: AgentProcess | None
    changed: bool
    left_frozen: bool
    on_event: Callable[[Event], None] | None

    @property
    def name(self) -> str:
        """The group as the user named it (its first member, with the count)."""
        first = self.members[0].name
        return first if len(self.members) == 1 else f"{first} (+{len(self.members) - 1})"

    @property
    def strategy(self) -> Strategy:
        """The first member's strategy: every member has the same kind."""
        return self.members[0].strategy

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
        lazy = any(m.lazy for m in self.members)
        return self.tally.report(
            container=self.members[0].name, containers=[m.name for m in self.members],
            volumes=[
                {"container": m.name, "destination": v.destination, "mode": v.mode, "source": str(v.source),
                 "bytes": m.volume_bytes.get(v.destination, 0)}
                for m in self.members for v in m.volumes
            ], source=self.host.name, destination=str(self.target), strategy=self.strategy.name,
            outcome=outcome, phases=self.machine.durations(), bytes_total=self.wire_bytes(),
            rounds=[ev for m in self.members for ev in m.strategy.events], tracker=self.strategy.tracker,
            dump_streamed=self.strategy.dump_to_destination,
            page_server_bytes=sum(m.final_ps.wire_bytes for m in self.members if m.final_ps is not None), exc=exc,
            phase=phase, commit_point=None if self.tally.running_at is None else ("running" if lazy else "confirmed"),
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
        """Apply the one-copy rule (source/rollback.py) to the whole group;
        returns the outcome."""
        returned: dict[str, list[bytes]] = {}
        # A dump waiting at its gate never runs: runc fails without CRIU (criu/gate.py).
        await self.runc.gated.abandon()
        for m in self.members:
            if m.paused and m.strategy.dump_keeps_serving:
                # First: a dump still serving memory holds the processes itself,
                # with the freezer thawed. Ended, CRIU re-freezes them; if it
                # died instead, they would run: freeze them again.
                await m.strategy.release_source()
                await refreeze_source(self.runc, m.name, self.note)
        for m in self.members:
            if m.dest is Destination.UNKNOWN:
                # The agent cancels a restore still running and says whether the copy ran.
                said, returned[m.name] = await self._abort(m.name)
                m.dest = said or Destination.UNKNOWN
        dest = group_destination(self.members)
        if not may_resume_source(dest):
            self.left_frozen = any(m.paused for m in self.members)
            for m in self.members:
                held = m.dest is Destination.UNTOUCHED
                self.note(frozen_message(dest if held else m.dest, m.name, self.target.host, str(self.target),
                                         held_by_group=held), "warning")
            return "failed"
        for m in self.members:
            if m.paused:
                # First, and bounded on its own: it depends on nothing the peer does.
                async with asyncio.timeout(self.opts.timeout(Phase.ROLLBACK.value)):
                    await resume_source(self.runc, m.name)
                m.paused = False
                self.note(f"source container {m.name!r} resumed")
        for m in self.members:
            if m.name not in returned:
                said, returned[m.name] = await self._abort(m.name)
                if said is None and self.session is not None:
                    await sweep_destination(self.target, self.opts, self.host, m.name, self.note)
            if m.net is not None and m.net.locked:
                for k, v in (await m.net.unlock(returned[m.name])).items():
                    self.tally.held_frames[k] = self.tally.held_frames.get(k, 0) + v
        return "rolled-back" if self.changed else "aborted"

    async def _abort(self, name: str) -> tuple[Destination | None, list[bytes]]:
        timeout = min(ABORT_TIMEOUT, self.opts.timeout(Phase.ROLLBACK.value))
        return await abort_destination(self.session, name, self.target.host, self.note, timeout=timeout)

    async def _close(self) -> None:
        await self.runc.gated.abandon()
        for m in self.members:
            if m.final_ps is not None:
                m.final_ps.close()
            m.strategy.close()
        if self.session is not None:
            with contextlib.suppress(MigrationError):
                await self.session.close()
        if self.agent is not None:
            await self.agent.close()
        for m in self.members:
            if m.net is not None:
                if self.left_frozen and m.paused:
                    await m.net.abandon()  # the lock stays engaged: tug recover lifts it
                else:
                    await m.net.close()
            remove_tree(m.work)
