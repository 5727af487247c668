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
