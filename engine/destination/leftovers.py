"""Processes of a container that runc does not know about.

A ``criu restore`` that was cancelled or killed can leave CRIU's own
processes (``criu: restore``) in the container's cgroup, where runc cannot
see them; a later restore of the same name then fails or, worse, finishes
after the rollback. Cleanup therefore empties the cgroup itself
(:mod:`tug.engine.runtime.cgroup`).
"""

from __future__ import annotations

import logging

from tug.engine.hostcfg import HostConfig
from tug.engine.runtime.cgroup import kill_container_cgroups

log = logging.getLogger("tug.agent")


async def kill_cgroup_of(host: HostConfig, container: str) -> int:
    """Kill every process left in ``container``'s cgroups here; returns how many."""
    done = await kill_container_cgroups(container, host.cgroup_parent)
    if done.killed:
        log.warning("killed %d process(es) left in the cgroup of %s", len(done.killed), container)
    if not done.ok:
        log.error("cgroup of %s not emptied: %s", container, done.describe())
    return len(done.killed)
