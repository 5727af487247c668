"""Sending directories as record streams (rootfs passes, image files), with progress."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import aiofiles

from tug.engine import rootfs, safefs
from tug.engine.errors import ConfigError, ProtocolError
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
) -> int:
    """Stream the files ``entries`` (relative to root); returns payload bytes.

    Each record carries the size from the scan. A file that changed since the
    scan is cut or zero-padded to that size: the record stays well-formed, and
    the frozen pass that follows finds the difference by mtime and sends it
    again, so the destination ends up exact.
    """
    out = await session.open_stream(kind, {"container": container})
    total = 0
    rootfd = await asyncio.to_thread(safefs.open_root, root)
    try:
        for e in entries:
            await out.write(rootfs.encode_record_header(e))
            left = e.size
            # Opened below the root's fd, through no symlink, and only if it is
            # still a regular file: the container may have swapped it since the
            # scan (for a symlink to a host file, a FIFO, a device).
            # (An empty file has nothing to read: no open, no thread hop.)
            fd = await asyncio.to_thread(safefs.open_regular_for_read, rootfd, e.path) if left else None
            if fd is not None:
                async with aiofiles.open(fd, "rb") as f:
                    while left > 0:
                        chunk = await f.read(min(CHUNK, left))
                        if not chunk:
                            break
                        left -= len(chunk)
                        await out.write(chunk)
                        meter.add(len(chunk))
            if left:
                # Vanished, swapped or shrunk since the scan: padded to keep the
                # record well-formed; the next pass fixes it.
                await out.write(bytes(left))
                meter.add(left)
            total += e.size
    finally:
        os.close(rootfd)
    await out.close({"files": len(entries), "bytes": total})
    meter.add(0, final=True)
    return total


async def sync_rootfs(
    session: Session, *, container: str, root: Path, phase: str, emit: ProgressFn | None, note: NoteFn
) -> int:
    """One rootfs pass: the manifest goes over, the agent applies the tree and
    names the files it needs, and those are sent. Returns payload bytes."""
    entries = await asyncio.to_thread(rootfs.scan, root)
    if len(entries) > rootfs.MAX_ENTRIES:
        raise ConfigError(f"the rootfs has {len(entries)} entries; tug moves at most {rootfs.MAX_ENTRIES}")
    parts = rootfs.manifest_parts(entries)
    for i, part in enumerate(parts):
        res = await session.call("rootfs_plan", container=container, manifest=part, last=i == len(parts) - 1)
    need = res.get("need", [])
    if not isinstance(need, list) or not all(type(i) is int and 0 <= i < len(entries) for i in need):
        raise ProtocolError("the agent's rootfs plan names files that are not in the manifest")
    send = [entries[i] for i in sorted(set(need))]
    if res.get("skipped"):
        examples = ", ".join(str(x) for x in res.get("skipped_examples") or [])
        note(f"rootfs: {res['skipped']} special files not copied (e.g. {examples})", "warning")
    meter = Meter(phase, "rootfs", sum(e.size for e in send), emit)
    return await send_entries(session, kind="rootfs", container=container, root=root, entries=send, meter=meter)


async def send_images_except(session: Session, container: str, images: Path, skip: set[str], meter: Meter) -> int:
    """The frozen dump's image files but ``skip`` (pages images the agent
    rebuilds itself); returns payload bytes."""
    entries = [e for e in await asyncio.to_thread(rootfs.scan, images) if e.kind == rootfs.FILE and e.path not in skip]
    meter.total = sum(e.size for e in entries)
    return await send_entries(session, kind="images", container=container, root=images, entries=entries, meter=meter)
