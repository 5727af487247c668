"""Tests for tug.policies: published rules at their exact thresholds, plus
properties of the combinators and of the spec language."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tug.policies import (
    PRESETS,
    AbortIfDiverging,
    Action,
    AllOf,
    AnyOf,
    ConvergencePolicy,
    Decision,
    DowntimeBudget,
    Incus,
    MaxDirtyGrowth,
    MaxIterations,
    MinDirtyPages,
    PHaul,
    PolicySpecError,
    RoundStats,
    SkipGoal,
    all_of,
    any_of,
    incus,
    parse_policy,
    phaul,
    qemu,
)

CONTINUE, FINAL, ABORT = Action.CONTINUE, Action.FINAL, Action.ABORT


def rs(index: int = 0, *, dirty: int = 1000, sent: int | None = None,
       skipped: int = 0, scanned: int | None = None, bw: float = 0.0,
       rate: float = 0.0, duration: float = 1.0) -> RoundStats:
    sent = dirty if sent is None else sent
    scanned = sent + skipped if scanned is None else scanned
    return RoundStats(index=index, duration_s=duration, pages_scanned=scanned,
                      dirty_pages=dirty, pages_sent=sent, pages_skipped=skipped,
                      bytes_sent=sent * 4096, bandwidth_bps=bw, dirty_rate_pps=rate)


def run(dirty: Sequence[int]) -> list[RoundStats]:
    return [rs(i, dirty=d) for i, d in enumerate(dirty)]


# --------------------------------------------------------------------------
# p.haul: phaul/iters.py __check_live_iter_progress (Python 2 integer '/')
# --------------------------------------------------------------------------

@pytest.mark.parametrize(("index", "prev", "cur", "action", "why"), [
    (0, None, 64, FINAL, "Small dump"),            # <= 64 stops
    (0, None, 65, CONTINUE, "Proceed"),
    (0, None, 0, FINAL, "Small dump"),
    (1, 100, 110, CONTINUE, "Proceed"),            # exactly 10 %: 10 > 10 is false
    (1, 100, 111, FINAL, "Iteration grows"),       # 11 %
    (1, 1000, 1101, CONTINUE, "Proceed"),          # 10.1 % floors to 10
    (1, 1000, 1109, CONTINUE, "Proceed"),          # 10.9 % floors to 10
    (1, 1000, 1110, FINAL, "Iteration grows"),     # 11 %
    (1, 65, 72, CONTINUE, "Proceed"),              # 700 // 65 = 10 (10.77 %)
    (1, 65, 73, FINAL, "Iteration grows"),         # 800 // 65 = 12
    (3, 200, 100, CONTINUE, "Proceed"),            # shrinking: negative rate
    (7, 100, 100, CONTINUE, "Proceed"),
    (8, 100, 100, FINAL, "Too many iterations"),   # index counts from 0: 9th round
    (8, 100, 90, FINAL, "Too many iterations"),    # shrinking, but capped
    (8, 100, 64, FINAL, "Small dump"),             # order: small dump first...
    (8, 100, 200, FINAL, "Iteration grows"),       # ...then growth, then the cap
    (1, 0, 100, FINAL, "Iteration grows"),         # prev 0: no ZeroDivisionError
])
def test_phaul_table(index: int, prev: int | None, cur: int, action: Action, why: str) -> None:
    history = ([] if prev is None else [rs(index - 1, dirty=prev)]) + [rs(index, dirty=cur)]
    decision = PHaul().decide(history)
    assert decision.action is action
    assert decision.reason.startswith(why)


def _phaul_oracle(index: int, cur: int, prev: int | None) -> bool:
    """Line-by-line port of p.haul's __check_live_iter_progress (True = go on),
    with Python 2's floor division for ints."""
    if cur <= 64:
        return False
    if prev is not None:
        delta = cur - prev
        grow_rate = delta * 100 // prev
        if grow_rate > 10:
            return False
    if index >= 8:
        return False
    return True


