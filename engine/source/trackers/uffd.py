"""The kernel interface of the uffd tracker: a userfaultfd in async write-protect
mode, and ``PAGEMAP_SCAN`` on ``/proc/PID/pagemap``.

Why: with ``UFFD_FEATURE_WP_ASYNC`` a write to a write-protected page never
blocks the writer: the kernel just clears the page's uffd-wp bit. A
``PAGEMAP_SCAN`` with ``PAGE_IS_WRITTEN`` and ``PM_SCAN_WP_MATCHING`` then
lists the pages whose bit is clear (written since they were protected, or
never protected) and protects them again, atomically, in a few ms per GiB.
No copy of the memory is kept anywhere.

Only the creation of the fd needs the target (:mod:`.inject`); ``UFFDIO_API``
and ``UFFDIO_REGISTER`` act on the fd's mm and run here. Closing the fd (tug
exiting included) unregisters every range and clears the bits: the target is
never left write-protected by a tug that went away.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import socket
import struct
import sys
from dataclasses import dataclass

from tug.engine.ptrace import sys_call

UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
#: Features asked for: async write-protect only. WP_UNPOPULATED would make
#: every empty entry of a registered VMA carry a uffd-wp marker, which
#: /proc/PID/pagemap shows as a *swapped* page (PM_SWAP): CRIU would dump every
#: never touched page. A page first touched after a scan carries no bit
#: anyway, so it is reported written without it. For the same reason the
#: scans match only pages that exist (:data:`ANYOF_MASK`).
FEATURES = UFFD_FEATURE_WP_ASYNC

PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
#: What the scan reports per run. Not PAGE_IS_FILE: computing it looks up each
#: page's struct page, which made a scan of 1 GiB of 4 KiB pages 11-13 ms
#: instead of 0.7-2.5 (bench.micro_uffd); only anonymous VMAs are registered,
#: so there are no file pages to tell apart.
RETURN_MASK = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO
#: A scan matches (reports, and with PM_SCAN_WP_MATCHING protects) only pages
#: present or swapped. Empty entries count as written to the kernel (nothing
#: protects them), so without this every scan "protected" them with a uffd-wp
#: marker, which /proc/PID/pagemap shows as a swapped page: CRIU then dumped
#: every never touched page near a touched one (5 MiB of the demo workload's
#: .bss; hybrid's lazy dump, which keeps the registration, fetched them from
#: the frozen source after the commit). Nothing is lost: an empty entry
#: written later becomes a page without the bit, reported written.
ANYOF_MASK = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
_SCAN_ARG = struct.Struct("<12Q")
_REGION = struct.Struct("<3Q")
#: page_region entries per PAGEMAP_SCAN call (24 bytes each).
VEC_LEN = 4096
PAGE = 4096
KCMP_FILE = 0
NR_KCMP = 312
USERFAULTFD_LINK = "anon_inode:[userfaultfd]"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class UffdError(Exception):
    """A userfaultfd or PAGEMAP_SCAN step failed (the caller falls back to content)."""


@dataclass(frozen=True, slots=True)
class Written:
    """A run of pages PAGEMAP_SCAN reported written, with their categories."""

    start: int
    end: int
    categories: int

    @property
    def dumpable(self) -> bool:
        """Pages CRIU puts in the process's pagemap: present or swapped, anonymous,
        not the shared zero page (a page only ever read; CRIU skips it too, and
        the filter sends whatever CRIU dumps that was not sent)."""
        cats = self.categories
        return bool(cats & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED)) and not cats & (PAGE_IS_FILE | PAGE_IS_PFNZERO)


def _ioctl(fd: int, request: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    r: int = _libc.ioctl(fd, request, ctypes.addressof(buf))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def parse_regions(raw: bytes, count: int, lo: int, hi: int) -> list[Written]:
    """The first ``count`` page_region entries of ``raw``, checked.

    The kernel fills them, but the addresses describe the untrusted target:
    an entry outside [lo, hi), unaligned or empty is an error, not data.
    """
    if count < 0 or count * _REGION.size > len(raw):
        raise UffdError(f"PAGEMAP_SCAN returned {count} regions for a buffer of {len(raw) // _REGION.size}")
    out = []
    for i in range(count):
        start, end, cats = _REGION.unpack_from(raw, i * _REGION.size)
        if start % PAGE or end % PAGE or not lo <= start < end <= hi:
            raise UffdError(f"PAGEMAP_SCAN region {start:#x}-{end:#x} outside the scanned {lo:#x}-{hi:#x}")
        out.append(Written(start, end, cats))
    return out


class Pagemap:
    """``PAGEMAP_SCAN`` on one process's pagemap."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = ctypes.create_string_buffer(VEC_LEN * _REGION.size)
        self._arg = ctypes.create_string_buffer(_SCAN_ARG.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def written(self, lo: int, hi: int, *, protect: bool = True) -> list[Written]:
        """Pages of [lo, hi) written since last protected; with ``protect``,
        write-protect them again in the same walk (VMAs not registered are
        skipped by the kernel)."""
        out: list[Written] = []
        start = lo
        while start < hi:
            flags = PM_SCAN_WP_MATCHING if protect else 0
            arg = _SCAN_ARG.pack(
                _SCAN_ARG.size, flags, start, hi, 0, ctypes.addressof(self._vec), VEC_LEN, 0, 0, PAGE_IS_WRITTEN, ANYOF_MASK,
                RETURN_MASK,
            )
            ctypes.memmove(self._arg, arg, len(arg))
            try:
                n = _ioctl(self.fd, PAGEMAP_SCAN, self._arg)
            except OSError as exc:
                raise UffdError(f"PAGEMAP_SCAN {start:#x}-{hi:#x}: {exc.strerror}") from None
            out.extend(parse_regions(self._vec.raw, n, lo, hi))
            walk_end = _SCAN_ARG.unpack(self._arg.raw)[4]
            if walk_end <= start or walk_end % PAGE:
                raise UffdError(f"PAGEMAP_SCAN made no progress at {start:#x} (walk_end {walk_end:#x})")
            start = walk_end
        return out


class Userfaultfd:
    """Tug's duplicate of a userfaultfd created inside a target process."""

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.pid = pid

    def close(self) -> None:
        """Closing the last fd unregisters every range and clears the bits."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def api(self) -> None:
        """UFFDIO_API with async write-protect; fails on an fd already set up
        (so an fd the target made for itself is never mistaken for ours)."""
        buf = ctypes.create_string_buffer(struct.pack("<3Q", UFFD_API, FEATURES, 0), 24)
        try:
            _ioctl(self.fd, UFFDIO_API, buf)
        except OSError as exc:
            raise UffdError(f"UFFDIO_API (WP_ASYNC) refused: {exc.strerror}") from None
        features = struct.unpack("<3Q", buf.raw)[1]
        if features & FEATURES != FEATURES:
            raise UffdError(f"kernel lacks userfaultfd WP_ASYNC (features {features:#x})")

    def register(self, start: int, end: int) -> str:
        """Register [start, end) for write-protect; "" on success, else why not."""
        buf = ctypes.create_string_buffer(struct.pack("<4Q", start, end - start, UFFDIO_REGISTER_MODE_WP, 0), 32)
        try:
            _ioctl(self.fd, UFFDIO_REGISTER, buf)
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return ""

    def unregister(self, start: int, end: int) -> None:
        buf = ctypes.create_string_buffer(struct.pack("<2Q", start, end - start), 16)
        try:
            _ioctl(self.fd, UFFDIO_UNREGISTER, buf)
        except OSError as exc:
            raise UffdError(f"UFFDIO_UNREGISTER {start:#x}-{end:#x}: {exc.strerror}") from None

    def leaked(self, pids: list[int]) -> int | None:
        """A process of ``pids`` holding our userfaultfd (kcmp), if any.

        The target closed its own in the injection; a thread of it that
        duplicated the fd meanwhile, a child forked then, or a process it
        passed the fd to could write-protect pages itself and hide writes
        from the scan (only the container's own memory would suffer: it is
        then compared by content). An fd still in flight in a unix socket is
        in nobody's table: it is found once received, the next round.
        """
        for pid in pids:
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for name in names:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{name}") != USERFAULTFD_LINK:
                        continue
                    if sys_call(NR_KCMP, os.getpid(), pid, KCMP_FILE, self.fd, int(name)) == 0:
                        return pid
                except (OSError, ValueError):
                    continue
        return None


async def inject_userfaultfd(pid: int, timeout: float = 10.0) -> Userfaultfd:
    """Run the injection helper (:mod:`.inject`) on ``pid``; our duplicate of its fd.

    The helper runs in its own session so that signals for tug (Ctrl-C, a
    SIGKILL of tug's process group) never stop it half-way.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tug.engine.source.trackers.inject", str(pid), str(theirs.fileno()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            pass_fds=(theirs.fileno(),), start_new_session=True,
        )  # fmt: skip
        theirs.close()
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            raise UffdError(f"injection helper for {pid} did not finish in {timeout:.0f} s") from None
        ours.setblocking(False)
        try:
            msg, fds, _, _ = socket.recv_fds(ours, 4096, 1)
        except BlockingIOError:
            raise UffdError(f"injection helper for {pid} exited {proc.returncode} without a report: {err.decode()[-300:]}") from None
        status = json.loads(msg or b"{}")
        if not status.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise UffdError(f"injection into {pid} failed: {status.get('error', 'no fd received')}")
        return Userfaultfd(fds[0], pid)
    finally:
        ours.close()
        theirs.close()


_PROBE_CHILD = (
    "import ctypes, mmap, sys\n"
    "m = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
    "for i in range(16): m[i * 4096] = 1\n"
    "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n"
    "sys.stdin.readline(); m[3 * 4096] = 2; print('ok', flush=True); sys.stdin.readline()\n"
)


#: probe()'s answer, once this process has asked (a fact of the host's kernel and of tug's rights).
_probed: str | None = None


async def probe() -> str:
    """Whether the tracker works here (:func:`probe_now`), found once per process.

    A migration asks up to twice before anything changes: pre-copy's tracker
    choice, then hybrid's when pre-copy ends as hybrid; each real probe starts
    a Python process (~55 ms).
    """
    global _probed
    if _probed is None:
        _probed = await probe_now()
    return _probed


async def probe_now() -> str:
    """Try the whole tracker on a throwaway process: "" if it works, else why not.

    Injection, UFFDIO_API with WP_ASYNC, registration, a protecting scan, one
    write by the process, and a scan that must report exactly that page.
    """
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE_CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    uffd: Userfaultfd | None = None
    pm: Pagemap | None = None
    try:
        base = int(await asyncio.wait_for(child.stdout.readline(), 10))
        uffd = await inject_userfaultfd(child.pid)
        uffd.api()
        if why := uffd.register(base, base + 16 * PAGE):
            return f"UFFDIO_REGISTER (write-protect) refused: {why}"
        pm = Pagemap(child.pid)
        pm.written(base, base + 16 * PAGE)
        child.stdin.write(b"\n")
        await child.stdin.drain()
        await asyncio.wait_for(child.stdout.readline(), 10)
        got = [(w.start, w.end) for w in pm.written(base, base + 16 * PAGE)]
        want = [(base + 3 * PAGE, base + 4 * PAGE)]
        return "" if got == want else f"PAGEMAP_SCAN reported {len(got)} written runs where one page was written"
    except (UffdError, OSError, ValueError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        for res in (pm, uffd):
            if res is not None:
                res.close()
        if child.returncode is None:
            child.kill()
        await child.wait()
