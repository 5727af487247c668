"""File-system operations on trees a container controls, relative to a root fd.

A container's rootfs is hostile input on both hosts: any name in it may be a
symlink, and any entry may be swapped for one between two of our system calls.
Path strings are therefore never handed to the kernel from the host's root.
Every operation starts at a directory fd opened on the tree's root and
resolves the rest with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``
(kernel >= 5.6), or, where that is missing or the path is longer than
``PATH_MAX``, one ``O_NOFOLLOW`` component at a time. The final name of each
operation is acted on through its parent's fd with the ``*at`` calls and
``AT_SYMLINK_NOFOLLOW``; metadata goes through the file's own fd.

So a symlink anywhere in a path makes the operation fail (``ELOOP`` or
``ENOTDIR``) instead of leaving the tree; callers turn that into a skipped
entry (the next pass sees the symlink as what it is) or an
:class:`UnsafePathError`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from tug.engine.errors import UnsafePathError

_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_PATH_MAX = 4096

# By name: ctypes.util.find_library runs ldconfig -p (a subprocess) per call.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


#: None until the first call finds out; tests may set it False to exercise
#: the component walk that kernels without openat2 use.
openat2_available: bool | None = None

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _openat2(dirfd: int, rel: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags=flags, mode=mode, resolve=_RESOLVE)
    fd = int(_libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return fd


def _walk_open(dirfd: int, rel: str, flags: int, mode: int) -> int:
    parts = rel.split("/")
    fd = os.dup(dirfd)
    try:
        for name in parts[:-1]:
            nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, mode, dir_fd=fd)
    finally:
        os.close(fd)


def check_relpath(rel: str) -> None:
    """Refuse what could name anything but an entry below the root."""
    if not rel or rel.startswith("/") or "\x00" in rel or any(p in ("..", ".", "") for p in rel.split("/")):
        raise UnsafePathError(f"unsafe path in a container tree: {rel!r}")


def open_beneath(rootfd: int, rel: str, flags: int, mode: int = 0) -> int:
    """Open ``rel`` below ``rootfd`` following no symlink on the way or at the end."""
    global openat2_available
    check_relpath(rel)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if openat2_available is not False and len(rel) < _PATH_MAX - 1:
        try:
            fd = _openat2(rootfd, rel, flags, mode)
        except OSError as exc:
            # ENOSYS: a kernel before 5.6; EPERM: a seccomp filter refusing it.
            if exc.errno not in (errno.ENOSYS, errno.EPERM) or openat2_available:
                raise
            openat2_available = False
        else:
            openat2_available = True
            return fd
    return _walk_open(rootfd, rel, flags, mode)


def open_root(path: str | os.PathLike[str]) -> int:
    """The tree's root itself is the host's choice (a bundle path), so it may be followed."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@contextmanager
def root_fd(path: str | os.PathLike[str]) -> Iterator[int]:
    fd = open_root(path)
    try:
        yield fd
    finally:
        os.close(fd)


def open_parent(rootfd: int, rel: str) -> tuple[int, str]:
    """An fd of the directory holding ``rel`` (the caller closes it), and the last name."""
    check_relpath(rel)
    head, _, name = rel.rpartition("/")
    if not head:
        return os.dup(rootfd), name
    try:
        return open_beneath(rootfd, head, os.O_RDONLY | os.O_DIRECTORY), name
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise UnsafePathError(f"{head!r} is not a directory of the container's tree (a symlink?)") from None
        if exc.errno == errno.ENOENT:
            raise UnsafePathError(f"{head!r} does not exist in the container's tree") from None
        raise


@contextmanager
def parent(rootfd: int, rel: str) -> Iterator[tuple[int, str]]:
    fd, name = open_parent(rootfd, rel)
    try:
        yield fd, name
    finally:
        os.close(fd)