@given(st.lists(st.integers(65, 5000), min_size=1, max_size=12), st.integers(0, 64))
def test_phaul_matches_port_of_original(dirty: list[int], small: int) -> None:
    dirty = dirty + [small]
    for t in range(len(dirty)):
        history = run(dirty[: t + 1])
        prev = dirty[t - 1] if t else None
        expected = CONTINUE if _phaul_oracle(t, dirty[t], prev) else FINAL
        assert PHaul().decide(history).action is expected


def test_phaul_steady_workload_does_nine_rounds() -> None:
    history = run([1000] * 20)
    stops = [t for t in range(20) if PHaul().decide(history[: t + 1]).stops]
    assert stops[0] == 8


# --------------------------------------------------------------------------
# Incus: driver_lxc.go migrateSendPreDumpLoop + the pre-dump loop
# --------------------------------------------------------------------------

@pytest.mark.parametrize(("written", "skipped", "goal", "action"), [
    (30, 70, 70, CONTINUE),          # exactly 70 %: 70 > 70 is false
    (29, 71, 70, FINAL),
    (3001, 6999, 70, CONTINUE),      # 69.99 % -> ceil 70, not > 70
    (3099, 6901, 70, CONTINUE),      # 69.01 % -> 70
    (2999, 7001, 70, FINAL),         # 70.01 % -> 71
    (0, 0, 70, CONTINUE),            # nothing dumped: pct 0, no division
    (0, 10, 70, FINAL),              # 100 %
    (0, 10, 100, CONTINUE),          # goal 100 can never be exceeded
    (10, 0, 0, CONTINUE),            # 0 % is not > 0
    (99, 1, 0, FINAL),               # 1 % > 0
])
def test_incus_goal_table(written: int, skipped: int, goal: int, action: Action) -> None:
    # pages_scanned deliberately differs: Incus divides by written + skipped.
    history = [rs(0, dirty=written, sent=written, skipped=skipped,
                  scanned=10 * (written + skipped) + 7)]
    assert Incus(goal=goal).decide(history).action is action


def _incus_loop_rounds(max_iterations: int) -> int:
    """Port of Incus's pre-dump loop with a goal that is never reached:
    how many pre-dumps run before the final dump."""
    max_iterations = min(max_iterations, 999)
    counter = 0
    rounds = 0
    final = False
    while not final:
        counter += 1
        final = not counter < max_iterations
        rounds += 1            # migrateSendPreDumpLoop: goal never hit here
        counter += 1
    return rounds


@pytest.mark.parametrize("iterations", [*range(0, 25), 998, 999, 1000, 5000])
def test_incus_iteration_count_matches_loop(iterations: int) -> None:
    policy = Incus(iterations=iterations)
    history = [rs(i, sent=100, skipped=0) for i in range(2000)]
    rounds = next(t + 1 for t in range(2000) if policy.decide(history[: t + 1]).stops)
    assert rounds == _incus_loop_rounds(iterations) == policy.max_rounds


def test_incus_default_is_six_predumps() -> None:
    history = [rs(i, sent=100, skipped=0) for i in range(10)]
    assert Incus().decide(history[:5]).action is CONTINUE    # index 4: counter 9 < 10
    assert Incus().decide(history[:6]).action is FINAL       # index 5: counter 11 >= 10
    assert Incus().max_rounds == 6


# --------------------------------------------------------------------------
# QEMU / DowntimeBudget: pending <= bandwidth * downtime_limit
# --------------------------------------------------------------------------

@pytest.mark.parametrize(("dirty", "bw", "action"), [
    (300, 4_096_000.0, FINAL),       # 1228800 B / 4096000 B/s = exactly 300 ms
    (301, 4_096_000.0, CONTINUE),
    (0, 4_096_000.0, FINAL),
    (1, 0.0, CONTINUE),              # bandwidth unknown: keep going
    (0, 0.0, FINAL),                 # ...unless nothing is pending (QEMU: 0 <= 0)
    (10**6, 1e12, FINAL),            # 4.096 ms
])
def test_qemu_table(dirty: int, bw: float, action: Action) -> None:
    assert qemu().decide([rs(0, dirty=dirty, bw=bw)]).action is action


