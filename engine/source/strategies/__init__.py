"""Migration strategies, by the name users pass as ``--strategy``.

Adding a strategy adds one module here and one entry below; the driver
(:mod:`tug.engine.source.migration`) knows none of them by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tug.engine.errors import ConfigError
from tug.engine.source.strategies.base import RestoreMode, Strategy
from tug.engine.source.strategies.hybrid import Hybrid
from tug.engine.source.strategies.postcopy import Postcopy
from tug.engine.source.strategies.precopy import Precopy
from tug.engine.source.strategies.pushed import PushedPrecopy
from tug.engine.source.strategies.stopcopy import StopCopy

if TYPE_CHECKING:
    from tug.engine.options import MigrationOptions

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (StopCopy, Precopy, Postcopy, Hybrid)}


def create(opts: MigrationOptions) -> Strategy:
    """The strategy ``opts`` names, its options checked (ConfigError)."""
    cls = REGISTRY.get(opts.strategy)
    if cls is None:
        raise ConfigError(f"unknown strategy {opts.strategy!r} (available: {', '.join(REGISTRY)})")
    if opts.eager and cls is not Precopy:
        raise ConfigError(
            f"--eager chooses how --strategy precopy ends; {opts.strategy} has no such choice "
            "(--no-lazy-restore makes any restore load all memory before the processes run)"
        )
    return cls(opts)


def resolve(opts: MigrationOptions, *, lazy_possible: bool) -> tuple[type[Strategy], str | None]:
    """Which strategy ``--strategy precopy`` runs: ``(class, note)``.

    Pre-copy ends as hybrid wherever hybrid can run, because hybrid's frozen
    window holds no memory (the benchmark: at 1 GiB its client downtime is
    about half of pre-copy's, and the frozen window a third). The price is
    the commit point: the destination runs before it holds the pages changed
    since the last round, so a source lost during the fill leaves the
    destination frozen for ``tug recover``. ``--eager`` keeps the classic
    commit point; otherwise what hybrid cannot do yet falls back to it, said
    in the note. The eager step pushes the changed pages from the frozen
    processes (pushed.py), each member's of a group from its own; only the
    soft-dirty tracker's has CRIU dump them. Every other strategy runs as
    named (no note).
    """
    if opts.strategy != Precopy.name:
        return REGISTRY[opts.strategy], None
    why = None
    if opts.eager:
        why = "--eager"
    elif not opts.lazy_restore:
        why = "--no-lazy-restore"
    elif not lazy_possible:
        why = "the destination has no userfaultfd (see tug doctor there)"
    elif opts.tracker == "soft-dirty":
        why = "the soft-dirty tracker's pre-dumps never reach hybrid's page store"
    if why is None:
        return Hybrid, (
            "precopy ends as hybrid: the destination's processes run before the pages changed since the last round "
            "arrive, and the frozen source serves them until they are in (--eager: every page in place first)"
        )
    # The eager step: pushed from the frozen processes where hybrid's machinery applies.
    pushed = opts.tracker != "soft-dirty"
    how = "the pages changed since the last round pushed from the frozen processes" if pushed else "CRIU dumps the changed pages"
    note = None if opts.eager else f"precopy restores eagerly (every page in place before the processes run; {how}): {why}"
    return (PushedPrecopy if pushed else Precopy), note


__all__ = ["REGISTRY", "RestoreMode", "Strategy", "create", "resolve"]
