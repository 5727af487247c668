"""Read access to the frozen container's processes, for the final steps that leave the memory in them.

After a lazy dump CRIU holds the processes stopped (ptrace) with the cgroup
freezer thawed; their memory is then the truth the destination is filled
from (hybrid, pre-copy's eager step). Every read is followed by a check that
CRIU still holds them: if it died and let them run, the bytes read may not
be the frozen ones, and nothing more is served (:class:`NotFrozen`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from tug.engine.errors import MigrationError
from tug.engine.procfs import SPECIAL, Region, parse_maps
from tug.engine.source.trackers.shadow import PAGE, ProcessMemory


class NotFrozen(MigrationError):
    """The source's processes are no longer held stopped: their memory is no longer the truth."""


def _private_regions(mem: ProcessMemory) -> list[Region]:
    """Private mappings whose pages CRIU may leave lazy: readable or not (CRIU dumps a
    PROT_NONE mapping's pages too, and /proc/PID/mem reads them as root)."""
    return [r for r in parse_maps(Path(f"/proc/{mem.pid}/maps").read_text()) if r.private and r.path not in SPECIAL]


class FrozenMemory:
    """Read access to the frozen container's processes, keyed by namespace pid.

    ``still_frozen`` is asked after every read: true then means the
    processes were stopped during the read too (nothing lets them go and
    stops them again), so the bytes read are the frozen ones. If CRIU died
    and let them run, :class:`NotFrozen` is raised instead of serving them.
    """

    def __init__(self, procs: list[ProcessMemory], still_frozen: Callable[[], bool] = lambda: True) -> None:
        self.procs = {m.ns_pid: m for m in procs}
        self.regions: dict[int, list[Region]] = {pid: _private_regions(m) for pid, m in self.procs.items()}
        self.still_frozen = still_frozen

    @classmethod
    def open(cls, host_pids: list[int], still_frozen: Callable[[], bool]) -> FrozenMemory:
        procs = []
        for pid in host_pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                procs.append(ProcessMemory(pid))
        return cls(procs, still_frozen)

    def close(self) -> None:
        for m in self.procs.values():
            m.close()
        self.procs.clear()

    def covered(self, pid: int, vaddr: int, npages: int) -> bool:
        """Do candidate mappings of ``pid`` cover the range without a gap?"""
        at, end = vaddr, vaddr + npages * PAGE
        for r in self.regions.get(pid, ()):
            if r.start <= at < r.end:
                at = r.end
                if at >= end:
                    return True
        return False

    def read(self, pid: int, vaddr: int, npages: int, *, check: bool = True) -> bytes | None:
        """The pages' frozen bytes, or None if ``pid`` has no such pages.

        ``check=False`` leaves :meth:`check_frozen` to the caller, once after
        a batch of reads (a check reads /proc: one per page run was a good
        part of the sweep's CPU when the changed pages are scattered).
        """
        if not self.covered(pid, vaddr, npages):
            return None
        data = self.procs[pid].read(vaddr, npages)
        if check:
            self.check_frozen()
        return data if len(data) == npages * PAGE else None

    def check_frozen(self) -> None:
        """Raise :class:`NotFrozen` unless the processes are still held (then what
        was read, or judged unchanged without a read, is the frozen content)."""
        if not self.still_frozen():
            raise NotFrozen("the source's processes are no longer held stopped (its CRIU ended): nothing more is served")

    def present(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, int, int]]:
        """(pid, vaddr, npages) runs of dumpable pages in the range (none if unknown or unmapped)."""
        mem = self.procs.get(pid)
        if mem is None or not self.covered(pid, vaddr, npages):
            return []
        try:
            return [(pid, v, n) for v, n in mem.present(vaddr, npages)]
        except OSError:
            return []

    def sweep_runs(self, pid: int) -> list[tuple[int, int]]:
        """The dumpable page runs of ``pid`` (chunks of at most MAX_PAGES), top down."""
        mem = self.procs[pid]
        runs: list[tuple[int, int]] = []
        for region in self.regions[pid]:
            with contextlib.suppress(OSError):
                runs.extend(mem.runs(region))
        return sorted(runs, reverse=True)