def test_downtime_budget_is_decimal_exact() -> None:
    # 10000 B/s * 100.1 ms = 1001 B, but 10000 * 100.1 / 1000 == 1000.9999999999999.
    policy = DowntimeBudget(100.1, page_size=1)
    assert policy.decide([rs(0, dirty=1001, bw=10_000.0)]).action is FINAL
    assert policy.decide([rs(0, dirty=1002, bw=10_000.0)]).action is CONTINUE


def test_zero_budget() -> None:
    assert DowntimeBudget(0).decide([rs(0, dirty=0, bw=1e9)]).action is FINAL
    assert DowntimeBudget(0).decide([rs(0, dirty=1, bw=1e9)]).action is CONTINUE


def test_qemu_preset_is_300ms_budget() -> None:
    assert qemu() == DowntimeBudget(300) == parse_policy("qemu")
    assert PRESETS["qemu"]() == qemu()
    assert parse_policy("qemu(downtime=0.5s)") == DowntimeBudget(500)


# --------------------------------------------------------------------------
# Generic rules
# --------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "history", "action"), [
    (MinDirtyPages(64), run([64]), FINAL),
    (MinDirtyPages(64), run([65]), CONTINUE),
    (MinDirtyPages(0), run([0]), FINAL),
    (MaxIterations(8), run([9] * 7), CONTINUE),
    (MaxIterations(8), run([9] * 8), FINAL),
    (MaxIterations(1), run([9]), FINAL),
    (MaxDirtyGrowth(1.1), run([100]), CONTINUE),          # nothing to compare
    (MaxDirtyGrowth(1.1), run([100, 110]), CONTINUE),     # exactly 10 %
    (MaxDirtyGrowth(1.1), run([100, 111]), FINAL),
    (MaxDirtyGrowth(1.1), run([1000, 1101]), FINAL),      # 10.1 %: no integer percent here
    (MaxDirtyGrowth(1.15), run([100, 115]), CONTINUE),    # 1.15 as a decimal, not binary
    (MaxDirtyGrowth(1.15), run([100, 116]), FINAL),
    (MaxDirtyGrowth(1.1), run([0, 0]), CONTINUE),         # zero prev: no division
    (MaxDirtyGrowth(1.1), run([0, 1]), FINAL),
    (SkipGoal(70), [rs(0, skipped=70, scanned=100)], CONTINUE),
    (SkipGoal(70), [rs(0, skipped=71, scanned=100)], FINAL),
    (SkipGoal(70), [rs(0, dirty=0, skipped=0, scanned=0)], CONTINUE),
    (SkipGoal(100), [rs(0, skipped=10, scanned=10)], CONTINUE),
    (SkipGoal(0), [rs(0, skipped=1, scanned=10)], FINAL),
    (SkipGoal(0), [rs(0, skipped=0, scanned=10)], CONTINUE),
    (SkipGoal(33.3), [rs(0, skipped=333, scanned=1000)], CONTINUE),
    (SkipGoal(33.3), [rs(0, skipped=334, scanned=1000)], FINAL),
])
def test_rule_table(policy: ConvergencePolicy, history: list[RoundStats], action: Action) -> None:
    assert policy.decide(history).action is action


def test_reason_is_readable() -> None:
    assert MinDirtyPages(64).decide(run([40])).reason == "dirty pages 40 <= 64"


def _diverging(n: int, *, dirty: int = 1000, rate: float = 300.0,
               bw: float = 1e6) -> list[RoundStats]:
    # 300 pages/s * 4096 B = 1228800 B/s > 1e6 B/s
    return [rs(i, dirty=dirty, rate=rate, bw=bw) for i in range(n)]


def test_abort_if_diverging() -> None:
    policy = AbortIfDiverging(3)
    assert policy.decide(_diverging(3)).action is CONTINUE          # needs 4 rounds
    assert policy.decide(_diverging(4)).action is ABORT
    shrinking = _diverging(4)
    shrinking[-1] = dataclasses.replace(shrinking[-1], dirty_pages=999)
    assert policy.decide(shrinking).action is CONTINUE
    unknown_bw = _diverging(4)
    unknown_bw[2] = dataclasses.replace(unknown_bw[2], bandwidth_bps=0.0)
    assert policy.decide(unknown_bw).action is CONTINUE
    at_bandwidth = _diverging(4, rate=1e6 / 4096)                   # rate == bandwidth
    assert policy.decide(at_bandwidth).action is CONTINUE
    # Round 0 (before the window) may be anything: it is only the baseline.
    first_fast = _diverging(4)
    first_fast[0] = dataclasses.replace(first_fast[0], bandwidth_bps=0.0)
    assert policy.decide(first_fast).action is ABORT


