"""The benchmark's strategy names: the presets and ad-hoc policies with a tracker."""

from __future__ import annotations

import pytest

from bench.matrix import strategy


def test_named_strategies_keep_their_arguments() -> None:
    assert strategy("hybrid-uffd").migrate_args == ("--strategy", "hybrid", "--policy", "qemu", "--tracker", "uffd")
    assert strategy("precopy-qemu").migrate_args[-1] == "content"
    # Pre-copy rows measure the classic final step, not the hybrid one tug defaults to.
    assert "--eager" in strategy("precopy-qemu").migrate_args and "--eager" not in strategy("hybrid-qemu").migrate_args
    assert strategy("precopy-default").migrate_args == ("--strategy", "precopy")  # what a user gets


@pytest.mark.parametrize(
    ("spec", "kind", "policy", "tracker"),
    [
        ("precopy:max-iter=3", "precopy", "max-iter=3", "content"),
        ("hybrid:downtime=30ms", "hybrid", "downtime=30ms", "content"),
        ("hybrid-uffd:downtime=30ms", "hybrid", "downtime=30ms", "uffd"),
        ("precopy-uffd:phaul(max-iters=2)", "precopy", "phaul(max-iters=2)", "uffd"),
    ],
)
def test_ad_hoc_policy_with_or_without_a_tracker(spec: str, kind: str, policy: str, tracker: str) -> None:
    s = strategy(spec)
    assert s.name == spec
    eager = ("--eager",) if kind == "precopy" else ()
    assert s.migrate_args == ("--strategy", kind, *eager, "--policy", policy, "--tracker", tracker)


@pytest.mark.parametrize("spec", ["precopy:", "hybrid-soft:qemu", "postcopy:qemu", "nope"])
def test_unknown_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        strategy(spec)
