"""A container's volumes: what each host mount is, and how it moves.

Every mount of the container's config that brings host storage in (a bind
mount, a block or network file system; see :func:`host_mounts`) must be
given a mode before anything changes, by the mount's path inside the
container (``--volume /data=shared``):

- ``shared``: the same path on the destination is the same storage (NFS, a
  cluster file system, a shared directory). tug does not trust the word: it
  writes a nonce into the directory here and the destination must read it
  back at the same path (a bound file must have the same bytes there).
- ``copy``: tug moves the data like the rootfs: a first pass while the
  container runs, a delta with each pre-copy round, the last delta while it
  is frozen, so a file it holds open and keeps writing arrives exactly as
  it was at the freeze. The destination keeps it under the bundle (or in
  ``copy:DESTDIR``) and its config's mount points there.

Anything else is refused, naming the mount and the options. The mount's
source path comes from the source host's own config (its admin's, not the
container's); the tree below it is the container's and is read like its
rootfs: fd-relative, never through a symlink.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tug.engine import safefs
from tug.engine.errors import ConfigError, PreconditionError

if TYPE_CHECKING:
    from tug.transports.session import Session

T = TypeVar("T")

SHARED = "shared"
COPY = "copy"
MODES = (SHARED, COPY)

#: Mount types a container gets from the kernel, not from the host's storage.
KERNEL_FILESYSTEMS = frozenset({
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "devtmpfs", "securityfs", "debugfs",
    "tracefs", "hugetlbfs", "bpf", "pstore",
})  # fmt: skip
#: Name prefix of the nonce file a shared directory is proved with.
NONCE_PREFIX = ".tug-volume-check-"


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeChoice:
    mode: str
    #: copy only: where the destination keeps the data (None: under the bundle).
    dest_dir: str | None = None


def parse_volume_options(specs: Iterable[str]) -> dict[str, VolumeChoice]:
    """``PATH=shared``, ``PATH=copy`` or ``PATH=copy:DESTDIR``, by the path inside the container."""
    out: dict[str, VolumeChoice] = {}
    for spec in specs:
        path, eq, rest = spec.partition("=")
        mode, colon, dest = rest.partition(":")
        if not eq or not path.startswith("/") or mode not in MODES:
            raise ConfigError(f"--volume {spec!r}: expected PATH=shared, PATH=copy or PATH=copy:DESTDIR (PATH inside the container)")
        if colon and (mode != COPY or not dest.startswith("/") or ".." in dest.split("/")):
            raise ConfigError(f"--volume {spec!r}: only copy takes a DESTDIR, an absolute path without '..'")
        key = posixpath.normpath(path)
        if key in out:
            raise ConfigError(f"--volume names {key} twice")
        out[key] = VolumeChoice(mode=mode, dest_dir=posixpath.normpath(dest) if colon else None)
    return out


def is_host_mount(m: Mapping[str, Any]) -> bool:
    """Whether a mount of a runc config brings host storage in: bind mounts
    (by type or option) and block or network file systems. Kernel file
    systems (proc, sysfs, tmpfs, ...) are recreated by the restore; a tmpfs's
    content is dumped by CRIU with the container."""
    options = m.get("options") or []
    bind = m.get("type") == "bind" or "bind" in options or "rbind" in options
    return bind or (m.get("type") or "") not in KERNEL_FILESYSTEMS


def host_mounts(spec: Mapping[str, Any]) -> list[str]:
    """The host mounts of a runc config, as ``source -> destination``."""
    return [f"{m.get('source', '?')} -> {m.get('destination', '?')}" for m in _mounts(spec) if is_host_mount(m)]


def _mounts(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [m for m in spec.get("mounts") or [] if isinstance(m, dict)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Volume:
    #: Its index among the config's mounts (how the destination finds it).
    index: int
    #: Where the container sees it.
    destination: str
    #: Where it is on this host (the mount's source).
    source: Path
    mode: str
    dest_dir: str | None = None
    #: A bound file rather than a directory.
    is_file: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "index": self.index, "destination": self.destination, "mode": self.mode,
            "dest_dir": self.dest_dir, "file": self.source.name if self.is_file else None,
            "root_mode": _root_mode(self.source),
        }

    @property
    def tree(self) -> tuple[Path, str | None]:
        """What a copy pass scans: the directory, or a bound file's parent and its name."""
        return (self.source.parent, self.source.name) if self.is_file else (self.source, None)


def _root_mode(path: Path) -> list[int]:
    st = os.stat(path)
    return [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]


