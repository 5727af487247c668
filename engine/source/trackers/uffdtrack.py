"""What the uffd tracker knows: which pages the destination holds, per process.

Why no shadow: a page's uffd-wp bit is set only by tug's own scans (every
protect goes through ``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING`` on tug's
userfaultfd), and the kernel clears it on any write. So "bit set" means
"not written since tug protected it and then read it", whatever happened
meanwhile: a VMA mapped again at the same address, moved by mremap, or
copied into a forked child carries no bits and reads as written. What is left
to remember is one byte per page sent (a :class:`~tug.engine.pageset.PageSet`), ~0.5 MiB per GiB.

The one invariant: a page of a dump is skipped only if it was read and sent
after its bit was set, its bit is still set at the freeze, and it lies in a
VMA registered with tug's userfaultfd at the freeze. Everything else goes to
the content tracker (:class:`~.shadow.ContentTracker`), which compares bytes
with what it sent for the regions it covered and calls every page it never
recorded changed.

Registration is tried again every round on every private, readable,
anonymous VMA: a
VMA already registered with tug's fd is left as it is, a new one becomes
tracked, and one the kernel refuses (registered by the container's own
userfaultfd, a shared mapping, a range that changed meanwhile) is compared by
content for that round, and its held pages forgotten.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tug.engine.pageset import PageSet
from tug.engine.procfs import Region
from tug.engine.source.trackers.shadow import PAGE, ContentTracker, ScanResult
from tug.engine.source.trackers.uffd import Pagemap, Userfaultfd, Written


@dataclass(slots=True)
class Process:
    """One process under the tracker: tug's duplicate of its userfaultfd."""

    pid: int
    ns_pid: int
    start_time: str
    uffd: Userfaultfd
    pagemap: Pagemap

    def close(self) -> None:
        self.pagemap.close()
        self.uffd.close()


@dataclass(slots=True)
class Sources:
    """Where one round's (or the freeze's) pages came from: the report's line."""

    uffd_written: int = 0  # pages the scans reported written (dumpable ones)
    content_scanned: int = 0  # pages compared by content (fallback)
    content_changed: int = 0
    fallback: Counter[str] = field(default_factory=Counter)  # why regions / processes were compared

    def line(self) -> str:
        why = ", ".join(f"{n}x {k}" for k, n in sorted(self.fallback.items()))
        return (
            f"{self.uffd_written} pages written (uffd scan); {self.content_scanned} compared by content, "
            f"{self.content_changed} changed" + (f" (fallback: {why})" if why else "")
        )


def start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: tells a process from a later one with its pid."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]


def anonymous(region: Region) -> bool:
    """No file behind it (the kernel names such mappings "", [heap], [stack]
    or [anon:NAME]; a file mapping's name is its path, which starts with "/"
    or names a pseudo file system)."""
    return region.path in ("", "[heap]", "[stack]") or region.path.startswith("[anon:")


def register_all(proc: Process, regions: list[Region]) -> tuple[list[Region], list[tuple[Region, str]]]:
    """Register every anonymous region for write-protect: (tracked, [(untracked, why)]).

    File-backed private mappings (a binary's .data, a library's) are left to
    the content compare: registering them would make the scan put uffd-wp
    markers into their empty entries (the kernel always uses markers for
    files), which CRIU would then dump as swapped pages.
    """
    ok: list[Region] = []
    refused: list[tuple[Region, str]] = []
    for r in regions:
        if not anonymous(r):
            refused.append((r, "file-backed mapping"))
            continue
        why = proc.uffd.register(r.start, r.end)
        if why:
            refused.append((r, f"register {why}"))
        else:
            ok.append(r)
    return ok, refused


