"""The filtering page server against real CRIU (``criu dump --page-server``), no lab.

A small C program runs as init of its own pid namespace with one child: 16
MiB of anonymous memory with a per-page pattern, a shared anonymous region,
and pages the child rewrites after fork. The test plays pre-copy by hand:

1. "rounds": the content tracker records what it reads of both processes,
   except a few pages (as if they had appeared after the last round);
2. the workload "writes" some recorded pages (through /proc/PID/mem);
3. the tree is stopped (SIGSTOP) so its memory stays put, and dumped twice
   with ``--leave-running``: once to files (the reference), once through the
   filter server.

Then: exactly the pages that differ from the shadow (written or never
recorded) were reported, with the dump's bytes; the pagemaps written equal
CRIU's own entry for entry; shared memory came out as ordinary image files;
and the images dir plus a page store holding "rounds + delta" restores with
real CRIU to the same memory. A second test makes the sink fail mid-dump:
CRIU's dump must fail cleanly and leave the process intact.

Needs root, criu and gcc; fails (not skips) when they are missing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tug.engine.criu import images
from tug.engine.destination.pagestore import PageStore
from tug.engine.errors import TransportError
from tug.engine.source.psfilter import FilterServer
from tug.engine.source.trackers.shadow import ContentTracker, ProcessMemory
from tug.transports.criu_pageserver import HEADER, PAGE_SIZE

from ..imagechain import restored_pages
from .test_images_criu import require_tools

pytestmark = pytest.mark.e2e

ANON_PAGES = 4096  # 16 MiB
SHM_PAGES = 16
CHILD_PAGES = 8  # the child rewrites anon pages 0..7 after fork
UNSENT = range(100, 110)  # init's anon pages the "rounds" never recorded
WRITTEN = (200, 201, 202, 203, 1000, ANON_PAGES - 1)  # init's anon pages written after the rounds
CHILD_WRITTEN = (5, 3000)  # the child's

PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

#define PAGE 4096

static void fill(unsigned char *p, const char *tag, uint64_t idx, unsigned a, unsigned b)
{
    memcpy(p, tag, 8);
    memcpy(p + 8, &idx, 8);
    for (unsigned j = 16; j < PAGE; j++)
        p[j] = (unsigned char)(a * j + b);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return 64;
    unsigned char *anon = mmap(NULL, %(anon)d * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *shm = mmap(NULL, %(shm)d * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (anon == MAP_FAILED || shm == MAP_FAILED)
        return 65;
    for (uint64_t i = 0; i < %(anon)d; i++)
        fill(anon + i * PAGE, "tuganon!", i, 1, (unsigned)i);
    for (uint64_t i = 0; i < %(shm)d; i++)
        fill(shm + i * PAGE, "tugshm!!", i, 1, (unsigned)(i * 11));
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
        close(sync[1]);
        for (;;)
            pause();
    }
    close(sync[1]);
    char c;
    while (read(sync[0], &c, 1) > 0)
        ;
    close(sync[0]);
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%%s.tmp", argv[1]);
    FILE *out = fopen(tmp, "w");
    if (!out)
        return 69;
    fprintf(out, "%%lx %%lx\n", (unsigned long)anon, (unsigned long)shm);
    fclose(out);
    rename(tmp, argv[1]);
    for (;;)
        pause();
}
""" % {"anon": ANON_PAGES, "shm": SHM_PAGES, "child": CHILD_PAGES}