# --------------------------------------------------------------------------
# Combinators
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Fixed:
    """A user-written policy: the Protocol needs no base class."""

    action: Action

    def decide(self, history: Sequence[RoundStats]) -> Decision:
        return Decision(action=self.action, reason=self.action.value)

    def describe(self) -> str:
        return str(self.action.value)


@pytest.mark.parametrize(("combinator", "members", "action"), [
    (any_of, [CONTINUE, CONTINUE], CONTINUE),
    (any_of, [CONTINUE, FINAL], FINAL),
    (any_of, [FINAL, ABORT], ABORT),          # ABORT wins over an earlier FINAL
    (any_of, [ABORT, FINAL], ABORT),
    (all_of, [FINAL, CONTINUE], CONTINUE),
    (all_of, [FINAL, FINAL], FINAL),
    (all_of, [CONTINUE, ABORT], ABORT),       # ABORT wins even without consensus
    (all_of, [FINAL], FINAL),
])
def test_combinator_table(combinator: object, members: list[Action], action: Action) -> None:
    assert callable(combinator)
    policy = combinator(*(Fixed(a) for a in members))
    assert policy.decide(run([1])).action is action


def test_combinators_need_members() -> None:
    with pytest.raises(ValueError):
        AnyOf(())
    with pytest.raises(ValueError):
        AllOf(())


# --------------------------------------------------------------------------
# Hypothesis strategies
# --------------------------------------------------------------------------

_counts = st.integers(0, 10**6)
_rates = st.floats(0, 1e10, allow_nan=False, allow_infinity=False)


@st.composite
def histories(draw: st.DrawFn, min_size: int = 1, max_size: int = 12) -> list[RoundStats]:
    n = draw(st.integers(min_size, max_size))
    out = []
    for i in range(n):
        sent, skipped = draw(_counts), draw(_counts)
        out.append(RoundStats(
            index=i, duration_s=draw(_rates), pages_scanned=sent + skipped + draw(_counts),
            dirty_pages=draw(st.one_of(_counts, st.integers(0, 200))),
            pages_sent=sent, pages_skipped=skipped, bytes_sent=sent * 4096,
            bandwidth_bps=draw(st.one_of(st.just(0.0), _rates)),
            dirty_rate_pps=draw(_rates)))
    return out


_page_sizes = st.sampled_from([4096, 1, 16384, 65536])

final_rules: st.SearchStrategy[ConvergencePolicy] = st.one_of(
    st.builds(MaxIterations, st.integers(1, 30)),
    st.builds(MinDirtyPages, st.integers(0, 10**6)),
    st.builds(MaxDirtyGrowth, st.floats(min_value=0, exclude_min=True, allow_infinity=False)),
    st.builds(DowntimeBudget, st.floats(min_value=0, allow_infinity=False), page_size=_page_sizes),
    st.builds(SkipGoal, st.floats(0, 100)),
    st.builds(PHaul, min_pages=st.integers(0, 10**4), max_grow_rate=st.integers(0, 200),
              max_iters=st.integers(0, 30)),
    st.builds(Incus, goal=st.integers(0, 120), iterations=st.integers(0, 2000)),
    st.sampled_from([f() for f in PRESETS.values()]),
)
abort_rules = st.builds(AbortIfDiverging, st.integers(1, 6), page_size=_page_sizes)
leaf_rules = st.one_of(final_rules, abort_rules)
policies: st.SearchStrategy[ConvergencePolicy] = st.recursive(
    leaf_rules,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=4).map(lambda ps: AnyOf(tuple(ps))),
        st.lists(children, min_size=1, max_size=4).map(lambda ps: AllOf(tuple(ps))),
    ),
    max_leaves=8,
)


