"""Root filesystem sync: make the destination's rootfs equal the source's.

Runs twice in a stop-copy migration: once in full while the container runs,
then again while it is frozen, when only what changed since crosses the wire.
The second pass is what makes restore safe: CRIU reopens the container's open
files by path and checks their size, so the destination must hold exactly the
frozen source's files.

The comparison (:func:`plan`) is pure, as is the framing of the file
records that carry contents (:mod:`tug.engine.records`, each with its
digest); scanning and applying are thin I/O around them.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tug.engine import integrity, safefs
from tug.engine.errors import ProtocolError, UnsafePathError

DIR, FILE, LINK, OTHER = "d", "f", "l", "o"
#: Special files: named pipes, character and block devices, sockets.
FIFO, CHR, BLK, SOCK = "p", "c", "b", "s"
KINDS = frozenset((DIR, FILE, LINK, OTHER, FIFO, CHR, BLK, SOCK))
#: Device numbers (a character or block device's ``rdev``) a config may allow: (kind, major, minor).
Device = tuple[str, int, int]
#: Deeper trees are refused: each level holds a directory fd while scanning.
MAX_DEPTH = 512
#: Larger trees are refused (the plan's answer must fit in one frame).
MAX_ENTRIES = 2_000_000
#: Bytes of manifest sent in one part (well under the protocol's frame limit).
MANIFEST_PART_BYTES = 2 << 20


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
    #: A device's number (``st_rdev``); 0 for everything else.
    rdev: int = 0

    def to_wire(self) -> list[Any]:
        return [self.path, self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.link, self.rdev]

    @classmethod
    def from_wire(cls, item: Any) -> Entry:
        """An entry from the peer; every field is checked, since all of them
        come from the container's tree and end up in system calls."""
        if not isinstance(item, (list, tuple)) or len(item) != 9:
            raise ProtocolError("malformed rootfs manifest entry")
        path, kind, mode, uid, gid, size, mtime_ns, link, rdev = item
        if not isinstance(path, str) or not isinstance(kind, str) or not isinstance(link, str):
            raise ProtocolError("malformed rootfs manifest entry")
        if not all(type(v) is int for v in (mode, uid, gid, size, mtime_ns, rdev)):
            raise ProtocolError("malformed rootfs manifest entry")
        check_relpath(path)
        if kind not in KINDS:
            raise ProtocolError(f"unknown entry kind {kind!r} for {path!r}")
        if not (0 <= mode <= 0o7777 and 0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1 and 0 <= size < 2**63):
            raise ProtocolError(f"out-of-range metadata for {path!r}")
        if not -(2**63) <= mtime_ns < 2**63 or "\x00" in link or len(link) > 4095 or not 0 <= rdev < 2**64:
            raise ProtocolError(f"out-of-range metadata for {path!r}")
        return cls(path, kind, mode, uid, gid, size, mtime_ns, link, rdev)

    def same_content(self, other: Entry) -> bool:
        return (self.kind, self.size, self.mtime_ns, self.mode, self.uid, self.gid, self.link, self.rdev) == (
            other.kind, other.size, other.mtime_ns, other.mode, other.uid, other.gid, other.link, other.rdev,
        )

    @property
    def device(self) -> Device:
        return (self.kind, os.major(self.rdev), os.minor(self.rdev))


def manifest_parts(entries: list[Entry], budget: int = MANIFEST_PART_BYTES) -> list[list[list[Any]]]:
    """The manifest in parts of about ``budget`` bytes each (at least one part)."""
    parts: list[list[list[Any]]] = [[]]
    size = 0
    for e in entries:
        cost = len(e.path.encode()) + len(e.link.encode()) + 48
        if parts[-1] and size + cost > budget:
            parts.append([])
            size = 0
        parts[-1].append(e.to_wire())
        size += cost
    return parts


def check_relpath(path: str) -> None:
    """Refuse paths that could escape the rootfs on the receiving side."""
    safefs.check_relpath(path)


