"""Undoing a migration that failed before its commit point, source side."""

from __future__ import annotations

from collections.abc import Callable

from tug.engine.errors import MigrationError, RollbackError
from tug.engine.runtime.runc import Runc
from tug.transports.session import Session


async def resume_source(runc: Runc, name: str) -> None:
    """Thaw the frozen source container (a no-op if it already runs)."""
    st = await runc.state(name)
    if st is None:
        raise RollbackError(f"source container {name!r} vanished during the migration")
    if st.status == "paused":
        await runc.resume(name)


async def abort_destination(
    session: Session | None, name: str, host: str, note: Callable[[str, str], None]
) -> list[bytes]:
    """Tell the agent to undo everything; returns the frames it had held."""
    if session is None or session.peer is None:
        return []
    try:
        res = await session.call("abort", container=name, timeout=60, stream_failures=False)
        # A page server that died on its own (mid-dump, say) explains the
        # dump's failure better than the dumper's "Broken pipe".
        for why in res.get("page_servers") or []:
            note(f"{host}: {why}", "warning")
    except MigrationError as exc:
        # The agent also cleans up when the session ends; say so, don't fail.
        note(f"destination abort call failed ({exc}); the agent cleans up when the session ends", "info")
        return []
    frames = res.get("frames", [])
    return [f for f in frames if isinstance(f, bytes)] if isinstance(frames, list) else []
