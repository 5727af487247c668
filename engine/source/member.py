"""One container of the group a migration moves, and what the group decides.

A migration moves a group of containers as one: one freeze of every member,
one commit point, one rollback (the pods issue adds the namespaces members
share; today each member is a container of its own). The driver runs the
phases over the group; what it keeps per container lives in :class:`Member`,
so a second member adds no attribute and no branch to the driver.

The one-copy rule over a group (:func:`group_destination`): the source
resumes only if no member's copy can have run on the destination. One member
that ran keeps every member frozen here: a group is moved, or undone, whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tug.engine.criu.pageserver import RemotePageServer
from tug.engine.errors import ConfigError
from tug.engine.runtime.endpoint import SourceEndpoint
from tug.engine.runtime.freezer import Freezer
from tug.engine.runtime.network import EndpointSpec
from tug.engine.source.rollback import Destination
from tug.engine.source.strategies import Strategy
from tug.engine.volumes import Volume

#: The most containers one migration moves (a pod's members, say).
MAX_MEMBERS = 32


@dataclass(slots=True, eq=False)
class Member:
    name: str
    #: One strategy object per member: trackers, dumps and page servers
    #: work on one container's process tree.
    strategy: Strategy
    #: This member's work dir on the source (images, CRIU's work files).
    work: Path
    bundle: Path | None = None
    #: The rootfs as runc sees it.
    rootfs: Path | None = None
    config_raw: bytes = b""
    endpoint: EndpointSpec | None = None
    #: The member's network endpoint here, lock made ready before the freeze.
    net: SourceEndpoint | None = None
    #: The destination's page server for the frozen dump, when streaming.
    final_ps: RemotePageServer | None = None
    #: Frozen here (set before the pause call: a half-done pause is undone too).
    paused: bool = False
    #: Its freezer cgroup (runtime/freezer.py), found just before the freeze.
    freezer: Freezer | None = None
    #: What the source knows of the destination's copy (source/rollback.py).
    dest: Destination = Destination.UNTOUCHED
    #: Whether the destination restores it lazily (decided in pre-checkpoint).
    lazy: bool = False
    #: Running on the destination, its memory still arriving (Phase.FILL).
    filling: bool = False
    #: Whether the agent rebuilds pages images from its store.
    rebuild_pages: bool = False
    #: Its processes held file locks at the freeze (dumped and restored with them).
    file_locks: bool = False
    #: The member whose network namespace it joins (a pod: source/pod.py).
    netns_of: str | None = None
    #: The group's first member in its shared IPC namespace (a pod: source/pod.py).
    ipc_of: str | None = None
    #: Its host mounts and how each moves (tug.engine.volumes).
    volumes: list[Volume] = field(default_factory=list)
    #: Bytes each copied volume sent, by its path inside the container.
    volume_bytes: dict[str, int] = field(default_factory=dict)


def check_group(names: Sequence[str]) -> list[str]:
    """The containers to move, as a list: at least one, each once."""
    group = list(names)
    if not group:
        raise ConfigError("no container to migrate")
    if len(group) > MAX_MEMBERS:
        raise ConfigError(f"{len(group)} containers in one migration; tug moves at most {MAX_MEMBERS} as a group")
    seen: set[str] = set()
    for name in group:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"invalid container name {name!r}")
        if name in seen:
            raise ConfigError(f"container {name!r} is named twice")
        seen.add(name)
    return group


#: The order of what the source knows, from most to least permissive.
_RANK = {Destination.UNTOUCHED: 0, Destination.UNKNOWN: 1, Destination.RAN: 2}


def group_destination(members: Sequence[Member]) -> Destination:
    """What the source knows of the group's copy on the destination: the
    worst any member says (one member that ran is the group having run)."""
    worst = Destination.UNTOUCHED
    for m in members:
        if _RANK[m.dest] > _RANK[worst]:
            worst = m.dest
    return worst