def open_regular_for_read(rootfd: int, rel: str) -> int | None:
    """A read fd on ``rel`` if it is a regular file right now, else None.

    ``O_PATH`` first, so a device node or FIFO swapped in is never opened
    for real (no driver ``open``, no blocking); then the checked inode is
    reopened for reading through its own fd.
    """
    try:
        pfd = open_beneath(rootfd, rel, os.O_PATH)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            return None
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(pfd)


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dirfd: int, name: str) -> None:
    """Remove ``name`` (a whole directory tree too) without following symlinks."""
    st = lstat_at(dirfd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # rmtree with dir_fd is fd-based on Linux: symlinks inside are unlinked, never followed.
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def remove(rootfd: int, rel: str) -> None:
    head = rel.rpartition("/")[0]
    if head:
        check_relpath(head)
        try:
            os.close(open_beneath(rootfd, head, os.O_PATH | os.O_DIRECTORY))
        except FileNotFoundError:
            return  # its parent went first
        except OSError:
            pass  # open_parent below says what is wrong with it
    pfd, name = open_parent(rootfd, rel)
    try:
        remove_at(pfd, name)
    finally:
        os.close(pfd)


def set_meta_fd(fd: int, *, uid: int, gid: int, mode: int, mtime_ns: int | None) -> None:
    """Owner before mode: chown clears setuid/setgid bits."""
    os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)
    if mtime_ns is not None:
        os.utime(fd, ns=(mtime_ns, mtime_ns))


def make_dir(rootfd: int, rel: str, *, uid: int, gid: int, mode: int) -> None:
    with parent(rootfd, rel) as (pfd, name):
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePathError(f"{rel!r} exists and is not a directory") from None
            raise
        try:
            set_meta_fd(fd, uid=uid, gid=gid, mode=mode, mtime_ns=None)
        finally:
            os.close(fd)


def make_symlink(rootfd: int, rel: str, target: str, *, uid: int, gid: int, mtime_ns: int) -> None:
    """The link is created, owned and dated as itself; its target is never looked at."""
    with parent(rootfd, rel) as (pfd, name):
        remove_at(pfd, name)
        os.symlink(target, name, dir_fd=pfd)
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)


def make_node(rootfd: int, rel: str, kind: int, rdev: int, *, uid: int, gid: int, mode: int, mtime_ns: int) -> None:
    """A named pipe or device node, made in place of whatever is at ``rel``.

    Its owner and mode are set through an ``O_PATH`` fd of the node just
    made (opening a device or a pipe for real could block or act), its time
    by name without following a symlink.
    """
    with parent(rootfd, rel) as (pfd, name):
        remove_at(pfd, name)
        os.mknod(name, kind | 0o600, rdev, dir_fd=pfd)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != kind:
                raise UnsafePathError(f"{rel!r} changed while it was being made")
            # fchown/fchmod refuse O_PATH fds; the fd's /proc link names exactly this inode.
            os.chown(f"/proc/self/fd/{fd}", uid, gid)
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)


class NewFile:
    """A file written under a fresh random name, then renamed over ``rel``.

    The temporary is created ``O_EXCL|O_NOFOLLOW``, so nothing the container
    planted (a symlink at a guessed name) is opened; metadata is set on the fd.
    """

    def __init__(self, rootfd: int, rel: str, parent_fd: int | None = None) -> None:
        """``parent_fd``: an fd of ``rel``'s directory the caller already holds (it is duplicated)."""
        self.rel = rel
        if parent_fd is not None:
            self.pfd, self.name = os.dup(parent_fd), rel.rpartition("/")[2]
        else:
            self.pfd, self.name = open_parent(rootfd, rel)
        try:
            self.tmp = f".tug-{secrets.token_hex(8)}"
            self.fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.pfd
            )
        except BaseException:
            os.close(self.pfd)
            raise

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def commit(self, *, uid: int, gid: int, mode: int, mtime_ns: int) -> None:
        assert self.fd is not None
        try:
            set_meta_fd(self.fd, uid=uid, gid=gid, mode=mode, mtime_ns=mtime_ns)
        finally:
            os.close(self.fd)
            self.fd = None
        st = lstat_at(self.pfd, self.name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.name, dir_fd=self.pfd)
        os.rename(self.tmp, self.name, src_dir_fd=self.pfd, dst_dir_fd=self.pfd)
        os.close(self.pfd)
        self.pfd = -1

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.pfd >= 0:
            try:
                os.unlink(self.tmp, dir_fd=self.pfd)
            except FileNotFoundError:
                pass
            os.close(self.pfd)
            self.pfd = -1
