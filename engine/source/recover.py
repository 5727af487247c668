"""``tug recover``: finish or undo a migration that a failure left frozen.

When a migration fails after the destination's copy may have run (the
one-copy rule, :mod:`tug.engine.source.rollback`), or when ``tug migrate``
itself was killed, the source is left frozen behind its network lock. Run on
the source host, recover looks at both hosts and does the one safe thing:

========================  ====================  =============================
destination               source                action
========================  ====================  =============================
runs the container        frozen or gone        finish: delete the source and
                                                its endpoint; the destination
                                                adopts its copy
does not run it           frozen                undo: remove the destination's
                                                leftovers, resume the source,
                                                lift its network lock
does not run it           runs                  clean: the destination's
                                                leftovers go
runs it                   runs                  refuse: two copies (stop one)
does not run it           gone                  refuse: it runs nowhere
========================  ====================  =============================

A group's member restored before the group's last one is held there with its
processes stopped (never run) until that last one is in; recover finishes it
if the last one runs on the destination, and undoes it otherwise (removing
what the destination holds of the last one first, so that a restore still in
flight cannot change the answer).

Nothing is decided from a guess: a destination that cannot be reached is an
error, and both stay as they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tug.engine.errors import ConfigError, MigrationError
from tug.engine.fsutil import remove_tree
from tug.engine.hostcfg import HostConfig
from tug.engine.options import MigrationOptions
from tug.engine.runtime import network as netif
from tug.engine.runtime.endpoint import SourceEndpoint
from tug.engine.runtime.runc import Runc
from tug.engine.source import podmansrc
from tug.engine.source.container import open_session, retire_source
from tug.engine.source.lazydump import release_from_dump
from tug.transports import protocol as p
from tug.transports.ssh import parse_url


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoverReport:
    container: str
    #: finished | undone | cleaned | nothing
    action: str
    source_before: str | None
    destination_before: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "container": self.container, "action": self.action, "source_before": self.source_before,
            "destination_before": self.destination_before, "notes": list(self.notes),
        }


async def recover(container: str, destination: str, *, options: MigrationOptions | None = None) -> RecoverReport:
    opts = options or MigrationOptions()
    host = opts.host or HostConfig.from_env()
    runc = Runc(host.runc_root, log_dir=host.data_dir / "logs")
    target = parse_url(destination)
    notes: list[str] = []

    def note(message: str, level: str = "info") -> None:
        notes.append(message)

    def ignore_notice(ev: p.Notice) -> None:
        notes.append(f"{target.host}: {ev.message}")

    runc, _ = await podmansrc.resolve(runc, [container], opts, check=False)  # podman's: on its OCI state
    src = await runc.state(container)
    if src is not None and src.status == "running" and await release_from_dump(src.pid):
        # A killed tug's lazy dump was still holding it (runc said running).
        notes.append(f"stopped the CRIU dump that still held {container!r} (its processes are frozen again)")
        src = await runc.state(container)
    source = src.status if src is not None else None
    agent, session, _peer = await open_session(target, opts, host, info={"recover": True}, on_notice=ignore_notice)
    try:
        seen = await session.call("inspect", container=container, timeout=60)
        dest = seen.get("status") if isinstance(seen.get("status"), str) else None
        last = seen.get("held_until") if dest == "held" and isinstance(seen.get("held_until"), str) else None
        if last == container:
            last = None  # the group's last, held until its SysV segments were attached: it never ran
        if last is not None:
            # Restored for a group and held stopped until the group's last
            # member was in: it goes the way that member went.
            other = await session.call("inspect", container=last, timeout=60)
            if other.get("status") == "running":
                notes.append(f"{container!r} was held on {target.host} for its group; {last!r} runs there: letting it go")
                dest = "running"
            elif other.get("bundle") or other.get("status") is not None:
                # Not running (never restored, failed, or frozen): the group is
                # undone. What is left of it there goes first, so that no restore
                # still in flight can let it run after this decision.
                await session.call("discard", container=last, timeout=120)
                notes.append(f"removed what {target.host} held of {last!r}, the last of {container!r}'s group")
        if dest == "running":
            if source == "running":
                raise ConfigError(
                    f"{container!r} runs on both {host.name} and {target.host}: two copies; stop the one clients "
                    "should not reach (runc delete --force) and run recover again"
                )
            if src is not None:
                # As after a commit: the source copy, its endpoint and its bundle go.
                ep = await _open_source_endpoint(host, container, src.bundle)
                if not await retire_source(runc, container, host, src.bundle, ep, note):
                    raise MigrationError(f"could not delete the frozen source copy of {container!r}: {notes[-1]}")
                notes.append(f"deleted the frozen source copy of {container!r} and its endpoint")
            await session.call("adopt", container=container, timeout=60)
            action = "finished"
        else:
            if source is None:
                raise ConfigError(
                    f"{container!r} runs nowhere: not on {host.name}, and {target.host} has it {dest or 'not at all'}"
                )
            if seen.get("bundle") or dest is not None or seen.get("migrating"):
                await session.call("discard", container=container, timeout=120)
                notes.append(f"removed what {target.host} held of {container!r}")
            if source == "paused":
                await runc.resume(container)
                assert src is not None
                await _unlock_source(host, container, src.bundle, notes)
                notes.append(f"resumed the source copy of {container!r}")
                action = "undone"
            else:
                action = "cleaned" if notes else "nothing"
        # A killed tug migrate leaves its work dir (images, CRIU's files) behind.
        leftover = host.work_dir / f"{container}.out"
        if leftover.exists():
            remove_tree(leftover)
            notes.append(f"removed {leftover}")
        return RecoverReport(container=container, action=action, source_before=source, destination_before=dest, notes=notes)
    finally:
        with contextlib.suppress(MigrationError):
            await session.close()
        await agent.close()


async def _open_source_endpoint(host: HostConfig, container: str, bundle: Path) -> SourceEndpoint | None:
    """The source's endpoint as tug manages it (opening it clears a crashed run's lock), or None."""
    spec = netif.load_spec(bundle)
    if spec is None or host.network is None:
        return None
    return await SourceEndpoint.open(host.network, container, spec)


async def _unlock_source(host: HostConfig, container: str, bundle: Path, notes: list[str]) -> None:
    """Lift a network lock left engaged (tc redirect, frame sink) and re-announce the MAC."""
    ep = await _open_source_endpoint(host, container, bundle)
    if ep is None:
        return
    try:
        ep.locked = True
        await ep.unlock([])
    finally:
        await ep.close()
    notes.append("lifted the source's network lock")
