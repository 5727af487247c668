"""What a strategy may use of the migration that drives it.

Strategies and trackers get this narrow context, never the driver itself: the
driver (:mod:`tug.engine.source.migration`) imports the strategies, so a
strategy importing the driver back would be a cycle, and every attribute of
the driver would become part of every strategy's interface.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tug.engine.events import Event, Note
from tug.transports.session import Session

if TYPE_CHECKING:
    from tug.engine.options import MigrationOptions
    from tug.engine.runtime.runc import Runc
    from tug.transports.ssh import AgentProcess

#: The frozen dump itself, given the ``--page-server`` address (None: to files).
DumpFn = Callable[[str | None], Awaitable[None]]


@dataclass(slots=True, kw_only=True)
class SourceContext:
    #: The container's name (the same on both hosts).
    name: str
    session: Session
    #: The SSH connection to the destination's agent (for TCP forwards).
    agent: AgentProcess | None
    runc: Runc
    #: This migration's work dir on the source (images, CRIU's work files).
    work: Path
    opts: MigrationOptions
    #: Steps inside the frozen window, in ms; strategies add their own.
    timings: dict[str, float] = field(default_factory=dict)
    emit: Callable[[Event], None] = lambda ev: None
    #: Payload bytes on the wire so far: the session and every forward.
    wire_bytes: Callable[[], int] = lambda: 0
    #: One rootfs pass in the current phase (pre-copy rounds run one each).
    sync_rootfs: Callable[[], Coroutine[Any, Any, None]] | None = None
    #: Messages noted for the report (the driver's list).
    notes: list[str] = field(default_factory=list)

    def note(self, message: str, level: str = "info") -> None:
        self.notes.append(message)
        self.emit(Note(level=level, message=message))
