"""The library API: ``await tug.engine.migrate(container, destination)``.

Everything the CLI does goes through here, so a Python program gets the same
validation, progress events, rollback and report as a terminal user.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from tug.engine.events import Event, MigrationReport
from tug.engine.options import DEFAULT_TIMEOUTS, STRATEGIES, MigrationOptions


async def migrate(
    container: str | Sequence[str],
    destination: str,
    *,
    options: MigrationOptions | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> MigrationReport:
    """Live-migrate ``container`` (running on this host) to ``destination``.

    A list of containers moves as one group: every member frozen together,
    restored in the order given, one commit point and one rollback for all
    of them (no member's source resumes once any member ran there).

    ``destination`` is ``ssh://user@host[:port]``. Returns the report of a
    migration that completed. Raises a :class:`~tug.engine.errors.MigrationError`
    otherwise; its ``report`` attribute (when set) tells whether the source was
    resumed (``outcome == "rolled-back"``) and what happened up to then.
    """
    from tug.engine.source.migration import Migration

    opts = options or MigrationOptions()
    return await Migration(container, destination, opts, on_event).run()


def migrate_sync(container: str | Sequence[str], destination: str, **kwargs: object) -> MigrationReport:
    """Blocking wrapper for scripts that have no event loop of their own."""
    return asyncio.run(migrate(container, destination, **kwargs))  # type: ignore[arg-type]


__all__ = ["migrate", "migrate_sync", "MigrationOptions", "MigrationReport", "STRATEGIES", "DEFAULT_TIMEOUTS"]
