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

The one invariant everything rests on: a page is reported unchanged only if
its bytes are identical to the bytes last recorded for that key, and a page
never recorded is always changed. How the shadow is laid out is only about
speed. It is kept per pid in aligned blocks of BLOCK_PAGES pages, each one
bytearray of its recorded pages' bytes plus a valid marker per page, so that
the common case (a block nobody wrote) costs one memcmp of up to 256 KiB
instead of 64 Python-level page compares and dict lookups; only a block that
differs is refined, a group of pages and then a page at a time. A block is
allocated when a page in it is first recorded and holds only recorded pages.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tug.engine.procfs import Region, ns_pid, parse_maps
from tug.engine.source.trackers import vmread

PAGE = 4096
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE_OR_SHARED = 1 << 61
#: Pages read per /proc/PID/mem call: big enough to amortise the syscall and
#: the thread hop, small enough that streaming starts while the scan goes on.
CHUNK_PAGES = 1024
#: Pages per shadow block (256 KiB of address space). Large enough that
#: Python's per-block overhead is small next to the memcmp, small enough that
#: refining a block with one written page is cheap.
BLOCK_PAGES = 64
#: Pages compared at once when refining a block that differs.
_GROUP_PAGES = 8
_ALL_VALID = b"\x01" * BLOCK_PAGES


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


class ProcessMemory:
    """Read access to one live process's memory (root, or ptrace rights)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # First: while it reports the process alive, ``pid`` is that process
        # (the files below, and read_vectored, name it by pid).
        with contextlib.ExitStack() as undo:  # on any failure, what was opened is closed
            self._pidfd = os.pidfd_open(pid)
            undo.callback(os.close, self._pidfd)
            self.ns_pid = ns_pid(pid)
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            undo.callback(os.close, self._mem)
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            undo.callback(os.close, self._pagemap)
            if not vmread.alive(self._pidfd):
                raise ProcessLookupError(f"process {pid} exited")
            undo.pop_all()

    def close(self) -> None:
        os.close(self._mem)
        os.close(self._pagemap)
        os.close(self._pidfd)

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

    def present(self, vaddr: int, npages: int) -> list[tuple[int, int]]:
        """Dumpable page runs among ``npages`` pages from ``vaddr`` (one pagemap read)."""
        raw = os.pread(self._pagemap, npages * 8, vaddr // PAGE * 8)
        return list(anon_runs(vaddr, struct.unpack(f"<{len(raw) // 8}Q", raw)))

    def read(self, vaddr: int, npages: int) -> bytes:
        """The pages' current bytes; b"" if the mapping vanished meanwhile."""
        try:
            return os.pread(self._mem, npages * PAGE, vaddr)
        except OSError:
            return b""

    def read_vectored(self, pieces: list[tuple[int, int]], into: bytearray) -> int:
        """``pieces`` (address, bytes) into ``into`` one after the other, in one
        call (:mod:`.vmread`); how many bytes from the first piece on."""
        return vmread.read_vectored(self.pid, self._pidfd, pieces, into)

    def read_into(self, vaddr: int, into: memoryview) -> int:
        """Read the pages at ``vaddr`` into ``into``; how many bytes (0 if the mapping vanished)."""
        try:
            return os.preadv(self._mem, [into], vaddr)
        except OSError:
            return 0


