"""tug.engine: live migration of runc containers with CRIU.

The public entry point is :func:`tug.engine.migrate`; importing this package
stays cheap because the heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["migrate", "MigrationOptions", "MigrationReport"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tug.engine import api

        return getattr(api, name)
    raise AttributeError(name)
