"""Pods: containers that share a network namespace move together, or not at all.

A pod here is a container holding a network namespace tug manages (its
endpoint: address, MAC, connections) and the containers whose config joins
that namespace by path. runc and CRIU treat a namespace joined by path as
external: each member's dump leaves it out and its restore joins it again,
so on the destination the holder's endpoint is recreated once and every
member's config is pointed at it.

The rules, checked before anything changes:

- a member joining a namespace must move with the container that holds it
  (else it would lose its network on the source, or join nothing there);
- a holder must move with every container that joins its namespace (else
  they would be left in a namespace the commit deletes): ``--pod`` adds
  them, naming a holder alone is refused;
- holders are prepared on the destination before the members that join
  them (their namespace must exist there), and restored after them
  (source/window.py: the holder's restore brings the pod's link up).

A pod's members may share an IPC namespace too (the holder's, joined by
path): found by the namespace's identity (runtime/ipcns.py), it must move
whole like a network namespace, and the destination recreates it once
(each member gets ``ipc_of``: the group's first member in that namespace).
Its SysV objects are made there by the first member's restore; a later
member's attached segments are mapped by tug (destination/sysvattach.py).

Sharing other namespaces (UTS, PID, ...) between containers is refused:
CRIU would dump them with every member and restore them as copies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tug.engine.errors import PreconditionError
from tug.engine.runtime import ipcns
from tug.engine.runtime import network as netif
from tug.engine.runtime.runc import Runc

#: Namespaces a container may not share with another by path (see the module doc).
UNSHAREABLE = ("uts", "pid", "mount", "cgroup", "user")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sharing:
    """Which running container on this host joins which network namespace."""

    #: container -> the network namespace path its config joins (only those that join one).
    joins: Mapping[str, str]
    #: container -> its own endpoint's namespace path (only those tug manages one for).
    holds: Mapping[str, str]
    #: container -> the inode of its IPC namespace (only those not in the host's).
    ipc: Mapping[str, int] = field(default_factory=dict)

    def ipc_peers_of(self, name: str) -> list[str]:
        """The other containers in ``name``'s IPC namespace."""
        ino = self.ipc.get(name)
        return sorted(c for c, i in self.ipc.items() if ino is not None and i == ino and c != name)

    def holder_of(self, name: str) -> str | None:
        path = self.joins.get(name)
        if path is None:
            return None
        return next((h for h, p in self.holds.items() if p == path and h != name), None)

    def joiners_of(self, name: str) -> list[str]:
        path = self.holds.get(name)
        return sorted(c for c, p in self.joins.items() if path is not None and p == path and c != name)


async def read_sharing(runc: Runc, netns_path: Callable[[str], Path | None]) -> Sharing:
    """Every running or paused container's network namespace on this host.

    ``netns_path(name)`` is where tug keeps ``name``'s endpoint namespace
    (None: no bridge here, so nothing holds one).
    """
    joins: dict[str, str] = {}
    holds: dict[str, str] = {}
    ipc: dict[str, int] = {}
    host_ipc = ipcns.host_inode()
    for st in await runc.containers():
        if st.status not in ("running", "paused"):
            continue
        ino = ipcns.inode_of(st.pid) if st.pid else None
        if ino is not None and ino != host_ipc:
            ipc[st.id] = ino
        spec = _read_config(st.bundle)
        if spec is None:
            continue
        path = netif.netns_path_in_spec(spec)
        if path is None:
            continue
        own = netns_path(st.id)
        if own is not None and netif.load_spec(st.bundle) is not None and str(own) == path:
            holds[st.id] = path
        else:
            joins[st.id] = path
    return Sharing(joins=joins, holds=holds, ipc=ipc)


def _read_config(bundle: Path) -> dict[str, Any] | None:
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def shared_namespaces(name: str, spec: Mapping[str, Any]) -> list[str]:
    """The namespaces other than the network one that ``name``'s config joins by path."""
    out = []
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") in UNSHAREABLE and ns.get("path"):
            out.append(f"{ns['type']} ({ns['path']})")
    return out


def expand_pods(names: Iterable[str], sharing: Sharing) -> list[str]:
    """``names`` and every container joining the network namespace of one of
    them, or sharing its IPC namespace (and theirs, and so on)."""
    out = list(names)
    for name in out:  # grows while it runs: a peer's peers are added too
        for other in [*sharing.joiners_of(name), *sharing.ipc_peers_of(name)]:
            if other not in out:
                out.append(other)
    return out


def check_pods(group: list[str], sharing: Sharing) -> dict[str, str]:
    """The group's network namespace holders (member -> holder, for those that
    join one), or a clear error if the group splits a pod."""
    holders: dict[str, str] = {}
    for name in group:
        if name in sharing.joins:
            holder = sharing.holder_of(name)
            if holder is None:
                continue  # not a namespace of tug's: inspect_container refuses it with its own words
            if holder not in group:
                raise PreconditionError(
                    f"container {name!r} joins the network namespace of {holder!r}, which this migration does not "
                    f"move: migrate them together ('tug migrate {holder} --pod' or name both); nothing was changed"
                )
            holders[name] = holder
        left = [j for j in sharing.joiners_of(name) if j not in group]
        if left:
            raise PreconditionError(
                f"container(s) {', '.join(repr(j) for j in left)} join the network namespace of {name!r}: moving "
                f"{name!r} without them would leave them without a network. Migrate the pod whole "
                f"('tug migrate {name} --pod' or name them all); nothing was changed"
            )
    for name in group:
        outside = [c for c in sharing.ipc_peers_of(name) if c not in group]
        if outside:
            raise PreconditionError(
                f"container {name!r} shares its IPC namespace with {', '.join(repr(c) for c in outside)}, which this "
                f"migration does not move: their SysV objects are one, so they move together ('tug migrate {name} "
                "--pod' or name them all); nothing was changed"
            )
    return holders


def ipc_sets(group: list[str], sharing: Sharing) -> dict[str, str]:
    """Member -> the group's first member in its IPC namespace, for every member
    sharing one with another member (the name its namespace gets on the destination)."""
    out: dict[str, str] = {}
    for name in group:
        peers = [c for c in sharing.ipc_peers_of(name) if c in group]
        if peers:
            out[name] = min([name, *peers], key=group.index)
    return out


def restore_order(group: list[str], holders: Mapping[str, str]) -> list[str]:
    """Holders before the members that join their namespace (the order the
    destination prepares them in); otherwise as given."""
    first = [n for n in group if n not in holders]
    return first + [n for n in group if n in holders]
