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
from tug.engine.source.strategies.stopcopy import StopCopy

if TYPE_CHECKING:
    from tug.engine.options import MigrationOptions

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (StopCopy, Precopy, Postcopy, Hybrid)}


def create(opts: MigrationOptions) -> Strategy:
    """The strategy ``opts`` names, its options checked (ConfigError)."""
    cls = REGISTRY.get(opts.strategy)
    if cls is None:
        raise ConfigError(f"unknown strategy {opts.strategy!r} (available: {', '.join(REGISTRY)})")
    return cls(opts)


__all__ = ["REGISTRY", "RestoreMode", "Strategy", "create"]
