"""The migration's phase state machine: one table, one owner, one commit point.

Everything that asks "may we still roll back?" asks :class:`PhaseMachine`.
Before :attr:`Phase.COMMIT` the source is authoritative and any failure
resumes it; once the destination has confirmed a running container the
machine passes the commit point and the destination owns the container: a
later failure (cleaning up the frozen source) is reported, never rolled back.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Phase(enum.Enum):
    INIT = "init"
    PRE_CHECKPOINT = "pre-checkpoint"
    PRE_RESTORE = "pre-restore"
    PRECOPY = "precopy"
    CHECKPOINT = "checkpoint"
    TRANSFER = "transfer"
    RESTORE = "restore"
    #: A lazy restore's processes run; their memory is still arriving. The
    #: source stays frozen (the destination ran: it never resumes).
    FILL = "fill"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    DONE = "done"
    FAILED = "failed"


#: Legal transitions. ROLLBACK is reachable from every phase before COMMIT.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.INIT: frozenset({Phase.PRE_CHECKPOINT, Phase.FAILED}),
    Phase.PRE_CHECKPOINT: frozenset({Phase.PRE_RESTORE, Phase.ROLLBACK}),
    Phase.PRE_RESTORE: frozenset({Phase.PRECOPY, Phase.CHECKPOINT, Phase.ROLLBACK}),
    Phase.PRECOPY: frozenset({Phase.CHECKPOINT, Phase.ROLLBACK}),
    Phase.CHECKPOINT: frozenset({Phase.TRANSFER, Phase.RESTORE, Phase.ROLLBACK}),
    Phase.TRANSFER: frozenset({Phase.RESTORE, Phase.ROLLBACK}),
    Phase.RESTORE: frozenset({Phase.FILL, Phase.COMMIT, Phase.ROLLBACK}),
    # Rolling back from here never resumes the source (source/rollback.py):
    # it cleans up around a copy that ran.
    Phase.FILL: frozenset({Phase.COMMIT, Phase.ROLLBACK}),
    # A commit whose acknowledgement is lost fails without a rollback: the
    # destination's copy has run, so the source must never resume.
    Phase.COMMIT: frozenset({Phase.DONE, Phase.FAILED}),
    Phase.ROLLBACK: frozenset({Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}

TERMINAL = frozenset({Phase.DONE, Phase.FAILED})


class IllegalTransition(RuntimeError):
    """A bug in the engine, not a migration failure: never caught."""


@dataclass(slots=True)
class PhaseMachine:
    phase: Phase = Phase.INIT
    #: (phase, start, end) with time.monotonic() stamps; end is None while running.
    history: list[tuple[Phase, float, float | None]] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        """True once the destination owns the container: no rollback after this."""
        return self.phase in (Phase.COMMIT, Phase.DONE)

    @property
    def can_roll_back(self) -> bool:
        return Phase.ROLLBACK in TRANSITIONS[self.phase]

    def advance(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"{self.phase.value} -> {to.value}")
        now = time.monotonic()
        if self.history and self.history[-1][2] is None:
            p, start, _ = self.history[-1]
            self.history[-1] = (p, start, now)
        self.phase = to
        if to not in TERMINAL:
            self.history.append((to, now, None))

    def durations(self) -> dict[str, float]:
        """Seconds spent per phase (a phase entered twice adds up)."""
        out: dict[str, float] = {}
        now = time.monotonic()
        for p, start, end in self.history:
            out[p.value] = out.get(p.value, 0.0) + ((end if end is not None else now) - start)
        return out
