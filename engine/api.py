"""The library API: ``await tug.engine.migrate(container, destination)``.

Everything the CLI does goes through here, so a Python program gets the same
validation, progress events, rollback and report as a terminal user.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tug.engine.events import Event, MigrationReport
from tug.engine.hostcfg import HostConfig
from tug.policies import ConvergencePolicy

STRATEGIES = ("stop-copy", "precopy")

#: Seconds each phase may take before the migration is rolled back.
DEFAULT_TIMEOUTS: Mapping[str, float] = {
    "pre-checkpoint": 300.0,
    "pre-restore": 60.0,
    "precopy": 1800.0,
    "checkpoint": 300.0,
    "transfer": 1800.0,
    "restore": 300.0,
    "commit": 60.0,
    "rollback": 120.0,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationOptions:
    strategy: str = "stop-copy"
    #: SSH private key; default: TUG_SSH_IDENTITY, else asyncssh's defaults (~/.ssh/id_*).
    identity: Path | None = None
    #: known_hosts file checked against the destination's host key
    #: (default: TUG_SSH_KNOWN_HOSTS, else ~/.ssh/known_hosts). Never skipped.
    known_hosts: Path | None = None
    #: Command that starts the agent on the destination; default: this
    #: interpreter's path with ``-m tug.engine.destination.agent`` (same install layout).
    agent_command: str | None = None
    connect_timeout: float = 15.0
    timeouts: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    #: precopy only: when to stop iterating. A policy object (anything with
    #: ``decide(history)``) or a spec string such as "phaul" or "max-iter=8,min-dirty=64".
    policy: ConvergencePolicy | str = "phaul"
    #: precopy only: how dirty pages are found: auto | content | soft-dirty.
    tracker: str = "auto"
    #: stop-copy: stream the frozen dump's memory straight to a CRIU page
    #: server on the destination (through an SSH forward) while CRIU dumps,
    #: instead of dumping to local files and sending them afterwards: dump
    #: and transfer overlap inside the frozen window. Needs TCP forwarding in
    #: the destination's sshd. Pre-copy ignores it: the content tracker needs
    #: the local dump, the soft-dirty tracker always streams.
    stream_dump: bool = True
    #: Established TCP connections are always checkpointed (TCP repair) and,
    #: by default, restored intact. With tcp_close they are restored closed:
    #: for clients that reconnect anyway, and cheaper than a repair.
    tcp_close: bool = False
    #: Restore lazily: the destination's processes run before their memory is
    #: in place and a local ``criu lazy-pages`` daemon fills it (the pages are
    #: already on the destination); commit waits until it is full. Falls back
    #: to an eager restore, with a note, where userfaultfd is missing.
    lazy_restore: bool = True
    #: Testing only: make a step fail for real (e.g. "corrupt-images" damages
    #: the images on the destination so that CRIU's restore fails).
    fault: str | None = None
    host: HostConfig | None = None

    def timeout(self, phase: str) -> float:
        return self.timeouts.get(phase, DEFAULT_TIMEOUTS.get(phase, 300.0))


async def migrate(
    container: str,
    destination: str,
    *,
    options: MigrationOptions | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> MigrationReport:
    """Live-migrate ``container`` (running on this host) to ``destination``.

    ``destination`` is ``ssh://user@host[:port]``. Returns the report of a
    migration that completed. Raises a :class:`~tug.engine.errors.MigrationError`
    otherwise; its ``report`` attribute (when set) tells whether the source was
    resumed (``outcome == "rolled-back"``) and what happened up to then.
    """
    from tug.engine.source.migration import Migration

    opts = options or MigrationOptions()
    return await Migration(container, destination, opts, on_event).run()


def migrate_sync(container: str, destination: str, **kwargs: object) -> MigrationReport:
    """Blocking wrapper for scripts that have no event loop of their own."""
    return asyncio.run(migrate(container, destination, **kwargs))  # type: ignore[arg-type]


__all__ = ["migrate", "migrate_sync", "MigrationOptions", "MigrationReport", "STRATEGIES", "DEFAULT_TIMEOUTS"]
