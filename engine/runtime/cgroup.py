"""Emptying and removing a container's cgroups: every process in them, known to runc or not.

Why: ``runc delete --force`` kills what runc's state names. A ``criu
restore`` cancelled or killed half way leaves CRIU's own processes (``criu:
restore``, the tree before it became the container) in the container's
cgroup, unknown to runc: a later restore of the name fails or, worse, one
finishes after the rollback. Cleanup therefore empties the cgroup itself,
after ``runc delete``.

API (all paths are runc's ``linux.cgroupsPath``, cgroupfs driver: ``/a/b``
from each hierarchy's root, or ``a/b`` from this process's own cgroup)::

    container_cgroups_path(name, cgroup_parent) -> str | None
        What destination/staging.py sets: f"{cgroup_parent}/{name}"; None
        without a parent (the source's config.json then chose the path: this
        host owns nothing there it may empty).
    cgroup_dirs(cgroups_path) -> list[Path]
        Its directories that exist now, one per hierarchy (v1 and unified).
    container_cgroup_dirs(name, cgroup_parent) -> list[Path]   ([] without a parent)
    await kill_cgroup(cgroups_path, *, timeout=10.0) -> CgroupCleanup
        Kill every process in it and below it, in every hierarchy, then
        remove the emptied directories.
    await kill_container_cgroups(name, cgroup_parent, *, timeout=10.0) -> CgroupCleanup
        The two together (nothing done without a parent).

``CgroupCleanup``: ``killed`` (pids found and SIGKILLed), ``removed``
(dirs), ``survivors`` (pids still there at the deadline), ``left`` (dirs not
removed), ``ok`` (neither), ``describe()`` (a log line). Leftovers are
reported, not raised; :class:`UnsafePathError` is raised, before anything is
touched, for a path tug must never empty.

How: v2 ``cgroup.kill`` (kernel >= 5.14) kills a whole subtree, frozen or
not. Elsewhere (v1 hierarchies, threaded cgroups) each pid of the subtree's
``cgroup.procs`` is SIGKILLed through a pidfd, only if still listed once the
pidfd is open (a pid reused meanwhile elsewhere is never hit). Freezers are
thawed after the kill: a frozen task acts on SIGKILL only once thawed, and
then dies before running any code of its own. Rounds repeat until one finds
no process (forks are caught by the next) or ``timeout`` passes; then the
directories go, deepest first (busy while tasks exit: retried until then).

Safety: only hierarchies mounted at ``/sys/fs/cgroup`` or directly below
(per /proc/self/mountinfo) count; each directory is opened one component at
a time, ``O_NOFOLLOW``, relative to its parent, so no symlink or ``..`` leads
elsewhere; ``.``, ``..``, empty paths, the root and any cgroup holding this
process (its own or an ancestor) are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from tug.engine import safefs
from tug.engine.errors import UnsafePathError

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: What runc accepts as a container id (libcontainer's idRegex).
_NAME = re.compile(r"[\w+\-.]+", re.ASCII)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One cgroup hierarchy mounted at or below :data:`CGROUP_ROOT`."""

    mount: Path
    version: int  # 1 or 2
    #: v1: the mount's super options, i.e. its controllers (or ``name=...``); v2: empty.
    controllers: frozenset[str]
    #: This process's own cgroup in it ("/..."), None if unknown.
    own: str | None


@dataclass
class CgroupCleanup:
    """What :func:`kill_cgroup` did (see the module doc); leftovers are reported, not raised."""

    cgroups_path: str | None
    killed: set[int] = field(default_factory=set)
    removed: list[Path] = field(default_factory=list)
    survivors: set[int] = field(default_factory=set)
    left: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.survivors and not self.left

    def describe(self) -> str:
        what = f"cgroup {self.cgroups_path}: killed {len(self.killed)} process(es), removed {len(self.removed)} dir(s)"
        if self.survivors:
            what += f"; still running: {', '.join(map(str, sorted(self.survivors)))}"
        if self.left:
            what += f"; not removed: {', '.join(map(str, self.left))}"
        return what



