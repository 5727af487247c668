"""A received container's volumes, on the destination.

The source says, per host mount of the container's config, whether it is
shared (this host has the same storage at the same path: the mount stays as
it is) or copied (the data arrives like the rootfs, into a directory this
agent creates: under the bundle, or the ``copy:DESTDIR`` the user named).
The config's mount then points at the copy. Every directory created outside
the bundle is listed in the bundle (:data:`CREATED_FILE`), so a rollback, or
a later agent sweeping a dead one's leftovers, removes exactly those.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine.errors import PreconditionError, ProtocolError
from tug.engine.volumes import COPY, MODES, SHARED, is_host_mount

#: In the bundle: the copy directories created outside it (JSON list).
CREATED_FILE = ".tug-volumes.json"
#: Copies kept under the bundle: volumes/<mount index>.
BUNDLE_SUBDIR = "volumes"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedVolume:
    index: int
    destination: str
    mode: str
    #: copy: the directory the data goes into (the tree a pass applies to).
    root: Path | None = None
    #: copy of a bound file: its name in ``root``.
    file: str | None = None


def _check_wire(item: Any, mounts: list[Any]) -> ReceivedVolume:
    if not isinstance(item, dict):
        raise ProtocolError("malformed volume")
    index, dest, mode, file = item.get("index"), item.get("destination"), item.get("mode"), item.get("file")
    if type(index) is not int or not 0 <= index < len(mounts) or mode not in MODES:
        raise ProtocolError("malformed volume")
    m = mounts[index]
    if not isinstance(m, dict) or not is_host_mount(m) or os.path.normpath(str(m.get("destination"))) != dest:
        raise ProtocolError(f"volume {dest!r} does not match mount {index} of the config")
    if file is not None and (not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\0" in file):
        raise ProtocolError("malformed volume file name")
    return ReceivedVolume(index=index, destination=str(dest), mode=str(mode), file=file)


def stage_volumes(bundle: Path, spec: dict[str, Any], wire: Any) -> list[ReceivedVolume]:
    """Create each copied volume's directory and point the config's mount at it.

    ``spec`` (the container's config, being rewritten) is changed in place.
    A ``DESTDIR`` must not exist yet, or be an empty directory: a copy
    replaces what its directory holds, and tug deletes only what it made.
    """
    if wire is None:
        return []
    if not isinstance(wire, list):
        raise ProtocolError("malformed volumes")
    mounts = spec.get("mounts") or []
    out: list[ReceivedVolume] = []
    created: list[str] = []
    for item in wire:
        vol = _check_wire(item, mounts)
        if vol.mode == SHARED:
            out.append(vol)
            continue
        dest_dir = item.get("dest_dir")
        if dest_dir is None:
            root = bundle / BUNDLE_SUBDIR / str(vol.index)
            root.mkdir(parents=True)
        else:
            if not isinstance(dest_dir, str) or not dest_dir.startswith("/") or ".." in dest_dir.split("/"):
                raise ProtocolError("malformed volume destination directory")
            root = Path(dest_dir)
            if root.is_symlink() or (root.exists() and (not root.is_dir() or any(root.iterdir()))):
                raise PreconditionError(f"{root} exists and is not an empty directory: tug copies volume {vol.destination} only into a new one")
            root.mkdir(parents=True, exist_ok=True)
            created.append(str(root))
            (bundle / CREATED_FILE).write_text(json.dumps(created))
        _set_root_meta(root, item.get("root_mode"))
        mounts[vol.index]["source"] = str(root / vol.file) if vol.file else str(root)
        out.append(ReceivedVolume(index=vol.index, destination=vol.destination, mode=COPY, root=root, file=vol.file))
    return out


def _set_root_meta(root: Path, meta: Any) -> None:
    """The copy's top directory gets the source's mode and owner (its
    entries get theirs from the passes)."""
    if vol_meta_ok(meta):
        mode, uid, gid = meta
        os.chown(root, uid, gid, follow_symlinks=False)
        os.chmod(root, mode)


def vol_meta_ok(meta: Any) -> bool:
    return (
        isinstance(meta, list) and len(meta) == 3 and all(type(v) is int for v in meta)
        and 0 <= meta[0] <= 0o7777 and 0 <= meta[1] < 2**32 - 1 and 0 <= meta[2] < 2**32 - 1
    )


def remove_created(bundle: Path) -> list[str]:
    """A rollback: the copy directories made outside ``bundle`` go (before the bundle)."""
    try:
        listed = json.loads((bundle / CREATED_FILE).read_text())
    except (OSError, ValueError):
        return []
    removed = []
    for path in listed if isinstance(listed, list) else []:
        if isinstance(path, str) and path.startswith("/") and ".." not in path.split("/"):
            p = Path(path)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(path)
    return removed
