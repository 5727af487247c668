"""Convergence policies for iterative pre-copy: when to stop iterating.

Pure functions of the round history; see ``base`` for the vocabulary,
``rules`` for single criteria and combinators, ``presets`` for published
rules (p.haul, Incus, QEMU) and ``parse`` for the text form.
"""

from .base import Action, ConvergencePolicy, Decision, RoundStats
from .parse import PolicySpecError, parse_policy
from .presets import PRESETS, QEMU_DEFAULT_DOWNTIME_MS, Incus, PHaul, incus, phaul, qemu
from .rules import (
    AbortIfDiverging,
    AllOf,
    AnyOf,
    DowntimeBudget,
    MaxDirtyGrowth,
    MaxIterations,
    MinDirtyPages,
    SkipGoal,
    all_of,
    any_of,
)

__all__ = [
    "PRESETS",
    "QEMU_DEFAULT_DOWNTIME_MS",
    "AbortIfDiverging",
    "Action",
    "AllOf",
    "AnyOf",
    "ConvergencePolicy",
    "Decision",
    "DowntimeBudget",
    "Incus",
    "MaxDirtyGrowth",
    "MaxIterations",
    "MinDirtyPages",
    "PHaul",
    "PolicySpecError",
    "RoundStats",
    "SkipGoal",
    "all_of",
    "any_of",
    "incus",
    "parse_policy",
    "phaul",
    "qemu",
]
