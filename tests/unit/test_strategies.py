"""The strategy registry: every name the API offers has an implementation,
options are checked at construction, and the driver's questions have the
answers each strategy's design says."""

from __future__ import annotations

import pytest

from tug.engine.api import STRATEGIES
from tug.engine.errors import ConfigError
from tug.engine.options import MigrationOptions
from tug.engine.source import strategies
from tug.engine.source.strategies import RestoreMode


def test_every_offered_strategy_is_registered() -> None:
    assert set(STRATEGIES) == set(strategies.REGISTRY)


def test_unknown_strategy_and_bad_policy_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown strategy"):
        strategies.create(MigrationOptions(strategy="teleport"))
    with pytest.raises(ConfigError, match="bad --policy"):
        strategies.create(MigrationOptions(strategy="precopy", policy="max-iter=banana"))


def test_stop_copy_answers() -> None:
    s = strategies.create(MigrationOptions(strategy="stop-copy"))
    assert not s.has_rounds and s.dump_to_destination and s.page_server_early and s.final_parent is None
    assert not strategies.create(MigrationOptions(strategy="stop-copy", stream_dump=False)).dump_to_destination
    assert s.restore_mode(True) is RestoreMode.LAZY_LOCAL and s.restore_mode(False) is RestoreMode.EAGER


def test_precopy_has_rounds_and_starts_no_page_server_before_them() -> None:
    s = strategies.create(MigrationOptions(strategy="precopy", policy="phaul"))
    assert s.has_rounds and not s.page_server_early and s.tracker is None  # chosen in preflight


def _resolved(lazy_possible: bool = True, **kw: object) -> tuple[str, str | None]:
    cls, note = strategies.resolve(MigrationOptions(**kw), lazy_possible=lazy_possible)  # type: ignore[arg-type]
    return cls.__name__, note


def test_precopy_ends_as_hybrid_where_hybrid_can_run() -> None:
    name, note = _resolved(strategy="precopy")
    assert name == "Hybrid" and note is not None and "--eager" in note
    for tracker in ("auto", "content", "uffd"):
        assert _resolved(strategy="precopy", tracker=tracker)[0] == "Hybrid"


@pytest.mark.parametrize(("kw", "why", "cls"), [
    ({"eager": True}, None, "PushedPrecopy"),
    ({"eager": True, "tracker": "uffd"}, None, "PushedPrecopy"),
    ({"eager": True, "tracker": "soft-dirty"}, None, "Precopy"),
    ({"lazy_restore": False}, "--no-lazy-restore", "PushedPrecopy"),
    ({"lazy_possible": False}, "no userfaultfd", "PushedPrecopy"),
    ({"tracker": "soft-dirty"}, "soft-dirty", "Precopy"),
])
def test_precopy_stays_eager_and_says_why(kw: dict[str, object], why: str | None, cls: str) -> None:
    """The eager step is pushed from the frozen processes (a group's too, each
    member from its own); soft-dirty's (whose pre-dumps never reach the page
    store) is CRIU's."""
    name, note = _resolved(strategy="precopy", **kw)
    assert name == cls
    if why is None:
        assert note is None  # asked for: nothing to explain
    else:
        assert note is not None and note.startswith("precopy restores eagerly") and why in note
        assert ("pushed from the frozen processes" in note) == (cls == "PushedPrecopy")


def test_pushed_precopy_answers() -> None:
    """Reported as precopy; every page on the destination before its processes run
    (lazily from the local store where it can); its dump holds the processes until
    the push ends and serves no fill; nothing to relay."""
    from tug.engine.source.strategies.pushed import PushedPrecopy

    s = PushedPrecopy(MigrationOptions(strategy="precopy", eager=True))
    assert s.name == "precopy" and s.has_rounds and s.dump_keeps_serving and not s.serves_fill
    assert not s.dump_to_destination
    assert s.restore_mode(True) is RestoreMode.LAZY_LOCAL and s.restore_mode(False) is RestoreMode.EAGER
    assert s.relayed() == []


@pytest.mark.parametrize("strategy", ["stop-copy", "postcopy", "hybrid"])
def test_other_strategies_run_as_named(strategy: str) -> None:
    cls, note = strategies.resolve(MigrationOptions(strategy=strategy), lazy_possible=False)
    assert (cls.name, note) == (strategy, None)


@pytest.mark.parametrize("strategy", ["stop-copy", "postcopy", "hybrid"])
def test_eager_is_refused_where_there_is_no_choice(strategy: str) -> None:
    with pytest.raises(ConfigError, match="--eager chooses how --strategy precopy ends"):
        strategies.create(MigrationOptions(strategy=strategy, eager=True))
    assert strategies.create(MigrationOptions(strategy="precopy", eager=True)).name == "precopy"


@pytest.mark.parametrize(
    ("requested", "soft_dirty", "uffd_works", "allow", "picked"),
    [
        ("auto", True, True, True, "soft-dirty"),  # pre-copy: soft-dirty first
        ("auto", True, True, False, "uffd"),  # hybrid: never soft-dirty
        ("auto", False, True, True, "uffd"),
        ("auto", False, False, True, "content"),
        ("auto", True, False, False, "content"),
        ("content", True, True, True, "content"),
        ("uffd", True, True, False, "uffd"),
    ],
)
async def test_tracker_choice(monkeypatch: pytest.MonkeyPatch, requested: str, soft_dirty: bool, uffd_works: bool,
                              allow: bool, picked: str) -> None:
    """What the kernel offers (faked here: the choice itself is the logic under test)."""
    from tug.engine.source.strategies import precopy

    async def has_feature(name: str) -> bool:
        return soft_dirty

    async def probe() -> str | None:
        return None if uffd_works else "no PAGEMAP_SCAN"

    monkeypatch.setattr(precopy.criu, "has_feature", has_feature)
    monkeypatch.setattr(precopy, "uffd_probe", probe)
    assert await precopy.choose_tracker(requested, allow_soft_dirty=allow) == picked
