"""Pre-copy: rounds while the container runs, then a short frozen delta.

The strategy owns the convergence policy and picks the tracker that finds
dirty pages (:mod:`tug.engine.source.trackers`): soft-dirty where the kernel
has it (CRIU's pre-dumps), else the content tracker; ``uffd`` (userfaultfd
write-protect and PAGEMAP_SCAN, no shadow copy) when asked for. Everything else it
delegates to the tracker's rounds, which also decide where the frozen dump's
memory goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tug.engine.criu import tool as criu
from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.source.context import DumpFn, SourceContext
from tug.engine.source.strategies.base import Strategy
from tug.engine.source.trackers.base import Rounds, run_together
from tug.engine.source.trackers.content import ContentRounds
from tug.engine.source.trackers.softdirty import PreDump
from tug.engine.source.trackers.uffd import probe as uffd_probe
from tug.engine.source.trackers.uffdrounds import UffdRounds
from tug.policies import ConvergencePolicy, PolicySpecError, parse_policy

if TYPE_CHECKING:
    from tug.engine.options import MigrationOptions

TRACKERS: dict[str, type[Rounds]] = {"content": ContentRounds, "soft-dirty": PreDump, "uffd": UffdRounds}
TRACKER_CHOICES = ("auto", *TRACKERS)


async def choose_tracker(requested: str, *, allow_soft_dirty: bool = True) -> str:
    """auto picks soft-dirty where the kernel has it (and ``allow_soft_dirty``:
    hybrid's page store never sees pre-dump images), then uffd where it works
    on a throwaway process (:func:`~tug.engine.source.trackers.uffd.probe`),
    else content.

    Runs before anything changes on either host, so refusing an explicit
    ``soft-dirty`` here leaves nothing to roll back.
    """
    if requested not in TRACKER_CHOICES:
        raise PreconditionError(f"unknown tracker {requested!r} (choose from {', '.join(TRACKER_CHOICES)})")
    if requested == "content":
        return "content"
    if requested == "uffd":
        # Refused here, before anything changes, if it cannot work at all; a
        # process it cannot attach later is compared by content (noted).
        if why := await uffd_probe():
            raise PreconditionError(f"the uffd tracker does not work here ({why}); see tug doctor, or use --tracker content")
        return "uffd"
    if allow_soft_dirty:
        soft_dirty = await criu.has_feature("mem_dirty_track")
        if requested == "soft-dirty" and not soft_dirty:
            raise PreconditionError("kernel lacks soft-dirty (see tug doctor); use --tracker content")
        if soft_dirty:
            return "soft-dirty"
    return "uffd" if not await uffd_probe() else "content"


class Precopy(Strategy):
    name = "precopy"
    has_rounds = True

    def __init__(self, opts: MigrationOptions) -> None:
        super().__init__(opts)
        try:
            self.policy: ConvergencePolicy = parse_policy(opts.policy) if isinstance(opts.policy, str) else opts.policy
        except PolicySpecError as exc:
            raise ConfigError(f"bad --policy: {exc}") from None
        self._tracker: str | None = None
        self._rounds: Rounds | None = None

    @property
    def tracker(self) -> str | None:
        return self._tracker

    @property
    def rounds(self) -> Rounds:
        assert self._rounds is not None, "bind() first"
        return self._rounds

    async def preflight(self) -> None:
        self._tracker = await choose_tracker(self.opts.tracker)

    def bind(self, ctx: SourceContext) -> None:
        super().bind(ctx)
        assert self._tracker is not None, "preflight() first"
        self._rounds = TRACKERS[self._tracker](ctx, self.policy)
        self.events = self._rounds.events

    @property
    def dump_to_destination(self) -> bool:
        return TRACKERS[self._tracker].final_to_destination if self._tracker else True

    @property
    def final_parent(self) -> str | None:
        return self.rounds.final_parent

    async def run_rounds(self) -> None:
        await self.rounds.run()

    @classmethod
    async def run_rounds_together(cls, group: Sequence[Strategy]) -> None:
        """One convergence policy over the group's sum (trackers/base.py)."""
        members = [s for s in group if isinstance(s, Precopy)]
        assert len(members) == len(group) and members, "one strategy class per group"
        await run_together([s.rounds for s in members], members[0].policy)

    async def prepare_final(self, images_dir: Path) -> None:
        await self.rounds.prepare_final(images_dir)

    async def final_dump(self, dump: DumpFn, page_server: str | None) -> None:
        await self.rounds.final_dump(dump, page_server)

    def final_dump_target(self, page_server: str | None) -> str | None:
        return self.rounds.final_dump_target(page_server)

    def rebuilt_pages(self) -> set[str]:
        return self.rounds.rebuilt_pages()

    def close(self) -> None:
        if self._rounds is not None:
            self._rounds.close()
