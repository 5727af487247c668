"""The pagemap reader/writer against images real CRIU writes.

A small C program (built here with gcc) runs as init of its own pid namespace
with one child. It fills memory with a per-page pattern CRIU cannot guess:
2 MiB of anonymous private memory, three copy-on-write pages of a private file
mapping, a shared anonymous region, and eight pages the child rewrites after
fork. After ``criu dump`` the test finds every one of those pages in the pages
files at the offset ``page_layout`` predicts, checks the pages files' sizes and
that writing each pagemap back gives CRIU's exact bytes.

Needs root, criu and gcc; fails (not skips) when they are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tug.engine.criu.images import (
    PAGE_SIZE,
    PE_LAZY,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    iter_pages,
    page_layout,
    pages_file_name,
    pages_file_size,
    process_pagemap_pid,
    read_pagemap,
    shmem_pagemap_id,
    write_pagemap,
)
from tug.engine.criu.stats import read_dump_stats

pytestmark = pytest.mark.e2e

ANON_PAGES = 512  # 2 MiB
FILE_PAGES = 16
COW_PAGES = (3, 4, 9)
SHM_PAGES = 4
CHILD_PAGES = 8  # the child rewrites anon pages 0..7 after fork

PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>

#define PAGE 4096

/* Header "tag" + little-endian u64 index, then byte j = a*j + b. */
static void fill(unsigned char *p, const char *tag, uint64_t idx, unsigned a, unsigned b)
{
    memcpy(p, tag, 8);
    memcpy(p + 8, &idx, 8);
    for (unsigned j = 16; j < PAGE; j++)
        p[j] = (unsigned char)(a * j + b);
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 64;
    unsigned char *anon = mmap(NULL, %(anon)d * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *shm = mmap(NULL, %(shm)d * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int fd = open(argv[1], O_RDONLY);
    if (anon == MAP_FAILED || shm == MAP_FAILED || fd < 0)
        return 65;
    unsigned char *file = mmap(NULL, %(file)d * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (file == MAP_FAILED)
        return 66;
    close(fd);

    for (uint64_t i = 0; i < %(anon)d; i++)
        fill(anon + i * PAGE, "tuganon!", i, 1, (unsigned)i);
    for (uint64_t i = 0; i < %(shm)d; i++)
        fill(shm + i * PAGE, "tugshm!!", i, 1, (unsigned)(i * 11));
    volatile unsigned sum = 0;
    for (uint64_t i = 0; i < %(file)d; i++)  /* fault every file page in, unmodified */
        sum += file[i * PAGE];
    static const uint64_t cow[] = {%(cow)s};
    for (unsigned k = 0; k < sizeof(cow) / sizeof(cow[0]); k++)
        fill(file + cow[k] * PAGE, "tugcow!!", cow[k], 7, (unsigned)cow[k]);

    int sync[2];
    if (pipe(sync))
        return 67;
    pid_t child = fork();
    if (child < 0)
        return 68;
    if (child == 0) {
        for (uint64_t i = 0; i < %(child)d; i++)
            fill(anon + i * PAGE, "tugchild", i, 3, (unsigned)(i * 5));
        close(sync[0]);
        close(sync[1]);  /* the parent's read() returns 0: the child is ready */
        for (;;)
            pause();
    }
    close(sync[1]);
    char c;
    while (read(sync[0], &c, 1) > 0)
        ;
    close(sync[0]);

    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%%s.tmp", argv[2]);
    FILE *out = fopen(tmp, "w");
    if (!out)
        return 69;
    fprintf(out, "%%lx %%lx %%lx\n", (unsigned long)anon, (unsigned long)file, (unsigned long)shm);
    fclose(out);
    rename(tmp, argv[2]);
    for (;;)
        pause();
}
""" % {
    "anon": ANON_PAGES,
    "shm": SHM_PAGES,
    "file": FILE_PAGES,
    "cow": ", ".join(str(k) for k in COW_PAGES),
    "child": CHILD_PAGES,
}


