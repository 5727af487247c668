"""The pre-copy round loop every tracker shares.

A tracker finds the pages a running container wrote since the previous round
and sends them (:meth:`Rounds.round`); after each round the convergence
policy, a pure function of the round history, decides: another round, the
final dump, or abort. A tracker also says where the frozen dump's memory goes
(:attr:`Rounds.final_to_destination`, :meth:`Rounds.final_dump`) and which
pages images the destination rebuilds from what the rounds sent.

Trackers: :mod:`.content` (a shadow copy compared page by page, for kernels
without soft-dirty) and :mod:`.softdirty` (CRIU's own pre-dumps). The
``precopy`` strategy (:mod:`tug.engine.source.strategies.precopy`) picks one.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from pathlib import Path

from tug.engine.errors import AbortedByPolicy
from tug.engine.events import RoundCompleted
from tug.engine.source.context import DumpFn, SourceContext
from tug.policies import Action, ConvergencePolicy, Decision, RoundStats

#: Whatever the policy says, stop iterating after this many rounds: a policy
#: (possibly the user's own) that never says final must not pin the source.
SAFETY_MAX_ROUNDS = 30


class Rounds(abc.ABC):
    """The pre-copy loop shared by every tracker: round, ask the policy, repeat.

    Subclasses implement :meth:`round`; they say where the final dump goes
    (``final_to_destination``, ``final_parent``, :meth:`prepare_final`,
    :meth:`final_dump`) and which pages images the destination rebuilds
    (:meth:`rebuilt_pages`).
    """

    #: The tracker's name in reports.
    name = ""
    #: True when the frozen dump streams to a CRIU page server on the
    #: destination (migration.py starts it); False when the tracker serves
    #: the dump itself (the content tracker filters it on the source).
    final_to_destination = True

    def __init__(self, ctx: SourceContext, policy: ConvergencePolicy) -> None:
        self.ctx = ctx
        self.policy = policy
        self.history: list[RoundStats] = []
        self.events: list[RoundCompleted] = []
        self._last_round_start: float | None = None
        #: Best link-rate estimate so far (bytes/s). A round that is bound by
        #: the scan, not the link, says nothing about the link; round 0 (the
        #: full copy) saturates it, so keep the best rate any round showed.
        self.bandwidth_bps = 0.0

    @property
    def final_parent(self) -> str | None:
        """``--parent-path`` of the final dump, relative to its image dir."""
        return None

    @abc.abstractmethod
    async def round(self, index: int) -> RoundStats:
        """One round: find what changed since the last, send it, say what it cost."""

    async def prepare_final(self, images_dir: Path) -> None:
        """Before the freeze: whatever the final dump needs ready (nothing here)."""

    async def final_dump(self, dump: DumpFn, page_server: str | None) -> None:
        """Run the frozen dump; by default to the destination's page server."""
        await dump(page_server)

    def final_dump_target(self, page_server: str | None) -> str | None:
        """Where :meth:`final_dump` sends the memory (strategies/base.py)."""
        return page_server

    def rebuilt_pages(self) -> set[str]:
        """Pages images the agent rebuilds from its store: the transfer phase
        sends every other file of the images dir."""
        return set()

    def close(self) -> None:
        """Release what prepare_final() took (idempotent)."""

    def _since_last_round(self, t0: float) -> float:
        """Seconds since the previous round started (0 for the first)."""
        since = t0 - self._last_round_start if self._last_round_start is not None else 0.0
        self._last_round_start = t0
        return since

    async def run(self) -> None:
        """Rounds until the policy says final (or abort)."""
        await run_together([self], self.policy)


def combine(index: int, parts: Sequence[RoundStats]) -> RoundStats:
    """One round of a group, its members' rounds run side by side: counts add
    up, the round lasts as long as its slowest member, and the link and the
    workload's dirtying are shared, so their rates add up too."""
    if len(parts) == 1:
        return parts[0]
    return RoundStats(
        index=index,
        duration_s=max(p.duration_s for p in parts),
        pages_scanned=sum(p.pages_scanned for p in parts),
        dirty_pages=sum(p.dirty_pages for p in parts),
        pages_sent=sum(p.pages_sent for p in parts),
        pages_skipped=sum(p.pages_skipped for p in parts),
        bytes_sent=sum(p.bytes_sent for p in parts),
        bandwidth_bps=sum(p.bandwidth_bps for p in parts),
        dirty_rate_pps=sum(p.dirty_rate_pps for p in parts),
    )


async def run_together(members: Sequence[Rounds], policy: ConvergencePolicy) -> None:
    """The pre-copy loop over a group: every member's round runs side by side,
    and one convergence policy decides on their sum (a group is frozen as one,
    so it converges as one). Each member keeps its own history; the group's
    rounds are reported once, through the first member."""
    lead = members[0]
    history: list[RoundStats] = []
    index = 0
    while True:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(m.round(index)) for m in members]
        parts = [t.result() for t in tasks]
        for m, part in zip(members, parts, strict=True):
            m.history.append(part)
        stats = combine(index, parts)
        history.append(stats)
        decision = policy.decide(history)
        if decision.action is Action.CONTINUE and index + 1 >= SAFETY_MAX_ROUNDS:
            lead.ctx.note(f"policy still says continue after {index + 1} rounds; going final (safety cap)", "warning")
            decision = Decision(action=Action.FINAL, reason=f"safety cap of {SAFETY_MAX_ROUNDS} rounds")
        ev = RoundCompleted(
            index=stats.index,
            duration_ms=stats.duration_s * 1000,
            pages_scanned=stats.pages_scanned,
            dirty_pages=stats.dirty_pages,
            pages_sent=stats.pages_sent,
            bytes=stats.bytes_sent,
            bandwidth_bps=stats.bandwidth_bps,
            dirty_rate_pps=stats.dirty_rate_pps,
            decision=f"{decision.action.name.lower()}: {decision.reason}",
        )
        lead.events.append(ev)
        lead.ctx.emit(ev)
        if decision.action is Action.FINAL:
            return
        if decision.action is Action.ABORT:
            raise AbortedByPolicy(f"pre-copy will not converge: {decision.reason}")
        index += 1
