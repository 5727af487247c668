"""The one interface every migration strategy implements.

The driver (:mod:`tug.engine.source.migration`) runs the phases and owns the
commit point; it asks the strategy only these questions, and knows no
strategy by name:

- before the freeze: are there rounds to run while the container runs
  (:attr:`Strategy.has_rounds`, :meth:`Strategy.run_rounds`)?
- the frozen dump: does its memory stream to a CRIU page server on the
  destination (:attr:`Strategy.dump_to_destination`), against which parent
  images (:attr:`Strategy.final_parent`), and how is it run
  (:meth:`Strategy.prepare_final`, :meth:`Strategy.final_dump`)?
- after it: what must still cross before the restore
  (:meth:`Strategy.finish_memory`), which pages images does the destination
  rebuild itself (:meth:`Strategy.rebuilt_pages`), and how does it restore
  (:meth:`Strategy.restore_mode`, :meth:`Strategy.restore_args`)?
- does something on the source still hold the frozen memory after the dump
  (:attr:`Strategy.dump_keeps_serving`)? Then :meth:`Strategy.release_source`
  ends it on any failure, before the driver decides whether the source
  resumes; and if it serves a lazy restore's fill
  (:attr:`Strategy.serves_fill`), :meth:`Strategy.after_fill` ends it once
  the destination holds every page.

A strategy lives in three steps: constructed from the options (bad input is a
:class:`ConfigError` before anything happens), :meth:`Strategy.preflight`
before anything changes on either host (a missing kernel feature refuses the
migration cleanly), then :meth:`Strategy.bind` once the session exists.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tug.engine.events import RoundCompleted
from tug.engine.source.context import DumpFn, SourceContext
from tug.transports.forward import PortForward

if TYPE_CHECKING:
    from tug.engine.options import MigrationOptions


class RestoreMode(enum.Enum):
    #: CRIU loads every page before the processes run.
    EAGER = "eager"
    #: The processes run first; a local lazy-pages daemon fills their memory
    #: from the images already on the destination.
    LAZY_LOCAL = "lazy-local"
    #: The processes run first; the destination's lazy-pages daemon fetches
    #: their memory from the frozen source (post-copy).
    LAZY_REMOTE = "lazy-remote"


class Strategy(abc.ABC):
    #: The name users pass as ``--strategy``.
    name: ClassVar[str]
    #: Whether the PRECOPY phase runs (rounds while the container runs).
    has_rounds: ClassVar[bool] = False
    #: Whether the frozen dump goes on serving the container's memory after it
    #: returns (CRIU then holds the processes stopped, not the freezer).
    dump_keeps_serving: ClassVar[bool] = False
    #: Whether the frozen source serves a lazy restore's fill (its after_fill ends that).
    serves_fill: ClassVar[bool] = False

    def __init__(self, opts: MigrationOptions) -> None:
        self.opts = opts
        self._ctx: SourceContext | None = None
        #: One event per round, for the report.
        self.events: list[RoundCompleted] = []

    @property
    def ctx(self) -> SourceContext:
        assert self._ctx is not None, "bind() first"
        return self._ctx

    @property
    def tracker(self) -> str | None:
        """How dirty pages are found (reports); None without rounds."""
        return None

    async def preflight(self) -> None:
        """Checks that need the host but change nothing (kernel features)."""

    def bind(self, ctx: SourceContext) -> None:
        """The session exists: from now on the strategy may act."""
        self._ctx = ctx

    @property
    @abc.abstractmethod
    def dump_to_destination(self) -> bool:
        """The frozen dump's memory streams to a CRIU page server on the
        destination (started by the driver, before the freeze when it can)."""

    @property
    def page_server_early(self) -> bool:
        """The destination's page server may start in pre-restore (its
        parent images are known then): its start-up stays out of every round."""
        return self.dump_to_destination and not self.has_rounds

    @property
    def final_parent(self) -> str | None:
        """``--parent-path`` of the frozen dump, relative to its image dir."""
        return None

    async def run_rounds(self) -> None:
        """Rounds while the container runs, until the strategy is ready to freeze."""

    @classmethod
    async def run_rounds_together(cls, group: Sequence[Strategy]) -> None:
        """The rounds of a group, each member's strategy of this class: by
        default one after the other (a strategy whose rounds converge on
        the group's sum overrides this)."""
        for s in group:
            await s.run_rounds()

    async def prepare_final(self, images_dir: Path) -> None:
        """Before the freeze: whatever the frozen dump needs ready."""

    async def final_dump(self, dump: DumpFn, page_server: str | None) -> None:
        """Run the frozen dump (``dump``); by default to ``page_server`` or files."""
        await dump(page_server)

    def final_dump_target(self, page_server: str | None) -> str | None:
        """Where :meth:`final_dump` will send the memory (known once
        :meth:`prepare_final` ran), so that its runc can start before the freeze."""
        return page_server

    async def finish_memory(self) -> None:
        """The transfer phase, beside the images: whatever the memory still needs
        before the restore may run (pre-copy's eager step pushes it: pushed.py)."""

    def rebuilt_pages(self) -> set[str]:
        """Pages images the agent rebuilds from what it received: the
        transfer phase sends every other file of the images dir."""
        return set()

    def restore_mode(self, lazy_possible: bool) -> RestoreMode:
        """How the destination restores (``lazy_possible``: its userfaultfd)."""
        return RestoreMode.LAZY_LOCAL if lazy_possible else RestoreMode.EAGER

    async def restore_args(self) -> dict[str, Any]:
        """Extra arguments of the agent's ``restore`` call."""
        return {}

    async def after_fill(self) -> None:
        """The destination holds every page: whatever still serves them here ends."""

    async def release_source(self) -> None:
        """A failure: the source's processes go back under its freezer (idempotent)."""

    def fill_stats(self) -> dict[str, Any]:
        """What the fill after the commit point cost (for the report)."""
        return {}

    def relayed(self) -> list[tuple[PortForward, int]]:
        """The fill's resumable forwards and the agent's relay id for each (a lost link resumes them)."""
        return []

    def close(self) -> None:
        """Release what the strategy holds (idempotent; always called)."""