def page(tag: bytes, idx: int, a: int, b: int) -> bytes:
    """Python twin of the C fill(): the bytes one page must hold."""
    body = bytes((a * j + b) & 0xFF for j in range(16, PAGE_SIZE))
    return tag + struct.pack("<Q", idx) + body


def require_tools() -> tuple[str, str]:
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    criu, gcc = shutil.which("criu", path=path), shutil.which("gcc", path=path)
    if os.geteuid() != 0:
        pytest.fail("this test needs root (criu dump)")
    if criu is None or gcc is None:
        missing = ", ".join(n for n, p in (("criu", criu), ("gcc", gcc)) if p is None)
        pytest.fail(f"this test needs {missing}: run 'make test' (scripts/setup.sh installs them)")
    return criu, gcc


@dataclass
class Dumped:
    images: Path
    anon: int
    file: int
    shm: int


@pytest.fixture
def dumped(tmp_path: Path) -> Iterator[Dumped]:
    """Start the program in its own pid namespace, dump it with CRIU, yield the images."""
    criu, gcc = require_tools()
    src, exe = tmp_path / "prog.c", tmp_path / "prog"
    src.write_text(PROGRAM)
    build = subprocess.run([gcc, "-O1", "-o", str(exe), str(src)], capture_output=True, text=True, timeout=60)
    assert build.returncode == 0, build.stderr
    mapped = tmp_path / "mapped.bin"
    mapped.write_bytes(os.urandom(FILE_PAGES * PAGE_SIZE))
    info = tmp_path / "info"
    images = tmp_path / "img"
    images.mkdir()

    # Session leader inside a fresh pid namespace, stdio on /dev/null: dumpable
    # without --shell-job and without the host's mount namespace quirks.
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", str(exe), str(mapped), str(info)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    init_pid: int | None = None
    try:
        deadline = time.monotonic() + 10
        while not info.exists():
            assert proc.poll() is None, f"program exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "program did not get ready"
            time.sleep(0.01)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        init_pid = int(children[0])
        anon, file, shm = (int(x, 16) for x in info.read_text().split())

        res = subprocess.run(
            [criu, "dump", "-t", str(init_pid), "-D", str(images), "-v4", "-o", "dump.log"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        log = images / "dump.log"
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if "Error" in ln and "RLIMIT_NOFILE" not in ln] if log.exists() else []
        assert res.returncode == 0, f"criu dump failed ({res.returncode}): {res.stderr}\n" + "\n".join(errors[:10])
        proc.wait(timeout=10)  # criu dump kills the tree; unshare then exits
        yield Dumped(images=images, anon=anon, file=file, shm=shm)
    finally:
        if proc.poll() is None:
            # unshare has not reaped its child yet, so init_pid cannot have been reused.
            if init_pid is not None:
                try:
                    os.kill(init_pid, signal.SIGKILL)  # init's death kills the whole namespace
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def pagemaps(images: Path) -> dict[str, Pagemap]:
    return {p.name: read_pagemap(p.read_bytes()) for p in sorted(images.glob("pagemap-*.img"))}


def contents(images: Path, pm: Pagemap) -> dict[int, bytes]:
    """vaddr -> page bytes, via page_layout/iter_pages."""
    data = (images / pages_file_name(pm.pages_id)).read_bytes()
    return {vaddr: data[off : off + PAGE_SIZE] for vaddr, off in iter_pages(pm)}


def test_criu_pagemaps_read_layout_and_rewrite(dumped: Dumped) -> None:
    images = dumped.images
    maps = pagemaps(images)
    procs = {process_pagemap_pid(n): pm for n, pm in maps.items() if process_pagemap_pid(n) is not None}
    shmems = {shmem_pagemap_id(n): pm for n, pm in maps.items() if shmem_pagemap_id(n) is not None}
    # Pids are the namespace's: init is 1, its child 2.
    assert set(procs) == {1, 2}, sorted(maps)
    assert len(shmems) == 1, sorted(maps)
    assert len(procs) + len(shmems) == len(maps)

    # Byte-exact writer, exact pages file sizes, one pages file per pagemap and none spare.
    for name, pm in maps.items():
        assert write_pagemap(pm) == (images / name).read_bytes(), name
        assert pages_file_size(pm) == (images / pages_file_name(pm.pages_id)).stat().st_size, name
        assert page_layout(pm) == page_layout(pm, skip_absent=True), f"{name}: a plain dump keeps every page in its pages file"
    assert sorted(pages_file_name(pm.pages_id) for pm in maps.values()) == sorted(p.name for p in images.glob("pages-*.img"))

    # Parent: all 2 MiB of the anon pattern, only the three COW'd file pages.
    parent = contents(images, procs[1])
    for i in range(ANON_PAGES):
        assert parent.get(dumped.anon + i * PAGE_SIZE) == page(b"tuganon!", i, 1, i), f"anon page {i}"
    file_pages = {v for v in parent if dumped.file <= v < dumped.file + FILE_PAGES * PAGE_SIZE}
    assert file_pages == {dumped.file + k * PAGE_SIZE for k in COW_PAGES}, "CRIU stores only COW'd pages of a private file mapping"
    for k in COW_PAGES:
        assert parent[dumped.file + k * PAGE_SIZE] == page(b"tugcow!!", k, 7, k), f"cow page {k}"
    # Shared memory is not in the process pagemaps.
    assert not any(dumped.shm <= v < dumped.shm + SHM_PAGES * PAGE_SIZE for v in parent)

    # Flags CRIU 4.2 sets: anon private memory PE_PRESENT|PE_LAZY, file-backed COW pages PE_PRESENT.
    flags = {e.vaddr + i * PAGE_SIZE: e.flags for e in procs[1].entries for i in range(e.nr_pages)}
    assert flags[dumped.anon] == PE_PRESENT | PE_LAZY
    assert flags[dumped.file + COW_PAGES[0] * PAGE_SIZE] == PE_PRESENT

    # Child: its own rewrites at the same vaddrs; the rest, where stored, is the parent's pattern.
    child = contents(images, procs[2])
    for i in range(CHILD_PAGES):
        assert child.get(dumped.anon + i * PAGE_SIZE) == page(b"tugchild", i, 3, i * 5), f"child page {i}"
    for i in range(CHILD_PAGES, ANON_PAGES):
        got = child.get(dumped.anon + i * PAGE_SIZE)
        assert got is None or got == page(b"tuganon!", i, 1, i), f"child anon page {i}"

    # The shmem pagemap: vaddrs are offsets into the shared object.
    (shm,) = shmems.values()
    shared = contents(images, shm)
    for s in range(SHM_PAGES):
        assert shared.get(s * PAGE_SIZE) == page(b"tugshm!!", s, 1, s * 11), f"shm page {s}"


def test_dump_stats_count_the_pages_written(dumped: Dumped) -> None:
    """stats-dump (what soft-dirty pre-copy rounds are judged by) agrees with the images."""
    stats = read_dump_stats((dumped.images / "stats-dump").read_bytes())
    maps = pagemaps(dumped.images)
    private = sum(pages_file_size(pm) for n, pm in maps.items() if process_pagemap_pid(n) is not None)
    shared = sum(pages_file_size(pm) for n, pm in maps.items() if shmem_pagemap_id(n) is not None)
    assert stats.pages_written * PAGE_SIZE == private
    assert stats.shpages_written * PAGE_SIZE == shared
    assert stats.pages_skipped_parent == 0, "a dump without a parent skips nothing"
    assert stats.pages_scanned >= stats.pages_written >= ANON_PAGES + CHILD_PAGES
    assert stats.frozen_time_us > 0


def test_restore_from_rebuilt_images(dumped: Dumped, tmp_path: Path) -> None:
    """What the destination does: rebuild pagemaps and pages files from a page store.

    Every page is taken out of the dump into a dict keyed like tug's store
    ((pid, vaddr) or (shmid, offset)); a fresh image directory gets every other
    image file copied, pagemaps written by ``write_pagemap`` with each run split
    into single-page entries (so CRIU reads bytes our writer laid out, not a copy
    of its own) and pages files assembled from the store. CRIU must restore it
    and the restored processes must hold every pattern page.
    """
    criu, _ = require_tools()
    src = dumped.images
    store: dict[tuple[str, int, int], bytes] = {}
    maps = pagemaps(src)
    for name, pm in maps.items():
        pid, shmid = process_pagemap_pid(name), shmem_pagemap_id(name)
        key = ("pid", pid) if pid is not None else ("shm", shmid)
        assert key[1] is not None
        for vaddr, data in contents(src, pm).items():
            store[(key[0], key[1], vaddr)] = data

    dst = tmp_path / "rebuilt"
    dst.mkdir()
    for p in src.iterdir():
        if not (p.name.startswith("pages-") or p.name.startswith("pagemap-") or p.name.endswith(".log")):
            shutil.copyfile(p, dst / p.name)
    for name, pm in maps.items():
        pid, shmid = process_pagemap_pid(name), shmem_pagemap_id(name)
        kind, ident = ("pid", pid) if pid is not None else ("shm", shmid)
        assert ident is not None
        split = Pagemap(pm.pages_id, tuple(PagemapEntry(v, 1, e.flags) for e in pm.entries for v in range(e.vaddr, e.end, PAGE_SIZE)))
        (dst / name).write_bytes(write_pagemap(split))
        pages = b"".join(store[(kind, ident, vaddr)] for vaddr, _ in iter_pages(split))
        assert len(pages) == pages_file_size(split)
        (dst / pages_file_name(split.pages_id)).write_bytes(pages)

    pidfile = tmp_path / "restored.pid"
    res = subprocess.run(
        [criu, "restore", "-D", str(dst), "-d", "--pidfile", str(pidfile), "-v4", "-o", "restore.log"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    restored = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        log = (dst / "restore.log").read_text(errors="replace") if (dst / "restore.log").exists() else ""
        errors = [ln for ln in log.splitlines() if "Error" in ln and "RLIMIT_NOFILE" not in ln]
        assert res.returncode == 0 and restored is not None, f"criu restore failed ({res.returncode}): {res.stderr}\n" + "\n".join(errors[:10])
        child = int(Path(f"/proc/{restored}/task/{restored}/children").read_text().split()[0])
        for pid, first in ((restored, b"tuganon!"), (child, b"tugchild")):
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(dumped.anon)
                anon = mem.read(ANON_PAGES * PAGE_SIZE)
                mem.seek(dumped.file)
                file = mem.read(FILE_PAGES * PAGE_SIZE)
                mem.seek(dumped.shm)
                shm = mem.read(SHM_PAGES * PAGE_SIZE)
            for i in range(ANON_PAGES):
                want = page(b"tugchild", i, 3, i * 5) if first == b"tugchild" and i < CHILD_PAGES else page(b"tuganon!", i, 1, i)
                assert anon[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == want, f"pid {pid} anon page {i}"
            for k in COW_PAGES:
                assert file[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] == page(b"tugcow!!", k, 7, k), f"pid {pid} cow page {k}"
            for s in range(SHM_PAGES):
                assert shm[s * PAGE_SIZE : (s + 1) * PAGE_SIZE] == page(b"tugshm!!", s, 1, s * 11), f"pid {pid} shm page {s}"
    finally:
        # The restored init is ours only if it still runs our program (guards against pid reuse).
        if restored is not None:
            try:
                if os.readlink(f"/proc/{restored}/exe").startswith(str(tmp_path)):
                    os.kill(restored, signal.SIGKILL)  # kills the restored pid namespace
            except (FileNotFoundError, ProcessLookupError):
                pass