#: A file's type (``S_IFMT``) and its kind in a manifest, both ways.
_TYPES = {
    stat.S_IFDIR: DIR, stat.S_IFREG: FILE, stat.S_IFLNK: LINK, stat.S_IFIFO: FIFO, stat.S_IFCHR: CHR,
    stat.S_IFBLK: BLK, stat.S_IFSOCK: SOCK,
}  # fmt: skip
_TYPE_OF = {kind: ifmt for ifmt, kind in _TYPES.items()}


def _kind(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), OTHER)


def scan(root: Path, only: str | None = None) -> list[Entry]:
    """Every entry below root, parents before children, never through a symlink.

    ``only``: just that one name directly below root (a bound file's parent
    is scanned for the file alone, never for its siblings).

    Each directory is listed through an fd opened below the root without
    following symlinks; a directory the container swapped for a symlink since
    its parent was listed is recorded but not entered (the next pass sees the
    symlink). Iterative, so a hostile nesting depth cannot exhaust the stack.
    """
    out: list[Entry] = []
    with safefs.root_fd(root) as rootfd:
        # One frame per open directory: (fd, its relative path + "/", sorted entries left).
        stack: list[tuple[int, str, list[os.DirEntry[str]]]] = []

        def enter(fd: int, rel: str) -> None:
            if len(stack) >= MAX_DEPTH:
                os.close(fd)
                raise UnsafePathError(f"rootfs nested deeper than {MAX_DEPTH} directories at {rel!r}")
            with os.scandir(fd) as it:
                items = sorted((e for e in it if only is None or rel or e.name == only), key=lambda e: e.name, reverse=True)
            stack.append((fd, rel, items))

        try:
            enter(os.dup(rootfd), "")
            while stack:
                fd, rel, items = stack[-1]
                if not items:
                    os.close(fd)
                    stack.pop()
                    continue
                de = items.pop()
                try:
                    st = os.stat(de.name, dir_fd=fd, follow_symlinks=False)
                    kind = _kind(st.st_mode)
                    link = os.readlink(de.name, dir_fd=fd) if kind == LINK else ""
                except FileNotFoundError:
                    continue  # gone since the listing
                relpath = f"{rel}{de.name}"
                size = st.st_size if kind == FILE else 0
                rdev = st.st_rdev if kind in (CHR, BLK) else 0
                out.append(Entry(relpath, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_mtime_ns, link, rdev))
                if kind == DIR:
                    try:
                        sub = os.open(de.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                            continue  # swapped since the stat; the next pass sees what it became
                        raise
                    enter(sub, relpath + "/")
        finally:
            for fd, _, _ in stack:
                os.close(fd)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    delete: list[str] = field(default_factory=list)  # deepest first
    mkdirs: list[Entry] = field(default_factory=list)  # parents first
    links: list[Entry] = field(default_factory=list)
    #: Named pipes and allowed device nodes, made here (they have no content).
    nodes: list[Entry] = field(default_factory=list)
    send: list[Entry] = field(default_factory=list)  # files whose content must come over
    skipped: list[str] = field(default_factory=list)  # special files we do not copy

    @property
    def bytes_to_send(self) -> int:
        return sum(e.size for e in self.send)


def plan(source: list[Entry], dest: list[Entry], devices: frozenset[Device] = frozenset()) -> Plan:
    """What the destination must do so that its tree equals ``source``.

    Named pipes are made (a process may hold one open: CRIU reopens it by
    path); a device node only if ``devices`` (the container config's own
    devices) has its number, since the tree is the container's to fill;
    sockets are skipped (a restored process that binds one makes it).
    """
    have = {e.path: e for e in dest}
    want = {e.path: e for e in source}
    delete = [p for p, e in have.items() if p not in want or want[p].kind != e.kind]
    delete.sort(key=lambda p: p.count("/"), reverse=True)
    mkdirs, links, nodes, send, skipped = [], [], [], [], []
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
        elif e.kind == FIFO or (e.kind in (CHR, BLK) and e.device in devices):
            if fresh or (old is not None and not e.same_content(old)):
                nodes.append(e)
        else:
            skipped.append(e.path)
    return Plan(delete=delete, mkdirs=mkdirs, links=links, nodes=nodes, send=send, skipped=skipped)


# ---- applying on the destination ----------------------------------------


def apply_structure(root: Path, p: Plan) -> None:
    """Deletions, directories and symlinks; file contents follow as records.

    All of it relative to the root's fd and through no symlink (engine/safefs):
    the tree holds whatever the container left there.
    """
    root.mkdir(parents=True, exist_ok=True)
    with safefs.root_fd(root) as rootfd:
        for rel in p.delete:
            safefs.remove(rootfd, rel)
        for e in p.mkdirs:
            safefs.make_dir(rootfd, e.path, uid=e.uid, gid=e.gid, mode=e.mode)
        for e in p.links:
            safefs.make_symlink(rootfd, e.path, e.link, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns)
        for e in p.nodes:
            safefs.make_node(rootfd, e.path, _TYPE_OF[e.kind], e.rdev, uid=e.uid, gid=e.gid, mode=e.mode, mtime_ns=e.mtime_ns)


def config_devices(spec: Any) -> frozenset[Device]:
    """The device nodes a runc config creates itself (``linux.devices``): the
    only ones a rootfs sync may make on the destination."""
    out = set()
    for d in (spec.get("linux") or {}).get("devices") or [] if isinstance(spec, dict) else []:
        if isinstance(d, dict) and d.get("type") in (CHR, BLK) and type(d.get("major")) is int and type(d.get("minor")) is int:
            out.add((str(d["type"]), int(d["major"]), int(d["minor"])))
    return frozenset(out)


class FileWriter:
    """Writes decoded records into root, each file via a random temporary + rename.

    A file is committed (renamed into place with its metadata) only by
    :meth:`end` with ``keep``, once its record verified, and only if exactly
    the announced number of bytes went into it: a short or long file is an
    IntegrityError, never padded or cut (see :mod:`tug.engine.records`).
    """

    def __init__(self, root: Path, what: str = "file") -> None:
        self.root = root
        self.what = what
        self._rootfd: int | None = None
        self._file: safefs.NewFile | None = None
        self._written = 0  # bytes written into the current file
        self._parent: tuple[str, int] | None = None
        self.files = 0
        self.bytes = 0
        #: Records discarded because the source saw the file change while reading it.
        self.changed = 0

    def _open(self, entry: Entry) -> safefs.NewFile:
        if self._file is None:
            if self._rootfd is None:
                self._rootfd = safefs.open_root(self.root)
            # Files arrive directory by directory: the last parent's fd is
            # kept (nothing runs in this tree while it is written).
            head = entry.path.rpartition("/")[0]
            if self._parent is None or self._parent[0] != head:
                self._drop_parent()
                pfd, _ = safefs.open_parent(self._rootfd, entry.path)
                self._parent = (head, pfd)
            self._file = safefs.NewFile(self._rootfd, entry.path, parent_fd=self._parent[1])
            self._written = 0
        return self._file

    def write(self, entry: Entry, chunk: bytes | memoryview) -> None:
        """Data of ``entry``'s file, in order."""
        if chunk:
            self._open(entry).write(chunk)
            self._written += len(chunk)
            self.bytes += len(chunk)

    def end(self, entry: Entry, *, keep: bool) -> None:
        """The record of ``entry`` ended: commit the file (``keep``) or drop what was written."""
        if not keep:
            if self._file is not None:
                self._file.discard()
                self._file = None
            self.changed += 1
            return
        f = self._open(entry)
        self._file = None
        try:
            assert f.fd is not None
            size = os.fstat(f.fd).st_size
            for got in (self._written, size):  # what went in, what the file holds
                if got != entry.size:
                    raise integrity.size_mismatch(f"{self.what} {entry.path!r}", entry.size, got)
            f.commit(uid=entry.uid, gid=entry.gid, mode=entry.mode, mtime_ns=entry.mtime_ns)
        except BaseException:
            f.discard()
            raise
        self.files += 1

    def close(self) -> None:
        """Drops a half-written file, if any, and the root fd."""
        if self._file is not None:
            self._file.discard()
            self._file = None
        self._drop_parent()
        if self._rootfd is not None:
            os.close(self._rootfd)
            self._rootfd = None

    abort = close

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
