"""What a benchmark session runs: strategies x workloads x links x repetitions.

Strategies are data, not code paths: an ``engine`` strategy is a set of extra
``tug migrate`` arguments, a ``baseline`` names a function in
:mod:`bench.baselines`. Adding post-copy or a hybrid later is one entry in
:data:`STRATEGIES` (or ``--strategies precopy:max-iter=4`` for an ad-hoc
policy spec) and nothing else changes.

Cases are ordered link -> size -> rate -> rep -> strategy so that

* link shaping (lab-wide, and visible to anyone else using the lab) changes
  as rarely as possible, and
* the strategies being compared run back to back on the same machine state,
  in an order rotated per repetition, so slow drift (page cache, another
  user's load) does not systematically favour whichever runs first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PAGE_BYTES = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class Strategy:
    """One way of moving a container, compared with the others in a session."""

    name: str
    kind: Literal["engine", "baseline"]
    #: engine: extra arguments for ``tug migrate`` (besides NAME --to URL --json).
    migrate_args: tuple[str, ...] = ()
    #: baseline: key into :data:`bench.baselines.BASELINES`.
    baseline: str | None = None
    doc: str = ""


def _hybrid(policy: str, tracker: str = "content", name: str = "") -> Strategy:
    return Strategy(
        name=name or (f"hybrid-{policy}" if "=" not in policy else f"hybrid:{policy}"),
        kind="engine",
        migrate_args=("--strategy", "hybrid", "--policy", policy, "--tracker", tracker),
        doc=f"tug hybrid: pre-copy rounds ({tracker} tracker, policy {policy!r}), then a lazy final step "
        "served from the destination's page store where the frozen source confirms a page unchanged",
    )


def _precopy(policy: str, tracker: str = "content", name: str = "") -> Strategy:
    return Strategy(
        name=name or (f"precopy-{policy}" if "=" not in policy else f"precopy:{policy}"),
        kind="engine",
        # --eager: the row measures pre-copy's classic final step; without it
        # tug would end it as hybrid (the hybrid-* rows).
        migrate_args=("--strategy", "precopy", "--eager", "--policy", policy, "--tracker", tracker),
        doc=f"tug pre-copy, eager final step, {tracker} tracker, convergence policy {policy!r}",
    )


#: Every known strategy, in the order tables and plots list them. The anchor
#: (``naive``) comes first: every other row is compared against it.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(name="naive", kind="baseline", baseline="naive",
                 doc="by hand: runc checkpoint (kills), rsync -a images + bundle over ssh, runc restore -d"),
        Strategy(name="stop-copy", kind="engine", migrate_args=("--strategy", "stop-copy"),
                 doc="tug stop-copy: freeze, dump, send, restore, commit"),
        Strategy(name="podman-export", kind="baseline", baseline="podman-export",
                 doc="podman's own route by hand (--runtime podman only): checkpoint --export, copy, restore --import"),
        Strategy(name="naive-mux", kind="baseline", baseline="naive-mux",
                 doc="naive with one multiplexed ssh connection opened before the checkpoint (opt-in)"),
        Strategy(name="postcopy", kind="engine", migrate_args=("--strategy", "postcopy"),
                 doc="tug post-copy: freeze, dump all but memory, restore at once; memory fetched from the frozen source"),
        _precopy("phaul"),
        _precopy("incus"),
        _precopy("qemu"),
        _precopy("phaul", "uffd", "precopy-uffd"),
        _hybrid("phaul"),
        _hybrid("incus"),
        _hybrid("qemu"),
        _hybrid("qemu", "uffd", "hybrid-uffd"),
        Strategy(name="precopy-default", kind="engine", migrate_args=("--strategy", "precopy"),
                 doc="what --strategy precopy runs with no other option: hybrid where it can (tracker auto, "
                 "policy phaul), else eager; the report's strategy says which"),
    )
}

#: What a session compares unless --strategies says otherwise. naive-mux is
#: opt-in: the brief's anchor is plain naive.
DEFAULT_STRATEGIES: tuple[str, ...] = ("naive", "stop-copy", "postcopy", "precopy-phaul", "precopy-incus", "precopy-qemu")


#: ``precopy:<spec>``, ``hybrid-uffd:<spec>``: an ad-hoc policy, with the tracker named or the content one.
_ADHOC = re.compile(r"^(precopy|hybrid)(?:-(content|uffd))?:(.+)$")


def strategy(spec: str) -> Strategy:
    """A strategy by name, or ``precopy[-TRACKER]:<policy spec>`` / ``hybrid[-TRACKER]:<policy spec>``."""
    if spec in STRATEGIES:
        return STRATEGIES[spec]
    m = _ADHOC.match(spec)
    if m is not None:
        kind, tracker, policy = m.group(1), m.group(2), m.group(3)
        make = _precopy if kind == "precopy" else _hybrid
        return make(policy, tracker or "content", spec)
    raise ValueError(f"unknown strategy {spec!r} (known: {', '.join(STRATEGIES)}, "
                     "or precopy[-uffd]:<policy spec>, hybrid[-uffd]:<policy spec>)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """Lab-wide link shaping: what ``tug lab up --rate/--delay`` is given."""

    rate: str | None = None
    delay: str | None = None

    @property
    def name(self) -> str:
        base = self.rate or "unlimited"
        return f"{base}+{self.delay}" if self.delay else base

    def up_args(self) -> list[str]:
        args: list[str] = []
        if self.rate:
            args += ["--rate", self.rate]
        if self.delay:
            args += ["--delay", self.delay]
        return args


def link(spec: str) -> Link:
    """``unlimited``, ``1gbit``, ``10gbit``, ``1gbit+1ms``, ``unlimited+5ms``."""
    rate, _, delay = spec.partition("+")
    if not rate:
        raise ValueError(f"bad link {spec!r}")
    return Link(rate=None if rate in ("unlimited", "none", "0") else rate, delay=delay or None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """Knobs of ``tug lab demo``: memory size, dirtying rate, hot set."""

    memory_mib: int
    dirty_rate: int  # pages per second
    hot_set: float

    @property
    def dirty_mb_s(self) -> float:
        """Nominal dirtying bandwidth, MB/s (10^6 bytes)."""
        return self.dirty_rate * PAGE_BYTES / 1e6


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One run: a strategy applied once to a fresh container."""

    index: int
    strategy: Strategy
    workload: Workload
    link: Link
    rep: int

    def label(self) -> str:
        w = self.workload
        return f"{self.strategy.name} {w.memory_mib}MiB {w.dirty_rate}pg/s {self.link.name} rep{self.rep + 1}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The whole session: every axis, expanded into ordered cases by :meth:`cases`."""

    preset: str
    sizes: tuple[int, ...]
    rates: tuple[int, ...]
    hot_set: float
    links: tuple[Link, ...]
    strategies: tuple[Strategy, ...]
    reps: int

    def cases(self) -> list[Case]:
        out: list[Case] = []
        n = len(self.strategies)
        for lk in self.links:
            for size in self.sizes:
                for rate in self.rates:
                    w = Workload(memory_mib=size, dirty_rate=rate, hot_set=self.hot_set)
                    for rep in range(self.reps):
                        for k in range(n):
                            s = self.strategies[(k + rep) % n]  # rotate the order per rep
                            out.append(Case(index=len(out), strategy=s, workload=w, link=lk, rep=rep))
        return out

    def describe(self) -> str:
        return (
            f"{self.preset}: sizes {list(self.sizes)} MiB, rates {list(self.rates)} pages/s "
            f"(hot set {self.hot_set:g}), links {[lk.name for lk in self.links]}, "
            f"strategies {[s.name for s in self.strategies]}, {self.reps} rep(s): {len(self.cases())} runs"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    sizes: tuple[int, ...]
    rates: tuple[int, ...]
    links: tuple[str, ...]
    reps: int


#: quick: a few minutes, enough to see the shape. full: the matrix.
PRESETS: dict[str, Preset] = {
    "quick": Preset(sizes=(64, 256), rates=(1000,), links=("unlimited", "1gbit"), reps=1),
    "full": Preset(sizes=(64, 256, 1024), rates=(0, 1000, 10000), links=("unlimited", "1gbit", "10gbit"), reps=3),
}

DEFAULT_HOT_SET = 0.1


def plan(
    preset: str,
    *,
    sizes: tuple[int, ...] | None = None,
    rates: tuple[int, ...] | None = None,
    hot_set: float | None = None,
    links: tuple[str, ...] | None = None,
    strategies: tuple[str, ...] | None = None,
    reps: int | None = None,
) -> Plan:
    """A preset with any axis narrowed or replaced from the command line."""
    p = PRESETS[preset]
    chosen = tuple(strategy(s) for s in (strategies or DEFAULT_STRATEGIES))
    if len({s.name for s in chosen}) != len(chosen):
        raise ValueError("a strategy is listed twice")
    out = Plan(
        preset=preset,
        sizes=sizes or p.sizes,
        rates=rates if rates is not None else p.rates,
        hot_set=DEFAULT_HOT_SET if hot_set is None else hot_set,
        links=tuple(link(s) for s in (links or p.links)),
        strategies=chosen,
        reps=reps if reps is not None else p.reps,
    )
    if not 0 < out.hot_set <= 1:
        raise ValueError("--hot-set must be in (0, 1]")
    if out.reps < 1 or any(s < 1 for s in out.sizes) or any(r < 0 for r in out.rates):
        raise ValueError("sizes and reps must be >= 1, rates >= 0")
    return out
