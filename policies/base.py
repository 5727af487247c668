"""Vocabulary shared by every convergence policy.

A policy is consulted after each pre-copy round and sees only the history of
completed rounds.  Keeping policies pure functions of that history (no clock,
no I/O, no randomness) is what lets the engine replay a migration's decisions
from its log, and lets the tests pin published rules down to the last page.

Mapping from CRIU's ``stats-dump`` image of a pre-dump, which is where the
engine gets these numbers::

    pages_scanned  <- pages_scanned
    pages_skipped  <- pages_skipped_parent   (unchanged since the parent dump)
    pages_sent     <- pages_written
    dirty_pages    <- pages_written          (a pre-dump writes exactly the
                                              pages found dirty)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

__all__ = ["Action", "ConvergencePolicy", "Decision", "RoundStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundStats:
    """What one completed pre-copy round measured.

    Values are validated on construction because a negative count or a NaN
    rate would silently turn every comparison in a policy into "keep going",
    which is the one failure a convergence policy must never hide.
    """

    index: int
    """0-based round number; the first (full) round is 0."""
    duration_s: float
    pages_scanned: int
    """Pages examined this round."""
    dirty_pages: int
    """Pages written since the previous round: what this round had to send."""
    pages_sent: int
    pages_skipped: int
    """Pages examined but unchanged since the previous round, hence not sent."""
    bytes_sent: int
    bandwidth_bps: float
    """Bytes/s measured on the wire during the round; 0 when unknown."""
    dirty_rate_pps: float
    """Pages dirtied per second by the running workload."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"RoundStats.{f.name} must be a number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"RoundStats.{f.name} must be finite, got {value!r}")
            if value < 0:
                raise ValueError(f"RoundStats.{f.name} must be >= 0, got {value!r}")


class Action(enum.Enum):
    """What the engine should do after the round just completed."""

    CONTINUE = "continue"
    """Run another pre-copy round while the container keeps running."""
    FINAL = "final"
    """Freeze the container and do the final dump now."""
    ABORT = "abort"
    """Give up: the migration is not going to converge; keep the source."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """A policy's verdict plus the reason an operator will read in the log."""

    action: Action
    reason: str
    """Human readable, with the numbers compared, e.g. ``dirty pages 40 <= 64``."""

    @property
    def stops(self) -> bool:
        """True when the engine leaves the pre-copy loop (FINAL or ABORT)."""
        return self.action is not Action.CONTINUE


@runtime_checkable
class ConvergencePolicy(Protocol):
    """Decides, after every round, whether pre-copy has converged.

    A Protocol rather than a base class so library users can plug in their own
    policy without inheriting anything; the built-in ones are frozen
    dataclasses, so equal parameters give equal policies.
    """

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        """Judge the rounds so far.

        ``history`` is non-empty and ordered oldest first; its last element is
        the round that just completed.  Must be deterministic: the same
        history always gives the same decision.
        """
        ...

    def describe(self) -> str:
        """The canonical spec string; ``parse_policy`` turns it back into an
        equal policy, so logs and configs can carry policies as text."""
        ...


def continue_(reason: str) -> Decision:
    return Decision(action=Action.CONTINUE, reason=reason)


def final(reason: str) -> Decision:
    return Decision(action=Action.FINAL, reason=reason)


def abort(reason: str) -> Decision:
    return Decision(action=Action.ABORT, reason=reason)


def last_round(history: Sequence[RoundStats]) -> RoundStats:
    """The round just completed; an empty history is a caller bug, not a
    reason to go FINAL or CONTINUE, so it fails loudly."""
    if not history:
        raise ValueError("a convergence policy needs at least one completed round")
    return history[-1]
