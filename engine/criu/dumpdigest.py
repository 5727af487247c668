"""End-to-end digests of a dump streamed to a CRIU page server on the destination.

A streamed dump's memory goes from CRIU on the source, through tug's SSH
forward, to ``criu page-server`` on the destination, which writes it to
``pages-<id>.img``: tug never frames those bytes itself, so the per-run
digests of :mod:`tug.engine.integrity` do not apply. Instead the source
watches the stream as it passes the forward (:class:`StreamDigest`, CRIU's
page-server protocol parsed sans-IO by :mod:`tug.transports.criu_pageserver`)
and keeps one CRC-32 per pagemap over its page data in the order sent; the
page server appends each entry's data to that pagemap's pages image in the
same order, so once it has exited the destination recomputes the CRC of
each pages image and compares (:func:`verify_pages_images`) before anything
is restored from them.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from tug.engine.criu import images
from tug.engine.errors import IntegrityError
from tug.engine.integrity import mismatch, size_mismatch
from tug.transports.criu_pageserver import PAGE_SIZE, Kind, Pages, PageServerParser, PageServerProtocolError

#: Read size when digesting a pages image.
_CHUNK = 4 << 20


class StreamDigest:
    """CRC-32 and page count per pagemap (``"process:PID"``, ``"shmem:ID"``) of the data a dump sent."""

    def __init__(self) -> None:
        self._parser = PageServerParser()
        self.digests: dict[str, list[int]] = {}
        #: Why the stream could not be followed (then nothing can be verified).
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        """Bytes from CRIU's dump to the page server, as they pass. Never raises."""
        if self.error is not None:
            return
        try:
            for ev in self._parser.feed(data):
                if isinstance(ev, Pages):
                    d = self.digests.setdefault(f"{ev.kind.value}:{ev.id}", [0, 0])
                    d[0] = zlib.crc32(ev.data, d[0])
                    d[1] += ev.nr_pages
        except PageServerProtocolError as exc:
            self.error = str(exc)


def _pagemap_path(images_dir: Path, key: str) -> Path:
    kind, _, ident = key.partition(":")
    # A task's id (its pid) is never 0; a SysV segment's (its shmid) may be.
    if not ident.isdigit() or len(ident) > 20 or (int(ident) == 0 and kind != Kind.SHMEM.value):
        raise IntegrityError(f"bad pagemap name {key!r} in the source's digests")
    if kind == Kind.PROCESS.value:
        return images_dir / images.pagemap_file_name(int(ident))
    if kind == Kind.SHMEM.value:
        return images_dir / f"pagemap-shmem-{int(ident)}.img"
    raise IntegrityError(f"bad pagemap kind {key!r} in the source's digests")


def _file_crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc, size


def verify_pages_images(images_dir: Path, digests: dict[str, list[int]]) -> int:
    """Check every pages image the page server wrote against the source's digests; returns bytes checked.

    Raises IntegrityError on a digest or size that differs, and on a pages
    image with data the source never sent (or sent data that has no image).
    """
    checked = 0
    seen: set[Path] = set()
    for key, value in digests.items():
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise IntegrityError(f"bad digest for {key!r} from the source")
        crc, pages = value
        pm_path = _pagemap_path(images_dir, key)
        try:
            pm = images.read_pagemap(pm_path.read_bytes())
        except OSError:
            raise IntegrityError(f"the source sent pages of {key}, but {pm_path.name} was never written") from None
        target = images_dir / images.pages_file_name(pm.pages_id)
        seen.add(target)
        subject = f"{target.name} ({key})"
        got_crc, size = _file_crc(target) if target.exists() else (0, 0)
        if size != pages * PAGE_SIZE:
            raise size_mismatch(subject, pages * PAGE_SIZE, size)
        if got_crc != crc:
            raise mismatch(subject, crc, got_crc)
        checked += size
    for extra in images_dir.glob("pages-*.img"):
        if extra not in seen and extra.stat().st_size:
            raise size_mismatch(f"{extra.name}", 0, extra.stat().st_size, "the source sent no pages for it")
    return checked