def container_cgroups_path(name: str, cgroup_parent: str | None) -> str | None:
    """The cgroupsPath tug gives container ``name`` here (as destination/staging.py);
    None without a host cgroup parent (see the module doc)."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise UnsafePathError(f"not a container name: {name!r}")
    if not cgroup_parent:
        return None
    _components(cgroup_parent)  # refuse a malformed parent before building on it
    return f"{cgroup_parent.rstrip('/')}/{name}"


def cgroup_dirs(cgroups_path: str) -> list[Path]:
    """The directories of ``cgroups_path`` that exist now, one per hierarchy."""
    found = []
    for h in hierarchies():
        held = _open_target(h, cgroups_path)
        if held is not None:
            found.append(held.path)
            held.close()
    return found


def container_cgroup_dirs(name: str, cgroup_parent: str | None) -> list[Path]:
    path = container_cgroups_path(name, cgroup_parent)
    return [] if path is None else cgroup_dirs(path)


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted at /sys/fs/cgroup or one level below it."""
    own_v1: dict[frozenset[str], str] = {}
    own_v2: str | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            num, ctrls, path = (line.split(":", 2) + ["", ""])[:3]
            if num == "0" and not ctrls:
                own_v2 = path
            elif ctrls:
                own_v1[frozenset(ctrls.split(","))] = path
    found: dict[Path, Hierarchy] = {}
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in mountinfo:
        pre, sep, post = line.partition(" - ")
        fields, fs = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(fs) < 3 or fs[0] not in ("cgroup", "cgroup2"):
            continue
        root, mount = fields[3], Path(fields[4])
        if root != "/" or "\\" in fields[4] or not (mount == CGROUP_ROOT or mount.parent == CGROUP_ROOT):
            continue  # a subtree bind mount, an escaped name, or elsewhere (CRIU's cgroup yard)
        if fs[0] == "cgroup2":
            found[mount] = Hierarchy(mount, 2, frozenset(), own_v2)
        else:
            opts = frozenset(fs[2].split(","))
            own = next((p for ctrls, p in own_v1.items() if ctrls <= opts), None)
            found[mount] = Hierarchy(mount, 1, opts, own)
    return list(found.values())


