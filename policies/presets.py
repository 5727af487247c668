"""Published convergence rules, reproduced exactly.

"Exactly" means the same arithmetic (integer division included), the same
comparisons (``<=`` vs ``<``), the same order of checks and the same way of
counting rounds, so that a migration tuned against the original tool makes
the same decisions under tug.  Each class cites the source it was read from;
where the original has a quirk, the quirk is reproduced and documented rather
than fixed, because a preset that is "almost" p.haul or Incus is worse than
none.

Round numbering: tug's ``RoundStats.index`` is 0-based and counts pre-dumps
(round 0 is the first, full pre-dump), which is exactly p.haul's
``iter_index`` and one less than Incus's 1-based pre-dump count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ._spec import check_int, fmt_call, fmt_int
from .base import ConvergencePolicy, Decision, RoundStats, continue_, final, last_round
from .rules import DEFAULT_PAGE_SIZE, DowntimeBudget

__all__ = [
    "INCUS_MAX_ITERATIONS_CAP",
    "PRESETS",
    "QEMU_DEFAULT_DOWNTIME_MS",
    "Incus",
    "PHaul",
    "incus",
    "phaul",
    "qemu",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PHaul:
    """p.haul's live-migration iteration rule.

    Source: https://github.com/checkpoint-restore/p.haul, file
    ``phaul/iters.py`` (master, commit 02199d87), methods
    ``phaul_iter_worker.__check_live_iter_progress`` and ``__calc_grow_rate``;
    constants in ``class iter_consts`` (before commit bf68666, March 2016,
    they were the module globals ``phaul_iter_min_size = 64``,
    ``phaul_iter_grow_max = 10``, ``phaul_iter_max = 8``).

    After pre-dump ``index`` (0-based ``iter_index``) with ``w`` =
    ``pages_written`` of this pre-dump (tug: ``dirty_pages``), checked in
    this order, the first hit goes FINAL:

    1. ``w <= MIN_ITER_PAGES_COUNT`` (64)                     "Small dump"
    2. if there is a previous pre-dump with ``p`` pages written:
       ``(w - p) * 100 / p > MAX_ITER_GROW_RATE`` (10)        "Iteration grows"
       -- p.haul runs on Python 2, so ``/`` on ints is floor division:
       growth of 10.9 % floors to 10 and continues, 11 % stops.
    3. ``index >= MAX_ITERS_COUNT`` (8)                       "Too many iterations"

    Since ``index`` starts at 0, the cap allows 9 pre-dumps (index 0..8).
    p.haul would divide by zero if ``p == 0``; that cannot happen there (a
    0-page pre-dump already stopped at rule 1), but tug may keep iterating
    under ``all_of``, so ``p == 0`` counts as unbounded growth.
    """

    min_pages: int = 64
    max_grow_rate: int = 10
    """Percent, compared with the floored integer growth rate."""
    max_iters: int = 8
    """Compared with the 0-based round index, so ``max_iters + 1`` rounds."""

    def __post_init__(self) -> None:
        check_int("PHaul", "min_pages", self.min_pages, 0)
        check_int("PHaul", "max_grow_rate", self.max_grow_rate, 0)
        check_int("PHaul", "max_iters", self.max_iters, 0)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        last = last_round(history)
        written = last.dirty_pages
        if written <= self.min_pages:
            return final(f"Small dump: dirty pages {written} <= {self.min_pages}")
        if len(history) >= 2:
            prev = history[-2].dirty_pages
            if prev == 0:
                return final(f"Iteration grows: dirty pages 0 -> {written} (unbounded)")
            grow_rate = (written - prev) * 100 // prev  # Python 2 int '/' floors
            if grow_rate > self.max_grow_rate:
                return final(f"Iteration grows: {grow_rate}% > {self.max_grow_rate}% "
                             f"({prev} -> {written} pages)")
        if last.index >= self.max_iters:
            return final(f"Too many iterations: index {last.index} >= {self.max_iters}")
        return continue_(f"Proceed to next iteration: dirty pages {written} > "
                         f"{self.min_pages}, index {last.index} < {self.max_iters}")

    def describe(self) -> str:
        defaults = PHaul()
        args = [(key, fmt_int(getattr(self, field)))
                for key, field in PHAUL_PARAMS.items()
                if getattr(self, field) != getattr(defaults, field)]
        return fmt_call("phaul", args)


INCUS_MAX_ITERATIONS_CAP = 999
"""Incus clamps ``migration.incremental.memory.iterations`` to this, because
pre-dump directories are named with three digits."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Incus:
    """Incus's (ex-LXD) pre-copy rule for container live migration.

    Source: https://github.com/lxc/incus, file
    ``internal/server/instance/drivers/driver_lxc.go`` (main, commit
    be7afc5d): ``migrateSendPreDumpLoop`` (the goal check),
    ``migrationSendCheckForPreDumpSupport`` (iterations default 10, clamped
    to 999) and the pre-dump loop in ``MigrateSend``; config keys
    ``migration.incremental.memory.goal`` (default 70) and
    ``migration.incremental.memory.iterations`` (default 10) are documented
    in ``internal/instance/config.go``.  Unchanged since LXD commit 5d443c7
    (2017).

    Goal: from the pre-dump's CRIU ``stats-dump`` (tug: ``pages_sent`` is
    ``pages_written``, ``pages_skipped`` is ``pages_skipped_parent``)::

        total = written + skipped_parent         # not pages_scanned
        pct   = 0 if total == 0 else 100 - (100 * written) // total
        FINAL if pct > goal                      # strictly greater

    The integer division floors the *written* share, so ``pct`` is the
    skipped share rounded **up** (69.01 % counts as 70).  Since the goal is
    an integer, ``ceil(share) > goal`` holds exactly when ``share > goal``:
    exactly 70 % skipped continues, 70.01 % stops.  What differs from
    ``SkipGoal`` is the denominator, written + skipped rather than scanned.

    Iterations: the loop increments ``preDumpCounter`` twice per pre-dump
    (once before, once after) and marks a pre-dump final when, before it
    runs, ``preDumpCounter >= iterations``.  The k-th pre-dump (k = index+1)
    sees counter ``2k - 1``, so it is the last one when ``2k - 1 >=
    min(iterations, 999)``.  With the default 10 that is the 6th pre-dump
    (index 5), not the 10th; ``iterations`` of 0 or 1 allow one pre-dump.
    This is Incus's actual behaviour and is reproduced as such.
    """

    goal: int = 70
    iterations: int = 10

    def __post_init__(self) -> None:
        check_int("Incus", "goal", self.goal, 0)
        check_int("Incus", "iterations", self.iterations, 0)

    @property
    def max_rounds(self) -> int:
        """Pre-dumps Incus actually does at most, given its double count."""
        cap = min(self.iterations, INCUS_MAX_ITERATIONS_CAP)
        return max(1, (cap + 2) // 2)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        last = last_round(history)
        written, skipped = last.pages_sent, last.pages_skipped
        total = written + skipped
        pct = 100 - (100 * written) // total if total > 0 else 0
        counter = 2 * (last.index + 1) - 1
        cap = min(self.iterations, INCUS_MAX_ITERATIONS_CAP)
        share = f"skipped {pct}% ({skipped} of {total} pages)"
        if pct > self.goal:
            return final(f"{share} > goal {self.goal}%")
        if counter >= cap:
            return final(f"last pre-dump: counter {counter} >= iterations {cap} "
                         f"(round {last.index + 1} of at most {self.max_rounds})")
        return continue_(f"{share} <= goal {self.goal}%")

    def describe(self) -> str:
        defaults = Incus()
        args = [(key, fmt_int(getattr(self, field)))
                for key, field in INCUS_PARAMS.items()
                if getattr(self, field) != getattr(defaults, field)]
        return fmt_call("incus", args)


QEMU_DEFAULT_DOWNTIME_MS = 300
"""``DEFAULT_MIGRATE_SET_DOWNTIME`` in QEMU's ``migration/options.c``."""


def qemu(*, downtime_ms: float = QEMU_DEFAULT_DOWNTIME_MS,
         page_size: int = DEFAULT_PAGE_SIZE) -> DowntimeBudget:
    """QEMU's precopy switchover rule with its default 300 ms downtime limit.

    Source: https://gitlab.com/qemu-project/qemu (mirror
    github.com/qemu/qemu), ``migration/migration.c``:
    ``migration_update_counters`` sets ``threshold_size =
    expected_bw_per_ms * migrate_downtime_limit()`` (bandwidth measured over
    the last interval, unless ``avail-switchover-bandwidth`` is set), and
    ``migration_iteration_run`` completes when ``pending_size <=
    threshold_size``, i.e. pending / bandwidth <= downtime limit.  ``<=`` is
    current master (commit "migration: Rewrite the migration complete detect
    logic", QEMU 10.1, 2025); earlier releases used ``!pending_size ||
    pending_size < threshold_size``.  Either way 0 pending completes even at
    0 bandwidth (``threshold_size`` is 0 until the first measurement), and
    ``DowntimeBudget`` reproduces that.  QEMU's ``pending_size`` is the
    dirty memory left now; tug's best equivalent is the last round's dirty
    pages.  There is no QEMU iteration cap (it relies on auto-converge or the
    operator), so neither is there one here.
    """
    return DowntimeBudget(downtime_ms, page_size=page_size)


def phaul(*, min_pages: int = 64, max_grow_rate: int = 10, max_iters: int = 8) -> PHaul:
    """p.haul's rule (see ``PHaul``)."""
    return PHaul(min_pages=min_pages, max_grow_rate=max_grow_rate, max_iters=max_iters)


def incus(*, goal: int = 70, iterations: int = 10) -> Incus:
    """Incus's rule (see ``Incus``)."""
    return Incus(goal=goal, iterations=iterations)


# Spec parameter name -> dataclass field, in canonical (describe) order.
PHAUL_PARAMS: Mapping[str, str] = MappingProxyType({
    "min-pages": "min_pages",
    "max-grow-rate": "max_grow_rate",
    "max-iters": "max_iters",
})
INCUS_PARAMS: Mapping[str, str] = MappingProxyType({
    "goal": "goal",
    "iterations": "iterations",
})

PRESETS: Mapping[str, Callable[[], ConvergencePolicy]] = MappingProxyType({
    "phaul": phaul,
    "incus": incus,
    "qemu": qemu,
})
"""Preset name -> factory with the published defaults."""
