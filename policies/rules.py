"""Single-criterion convergence rules and the combinators that join them.

Each rule answers one question about the round history.  Real policies are
built by combining them (``any_of`` / ``all_of``) or taken from
``presets.py``, which reproduces published rules exactly.

Thresholds given as decimals (growth ratios, percentages, durations) are
compared exactly as the decimal the user wrote, never as its nearest binary
float, so ``max-growth=1.15`` stops once dirty pages exceed 115 % of the
previous round but not at exactly 115 %.  ``exact`` below does that
conversion.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from fractions import Fraction

from ._spec import check_int, check_num, fmt_call, fmt_int, fmt_ms, fmt_num
from .base import (
    Action,
    ConvergencePolicy,
    Decision,
    RoundStats,
    abort,
    continue_,
    final,
    last_round,
)

__all__ = [
    "AbortIfDiverging",
    "AllOf",
    "AnyOf",
    "DowntimeBudget",
    "MaxDirtyGrowth",
    "MaxIterations",
    "MinDirtyPages",
    "SkipGoal",
    "all_of",
    "any_of",
]

DEFAULT_PAGE_SIZE = 4096


def exact(value: float) -> Fraction:
    """The decimal a float was written as (its shortest repr), as a Fraction.

    Going through ``repr`` rather than ``Fraction(value)`` matters at the
    thresholds: ``Fraction(1.15)`` is slightly *below* 1.15, which would turn
    "exactly 15 % growth" into "more than 15 %".
    """
    return Fraction(repr(float(value)))


@dataclass(frozen=True, slots=True)
class MaxIterations:
    """FINAL once ``n`` rounds are done, whatever the stats say.

    The backstop every sane policy needs: a workload whose dirty set plateaus
    just above every other threshold would otherwise pre-copy forever.
    Rounds are counted from ``RoundStats.index`` (0-based) rather than from
    ``len(history)`` so that a caller passing a trimmed window still gets the
    cap at the right round.
    """

    n: int

    def __post_init__(self) -> None:
        check_int("MaxIterations", "n", self.n, 1)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        done = last_round(history).index + 1
        if done >= self.n:
            return final(f"rounds done {done} >= max {self.n}")
        return continue_(f"rounds done {done} < max {self.n}")

    def describe(self) -> str:
        return f"max-iter={fmt_int(self.n)}"


@dataclass(frozen=True, slots=True)
class MinDirtyPages:
    """FINAL when the last round had at most ``n`` dirty pages.

    Once the dirty set is this small, freezing and sending it costs less
    downtime than another round is worth.
    """

    n: int

    def __post_init__(self) -> None:
        check_int("MinDirtyPages", "n", self.n, 0)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        dirty = last_round(history).dirty_pages
        if dirty <= self.n:
            return final(f"dirty pages {dirty} <= {self.n}")
        return continue_(f"dirty pages {dirty} > {self.n}")

    def describe(self) -> str:
        return f"min-dirty={fmt_int(self.n)}"


@dataclass(frozen=True, slots=True)
class MaxDirtyGrowth:
    """FINAL when dirty pages grew by more than ``ratio`` vs the previous round.

    ``ratio=1.1`` stops on more than 10 % growth; exactly 10 % continues.
    Growth means pre-copy has stopped gaining on the workload, so further
    rounds only add network traffic.  The first round has nothing to compare
    with and continues; growth from a round with 0 dirty pages counts as
    unbounded (any dirty page at all stops), which avoids dividing by zero.
    """

    ratio: float

    def __post_init__(self) -> None:
        check_num("MaxDirtyGrowth", "ratio", self.ratio, minimum=0.0, strict=True)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        cur = last_round(history).dirty_pages
        if len(history) < 2:
            return continue_(f"dirty pages {cur}: no previous round to compare")
        prev = history[-2].dirty_pages
        limit = fmt_num(self.ratio)
        if prev == 0:
            if cur > 0:
                return final(f"dirty pages grew 0 -> {cur} (unbounded > x{limit})")
            return continue_(f"dirty pages 0 -> 0 (no growth, limit x{limit})")
        grew = Fraction(cur) > Fraction(prev) * exact(self.ratio)
        text = f"dirty pages {prev} -> {cur} (x{cur / prev:.4g}"
        if grew:
            return final(f"{text} > x{limit})")
        return continue_(f"{text} <= x{limit})")

    def describe(self) -> str:
        return f"max-growth={fmt_num(self.ratio)}"


@dataclass(frozen=True, slots=True)
class DowntimeBudget:
    """QEMU's switchover rule: FINAL when what is left fits the downtime budget.

    Pending bytes are the last round's ``dirty_pages * page_size`` (what the
    final frozen dump will have to send at least); the expected downtime is
    pending / ``bandwidth_bps``, and the rule stops when that is <= ``ms``.
    Evaluated, like QEMU, as ``pending <= bandwidth * budget`` so that an
    unknown (0) bandwidth never divides by zero: it keeps going, except that
    0 pending bytes stop at once, exactly as QEMU's ``0 <= 0`` does.
    """

    ms: float
    _: KW_ONLY
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        check_num("DowntimeBudget", "ms", self.ms, minimum=0.0)
        check_int("DowntimeBudget", "page_size", self.page_size, 1)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        last = last_round(history)
        pending = last.dirty_pages * self.page_size
        budget = fmt_num(self.ms)
        bw = last.bandwidth_bps
        if pending == 0:
            return final(f"pending 0 bytes: nothing to send (budget {budget} ms)")
        if bw <= 0:
            return continue_(f"pending {pending} bytes, bandwidth unknown (budget {budget} ms)")
        # pending <= bw [B/s] * ms / 1000, kept exact (no float rounding at the edge).
        fits = Fraction(pending) * 1000 <= Fraction(bw) * exact(self.ms)
        expected = f"expected downtime {pending * 1000 / bw:.4g} ms"
        if fits:
            return final(f"{expected} <= budget {budget} ms")
        return continue_(f"{expected} > budget {budget} ms")

    def describe(self) -> str:
        if self.page_size == DEFAULT_PAGE_SIZE:
            return f"downtime={fmt_ms(self.ms)}"
        return fmt_call("downtime", [("budget", fmt_ms(self.ms)),
                                     ("page-size", fmt_int(self.page_size))])


@dataclass(frozen=True, slots=True)
class SkipGoal:
    """FINAL when more than ``percent`` % of the scanned pages were skipped as
    unchanged, i.e. the destination already holds that share of memory.

    Compared exactly (``100 * skipped > percent * scanned``); a round that
    scanned nothing has no share to judge and continues.  For Incus's integer
    variant of this rule see ``presets.Incus``.
    """

    percent: float

    def __post_init__(self) -> None:
        check_num("SkipGoal", "percent", self.percent, minimum=0.0, maximum=100.0)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        last = last_round(history)
        goal = fmt_num(self.percent)
        if last.pages_scanned == 0:
            return continue_(f"no pages scanned (goal {goal}%)")
        share = f"skipped {last.pages_skipped}/{last.pages_scanned} pages " \
                f"({100 * last.pages_skipped / last.pages_scanned:.4g}%)"
        if 100 * last.pages_skipped > exact(self.percent) * last.pages_scanned:
            return final(f"{share} > goal {goal}%")
        return continue_(f"{share} <= goal {goal}%")

    def describe(self) -> str:
        return f"skip-goal={fmt_num(self.percent)}"


@dataclass(frozen=True, slots=True)
class AbortIfDiverging:
    """ABORT when pre-copy provably cannot catch up with the workload.

    Two signals must hold together, because either alone is common in
    migrations that do converge:

    * for each of the last ``rounds`` rounds, the workload dirtied memory
      faster than the wire carried it (``dirty_rate_pps * page_size >
      bandwidth_bps``, with a known, non-zero bandwidth), and
    * over those rounds the dirty set made no net progress: the last round's
      ``dirty_pages`` is >= that of the round just before the window.

    It therefore needs ``rounds + 1`` rounds of history before it can fire,
    and never looks at round 0 alone (the full copy has no meaningful dirty
    rate).  Unknown bandwidth is not evidence of divergence.  Combine it with
    a FINAL rule via ``any_of``: it only ever says ABORT or CONTINUE.
    """

    rounds: int = 3
    _: KW_ONLY
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        check_int("AbortIfDiverging", "rounds", self.rounds, 1)
        check_int("AbortIfDiverging", "page_size", self.page_size, 1)

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        last = last_round(history)
        if len(history) <= self.rounds:
            return continue_(f"{len(history)} rounds: too few to judge divergence "
                             f"(needs {self.rounds + 1})")
        window = history[-self.rounds:]
        baseline = history[-self.rounds - 1]
        for r in window:
            if r.bandwidth_bps <= 0:
                return continue_(f"round {r.index}: bandwidth unknown")
            rate = r.dirty_rate_pps * self.page_size
            if rate <= r.bandwidth_bps:
                return continue_(f"round {r.index}: dirty rate {rate:.4g} B/s "
                                 f"<= bandwidth {r.bandwidth_bps:.4g} B/s")
        if last.dirty_pages < baseline.dirty_pages:
            return continue_(f"dirty pages shrinking {baseline.dirty_pages} -> "
                             f"{last.dirty_pages} despite dirty rate > bandwidth")
        return abort(f"dirty rate > bandwidth for {self.rounds} consecutive rounds and "
                     f"dirty pages not shrinking ({baseline.dirty_pages} -> "
                     f"{last.dirty_pages})")

    def describe(self) -> str:
        if self.page_size == DEFAULT_PAGE_SIZE:
            return f"abort-diverging={fmt_int(self.rounds)}"
        return fmt_call("abort-diverging", [("rounds", fmt_int(self.rounds)),
                                            ("page-size", fmt_int(self.page_size))])


def _members(owner: str, policies: Iterable[ConvergencePolicy]) -> tuple[ConvergencePolicy, ...]:
    members = tuple(policies)
    if not members:
        raise ValueError(f"{owner} needs at least one policy")
    for p in members:
        if not isinstance(p, ConvergencePolicy):
            raise TypeError(f"{owner} members must be convergence policies, got {p!r}")
    return members


def _first(decisions: Sequence[Decision], action: Action) -> Decision | None:
    return next((d for d in decisions if d.action is action), None)


@dataclass(frozen=True, slots=True)
class AnyOf:
    """Stop as soon as any member wants to stop.

    Every member is consulted on every round.  If any says ABORT, the first
    ABORT (in member order) is returned, even when an earlier member said
    FINAL: a member that knows the migration cannot converge must not be
    overruled by one that merely thinks it is good enough.  Otherwise the
    first FINAL is returned, else CONTINUE with all members' reasons.
    Hence ``any_of`` never stops later than any of its members.
    """

    policies: tuple[ConvergencePolicy, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", _members("AnyOf", self.policies))

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        decisions = [p.decide(history) for p in self.policies]
        chosen = _first(decisions, Action.ABORT) or _first(decisions, Action.FINAL)
        if chosen is not None:
            return chosen
        return continue_("; ".join(d.reason for d in decisions))

    def describe(self) -> str:
        return "any(" + ",".join(p.describe() for p in self.policies) + ")"


@dataclass(frozen=True, slots=True)
class AllOf:
    """Go FINAL only when every member says FINAL on the same round.

    ABORT still wins: if any member says ABORT, the first ABORT is returned
    at once, whatever the others say.  Otherwise, while some member says
    CONTINUE, the result is CONTINUE (with the reasons of those that want
    to continue).  Without abort members, ``all_of`` therefore never stops
    earlier than any of its members.  Remember members are judged on the
    same round: a rule that said FINAL two rounds ago and CONTINUE now does
    not count.
    """

    policies: tuple[ConvergencePolicy, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", _members("AllOf", self.policies))

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        decisions = [p.decide(history) for p in self.policies]
        aborted = _first(decisions, Action.ABORT)
        if aborted is not None:
            return aborted
        waiting = [d.reason for d in decisions if d.action is Action.CONTINUE]
        if waiting:
            return continue_("; ".join(waiting))
        return final(" and ".join(d.reason for d in decisions))

    def describe(self) -> str:
        return "all(" + ",".join(p.describe() for p in self.policies) + ")"


def any_of(*policies: ConvergencePolicy) -> AnyOf:
    """Stop when any policy stops; ABORT beats FINAL (see ``AnyOf``)."""
    return AnyOf(policies)


def all_of(*policies: ConvergencePolicy) -> AllOf:
    """FINAL when all policies say FINAL; any ABORT wins (see ``AllOf``)."""
    return AllOf(policies)
