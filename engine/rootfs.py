"""Root filesystem sync: make the destination's rootfs equal the source's.

Runs twice in a stop-copy migration: once in full while the container runs,
then again while it is frozen, when only what changed since crosses the wire.
The second pass is what makes restore safe: CRIU reopens the container's open
files by path and checks their size, so the destination must hold exactly the
frozen source's files.

The comparison (:func:`plan`) and the file record framing
(:class:`RecordDecoder`) are pure; scanning and applying are thin I/O around
them.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .errors import ProtocolError

DIR, FILE, LINK, OTHER = "d", "f", "l", "o"


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # relative, "/"-separated, never starts with "/"
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    link: str = ""

    def to_wire(self) -> list[Any]:
        return [self.path, self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.link]

    @classmethod
    def from_wire(cls, item: Any) -> Entry:
        if not isinstance(item, (list, tuple)) or len(item) != 8:
            raise ProtocolError("malformed rootfs manifest entry")
        path, kind, mode, uid, gid, size, mtime_ns, link = item
        if not isinstance(path, str) or not isinstance(kind, str) or not isinstance(link, str):
            raise ProtocolError("malformed rootfs manifest entry")
        if not all(isinstance(v, int) for v in (mode, uid, gid, size, mtime_ns)):
            raise ProtocolError("malformed rootfs manifest entry")
        check_relpath(path)
        return cls(path, kind, mode, uid, gid, size, mtime_ns, link)

    def same_content(self, other: Entry) -> bool:
        return (self.kind, self.size, self.mtime_ns, self.mode, self.uid, self.gid, self.link) == (
            other.kind, other.size, other.mtime_ns, other.mode, other.uid, other.gid, other.link,
        )


def check_relpath(path: str) -> None:
    """Refuse paths that could escape the rootfs on the receiving side."""
    if not path or path.startswith("/") or "\x00" in path or any(p in ("..", "") for p in path.split("/")):
        raise ProtocolError(f"unsafe path in rootfs sync: {path!r}")


def scan(root: Path) -> list[Entry]:
    """Every entry below root, parents before children."""
    out: list[Entry] = []

    def walk(dirpath: str, rel: str) -> None:
        with os.scandir(dirpath) as it:
            items = sorted(it, key=lambda e: e.name)
        for de in items:
            relpath = f"{rel}{de.name}"
            st = de.stat(follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                kind = DIR
            elif stat.S_ISREG(mode):
                kind = FILE
            elif stat.S_ISLNK(mode):
                kind = LINK
            else:
                kind = OTHER
            link = os.readlink(de.path) if kind == LINK else ""
            size = st.st_size if kind == FILE else 0
            out.append(Entry(relpath, kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, size, st.st_mtime_ns, link))
            if kind == DIR:
                walk(de.path, relpath + "/")

    walk(str(root), "")
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    delete: list[str] = field(default_factory=list)  # deepest first
    mkdirs: list[Entry] = field(default_factory=list)  # parents first
    links: list[Entry] = field(default_factory=list)
    send: list[Entry] = field(default_factory=list)  # files whose content must come over
    skipped: list[str] = field(default_factory=list)  # special files we do not copy

    @property
    def bytes_to_send(self) -> int:
        return sum(e.size for e in self.send)


def plan(source: list[Entry], dest: list[Entry]) -> Plan:
    """What the destination must do so that its tree equals ``source``."""
    have = {e.path: e for e in dest}
    want = {e.path: e for e in source}
    delete = [p for p, e in have.items() if p not in want or want[p].kind != e.kind]
    delete.sort(key=lambda p: p.count("/"), reverse=True)
    mkdirs, links, send, skipped = [], [], [], []
    for e in source:
        old = have.get(e.path)
        fresh = old is None or old.kind != e.kind
        if e.kind == DIR:
            if fresh or (old is not None and (old.mode, old.uid, old.gid) != (e.mode, e.uid, e.gid)):
                mkdirs.append(e)
        elif e.kind == LINK:
            if fresh or (old is not None and not e.same_content(old)):
                links.append(e)
        elif e.kind == FILE:
            if fresh or (old is not None and not e.same_content(old)):
                send.append(e)
        else:
            skipped.append(e.path)
    return Plan(delete=delete, mkdirs=mkdirs, links=links, send=send, skipped=skipped)


# ---- file records: [u32 header length][msgpack header][size bytes of data] ----

_HDR = struct.Struct(">I")


def encode_record_header(entry: Entry) -> bytes:
    body: bytes = msgpack.packb(entry.to_wire(), use_bin_type=True)
    return _HDR.pack(len(body)) + body


class RecordDecoder:
    """Splits the record stream back into (entry, data chunk, is_last) pieces.

    Only headers are buffered; file data is handed on as views of the caller's
    bytes, so a 1 MiB chunk of pages goes from the frame to ``os.write``
    without another copy.
    """

    def __init__(self) -> None:
        self._hdr = bytearray()
        self._entry: Entry | None = None
        self._left = 0

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[Entry, memoryview, bool]]:
        view = memoryview(data)
        while view:
            if self._entry is None:
                # Fill the 4-byte length, then the header it announces.
                want = 4 if len(self._hdr) < 4 else 4 + self._header_len()
                take = want - len(self._hdr)
                self._hdr += view[:take]
                view = view[take:]
                if len(self._hdr) < 4 or len(self._hdr) < 4 + self._header_len():
                    continue
                try:
                    item = msgpack.unpackb(bytes(self._hdr[4:]), raw=False)
                except Exception as exc:  # msgpack raises several unrelated types
                    raise ProtocolError(f"bad rootfs record header: {exc}") from None
                self._hdr.clear()
                entry = Entry.from_wire(item)
                if entry.kind != FILE or entry.size < 0:
                    raise ProtocolError(f"record for a non-file: {entry.path!r}")
                self._entry, self._left = entry, entry.size
                if self._left == 0:
                    self._entry = None
                    yield entry, memoryview(b""), True
                continue
            take = min(self._left, len(view))
            chunk, view = view[:take], view[take:]
            self._left -= take
            entry = self._entry
            if self._left == 0:
                self._entry = None
            yield entry, chunk, self._left == 0
        return

    def _header_len(self) -> int:
        (n,) = _HDR.unpack_from(self._hdr)
        if n > 1 << 20:
            raise ProtocolError("rootfs record header too large")
        return int(n)

    def finish(self) -> None:
        if self._entry is not None or self._hdr:
            raise ProtocolError("rootfs stream ended in the middle of a file")


# ---- applying on the destination ----------------------------------------


def _apply_meta(path: Path, e: Entry) -> None:
    if e.kind == LINK:
        os.lchown(path, e.uid, e.gid)
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        return
    os.chown(path, e.uid, e.gid)
    os.chmod(path, e.mode)
    if e.kind == FILE:
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir() and not child.is_symlink():
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()


def apply_structure(root: Path, p: Plan) -> None:
    """Deletions, directories and symlinks; file contents follow as records."""
    root.mkdir(parents=True, exist_ok=True)
    for rel in p.delete:
        _remove(root / rel)
    for e in p.mkdirs:
        d = root / e.path
        d.mkdir(exist_ok=True)
        _apply_meta(d, e)
    for e in p.links:
        link = root / e.path
        if link.exists() or link.is_symlink():
            _remove(link)
        os.symlink(e.link, link)
        _apply_meta(link, e)


class FileWriter:
    """Writes decoded records into root, each file via a temp name + rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None
        self._tmp: Path | None = None
        self.files = 0
        self.bytes = 0

    def write(self, entry: Entry, chunk: bytes | memoryview, last: bool) -> None:
        if self._fd is None:
            final = self.root / entry.path
            self._tmp = final.with_name(f".{final.name}.tug-tmp")
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if chunk:
            view = memoryview(chunk)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.bytes += len(chunk)
        if last:
            os.close(self._fd)
            self._fd = None
            assert self._tmp is not None
            _apply_meta(self._tmp, entry)
            os.replace(self._tmp, self.root / entry.path)
            self._tmp = None
            self.files += 1

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
