"""The destination's store of pre-copied pages, and how CRIU is made to read it in place.

Per process, pages are kept in *segments*: tmpfs files whose pages are in
ascending address order, each page in exactly one slot (a page sent again
overwrites its slot). Round 0 streams a process's memory in ascending order,
so it fills one segment; a page first seen later that does not extend the
current segment ascending starts a new one. Few rounds bring new pages, so a
process has few segments.

At the final step CRIU's pagemap (from the frozen dump, sent whole) says which
pages the restore needs. Copying them into a fresh ``pages-<id>.img`` in
pagemap order would materialise the container's whole memory once more inside
the downtime (seconds per GiB on these VMs). Instead the segments become a
chain of parent images, the layout CRIU's own incremental dumps produce:

* the top pagemap (in the images dir) keeps CRIU's entries, all marked
  ``PE_PARENT``, with an empty pages file;
* parent level *k* (``chain-k``, linked by relative ``parent`` symlinks from
  the top down to ``chain-0``) holds segment *k* of every process as its pages
  file, untouched: its pagemap lists the segment's pages as ``PE_PRESENT`` (in
  file order, which is ascending order) and every still-needed page found in a
  lower segment as ``PE_PARENT``.

So nothing is copied: files are renamed and pagemaps of a few KiB written.
When a process has a single segment holding exactly the needed pages in
order, its segment simply *is* the pages image and is renamed into place.

A page the pagemap needs but no segment holds is an error, never a hole of
zeros: correctness does not depend on the layout.

Served lazily: CRIU's lazy-pages daemon cannot read parent images, so a lazy
restore gets the pages another way. :meth:`PageStore.rebuild_lazy` announces
every lazy page as lazy only (as CRIU's own lazy dump does), and the agent's
page server (``storeserver.py``) answers the daemon's requests straight from
the segments (:meth:`PageStore.run_at`): nothing is copied or loaded inside
the downtime, and the processes run before their memory is in place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tug.engine.criu import images
from tug.engine.errors import MigrationError
from tug.engine.pageset import PageSet

PAGE = 4096

Run = tuple[int, int]  # (first page number, number of pages)


class _Segment:
    """One tmpfs file of pages in ascending address order."""

    __slots__ = ("fd", "path", "runs", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.runs: list[Run] = []  # file order = ascending page order
        self.size = 0

    @property
    def last_page(self) -> int:
        return self.runs[-1][0] + self.runs[-1][1] - 1 if self.runs else -1

    def append(self, first: int, data: memoryview) -> int:
        """Write pages ``first``.. at the end; returns their offset."""
        n = len(data) // PAGE
        off = self.size
        _pwrite_all(self.fd, data, off)
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == first:
            self.runs[-1] = (self.runs[-1][0], self.runs[-1][1] + n)
        else:
            self.runs.append((first, n))
        self.size += n * PAGE
        return off


class _ProcessPages:
    __slots__ = ("root", "pid", "segments", "index")

    def __init__(self, root: Path, pid: int) -> None:
        self.root, self.pid = root, pid
        self.segments: list[_Segment] = []
        self.index: dict[int, tuple[int, int]] = {}  # page number -> (segment, byte offset)

    def write(self, vaddr: int, data: memoryview) -> None:
        first = vaddr // PAGE
        n = len(data) // PAGE
        slot = self.index.get(first)
        if slot is not None and all(self.index.get(first + k) == (slot[0], slot[1] + k * PAGE) for k in range(n)):
            _pwrite_all(self.segments[slot[0]].fd, data, slot[1])  # overwrite in place
            return
        if all(first + k not in self.index for k in range(n)):
            seg_no = len(self.segments) - 1
            if seg_no < 0 or first <= self.segments[seg_no].last_page:
                self.segments.append(_Segment(self.root / f"{self.pid}.{len(self.segments)}.pages"))
                seg_no += 1
            off = self.segments[seg_no].append(first, data)
            for k in range(n):
                self.index[first + k] = (seg_no, off + k * PAGE)
            return
        for k in range(n):  # mixed known and new: page by page
            self.write((first + k) * PAGE, data[k * PAGE : (k + 1) * PAGE])

    def close(self) -> None:
        for seg in self.segments:
            if seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1


def _pwrite_all(fd: int, data: memoryview, off: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], off + done)


# ---- run arithmetic (sorted, non-overlapping runs of page numbers) --------------


def _coalesce(runs: Iterable[Run]) -> list[Run]:
    out: list[Run] = []
    for first, n in runs:
        if out and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((first, n))
    return out


def _subtract(a: list[Run], b: list[Run]) -> list[Run]:
    """Pages of ``a`` not in ``b`` (both sorted and non-overlapping)."""
    out: list[Run] = []
    j = 0
    for first, n in a:
        lo, hi = first, first + n
        while j < len(b) and b[j][0] + b[j][1] <= lo:
            j += 1
        k = j
        while lo < hi and k < len(b) and b[k][0] < hi:
            if b[k][0] > lo:
                out.append((lo, b[k][0] - lo))
            lo = max(lo, b[k][0] + b[k][1])
            k += 1
        if lo < hi:
            out.append((lo, hi - lo))
    return out


def _process_pagemaps(images_dir: Path) -> Iterator[tuple[int, Path, images.Pagemap, Path]]:
    """Each process's pagemap in ``images_dir``: (pid, its path, it, the path of its pages image)."""
    for pm_path in sorted(images_dir.glob("pagemap-*.img")):
        pid = images.process_pagemap_pid(pm_path.name)
        if pid is not None:
            pm = images.read_pagemap(pm_path.read_bytes())
            yield pid, pm_path, pm, images_dir / images.pages_file_name(pm.pages_id)


