"""What a caller may choose about a migration: :class:`MigrationOptions`.

Its own module (re-exported by :mod:`tug.engine.api`) so that the engine's
parts read the options without importing the API that drives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tug.engine.hostcfg import HostConfig
from tug.policies import ConvergencePolicy

#: The strategies ``--strategy`` accepts (tug.engine.source.strategies.REGISTRY implements each).
STRATEGIES = ("stop-copy", "precopy", "postcopy", "hybrid")

#: Seconds each phase may take before the migration is rolled back.
DEFAULT_TIMEOUTS: Mapping[str, float] = {
    "pre-checkpoint": 300.0,
    "pre-restore": 60.0,
    "precopy": 1800.0,
    "checkpoint": 300.0,
    "transfer": 1800.0,
    "restore": 300.0,
    # The memory of a lazy restore, after the processes run: post-copy moves
    # all of it over the link here (~11 s per GiB at 1 gbit).
    "fill": 3600.0,
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
    #: post-copy and hybrid: how long a link lost during the fill may take to
    #: come back (tug reconnects and the fill resumes) before the migration
    #: fails with both sides frozen for ``tug recover``.
    link_recovery: float = 30.0
    timeouts: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    #: precopy only: when to stop iterating. A policy object (anything with
    #: ``decide(history)``) or a spec string such as "phaul" or "max-iter=8,min-dirty=64".
    policy: ConvergencePolicy | str = "phaul"
    #: precopy only: how dirty pages are found: auto | content | soft-dirty | uffd.
    tracker: str = "auto"
    #: precopy only: keep pre-copy's classic final step (the destination holds
    #: every page before its processes run, so a source lost afterwards
    #: changes nothing). Without it, pre-copy ends as hybrid wherever hybrid
    #: can run (tug.engine.source.strategies.resolve): a frozen window that
    #: no longer grows with memory, but from the destination's processes
    #: running until their memory is filled, the frozen source is still needed.
    eager: bool = False
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
    #: How each host mount of the container moves, by its path inside the
    #: container: ``"/data=shared"``, ``"/data=copy"`` or ``"/data=copy:DESTDIR"``
    #: (see tug.engine.volumes). A host mount not named here refuses the migration.
    volumes: tuple[str, ...] = ()
    #: Extra CRIU options for the destination's restore, each as a line of a
    #: CRIU config file (``"ext-unix-sk"``, ``"skip-in-flight"``). runc
    #: offers no way to pass them to the source's dump.
    criu_opts: tuple[str, ...] = ()
    #: Add to the group every container that joins the network namespace
    #: of a named one (its pod: tug.engine.source.pod).
    pod: bool = False
    #: Whose container it is: "runc" (tug's runc root), "podman" (this host's
    #: podman; the destination's podman owns the result), or "auto": runc's if
    #: runc knows the name, else podman's.
    runtime: str = "auto"
    host: HostConfig | None = None

    def timeout(self, phase: str) -> float:
        return self.timeouts.get(phase, DEFAULT_TIMEOUTS.get(phase, 300.0))
