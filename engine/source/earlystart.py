"""Before the freeze: runc on both hosts started, CRIU held at its gates (criu/gate.py).

The frozen dump's runc starts on the source (the lazy dumps of post-copy and
hybrid start theirs in their ``prepare_final``), and for a lone runc
container the destination starts its ``runc restore`` too
(destination/prestart.py): what runc does before CRIU runs (25-40 ms a side
here) is then out of the frozen window. Each waits until the window lets it
go; whatever fails here before the freeze costs the window that time, never
the migration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tug.engine.errors import MigrationError, TransportError
from tug.engine.options import MigrationOptions
from tug.engine.runtime.podmanrunc import PodmanRunc
from tug.engine.runtime.runc import Runc
from tug.engine.source.member import Member
from tug.transports.session import Session


async def start_early(
    runc: Runc, session: Session, members: list[Member], opts: MigrationOptions, timeout: float,
    note: Callable[..., Any],
) -> None:
    for m in members:
        if not m.strategy.dump_keeps_serving:
            await runc.prestart_checkpoint(
                m.name, image_dir=m.work / "images", work_dir=m.work / "criu",
                page_server=m.strategy.final_dump_target(m.final_ps.address if m.final_ps is not None else None),
                parent_path=m.strategy.final_parent, timeout=timeout,
            )
    if len(members) == 1 and not isinstance(runc, PodmanRunc):
        await _prestart_restore(session, members[0], opts, note)


async def _prestart_restore(session: Session, m: Member, opts: MigrationOptions, note: Callable[..., Any]) -> None:
    """The destination starts its runc restore now; refused, the restore runs as usual.

    runc wrote descriptors.json, the one image ``runc restore`` reads before
    CRIU, from its own state before it started the dump's CRIU: it is there
    once the dump waits at its gate.
    """
    descriptors = m.work / "images" / "descriptors.json"
    if not descriptors.is_file():  # (runc ended before its gate: the dump runs in the window)
        return
    try:
        await session.call("restore_prestart", container=m.name, descriptors=descriptors.read_bytes(),
                           tcp_close=opts.tcp_close, lazy=m.lazy, criu_opts=list(opts.criu_opts) or None)
    except TransportError:
        raise
    except MigrationError as exc:
        note(f"the destination did not start its runc restore early ({exc}): it starts in the frozen window")
