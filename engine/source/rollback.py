"""What may happen to the source after a failure: the one-copy rule.

At every instant exactly one copy of the container may run. The source decides
from what it knows of the destination (:class:`Destination`):

- ``UNTOUCHED``: the restore was never sent, so nothing of the container can
  run there. The source resumes first, without waiting for the peer (a dead
  or stuck agent cannot hold it frozen), then the agent is told to discard
  what it received, and the held frames are delivered to the resumed source.
- ``RAN``: the destination's processes ran, so clients may have been answered
  by the new copy. The source never resumes on its own; it stays frozen, and
  its network lock stays engaged after tug exits, until ``tug recover``
  finishes the migration (the destination runs: delete the source) or undoes
  it (the destination's copy is gone: resume the source).
- ``UNKNOWN``: the restore was sent and no answer came. The source asks the
  agent, which cancels a restore still running and says whether the copy
  ran; without an answer both stay frozen (the agent keeps a copy that ran
  and removes one that did not) and the error names the command that decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable
from typing import Any

from tug.engine.errors import MigrationError, RollbackError
from tug.engine.hostcfg import HostConfig
from tug.engine.options import MigrationOptions
from tug.engine.runtime.runc import Runc
from tug.transports.session import Session
from tug.transports.ssh import SshTarget

#: Seconds the agent gets to answer a rollback's abort. The source has
#: resumed already when it asks (UNTOUCHED), so this bounds only how long
#: frames stay held; a dead agent cleans up on its own when its session ends.
ABORT_TIMEOUT = 20.0
#: Seconds a fresh agent gets to remove a dead agent's leftovers.
SWEEP_TIMEOUT = 60.0


class Destination(enum.Enum):
    UNTOUCHED = "untouched"
    UNKNOWN = "unknown"
    RAN = "ran"


def may_resume_source(dest: Destination) -> bool:
    """The rule itself: only a destination that never ran the container lets the source resume."""
    return dest is Destination.UNTOUCHED


async def resume_source(runc: Runc, name: str) -> None:
    """Thaw the frozen source container (a no-op if it already runs)."""
    st = await runc.state(name)
    if st is None:
        raise RollbackError(f"source container {name!r} vanished during the migration")
    if st.status == "paused":
        await runc.resume(name)


async def refreeze_source(runc: Runc, name: str, note: Callable[[str, str], None]) -> None:
    """Make sure the source is frozen by its freezer (after a dump that held it itself)."""
    st = await runc.state(name)
    if st is not None and st.status == "running":
        await runc.pause(name)
        note(f"source container {name!r} was released by its dump and ran: frozen again", "warning")


async def abort_destination(
    session: Session | None, name: str, host: str, note: Callable[[str, str], None], *, timeout: float = ABORT_TIMEOUT
) -> tuple[Destination | None, list[bytes]]:
    """Ask the agent to undo everything it did for ``name``.

    Returns what the agent says of its copy (RAN: it ran and was kept,
    UNTOUCHED: nothing of it runs there any more; None: no answer) and the
    frames it had held, which belong to the source.
    """
    if session is None or session.peer is None:
        return None, []
    try:
        res = await session.call("abort", container=name, timeout=timeout, stream_failures=False)
    except MigrationError as exc:
        note(f"the destination did not confirm the abort ({exc}); its agent removes what did not run when its session ends", "warning")
        return None, []
    # A page server that died on its own (mid-dump, say) explains the
    # dump's failure better than the dumper's "Broken pipe".
    for why in res.get("page_servers") or []:
        note(f"{host}: {why}", "warning")
    frames = res.get("frames", [])
    held = [f for f in frames if isinstance(f, bytes)] if isinstance(frames, list) else []
    return (Destination.RAN if res.get("ran") else Destination.UNTOUCHED), held


def recover_hint(name: str, url: str) -> str:
    return f"tug recover {name} --to {url}"


def frozen_message(dest: Destination, name: str, host: str, url: str, detail: Any = None, *, held_by_group: bool = False) -> str:
    """What the user reads when the source stays frozen, and how to finish.

    ``held_by_group``: this member never ran on ``host`` (``dest`` is the
    group's), but another container of its group may have: it stays frozen
    with the group rather than split it.
    """
    cmd = recover_hint(name, url)
    if held_by_group:
        return (
            f"{name!r} did not run on {host}, but another container of its group {'did' if dest is Destination.RAN else 'may have'}; "
            f"it stays frozen with the group. Run '{cmd}' for each container of the group"
        )
    if dest is Destination.RAN:
        why = f"{name!r} ran on {host}" + (f" ({detail})" if detail else "")
        return (
            f"{why}; the source copy here stays frozen and is never resumed on its own once the new copy has "
            f"run. Run '{cmd}': it deletes the source if {host} runs the container, or resumes it if not"
        )
    return (
        f"whether {name!r} ran on {host} is unknown (no answer); both copies stay frozen. Run '{cmd}' once "
        f"{host} is reachable: it finishes the migration or resumes the source, whichever is safe"
    )


async def finish_uncancelled(aw: asyncio.Future[Any] | asyncio.Task[Any]) -> tuple[Any, bool]:
    """Wait for ``aw`` to the end even if we are cancelled meanwhile.

    A second Ctrl-C or SIGTERM during a rollback must not abandon it halfway
    (a frozen source, a half-removed destination). Returns the result and
    whether a cancellation arrived, which the caller re-raises afterwards.
    """
    cancelled = False
    while True:
        try:
            return await asyncio.shield(aw), cancelled
        except asyncio.CancelledError:
            if aw.done():
                raise
            cancelled = True


async def sweep_destination(
    target: SshTarget, opts: MigrationOptions, host: HostConfig, name: str, note: Callable[[str, str], None]
) -> None:
    """The agent did not answer the abort (killed, link lost): a fresh one
    removes what the migration left there. Best effort and bounded: the
    source runs already, and a later migration or recover sweeps too."""
    from tug.engine.source.container import open_session

    def quiet(ev: Any) -> None:
        pass

    try:
        async with asyncio.timeout(opts.connect_timeout + SWEEP_TIMEOUT):
            agent, session, _ = await open_session(target, opts, host, info={}, on_notice=quiet)
            try:
                await session.call("discard", container=name)
            finally:
                with contextlib.suppress(MigrationError):
                    await session.close()
                await agent.close()
        note(f"removed what the migration had left on {target.host}", "info")
    except (MigrationError, TimeoutError) as exc:
        note(f"could not clean up {target.host} ({exc or 'timed out'}): run '{recover_hint(name, str(target))}'", "warning")