def first_stop(policy: ConvergencePolicy, history: Sequence[RoundStats]) -> int | None:
    return next((t for t in range(len(history)) if policy.decide(history[: t + 1]).stops), None)


def _le(a: int | None, b: int | None) -> bool:
    """a stops no later than b (None = never stops)."""
    return b is None or (a is not None and a <= b)


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

@given(st.lists(policies, min_size=1, max_size=4), histories())
def test_any_of_stops_no_later_than_members(members: list[ConvergencePolicy],
                                            history: list[RoundStats]) -> None:
    combined = any_of(*members)
    for t in range(len(history)):
        prefix = history[: t + 1]
        decisions = [m.decide(prefix) for m in members]
        got = combined.decide(prefix)
        assert got.stops == any(d.stops for d in decisions)
        if any(d.action is ABORT for d in decisions):
            assert got.action is ABORT
    for m in members:
        assert _le(first_stop(combined, history), first_stop(m, history))


@given(st.lists(final_rules, min_size=1, max_size=4), histories())
def test_all_of_stops_no_earlier_than_members(members: list[ConvergencePolicy],
                                              history: list[RoundStats]) -> None:
    combined = all_of(*members)
    for t in range(len(history)):
        prefix = history[: t + 1]
        got = combined.decide(prefix)
        assert (got.action is FINAL) == all(m.decide(prefix).action is FINAL for m in members)
    for m in members:
        assert _le(first_stop(m, history), first_stop(combined, history))


@given(st.lists(policies, min_size=1, max_size=4), histories())
def test_all_of_abort_wins(members: list[ConvergencePolicy], history: list[RoundStats]) -> None:
    got = all_of(*members).decide(history)
    if any(m.decide(history).action is ABORT for m in members):
        assert got.action is ABORT
    else:
        assert got.action is not ABORT


@given(st.integers(1, 15), histories(min_size=15, max_size=15))
def test_max_iterations_final_by_round_n(n: int, history: list[RoundStats]) -> None:
    policy = MaxIterations(n)
    assert policy.decide(history[:n]).action is FINAL
    assert all(policy.decide(history[: t + 1]).action is CONTINUE for t in range(n - 1))


@given(policies, st.integers(1, 12), histories(min_size=12, max_size=12))
def test_any_of_with_max_iterations_always_stops(policy: ConvergencePolicy, n: int,
                                                 history: list[RoundStats]) -> None:
    assert _le(first_stop(any_of(policy, MaxIterations(n)), history), n - 1)


@given(policies, histories())
def test_deterministic(policy: ConvergencePolicy, history: list[RoundStats]) -> None:
    first = policy.decide(history)
    copied = [dataclasses.replace(r) for r in history]
    assert policy.decide(copied) == first
    assert policy.decide(tuple(history)) == first
    assert policy.decide(history) == first


@given(policies)
def test_describe_round_trip(policy: ConvergencePolicy) -> None:
    text = policy.describe()
    parsed = parse_policy(text)
    assert parsed == policy
    assert parsed.describe() == text


_spec_alphabet = st.sampled_from(list("anylpqucirgmxdwtbok-=(),.0123456789es% \t:;_A"))
_tokens = st.sampled_from([
    "max-iter", "min-dirty", "max-growth", "downtime", "skip-goal", "abort-diverging",
    "phaul", "incus", "qemu", "any", "all", "goal", "iterations", "budget", "page-size",
    "min-pages", "max-grow-rate", "max-iters", "rounds", "=", "(", ")", ",", "ms", "s",
    "0", "1", "8", "64", "1.1", "0.3", "1e999", "-1", "99999999999999999999", " ",
])


def _parse_or_spec_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicySpecError as exc:
        assert isinstance(exc, ValueError)
        assert "valid keys" in str(exc)
        return
    assert parse_policy(policy.describe()) == policy


@given(st.text())
def test_parse_arbitrary_text(text: str) -> None:
    _parse_or_spec_error(text)