def classify(name: str, spec: Mapping[str, Any], choices: Mapping[str, VolumeChoice]) -> list[Volume]:
    """The container's volumes with their modes, or an error before anything changes."""
    mounted = {posixpath.normpath(str(m.get("destination") or "")) for m in _mounts(spec) if is_host_mount(m)}
    unknown = sorted(set(choices) - mounted)
    if unknown:
        raise ConfigError(f"--volume names {', '.join(unknown)}, which {name!r} does not mount from the host")
    volumes: list[Volume] = []
    undecided: list[str] = []
    for index, m in enumerate(_mounts(spec)):
        if not is_host_mount(m):
            continue
        dest = posixpath.normpath(str(m.get("destination") or ""))
        source = str(m.get("source") or "")
        choice = choices.get(dest)
        if choice is None:
            undecided.append(f"{source} -> {dest}")
            continue
        options = m.get("options") or []
        if not (m.get("type") == "bind" or "bind" in options or "rbind" in options):
            # runc mounts it itself at start (a block device, NFS): CRIU
            # cannot dump such a mount, and tug cannot verify or copy it.
            raise PreconditionError(
                f"volume {dest} of {name!r} is a {m.get('type')} mount of {source}: tug moves bind-mounted "
                "volumes only (bind the storage on the host and mount that into the container); nothing was changed"
            )
        path = Path(source)
        if not path.is_absolute():
            raise PreconditionError(f"volume {dest} of {name!r}: its source {source!r} is not an absolute path")
        if not path.exists():
            raise PreconditionError(f"volume {dest} of {name!r}: its source {source} does not exist here")
        is_file = not path.is_dir()
        if is_file and not path.is_file():
            raise PreconditionError(f"volume {dest} of {name!r}: its source {source} is neither a directory nor a file")
        volumes.append(Volume(index=index, destination=dest, source=path, mode=choice.mode, dest_dir=choice.dest_dir, is_file=is_file))
    if undecided:
        first = undecided[0].rpartition(" -> ")[2]
        raise PreconditionError(
            f"container {name!r} mounts host storage ({', '.join(undecided)}): say for each whether the destination "
            f"has the same storage at the same path (--volume {first}=shared, which tug verifies) or tug copies it "
            f"(--volume {first}=copy[:DESTDIR]); nothing was changed"
        )
    return volumes


# ---- proving a shared volume ------------------------------------------------------


def plant_nonce(volume: Volume) -> tuple[str, bytes]:
    """Write a fresh nonce file into a shared directory; returns its name and content."""
    name = f"{NONCE_PREFIX}{secrets.token_hex(8)}"
    nonce = secrets.token_bytes(32)
    with safefs.root_fd(volume.source) as rootfd:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=rootfd)
        try:
            os.write(fd, nonce)
        finally:
            os.close(fd)
    return name, nonce


def remove_nonce(volume: Volume, name: str) -> None:
    with safefs.root_fd(volume.source) as rootfd:
        safefs.remove_at(rootfd, name)


def _read_regular(directory: Path, name: str, read: Callable[[int], T]) -> T | None:
    """``read`` applied to ``name`` in ``directory``, opened through no
    symlink and only if it is a regular file (None: missing, not a regular
    file, or unreadable)."""
    try:
        with safefs.root_fd(directory) as rootfd:
            fd = safefs.open_regular_for_read(rootfd, name)
            if fd is None:
                return None
            try:
                return read(fd)
            finally:
                os.close(fd)
    except OSError:
        return None


def read_nonce(directory: Path, name: str) -> bytes | None:
    """The nonce as the destination reads it at the same path (None: not there)."""
    if not name.startswith(NONCE_PREFIX) or "/" in name:
        return None
    return _read_regular(directory, name, lambda fd: os.read(fd, 64))


def file_digest(path: Path) -> str | None:
    """A bound file's content digest, to prove both hosts see the same file."""

    def digest(fd: int) -> str:
        h = hashlib.blake2b(digest_size=16)
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()

    return _read_regular(path.parent, path.name, digest)


async def verify_shared(session: Session, container: str, vol: Volume, host: str) -> None:
    """Prove that ``host`` has the same storage at ``vol``'s path, or refuse.

    A directory: a nonce written here must be read back there (then it is
    removed). A bound file: both hosts must read the same bytes.
    """
    advice = f"use --volume {vol.destination}=copy to have tug copy it; nothing was changed"
    if vol.is_file:
        mine = await asyncio.to_thread(file_digest, vol.source)
        res = await session.call("volume_digest", path=str(vol.source))
        if mine is None or res.get("digest") != mine:
            raise PreconditionError(
                f"volume {vol.destination} of {container!r}: {vol.source} on {host} is not the same file as here "
                f"(its content differs or it is missing): not the same storage; {advice}"
            )
        return
    name, nonce = await asyncio.to_thread(plant_nonce, vol)
    try:
        res = await session.call("volume_check", path=str(vol.source), name=name)
    finally:
        await asyncio.to_thread(remove_nonce, vol, name)
    if res.get("nonce") != nonce:
        raise PreconditionError(
            f"volume {vol.destination} of {container!r}: {vol.source} on {host} is not the same storage as here "
            f"(a nonce written here was not read back there); {advice}"
        )