def _runs_in(proc: _ProcessPages | None, first: int, n: int) -> list[Run]:
    """Which of pages ``first``..``first+n`` the store holds, as runs."""
    if proc is None:
        return []
    return _coalesce((p, 1) for p in range(first, first + n) if p in proc.index)


def _level_entries(present: list[Run], parent: list[Run]) -> list[images.PagemapEntry]:
    """A level's pagemap: ``present`` pages in its file, ``parent`` pages below it."""
    tagged = sorted([(f, n, images.PE_PRESENT) for f, n in present] + [(f, n, images.PE_PARENT) for f, n in parent])
    out: list[images.PagemapEntry] = []
    for first, n, flag in tagged:
        if out and out[-1].flags == flag and out[-1].end == first * PAGE:
            out[-1] = images.PagemapEntry(vaddr=out[-1].vaddr, nr_pages=out[-1].nr_pages + n, flags=flag)
        else:
            out.append(images.PagemapEntry(vaddr=first * PAGE, nr_pages=n, flags=flag))
    return out


def _is_lazy_dump(pm: images.Pagemap) -> bool:
    """A lazy dump's pagemap: some entry is lazy only (no data in the pages image)."""
    return any(e.flags & images.PE_LAZY and not e.present for e in pm.entries)


def _lazy_runs(pm: images.Pagemap, pid: int, confirmed: PageSet | None) -> list[Run] | None:
    """A lazy dump's lazy pages as runs (None: not a lazy dump's pagemap), each
    one checked ``confirmed`` by the source; anything else absent is refused."""
    if not _is_lazy_dump(pm):
        return None
    runs: list[Run] = []
    for e in pm.entries:
        if e.present:
            continue
        if e.flags & images.PE_PARENT or not e.flags & images.PE_LAZY:
            raise MigrationError(f"pagemap of pid {pid} has pages at {e.vaddr:#x} neither present nor lazy")
        held = confirmed.leading(pid, e.vaddr, e.end, held=True) if confirmed is not None else 0
        if held != e.nr_pages:
            raise MigrationError(
                f"the source never confirmed page {e.vaddr + held * PAGE:#x} of pid {pid}: its frozen content is "
                "unknown here, no restore from the page store"
            )
        runs.append((e.vaddr // PAGE, e.nr_pages))
    return _coalesce(runs)


class PageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._procs: dict[int, _ProcessPages] = {}

    def write(self, pid: int, vaddr: int, data: bytes | memoryview) -> None:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = _ProcessPages(self.root, pid)
        proc.write(vaddr, memoryview(data))

    def run_at(self, pid: int, first: int, n: int) -> tuple[int, int, int] | None:
        """Where pages ``first``.. of ``pid`` are: (fd, byte offset, how many of the ``n`` lie
        contiguously from there in one segment); None if the first page is not here."""
        proc = self._procs.get(pid)
        slot = proc.index.get(first) if proc is not None else None
        if proc is None or slot is None:
            return None
        count = 1
        while count < n and proc.index.get(first + count) == (slot[0], slot[1] + count * PAGE):
            count += 1
        return proc.segments[slot[0]].fd, slot[1], count

    def rebuild_lazy(self, images_dir: Path) -> dict[str, int]:
        """Images for a lazy restore served from this store (module doc: "served lazily").

        Every page CRIU marked lazy stays here and is announced as lazy only
        (``PE_LAZY`` without ``PE_PRESENT``, as CRIU's own lazy dump writes
        it): the lazy-pages daemon will ask for it. The few pages CRIU restores
        itself (present, not lazy) are copied into the pages image. A page the
        pagemap needs that the store lacks fails here, before the restore.
        """
        stats = {"lazy_pages": 0, "copied_pages": 0}
        for pid, pm_path, pm, target in _process_pagemaps(images_dir):
            if target.exists():
                raise MigrationError(f"{target.name} was sent whole: a lazy restore from the page store cannot use it")
            proc = self._procs.get(pid)
            entries: list[images.PagemapEntry] = []
            with open(target, "wb") as out:
                for e in pm.entries:
                    if e.flags & images.PE_PARENT:
                        raise MigrationError(f"pagemap of pid {pid} refers to a parent image: not served from the store")
                    if not e.present:
                        entries.append(e)
                        continue
                    first = e.vaddr // PAGE
                    missing = _subtract([(first, e.nr_pages)], _runs_in(proc, first, e.nr_pages))
                    if missing:
                        raise MigrationError(
                            f"page store has no copy of page {missing[0][0] * PAGE:#x} of pid {pid}: "
                            "source and destination disagree"
                        )
                    if e.flags & images.PE_LAZY:
                        entries.append(images.PagemapEntry(vaddr=e.vaddr, nr_pages=e.nr_pages, flags=e.flags & ~images.PE_PRESENT))
                        stats["lazy_pages"] += e.nr_pages
                    else:
                        assert proc is not None
                        for k in range(e.nr_pages):
                            seg, off = proc.index[first + k]
                            out.write(os.pread(self._procs[pid].segments[seg].fd, PAGE, off))
                        entries.append(e)
                        stats["copied_pages"] += e.nr_pages
            pm_path.write_bytes(images.write_pagemap(images.Pagemap(pages_id=pm.pages_id, entries=tuple(entries))))
        return stats

    def rebuild(self, images_dir: Path, confirmed: PageSet | None = None) -> dict[str, int]:
        """Make every process pages image the restore needs readable by CRIU (module doc).

        A lazy dump's pagemaps (pre-copy's eager step from the frozen
        processes: "pushed" in the module doc) keep their few non-lazy pages
        in their own pages image; every lazy page must be ``confirmed`` by the
        source (its stored copy is the frozen content) and comes from the chain.
        """
        stats = {"renamed_files": 0, "empty_files": 0, "chained_processes": 0, "chain_levels": 0, "rebuilt_pages": 0}
        chained: dict[int, tuple[Path, images.Pagemap, list[Run]]] = {}
        for pid, pm_path, pm, target in _process_pagemaps(images_dir):
            lazy = _lazy_runs(pm, pid, confirmed)
            if target.exists() and lazy is None:
                continue  # sent whole
            needed = lazy if lazy is not None else _coalesce((v // PAGE, n) for v, n, _ in images.page_layout(pm))
            proc = self._procs.get(pid)
            segments = proc.segments if proc is not None else []
            self._require(pid, needed)
            stats["rebuilt_pages"] += sum(n for _, n in needed)
            if not needed:  # (a lazy dump's pagemap always has a lazy page)
                target.write_bytes(b"")  # a pagemap without pages: CRIU's pages image is empty too
                stats["empty_files"] += 1
                continue
            assert proc is not None
            if lazy is None and len(segments) == 1 and segments[0].runs == needed:
                os.close(segments[0].fd)
                segments[0].fd = -1
                os.rename(segments[0].path, target)  # the store already is the image
                stats["renamed_files"] += 1
            else:
                chained[pid] = (pm_path, pm, needed)
        if chained:
            stats["chain_levels"] = self._chain(images_dir, chained)
            stats["chained_processes"] = len(chained)
        return stats

    def check_pushed(self, images_dir: Path, confirmed: PageSet) -> dict[str, int]:
        """A lazy dump's images for a lazy restore served from this store: nothing to rebuild.

        Its pagemaps already announce each lazy page as lazy only, and its
        own pages image holds the others; every lazy page must be confirmed
        by the source and held here (the lazy-pages daemon is then served from
        the store: storeserver.py), else the restore is refused.
        """
        lazy_pages = 0
        for pid, _, pm, _ in _process_pagemaps(images_dir):
            runs = _lazy_runs(pm, pid, confirmed)
            if runs:
                self._require(pid, runs)
                lazy_pages += sum(n for _, n in runs)
        return {"lazy_pages": lazy_pages}

    def _require(self, pid: int, needed: list[Run]) -> None:
        """Every page of ``needed`` is held, or the restore cannot use the store."""
        proc = self._procs.get(pid)
        missing = needed
        for seg in proc.segments if proc is not None else []:
            missing = _subtract(missing, seg.runs)
        if missing:
            raise MigrationError(
                f"page store has no copy of page {missing[0][0] * PAGE:#x} of pid {pid}: source and destination disagree"
            )

    def _chain(self, images_dir: Path, chained: dict[int, tuple[Path, images.Pagemap, list[Run]]]) -> int:
        """Turn the segments into parent images under ``images_dir`` (module doc); returns the depth."""
        depth = max(len(self._procs[pid].segments) if pid in self._procs else 0 for pid in chained) or 1
        if (images_dir / "parent").exists() or (images_dir / "parent").is_symlink():
            raise MigrationError(f"{images_dir} already has a parent image; cannot chain the page store")
        levels = [images_dir.parent / f"chain-{k}" for k in range(depth)]
        for k, level in enumerate(levels):
            level.mkdir()
            if k > 0:
                (level / "parent").symlink_to(f"../{levels[k - 1].name}")
        (images_dir / "parent").symlink_to(f"../{levels[-1].name}")
        for pid, (pm_path, pm, needed) in chained.items():
            segments = self._procs[pid].segments if pid in self._procs else []
            wanted = needed  # pages the level above sends down
            for k in reversed(range(depth)):
                seg = segments[k] if k < len(segments) else None
                present = seg.runs if seg is not None else []
                below = _subtract(wanted, present)
                entries = _level_entries(present, below)
                pages = levels[k] / images.pages_file_name(pm.pages_id)
                if seg is not None:
                    os.close(seg.fd)
                    seg.fd = -1
                    os.rename(seg.path, pages)
                else:
                    pages.touch()
                if entries:
                    pagemap = images.Pagemap(pages_id=pm.pages_id, entries=tuple(entries))
                    (levels[k] / pm_path.name).write_bytes(images.write_pagemap(pagemap))
                wanted = below
            # A lazy dump's non-lazy pages stay in its own pages image (present
            # entries, in file order); every other page comes from the chain.
            lazy_dump = _is_lazy_dump(pm)
            top = images.Pagemap(
                pages_id=pm.pages_id,
                entries=tuple(
                    e if lazy_dump and e.present else
                    images.PagemapEntry(vaddr=e.vaddr, nr_pages=e.nr_pages, flags=(e.flags & ~images.PE_PRESENT) | images.PE_PARENT)
                    for e in pm.entries
                ),
            )
            pm_path.write_bytes(images.write_pagemap(top))
            (images_dir / images.pages_file_name(pm.pages_id)).touch()
        return depth

    def close(self) -> None:
        for proc in self._procs.values():
            proc.close()
        self._procs.clear()