@given(st.one_of(st.text(_spec_alphabet), st.lists(_tokens).map("".join)))
def test_parse_spec_like_text(text: str) -> None:
    _parse_or_spec_error(text)


@settings(max_examples=50)
@given(policies, st.data())
def test_parse_mutated_specs(policy: ConvergencePolicy, data: st.DataObject) -> None:
    text = policy.describe()
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(i, min(len(text), i + 3)))
    _parse_or_spec_error(text[:i] + data.draw(st.text(_spec_alphabet, max_size=3)) + text[j:])


# --------------------------------------------------------------------------
# Parser specifics
# --------------------------------------------------------------------------

def test_parse_rule_list_is_any_of() -> None:
    spec = "max-iter=8,min-dirty=64,max-growth=1.1,downtime=300ms,skip-goal=70,abort-diverging=3"
    assert parse_policy(spec) == any_of(
        MaxIterations(8), MinDirtyPages(64), MaxDirtyGrowth(1.1), DowntimeBudget(300),
        SkipGoal(70), AbortIfDiverging(3))


@pytest.mark.parametrize("spec", ["downtime=300ms", "downtime=0.3s", "downtime=300",
                                  " downtime = 300.0ms ", "downtime(budget=0.3s)"])
def test_parse_downtime_units(spec: str) -> None:
    assert parse_policy(spec) == DowntimeBudget(300)


@pytest.mark.parametrize(("spec", "expected"), [
    ("phaul", phaul()),
    ("phaul(max-iters=4,min-pages=32)", PHaul(max_iters=4, min_pages=32)),
    ("incus", incus()),
    ("incus(goal=80)", Incus(goal=80)),
    ("incus(goal=80,iterations=5)", Incus(goal=80, iterations=5)),
    ("all(phaul,downtime=1s)", all_of(phaul(), DowntimeBudget(1000))),
    ("any(incus,abort-diverging)", any_of(incus(), AbortIfDiverging())),
    ("abort-diverging(rounds=2,page-size=16384)", AbortIfDiverging(2, page_size=16384)),
    ("max-iter=8", MaxIterations(8)),
])
def test_parse_examples(spec: str, expected: ConvergencePolicy) -> None:
    assert parse_policy(spec) == expected


@pytest.mark.parametrize(("spec", "token"), [
    ("max-iters=8", "max-iters=8"),
    ("max-iter=8x", "max-iter=8x"),
    ("max-iter=0", "max-iter=0"),
    ("skip-goal=101", "skip-goal=101"),
    ("downtime=1e999s", "downtime=1e999s"),
    ("incus(foo=1)", "foo=1"),
    ("incus(goal=1,goal=2)", "goal"),
    ("phaul=3", "phaul=3"),
    ("max-iter", "max-iter"),
    ("max-iter=8,", "<end of spec>"),
    ("any(max-iter=8", "<end of spec>"),
    ("", ""),
])
def test_parse_errors_name_token(spec: str, token: str) -> None:
    with pytest.raises(PolicySpecError) as info:
        parse_policy(spec)
    assert info.value.token == token
    assert repr(token) in str(info.value)
    assert "max-iter=N" in str(info.value) and "phaul" in str(info.value)


def test_parse_deep_nesting_is_a_spec_error() -> None:
    with pytest.raises(PolicySpecError):
        parse_policy("any(" * 10_000 + "max-iter=1" + ")" * 10_000)


def test_describe_canonical_forms() -> None:
    assert DowntimeBudget(0.5).describe() == "downtime=0.5ms"
    assert (DowntimeBudget(300, page_size=16384).describe()
            == "downtime(budget=300ms,page-size=16384)")
    assert PHaul().describe() == "phaul"
    assert Incus(iterations=4).describe() == "incus(iterations=4)"
    assert any_of(MaxIterations(8), MinDirtyPages(64)).describe() == "any(max-iter=8,min-dirty=64)"


def test_round_stats_validation() -> None:
    with pytest.raises(ValueError):
        rs(0, dirty=-1)
    with pytest.raises(ValueError):
        rs(0, bw=float("nan"))
    with pytest.raises(ValueError):
        MinDirtyPages(64).decide([])