class UffdTracker:
    """The uffd tracker's record, and the frozen dump's filter (:meth:`diff`)."""

    def __init__(self, content: ContentTracker) -> None:
        #: The fallback: compares bytes for whatever the scans do not cover.
        self.content = content
        self.held = PageSet()
        #: Per pid in the container: the ranges registered at the freeze, sorted.
        self._frozen: dict[int, list[tuple[int, int]]] = {}

    def note_written(self, proc: Process, runs: list[Written]) -> list[tuple[int, int]]:
        """Forget the pages a scan reported written; the dumpable runs to read and send."""
        out = []
        for w in runs:
            self.held.forget(proc.ns_pid, w.start, w.end)
            if w.dumpable:
                out.append((w.start, w.end))
        return out

    def sent(self, ns_pid: int, vaddr: int, data: bytes | memoryview) -> None:
        """The caller sends ``data`` (read after the page was protected)."""
        self.held.add(ns_pid, vaddr, vaddr + len(data) // PAGE * PAGE)

    def untracked(self, ns_pid: int, region: Region) -> None:
        """A region goes to the content compare: what was held there no longer counts."""
        self.held.forget(ns_pid, region.start, region.end)

    def freeze(self, proc: Process, regions: list[Region], sources: Sources) -> None:
        """At the freeze: register again (tells what is tracked), scan without
        protecting, forget what was written. Milliseconds; nothing is read.

        The processes stay registered while CRIU dumps them: the scans put no
        uffd-wp marker into empty entries (uffd.ANYOF_MASK), so the pagemap
        CRIU reads shows exactly the pages there are, and unregistering
        (~25 ms per GiB inside the frozen window: the kernel clears every
        entry's bit) bought nothing. A restored process never has tug's
        registration (CRIU restores VMAs without uffd flags; tested end to
        end), and a source resumed after a rollback loses it when tug closes
        its fds.
        """
        ok, refused = register_all(proc, regions)
        for r, why in refused:
            self.untracked(proc.ns_pid, r)
            sources.fallback[why] += 1
        self._frozen[proc.ns_pid] = sorted((r.start, r.end) for r in ok)
        for r in ok:
            written = proc.pagemap.written(r.start, r.end, protect=False)
            for lo, hi in self.note_written(proc, written):
                sources.uffd_written += (hi - lo) // PAGE

    def forget_pid(self, ns_pid: int) -> None:
        self.held.forget_pid(ns_pid)
        self._frozen.pop(ns_pid, None)

    def _tracked_end(self, pid: int, vaddr: int) -> int:
        """End of the frozen registered range holding vaddr (vaddr if none)."""
        ranges = self._frozen.get(pid, [])
        i = bisect.bisect_right(ranges, (vaddr, 2**64)) - 1
        if i >= 0 and ranges[i][0] <= vaddr < ranges[i][1]:
            return ranges[i][1]
        return vaddr

    def needs_data(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, int]]:
        """The runs the content tracker must judge: held pages inside a range
        registered at the freeze are the destination's as they are."""
        if vaddr % PAGE:
            raise ValueError(f"vaddr {vaddr:#x} is not page aligned")
        end = vaddr + npages * PAGE
        tracked_end = min(self._tracked_end(pid, vaddr), end)
        check: list[tuple[int, int]] = self.held.missing(pid, vaddr, tracked_end) if tracked_end > vaddr else []
        if tracked_end < end:
            if check and check[-1][1] == tracked_end:
                check[-1] = (check[-1][0], end)
            else:
                check.append((tracked_end, end))
        return check

    def diff(self, pid: int, vaddr: int, data: bytes | bytearray | memoryview, *, record: bool = True) -> ScanResult:
        """The runs of a dump's pages the destination does not hold (see the invariant).

        Held pages inside a range registered at the freeze are skipped; every
        other run is the content tracker's to judge (byte compare against
        what it sent; never recorded means changed).
        """
        n = len(data) // PAGE
        changed: list[tuple[int, bytes]] = []
        with memoryview(data) as view:
            for lo, hi in self.needs_data(pid, vaddr, n):
                res = self.content.diff(pid, lo, view[lo - vaddr : hi - vaddr], record=record)
                changed.extend(res.changed)
        return ScanResult(scanned=n, changed=changed)
