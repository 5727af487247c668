"""The content tracker: pre-copy on kernels without soft-dirty tracking.

Without ``CONFIG_MEM_SOFT_DIRTY`` nothing in the kernel says which pages a
running process wrote, so this tracker reads the container's memory itself
(``/proc/PID/maps`` for mappings, ``/proc/PID/pagemap`` for present anonymous
pages, ``/proc/PID/mem`` for their bytes) and compares each page with a shadow
copy of exactly the bytes last sent to the destination.

Why a shadow copy rather than hashes: the final step reuses a destination page
only when it is *byte-identical* to the frozen dump's page. Comparing against
the very bytes that were sent makes that true by construction (no hash can
collide), and a page that was torn while being read during a round simply
compares unequal at the end and is sent again. The price is source memory
equal to the container's resident anonymous memory; memcmp costs about the
same as hashing.

The key of a page is (pid inside the container's pid namespace, virtual
address): the names CRIU itself uses in ``pagemap-<pid>.img``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE_OR_SHARED = 1 << 61
#: Mappings the kernel special-cases; CRIU never dumps their pages.
SPECIAL = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]", "[uprobes]")
#: Pages read per /proc/PID/mem call: big enough to amortise the syscall and
#: the thread hop, small enough that streaming starts while the scan goes on.
CHUNK_PAGES = 1024


@dataclass(frozen=True, slots=True)
class Region:
    start: int
    end: int
    perms: str
    path: str

    @property
    def private(self) -> bool:
        return len(self.perms) > 3 and self.perms[3] == "p"

    @property
    def candidate(self) -> bool:
        """Could CRIU dump pages of this mapping into the process's pagemap?"""
        return self.private and self.perms[0] == "r" and self.path not in SPECIAL


def parse_maps(text: str) -> list[Region]:
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        out.append(Region(int(lo, 16), int(hi, 16), parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def anon_runs(vaddr: int, entries: memoryview | tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """Runs (vaddr, npages) of pages that are present (or swapped) and anonymous.

    Those are the pages CRIU dumps for a private mapping: a page with bit 61
    set is still the file's (or shared) page and is not part of the dump.
    """
    start = -1
    for i, e in enumerate(entries):
        dumpable = bool(e & (PM_PRESENT | PM_SWAP)) and not (e & PM_FILE_OR_SHARED)
        if dumpable and start < 0:
            start = i
        elif not dumpable and start >= 0:
            yield vaddr + start * PAGE, i - start
            start = -1
    if start >= 0:
        yield vaddr + start * PAGE, len(entries) - start


def ns_pid(pid: int) -> int:
    """The pid as the container sees it (innermost NSpid): CRIU's name for it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


class ProcessMemory:
    """Read access to one live process's memory (root, or ptrace rights)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ns_pid = ns_pid(pid)
        self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._mem)
        os.close(self._pagemap)

    def regions(self) -> list[Region]:
        return [r for r in parse_maps(Path(f"/proc/{self.pid}/maps").read_text()) if r.candidate]

    def runs(self, region: Region) -> list[tuple[int, int]]:
        """Dumpable page runs of ``region``, split into CHUNK_PAGES pieces."""
        n = (region.end - region.start) // PAGE
        raw = os.pread(self._pagemap, n * 8, region.start // PAGE * 8)
        entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
        out = []
        for vaddr, count in anon_runs(region.start, entries):
            for off in range(0, count, CHUNK_PAGES):
                out.append((vaddr + off * PAGE, min(CHUNK_PAGES, count - off)))
        return out

    def read(self, vaddr: int, npages: int) -> bytes:
        """The pages' current bytes; b"" if the mapping vanished meanwhile."""
        try:
            return os.pread(self._mem, npages * PAGE, vaddr)
        except OSError:
            return b""


@dataclass(slots=True)
class ScanResult:
    scanned: int
    #: Runs of changed pages: (vaddr, bytes of n whole pages), ascending.
    changed: list[tuple[int, bytes]]

    @property
    def changed_pages(self) -> int:
        return sum(len(d) // PAGE for _, d in self.changed)


class ContentTracker:
    """Which pages differ from what the destination holds.

    ``shadow[(pid, vaddr)]`` is exactly the last content sent for that page;
    the destination's store holds the same bytes because the stream is
    ordered and lossless (any break fails the migration).
    """

    def __init__(self) -> None:
        self.shadow: dict[tuple[int, int], bytes] = {}

    @property
    def pages(self) -> int:
        return len(self.shadow)

    def diff(self, pid: int, vaddr: int, data: bytes, *, record: bool = True) -> ScanResult:
        """Compare ``data`` (whole pages starting at vaddr) with the shadow.

        With ``record`` the shadow is updated to the new content, on the
        promise that the caller sends the returned runs.
        """
        shadow = self.shadow
        changed: list[tuple[int, bytes]] = []
        run_start = -1
        n = len(data) // PAGE
        for i in range(n):
            page = data[i * PAGE : (i + 1) * PAGE]
            key = (pid, vaddr + i * PAGE)
            if shadow.get(key) != page:
                if record:
                    shadow[key] = page
                if run_start < 0:
                    run_start = i
            elif run_start >= 0:
                changed.append((vaddr + run_start * PAGE, data[run_start * PAGE : i * PAGE]))
                run_start = -1
        if run_start >= 0:
            changed.append((vaddr + run_start * PAGE, data[run_start * PAGE : n * PAGE]))
        return ScanResult(scanned=n, changed=changed)

    def scan(self, mem: ProcessMemory, vaddr: int, npages: int) -> ScanResult:
        data = mem.read(vaddr, npages)
        return self.diff(mem.ns_pid, vaddr, data)