#: criu/page-xfer.c's struct, verbatim: its layout is what HEADER must match.
LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
typedef uint32_t u32;
typedef uint64_t u64;
struct page_server_iov {
	u32 cmd;
	u64 nr_pages;
	u64 vaddr;
	u64 dst_id;
};
int main(void)
{
    printf("%zu %zu %zu %zu %zu\n", sizeof(struct page_server_iov), offsetof(struct page_server_iov, cmd),
           offsetof(struct page_server_iov, nr_pages), offsetof(struct page_server_iov, vaddr),
           offsetof(struct page_server_iov, dst_id));
    return 0;
}
"""


@dataclass
class Tree:
    criu: str
    unshare: subprocess.Popen[bytes]
    init: int  # host pids
    child: int
    anon: int
    shm: int

    def alive(self) -> bool:
        return self.unshare.poll() is None


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    criu, gcc = require_tools()
    src, exe = tmp_path / "prog.c", tmp_path / "prog"
    src.write_text(PROGRAM)
    build = subprocess.run([gcc, "-O1", "-o", str(exe), str(src)], capture_output=True, text=True, timeout=60)
    assert build.returncode == 0, build.stderr
    info = tmp_path / "info"
    # No rseq: the kernel writes the current CPU into a thread's rseq area
    # whenever it returns to user space, which CRIU's parasite makes it do,
    # so that page could differ between the two dumps of a "stopped" tree.
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", str(exe), str(info)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "GLIBC_TUNABLES": "glibc.pthread.rseq=0"},
    )
    init: int | None = None
    try:
        deadline = time.monotonic() + 10
        while not info.exists():
            assert proc.poll() is None, f"program exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "program did not get ready"
            time.sleep(0.01)
        init = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        child = int(Path(f"/proc/{init}/task/{init}/children").read_text().split()[0])
        anon, shm = (int(x, 16) for x in info.read_text().split())
        yield Tree(criu, proc, init, child, anon, shm)
    finally:
        if proc.poll() is None:
            if init is not None:
                with_suppressed_lookup(lambda: os.kill(init, signal.SIGKILL))  # kills the namespace
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def with_suppressed_lookup(fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except ProcessLookupError:
        pass


def pattern(tag: bytes, idx: int, a: int, b: int) -> bytes:
    body = bytes((a * j + b) & 0xFF for j in range(16, PAGE_SIZE))
    return tag + idx.to_bytes(8, "little") + body


def record_rounds(tracker: ContentTracker, t: Tree) -> None:
    """What pre-copy rounds would have sent: every dumpable page, but UNSENT."""
    skip = {t.anon + i * PAGE_SIZE for i in UNSENT}
    for host_pid in (t.init, t.child):
        mem = ProcessMemory(host_pid)
        try:
            for region in mem.regions():
                for vaddr, n in mem.runs(region):
                    data = mem.read(vaddr, n)
                    for k in range(len(data) // PAGE_SIZE):
                        v = vaddr + k * PAGE_SIZE
                        if not (host_pid == t.init and v in skip):
                            tracker.diff(mem.ns_pid, v, data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE])
        finally:
            mem.close()


def write_pages(t: Tree) -> None:
    """The workload writes after the last round (through /proc/PID/mem: root may)."""
    for host_pid, pages in ((t.init, WRITTEN), (t.child, CHILD_WRITTEN)):
        fd = os.open(f"/proc/{host_pid}/mem", os.O_RDWR)
        try:
            for i in pages:
                assert os.pwrite(fd, pattern(b"written!", i, 13, host_pid), t.anon + i * PAGE_SIZE) == PAGE_SIZE
        finally:
            os.close(fd)


def stop(t: Tree) -> None:
    os.killpg(t.init, signal.SIGSTOP)  # setsid: init leads the group, the child is in it
    deadline = time.monotonic() + 5
    while not all(_state(p) == "T" for p in (t.init, t.child)):
        assert time.monotonic() < deadline, "tree did not stop"
        time.sleep(0.01)


def stopped_again(t: Tree, seconds: float = 5.0) -> bool:
    """Whether CRIU left the tree stopped: it detaches, then stops each task
    again with a signal, so the stop may show a moment after CRIU exited."""
    deadline = time.monotonic() + seconds
    while not all(_state(p) == "T" for p in (t.init, t.child)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def dump_argv(t: Tree, images_dir: Path, *extra: str) -> list[str]:
    images_dir.mkdir(parents=True, exist_ok=True)
    return [t.criu, "dump", "-t", str(t.init), "-D", str(images_dir), "--leave-running", "-v4", "-o", "dump.log", *extra]


def log_errors(images_dir: Path) -> str:
    log = images_dir / "dump.log"
    if not log.exists():
        return ""
    return "\n".join(ln for ln in log.read_text(errors="replace").splitlines() if "Error" in ln and "RLIMIT" not in ln)[:2000]


class Collect:
    def __init__(self, fail_after: int | None = None) -> None:
        self.runs: list[tuple[int, int, bytes]] = []
        self.fail_after = fail_after

    async def __call__(self, pid: int, vaddr: int, data: bytes) -> None:
        if self.fail_after is not None and len(self.runs) >= self.fail_after:
            raise TransportError("link lost (test)")
        self.runs.append((pid, vaddr, data))
        await asyncio.sleep(0)


async def filtered_dump(
    t: Tree, tracker: ContentTracker, images_dir: Path, sink: Collect, servers: list[FilterServer] | None = None
) -> tuple[int, BaseException | None]:
    """``criu dump --page-server`` into a FilterServer; (criu's exit code, serve's error)."""
    fs = FilterServer.listen(tracker, images_dir)
    if servers is not None:
        servers.append(fs)
    serve = asyncio.create_task(fs.serve(sink))
    proc = await asyncio.create_subprocess_exec(
        *dump_argv(t, images_dir, "--page-server", "--address", "127.0.0.1", "--port", str(fs.port)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    rc = await asyncio.wait_for(proc.wait(), 60)
    try:
        await asyncio.wait_for(serve, 10)
    except Exception as exc:  # the caller judges it
        return rc, exc
    return rc, None


def pages_of(images_dir: Path, name: str) -> dict[int, bytes]:
    pm = images.read_pagemap((images_dir / name).read_bytes())
    data = (images_dir / images.pages_file_name(pm.pages_id)).read_bytes()
    return {v: data[off : off + PAGE_SIZE] for v, off in images.iter_pages(pm)}


def test_header_layout_is_crius(tmp_path: Path) -> None:
    _, gcc = require_tools()
    (tmp_path / "l.c").write_text(LAYOUT_PROGRAM)
    subprocess.run([gcc, "-o", str(tmp_path / "l"), str(tmp_path / "l.c")], check=True, timeout=60)
    out = subprocess.run([str(tmp_path / "l")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(x) for x in out] == [HEADER.size, 0, 8, 16, 24]


async def test_filtered_dump_equals_a_plain_dump_minus_the_unchanged_pages(tree: Tree, tmp_path: Path) -> None:
    t = tree
    tracker = ContentTracker()
    record_rounds(tracker, t)
    write_pages(t)
    stop(t)
    ref, got = tmp_path / "plain", tmp_path / "filtered"
    res = subprocess.run(dump_argv(t, ref), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"plain dump failed: {res.stderr}\n{log_errors(ref)}"
    assert stopped_again(t), "still stopped between the dumps"
    sink = Collect()
    servers: list[FilterServer] = []
    rc, err = await filtered_dump(t, tracker, got, sink, servers)
    assert rc == 0 and err is None, f"filtered dump: criu {rc}, server {err!r}\n{log_errors(got)}"
    assert servers[0].uncork_result == "", f"CRIU's socket stayed corked: {servers[0].uncork_result}"

    # The same pagemaps, entry for entry; the process pages files are the only images missing.
    names = {p.name for p in ref.glob("pagemap-*.img")}
    assert names == {p.name for p in got.glob("pagemap-*.img")}
    assert {"pagemap-1.img", "pagemap-2.img"} < names and any(n.startswith("pagemap-shmem-") for n in names)
    for name in sorted(names):
        assert images.read_pagemap((got / name).read_bytes()).entries == images.read_pagemap((ref / name).read_bytes()).entries, name
    process_pages = {images.pages_file_name(images.read_pagemap((got / n).read_bytes()).pages_id) for n in names if images.process_pagemap_pid(n)}
    service = {"dump.log", "stats-dump"}

    def others(d: Path) -> set[str]:
        return {p.name for p in d.iterdir() if not p.name.startswith("pages-") and p.name not in service}

    assert others(ref) == others(got)
    assert not any((got / n).exists() for n in process_pages)

    # Shared memory: ordinary images, the same pages.
    for name in names - {"pagemap-1.img", "pagemap-2.img"}:
        assert pages_of(got, name) == pages_of(ref, name), name

    # Reported: exactly the pages that differ from the shadow, with the dump's bytes.
    reported: dict[tuple[int, int], bytes] = {}
    for pid, vaddr, data in sink.runs:
        for k in range(len(data) // PAGE_SIZE):
            assert (pid, vaddr + k * PAGE_SIZE) not in reported, "reported twice"
            reported[(pid, vaddr + k * PAGE_SIZE)] = data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
    shadow = tracker.shadow
    expected = {}
    for pid in (1, 2):
        for vaddr, data in pages_of(ref, f"pagemap-{pid}.img").items():
            if shadow.get((pid, vaddr)) != data:
                expected[(pid, vaddr)] = data
    assert reported == expected
    anon = lambda pid, pages: {(pid, t.anon + i * PAGE_SIZE) for i in pages}  # noqa: E731
    assert anon(1, UNSENT) | anon(1, WRITTEN) | anon(2, CHILD_WRITTEN) <= set(reported)
    assert reported[(1, t.anon + WRITTEN[0] * PAGE_SIZE)] == pattern(b"written!", WRITTEN[0], 13, t.init)
    assert len(reported) < 100, f"{len(reported)} pages reported: the shadow should have matched almost all"

    # The destination's side: rounds + delta in a page store, pages images
    # rebuilt, real CRIU restores the same memory.
    os.kill(t.init, signal.SIGKILL)
    t.unshare.wait(timeout=10)
    store = PageStore(tmp_path / "store")
    for (pid, vaddr), data in shadow.items():
        store.write(pid, vaddr, data)
    for pid, vaddr, data in sink.runs:
        store.write(pid, vaddr, data)
    store.rebuild(got)
    store.close()
    for name in ("pagemap-1.img", "pagemap-2.img"):
        assert restored_pages(got, name) == pages_of(ref, name), name
    pidfile = tmp_path / "restored.pid"
    res = subprocess.run(
        [t.criu, "restore", "-D", str(got), "-d", "--pidfile", str(pidfile), "-v4", "-o", "restore.log"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    restored = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert res.returncode == 0 and restored is not None, f"restore failed: {res.stderr}"
        child = int(Path(f"/proc/{restored}/task/{restored}/children").read_text().split()[0])
        for host_pid, ns in ((restored, 1), (child, 2)):
            with open(f"/proc/{host_pid}/mem", "rb") as mem:
                mem.seek(t.anon)
                anon_now = mem.read(ANON_PAGES * PAGE_SIZE)
            want = pages_of(ref, f"pagemap-{ns}.img")
            for i in range(ANON_PAGES):
                v = t.anon + i * PAGE_SIZE
                if v in want:
                    assert anon_now[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == want[v], f"pid {ns} anon page {i}"
    finally:
        if restored is not None and os.readlink(f"/proc/{restored}/exe").startswith(str(tmp_path)):
            os.kill(restored, signal.SIGKILL)


async def test_a_failing_sink_fails_the_dump_and_leaves_the_process_intact(tree: Tree, tmp_path: Path) -> None:
    t = tree
    tracker = ContentTracker()  # empty shadow: every page is "changed"
    stop(t)
    rc, err = await filtered_dump(t, tracker, tmp_path / "failed", Collect(fail_after=1))
    assert isinstance(err, TransportError), err
    assert rc != 0, "CRIU must not report a dump whose pages did not get through"
    assert "page" in log_errors(tmp_path / "failed").lower()
    # CRIU cured and released the tree: it is stopped as before, not traced, and dumps fine again.
    assert stopped_again(t)
    for pid in (t.init, t.child):
        tracer = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("TracerPid:")]
        assert tracer == ["TracerPid:\t0"], tracer
    res = subprocess.run(dump_argv(t, tmp_path / "again"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, log_errors(tmp_path / "again")
    os.killpg(t.init, signal.SIGCONT)
    time.sleep(0.1)
    assert t.alive() and _state(t.init) in "SR"
