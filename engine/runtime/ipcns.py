"""IPC namespaces shared by a pod's containers: found by identity, recreated once.

runc and CRIU treat only network and PID namespaces as external. A container
that joins another's IPC namespace by path is dumped with that namespace's
SysV objects (each member's dump holds them all) and CRIU's restore joins
whatever namespace the config names (runc passes ``join-ns ipc:PATH``), then
creates the dumped objects in it again. So on the destination tug makes one
IPC namespace per shared set (a file bind-mounted from ``/proc/PID/ns/ipc``,
as ``ip netns`` does for network namespaces), points every member's config
at it, lets the first member restored there create the objects, and empties
the SysV object images of every later one (they are the same objects: the
whole group was frozen at once), keeping each image's header so that CRIU
reads an empty list.

Sharing is decided by the namespace itself (the inode of ``/proc/PID/ns/ipc``
of each container's init), not by config paths: a path names a process or a
file, the inode names the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tug.engine.errors import MigrationError
from tug.engine.runtime.runc import Runc

_LIBC = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2

#: CRIU images holding an IPC namespace's SysV objects (ipcns-var, its sysctls, stays whole).
OBJECT_IMAGES = ("ipcns-shm-", "ipcns-msg-", "ipcns-sem-")
#: A CRIU image's header: the common magic and the image's own, 4 bytes each.
IMAGE_HEADER = 8


def inode_of(pid: int) -> int | None:
    """The IPC namespace of process ``pid`` (None: gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/ipc").st_ino
    except OSError:
        return None


def inode_at(path: str) -> int | None:
    """The IPC namespace a path names (``/proc/PID/ns/ipc`` or a bind mount of one)."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def host_inode() -> int:
    """This host's own IPC namespace (tug runs in it)."""
    return os.stat("/proc/self/ns/ipc").st_ino


def ns_dir(data_dir: Path) -> Path:
    """Where tug keeps the IPC namespaces it made on this host."""
    return data_dir / "ipcns"


def create(path: Path) -> None:
    """A new, empty IPC namespace kept alive by a bind mount at ``path``."""
    remove(path)  # a crashed run's leftover (its containers are gone: their names were free)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.touch(mode=0o600)
    res = subprocess.run(["unshare", f"--ipc={path}", "true"], capture_output=True, text=True)
    if res.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise MigrationError(f"cannot create the IPC namespace {path}: {res.stderr.strip() or res.returncode}")


def remove(path: Path) -> None:
    """Unmount and remove an IPC namespace tug made; a missing one is fine."""
    if path.exists() or path.is_symlink():
        _LIBC.umount2(str(path).encode(), MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def empty_object_images(images: Path) -> int:
    """Cut every SysV object image in ``images`` to its header; returns how many.

    For a member restored into a namespace an earlier member's restore has
    filled already: CRIU would otherwise create each object a second time
    (and fail on the taken ids)."""
    done = 0
    for entry in os.scandir(images):
        if entry.name.startswith(OBJECT_IMAGES) and entry.name.endswith(".img") and entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_size > IMAGE_HEADER:
                    os.truncate(fd, IMAGE_HEADER)
                    done += 1
            finally:
                os.close(fd)
    return done


def path_in_spec(spec: Mapping[str, Any]) -> str | None:
    """The IPC namespace path a container's config joins (None: its own, or none)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "ipc" and ns.get("path"):
            return str(ns["path"])
    return None


def set_path_in_spec(spec: dict[str, Any], path: Path) -> None:
    namespaces = [ns for ns in spec.setdefault("linux", {}).get("namespaces") or [] if ns.get("type") != "ipc"]
    spec["linux"]["namespaces"] = [*namespaces, {"type": "ipc", "path": str(path)}]


async def drop_if_unused(bundle: Path, data_dir: Path, runc: Runc) -> bool:
    """Remove the IPC namespace tug made that ``bundle``'s container joined, once
    no container on this host is in it any more (the last of its pod left).
    Call it after that container is gone, before its bundle is. Never raises."""
    try:
        path = path_in_spec(json.loads((bundle / "config.json").read_text()))
    except (OSError, ValueError):
        return False
    if path is None or Path(path).parent != ns_dir(data_dir):
        return False  # not one of tug's
    try:
        ino = os.stat(path).st_ino
        states = await runc.containers()
    except (OSError, MigrationError):
        return False
    if any(st.pid and inode_of(st.pid) == ino for st in states):
        return False
    await asyncio.to_thread(remove, Path(path))
    return True