@dataclass(slots=True)
class ScanResult:
    scanned: int
    #: Runs of changed pages: (vaddr, bytes of n whole pages), ascending.
    changed: list[tuple[int, bytes]]

    @property
    def changed_pages(self) -> int:
        return sum(len(d) // PAGE for _, d in self.changed)


class _Block:
    """The last-sent bytes of one aligned BLOCK_PAGES-page block of one process.

    ``buf`` holds only the recorded pages, packed in slot order: a block with
    few resident pages costs those pages, not 256 KiB. A page's offset in
    ``buf`` is the number of recorded slots before it, so a run of recorded
    slots is one contiguous stretch of ``buf`` and compares in one memcmp.
    ``valid[slot]`` is 1 once the slot was recorded.
    """

    __slots__ = ("buf", "valid")

    def __init__(self, slot: int, seg: memoryview) -> None:
        self.buf = bytearray(seg)
        self.valid = bytearray(BLOCK_PAGES)
        self.valid[slot : slot + len(seg) // PAGE] = _ALL_VALID[: len(seg) // PAGE]

    def same(self, slot: int, seg: memoryview) -> bool:
        """Were all of seg's pages recorded, with exactly these bytes?

        bytearray.startswith takes any buffer and is a single memcmp at an
        offset, copying neither side (``memoryview == memoryview`` would
        compare element by element, ~100 times slower).
        """
        valid = self.valid
        return valid.find(0, slot, slot + len(seg) // PAGE) < 0 and self.buf.startswith(
            seg, valid.count(1, 0, slot) * PAGE
        )

    def changed(self, slot: int, seg: memoryview) -> list[tuple[int, int]]:
        """Maximal runs [start, end) of seg's pages (indices into seg) that differ.

        Called only for a segment that differs somewhere. Groups of
        _GROUP_PAGES are tried first: a typical dirty block has one or two
        written pages, so most groups pass with one memcmp, and only the
        groups that differ pay a Python step per page.
        """
        npages = len(seg) // PAGE
        runs: list[tuple[int, int]] = []
        for g in range(0, npages, _GROUP_PAGES):
            g_end = min(g + _GROUP_PAGES, npages)
            if self.same(slot + g, seg[g * PAGE : g_end * PAGE]):
                continue
            for k in range(g, g_end):
                if self.same(slot + k, seg[k * PAGE : (k + 1) * PAGE]):
                    continue
                if runs and runs[-1][1] == k:
                    runs[-1] = (runs[-1][0], k + 1)
                else:
                    runs.append((k, k + 1))
        return runs

    def store(self, slot: int, seg: memoryview) -> int:
        """Record seg's pages from ``slot`` on; returns how many were new."""
        end = slot + len(seg) // PAGE
        valid = self.valid
        off = valid.count(1, 0, slot) * PAGE
        old = valid.count(1, slot, end) * PAGE
        if old == len(seg):
            self.buf[off : off + old] = seg  # same size: in place
            return 0
        # New pages: rebuild at exactly the new size (one copy) rather than
        # let bytearray over-allocate, since the shadow's size is the
        # tracker's whole memory cost.
        with memoryview(self.buf) as mv:
            self.buf = bytearray().join((mv[:off], seg, mv[off + old :]))
        valid[slot:end] = _ALL_VALID[: end - slot]
        return (len(seg) - old) // PAGE


class ShadowView(Mapping[tuple[int, int], bytes]):
    """Read-only ``(pid, vaddr) -> bytes last sent``: for tests and diagnostics."""

    def __init__(self, blocks: dict[int, dict[int, _Block]]) -> None:
        self._blocks = blocks

    def __getitem__(self, key: tuple[int, int]) -> bytes:
        pid, vaddr = key
        page = vaddr // PAGE
        blk = self._blocks.get(pid, {}).get(page // BLOCK_PAGES)
        slot = page % BLOCK_PAGES
        if vaddr % PAGE or blk is None or not blk.valid[slot]:
            raise KeyError(key)
        off = blk.valid.count(1, 0, slot) * PAGE
        return bytes(blk.buf[off : off + PAGE])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pid, blocks in self._blocks.items():
            for index in sorted(blocks):
                valid = blocks[index].valid
                for slot in range(BLOCK_PAGES):
                    if valid[slot]:
                        yield pid, (index * BLOCK_PAGES + slot) * PAGE

    def __len__(self) -> int:
        return sum(b.valid.count(1) for blocks in self._blocks.values() for b in blocks.values())


class ContentTracker:
    """Which pages differ from what the destination holds.

    ``shadow[(pid, vaddr)]`` is exactly the last content sent for that page;
    the destination's store holds the same bytes because the stream is
    ordered and lossless (any break fails the migration).
    """

    def __init__(self) -> None:
        #: pid -> block index (vaddr // (BLOCK_PAGES * PAGE)) -> block.
        self._blocks: dict[int, dict[int, _Block]] = {}
        self._pages = 0

    @property
    def pages(self) -> int:
        """Pages recorded (what the destination holds)."""
        return self._pages

    @property
    def shadow(self) -> ShadowView:
        return ShadowView(self._blocks)

    @property
    def shadow_bytes(self) -> int:
        """Bytes held for page contents: the tracker's memory cost, give or take
        ~250 bytes of bookkeeping per block of up to BLOCK_PAGES pages."""
        return sum(len(b.buf) for blocks in self._blocks.values() for b in blocks.values())

    def needs_data(self, pid: int, vaddr: int, npages: int) -> list[tuple[int, int]]:
        """Every page: only a compare tells (psfilter.PageFilter)."""
        return [(vaddr, vaddr + npages * PAGE)] if npages > 0 else []

    def diff(self, pid: int, vaddr: int, data: bytes | bytearray | memoryview, *, record: bool = True) -> ScanResult:
        """Compare ``data`` (whole pages starting at vaddr) with the shadow.

        With ``record`` the shadow is updated to the new content, on the
        promise that the caller sends the returned runs. ``data`` may be a
        borrowed view (the final dump's pages as they arrive from CRIU): the
        changed runs returned are always bytes of their own. The input is walked
        in segments that each lie inside one block: an unchanged segment (the
        common case) costs one dict lookup and one memcmp, whatever its size.
        """
        if vaddr % PAGE:
            raise ValueError(f"vaddr {vaddr:#x} is not page aligned")
        blocks = self._blocks.get(pid)
        if blocks is None:
            blocks = {}
            if record:
                self._blocks[pid] = blocks
        n = len(data) // PAGE
        changed: list[tuple[int, bytes]] = []
        run_lo = run_hi = 0  # changed pages not yet emitted: [run_lo, run_hi) of data
        first_page = vaddr // PAGE
        with memoryview(data) as view:
            i = 0
            while i < n:
                index, slot = divmod(first_page + i, BLOCK_PAGES)
                cnt = min(BLOCK_PAGES - slot, n - i)
                seg = view[i * PAGE : (i + cnt) * PAGE]
                blk = blocks.get(index)
                runs: list[tuple[int, int]]
                if blk is None:
                    runs = [(0, cnt)]
                    if record:
                        blocks[index] = _Block(slot, seg)
                        self._pages += cnt
                elif blk.same(slot, seg):
                    runs = []
                else:
                    runs = blk.changed(slot, seg)
                    if record and blk.valid.find(0, slot, slot + cnt) >= 0:
                        # New pages make the block grow: one rebuild for the
                        # whole segment rather than one per run (rewriting
                        # the unchanged pages with the same bytes is moot).
                        self._pages += blk.store(slot, seg)
                    elif record:
                        for s, e in runs:
                            blk.store(slot + s, seg[s * PAGE : e * PAGE])
                for s, e in runs:
                    if s + i == run_hi and run_hi > run_lo:
                        run_hi = e + i
                        continue
                    if run_hi > run_lo:
                        changed.append((vaddr + run_lo * PAGE, bytes(data[run_lo * PAGE : run_hi * PAGE])))
                    run_lo, run_hi = s + i, e + i
                i += cnt
        if run_hi > run_lo:
            changed.append((vaddr + run_lo * PAGE, bytes(data[run_lo * PAGE : run_hi * PAGE])))
        return ScanResult(scanned=n, changed=changed)

    def scan(self, mem: ProcessMemory, vaddr: int, npages: int) -> ScanResult:
        data = mem.read(vaddr, npages)
        return self.diff(mem.ns_pid, vaddr, data)