def _components(cgroups_path: str) -> list[str]:
    """The path's components; refuses what is not a plain cgroupfs path below a root."""
    if not isinstance(cgroups_path, str) or "\0" in cgroups_path:
        raise UnsafePathError(f"not a cgroup path: {cgroups_path!r}")
    if ":" in cgroups_path:
        raise UnsafePathError(f"systemd-style cgroup path {cgroups_path!r}: only runc's cgroupfs paths are handled")
    parts = [p for p in cgroups_path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise UnsafePathError(f"refusing cgroup path {cgroups_path!r}: empty, the root, or with '.'/'..'")
    return parts


def target_components(h: Hierarchy, cgroups_path: str) -> list[str]:
    """Where ``cgroups_path`` is in hierarchy ``h``, as components below its root.

    Relative paths start at this process's own cgroup, as runc resolves them.
    Refuses a target that holds this process (its cgroup or an ancestor).
    """
    parts = _components(cgroups_path)
    own = None if h.own is None else [p for p in h.own.split("/") if p]
    if not cgroups_path.startswith("/"):
        if own is None:
            raise UnsafePathError(f"relative cgroup path {cgroups_path!r} but this process's cgroup in {h.mount} is unknown")
        parts = own + parts
    if own is not None and own[: len(parts)] == parts:
        raise UnsafePathError(f"refusing to empty {h.mount}/{'/'.join(parts)}: this process is in it")
    return parts



@dataclass(slots=True)
class _Held:
    """A cgroup directory and its parent, opened without following symlinks."""

    path: Path
    parent_fd: int
    name: str
    fd: int
    hierarchy: Hierarchy

    def close(self) -> None:
        for fd in (self.fd, self.parent_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def open_beneath(start_fd: int, parts: list[str]) -> int:
    """Open directory ``parts`` below ``start_fd``, never following a symlink
    (:func:`tug.engine.safefs.open_beneath`). Raises FileNotFoundError if a
    component is missing and :class:`UnsafePathError` if one is a symlink, not
    a directory, or not a plain name."""
    if not parts:
        return os.dup(start_fd)
    if any("/" in part for part in parts):
        raise UnsafePathError(f"bad path component in {parts!r}")
    try:
        return safefs.open_beneath(start_fd, "/".join(parts), os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise UnsafePathError(f"{'/'.join(parts)!r} holds a symlink or a non-directory: not followed") from None
        raise


def _open_target(h: Hierarchy, cgroups_path: str) -> _Held | None:
    """The target's directory in ``h``, held by fd, or None if it does not exist there."""
    parts = target_components(h, cgroups_path)
    root = os.open("/", _DIR)
    try:
        parent_fd = open_beneath(root, [*h.mount.parts[1:], *parts[:-1]])
        try:
            fd = open_beneath(parent_fd, parts[-1:])
        except BaseException:
            os.close(parent_fd)
            raise
    except FileNotFoundError:
        return None  # not in this hierarchy (or unmounted meanwhile)
    finally:
        os.close(root)
    return _Held(h.mount.joinpath(*parts), parent_fd, parts[-1], fd, h)


def _subtree(fd: int) -> list[tuple[int, str, int]]:
    """(parent fd, name, fd) of every cgroup below ``fd``, deepest first. Caller closes the fds."""
    out: list[tuple[int, str, int]] = []
    with contextlib.suppress(OSError):
        with os.scandir(fd) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for name in names:
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except OSError:
                continue  # removed meanwhile, or (never in cgroupfs) a symlink
            out += _subtree(child)
            out.append((fd, name, child))
    return out


def _write(fd: int, name: str, data: bytes) -> bool:
    try:
        f = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            os.write(f, data)
        finally:
            os.close(f)
    except OSError:
        return False
    return True


def _procs(fd: int) -> set[int]:
    try:
        f = os.open("cgroup.procs", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            text = os.read(f, 1 << 20).decode(errors="replace")
        finally:
            os.close(f)
    except OSError:
        return set()
    return {int(x) for x in text.split() if x.isdigit() and int(x) > 0}


def _kill_listed(fd: int) -> set[int]:
    """SIGKILL every process listed in this cgroup.procs that is still listed once
    its pidfd is open (so a reused pid is never hit). Returns the pids seen."""
    seen = _procs(fd) - {os.getpid()}
    pidfds: dict[int, int] = {}
    for pid in seen:
        with contextlib.suppress(OSError):
            pidfds[pid] = os.pidfd_open(pid)
    try:
        still = _procs(fd)
        for pid, pidfd in pidfds.items():
            if pid in still:
                with contextlib.suppress(OSError):  # exited meanwhile
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)
    return seen


def _kill_round(held: list[_Held]) -> set[int]:
    """One pass over every hierarchy: kill, thaw; returns the pids that were there."""
    seen: set[int] = set()
    for h in held:
        tree = [(h.parent_fd, h.name, h.fd)] + _subtree(h.fd)
        try:
            killed_all = h.hierarchy.version == 2 and _write(h.fd, "cgroup.kill", b"1")
            for _, _, fd in tree:
                pids = _procs(fd) if killed_all else _kill_listed(fd)
                seen |= pids
            for _, _, fd in tree:  # thaw after the kill: frozen tasks die on thawing
                if h.hierarchy.version == 2:
                    _write(fd, "cgroup.freeze", b"0")
                elif "freezer" in h.hierarchy.controllers:
                    _write(fd, "freezer.state", b"THAWED")
        finally:
            for _, _, fd in tree[1:]:
                os.close(fd)
    return seen


def _remove(held: list[_Held], done: list[Path]) -> list[_Held]:
    """rmdir each subtree, deepest first; returns the held cgroups not (yet) removed."""
    remaining = []
    for h in held:
        tree = _subtree(h.fd)
        try:
            for parent_fd, name, _ in tree:
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=parent_fd)
        finally:
            for _, _, fd in tree:
                os.close(fd)
        try:
            os.rmdir(h.name, dir_fd=h.parent_fd)
        except FileNotFoundError:
            pass  # gone already (runc removed it meanwhile)
        except OSError:
            remaining.append(h)  # still busy: tasks exiting
            continue
        done.append(h.path)
        h.close()
    return remaining



async def kill_cgroup(cgroups_path: str, *, timeout: float = 10.0) -> CgroupCleanup:
    """Kill every process in ``cgroups_path`` (and below it) in every hierarchy, then
    remove its directories. See the module doc for how, what is refused and the result."""
    result = CgroupCleanup(cgroups_path)
    found = hierarchies()
    for hier in found:
        target_components(hier, cgroups_path)  # refuse before touching anything
    held: list[_Held] = []
    try:
        for hier in found:
            one = await asyncio.to_thread(_open_target, hier, cgroups_path)
            if one is not None:
                held.append(one)
        deadline = time.monotonic() + timeout
        while held:  # until a round finds nobody
            seen = await asyncio.to_thread(_kill_round, held)
            result.killed |= seen
            if not seen:
                break
            if time.monotonic() >= deadline:
                result.survivors = seen
                break
            await asyncio.sleep(_POLL_S)
        while held and not result.survivors:
            held = await asyncio.to_thread(_remove, held, result.removed)
            if not held or time.monotonic() >= deadline:
                break
            await asyncio.sleep(_POLL_S)
        result.left = [h.path for h in held]
    finally:
        for h in held:
            h.close()
    return result


async def kill_container_cgroups(name: str, cgroup_parent: str | None, *, timeout: float = 10.0) -> CgroupCleanup:
    """:func:`kill_cgroup` on the cgroup tug gave container ``name`` (nothing without a parent)."""
    path = container_cgroups_path(name, cgroup_parent)
    if path is None:
        return CgroupCleanup(None)
    return await kill_cgroup(path, timeout=timeout)
