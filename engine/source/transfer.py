"""Sending directories as record streams (rootfs passes, image files), with progress."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiofiles

from tug.engine import integrity, records, rootfs, safefs
from tug.engine.errors import ConfigError, IntegrityError, ProtocolError
from tug.engine.progress import Meter, ProgressFn
from tug.transports.session import CHUNK, Session

NoteFn = Callable[[str, str], None]


async def send_entries(
    session: Session,
    *,
    kind: str,
    container: str,
    root: Path,
    entries: Sequence[rootfs.Entry],
    meter: Meter,
    frozen: bool,
    volume: int | None = None,
) -> int:
    """Stream the files ``entries`` (relative to root); returns payload bytes.

    Each record announces the size from the scan, carries the bytes read and
    ends with a digest of what was sent (:mod:`tug.engine.records`), which
    the agent verifies over what it writes. A file that no longer matches
    its scan when it is read (shrunk, grown, rewritten, vanished, or swapped
    for something that is not a regular file) cannot be sent as announced:

    * while the container runs (``frozen`` false) that is to be expected:
      the record is completed with zeros and marked ``CHANGED``, so the agent
      discards it rather than commit a padded or cut file, and the next pass
      (the frozen one last) sends the file as it then is;
    * once the container is frozen (its last rootfs pass, the dump's images)
      nothing may change any more, and the destination must hold exactly
      these files: it is an IntegrityError, and the migration fails before
      the restore.
    """
    what = "image file" if kind == "images" else f"{kind} file"
    out = await session.open_stream(kind, {"container": container} if volume is None else {"container": container, "volume": volume})
    total = 0
    rootfd = await asyncio.to_thread(safefs.open_root, root)
    try:
        for e in entries:
            rec = records.Encoder(e)
            await out.write(rec.header)
            # Opened below the root's fd, through no symlink, and only if it is
            # still a regular file: the container may have swapped it since the
            # scan (for a symlink to a host file, a FIFO, a device).
            # (An empty file has nothing to read: no open, no thread hop.)
            fd = await asyncio.to_thread(safefs.open_regular_for_read, rootfd, e.path) if e.size else None
            now: tuple[int, int] | None = (e.size, e.mtime_ns) if not e.size else None  # (size, mtime) when read
            if fd is not None:
                async with aiofiles.open(fd, "rb") as f:
                    while rec.sent < e.size:
                        chunk = await f.read(min(CHUNK, e.size - rec.sent))
                        if not chunk:
                            break
                        rec.add(chunk)
                        await out.write(chunk)
                        meter.add(len(chunk))
                    st = os.fstat(fd)  # after the read: a file that grew or was rewritten shows it
                    now = (st.st_size, st.st_mtime_ns)
            end = records.End.INTACT
            if now != (e.size, e.mtime_ns):
                if frozen:
                    raise _changed(f"{what} {e.path!r}", e, now)
                # Changed while the container runs: the agent drops the record
                # and the next pass sends the file as it then is.
                end = records.End.CHANGED
                while rec.sent < e.size:  # in chunks: a vanished file may have been large
                    pad = bytes(min(CHUNK, e.size - rec.sent))
                    rec.add(pad)
                    await out.write(pad)
                    meter.add(len(pad))
            await out.write(rec.trailer(end))
            total += e.size
    finally:
        os.close(rootfd)
    await out.close({"files": len(entries), "bytes": total})
    meter.add(0, final=True)
    return total


def _changed(subject: str, e: rootfs.Entry, now: tuple[int, int] | None) -> IntegrityError:
    """A file that differs from its scan while nothing may change: never padded, never cut."""
    if now is None:
        return integrity.size_mismatch(subject, e.size, 0, "it vanished or is no longer a regular file")
    size, mtime_ns = now
    if size != e.size:
        return integrity.size_mismatch(subject, e.size, size, "it changed while the container was frozen")
    return IntegrityError(
        f"integrity check failed for {subject}: modified while the container was frozen "
        f"(mtime_ns expected {e.mtime_ns}, got {mtime_ns})",
        subject=subject, check="mtime_ns", expected=e.mtime_ns, got=mtime_ns,
    )


async def sync_rootfs(
    session: Session,
    *,
    container: str,
    root: Path,
    phase: str,
    emit: ProgressFn | None,
    note: NoteFn,
    frozen: bool,
    volume: int | None = None,
    only: str | None = None,
) -> int:
    """One rootfs pass: the manifest goes over, the agent applies the tree and
    names the files it needs, and those are sent. Returns payload bytes.
    ``frozen``: the container is frozen, so a file that changes is an error
    (see :func:`send_entries`). ``volume``: a copied volume's pass instead
    (its tree, or with ``only`` a bound file of it; see tug.engine.volumes)."""
    what = "the rootfs" if volume is None else f"volume {root}"
    entries = await asyncio.to_thread(rootfs.scan, root, only)
    if len(entries) > rootfs.MAX_ENTRIES:
        raise ConfigError(f"{what} has {len(entries)} entries; tug moves at most {rootfs.MAX_ENTRIES}")
    if only is not None and [e.path for e in entries] != [only]:
        raise ConfigError(f"volume {root / only} is no longer a file tug can copy")
    where: dict[str, Any] = {} if volume is None else {"volume": volume}
    parts = rootfs.manifest_parts(entries)
    for i, part in enumerate(parts):
        res = await session.call("rootfs_plan", container=container, manifest=part, last=i == len(parts) - 1, **where)
    need = res.get("need", [])
    if not isinstance(need, list) or not all(type(i) is int and 0 <= i < len(entries) for i in need):
        raise ProtocolError("the agent's rootfs plan names files that are not in the manifest")
    send = [entries[i] for i in sorted(set(need))]
    if res.get("skipped"):
        examples = ", ".join(str(x) for x in res.get("skipped_examples") or [])
        note(f"{what}: {res['skipped']} special files not copied (e.g. {examples})", "warning")
    meter = Meter(phase, "rootfs" if volume is None else "volume", sum(e.size for e in send), emit)
    return await send_entries(
        session, kind="rootfs" if volume is None else "volume", container=container, root=root, entries=send,
        meter=meter, frozen=frozen, volume=volume,
    )


async def send_images_except(session: Session, container: str, images: Path, skip: set[str], meter: Meter) -> int:
    """The frozen dump's image files but ``skip`` (pages images the agent
    rebuilds itself); returns payload bytes. Nothing changes them any more:
    a file that differs from its scan is an error."""
    entries = [e for e in await asyncio.to_thread(rootfs.scan, images) if e.kind == rootfs.FILE and e.path not in skip]
    meter.total = sum(e.size for e in entries)
    return await send_entries(session, kind="images", container=container, root=images, entries=entries, meter=meter, frozen=True)
