"""The uffd tracker against real processes that write pages we choose.

The target is a small C program (built here with gcc, which setup installs)
that maps a region, then obeys commands on stdin; between commands nothing
else in the test regions is written, so the pages a scan reports in them are
exactly the ones a command wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tug.engine import ptrace
from tug.engine.api import MigrationOptions
from tug.engine.pageset import PageSet
from tug.engine.source.context import SourceContext
from tug.engine.source.trackers.shadow import PAGE, ContentTracker, ProcessMemory, ns_pid
from tug.engine.source.trackers.uffd import (
    PAGE_IS_FILE,
    PAGE_IS_PRESENT,
    PAGE_IS_WRITTEN,
    Pagemap,
    UffdError,
    Written,
    inject_userfaultfd,
    parse_regions,
)
from tug.engine.source.trackers.uffdrounds import UffdRounds
from tug.engine.source.trackers.uffdtrack import Process, Sources, UffdTracker, register_all, start_time
from tug.policies import parse_policy

NPAGES = 128

TARGET_C = r"""
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <fcntl.h>
#include <unistd.h>
static unsigned char *m, *extra;
static size_t nextra;
static long tpages[64];
static int ntp;
static void *thr(void *arg) { (void)arg; for (int i = 0; i < ntp; i++) m[tpages[i] * 4096 + 9] ^= 0x33; return NULL; }
int main(void) {
    size_t n = %d, ps = 4096;
    m = mmap(NULL, n * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i++) memset(m + i * ps, (int)(i & 0xff), ps);
    printf("%%lx\n", (unsigned long)m); fflush(stdout);
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        char *p = line + 1, *end; long v[64]; int k = 0;
        for (;;) { long x = strtol(p, &end, 10); if (end == p || k == 64) break; v[k++] = x; p = end; }
        switch (line[0]) {
        case 'w': for (int i = 0; i < k; i++) m[v[i] * ps + 7] ^= 0x5a; printf("ok\n"); break;
        case 'm': nextra = v[0]; extra = mmap(NULL, nextra * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                  for (size_t i = 0; i < nextra; i++) extra[i * ps] = 1; printf("%%lx\n", (unsigned long)extra); break;
        case 'n': nextra = v[0]; extra = mmap(NULL, nextra * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                  printf("%%lx\n", (unsigned long)extra); break;
        case 'r': { volatile unsigned char sum = 0; for (int i = 0; i < k; i++) sum += extra[v[i] * ps]; (void)sum; printf("ok\n"); break; }
        case 'W': for (int i = 0; i < k; i++) extra[v[i] * ps + 3] ^= 0x11; printf("ok\n"); break;
        case 'k': for (int i = 0; i < k; i++) getrandom(m + v[i] * ps + 100, 16, 0); printf("ok\n"); break;
        case 's': { struct sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
                    struct sock_fprog prog = {1, &allow}; prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    printf(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) ? "fail\n" : "ok\n"); break; }
        case 'U': { int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | 1);  /* its own, on the extra region */
                    struct uffdio_api api = {.api = UFFD_API, .features = 1ULL << 15 /* WP_ASYNC */};
                    struct uffdio_register reg = {.range = {(unsigned long)extra, nextra * ps}, .mode = UFFDIO_REGISTER_MODE_WP};
                    printf(fd < 0 || ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg) ? "fail\n" : "ok\n"); break; }
        case 'u': munmap(extra, nextra * ps); printf("ok\n"); break;
        case 'p': mprotect(m + v[0] * ps, ps, PROT_READ); mprotect(m + v[0] * ps, ps, PROT_READ | PROT_WRITE); printf("ok\n"); break;
        case 't': { pthread_t t; ntp = k; memcpy(tpages, v, sizeof(long) * k); pthread_create(&t, NULL, thr, NULL); pthread_join(t, NULL); printf("ok\n"); break; }
        case 'f': { fflush(stdout); pid_t c = fork(); if (c == 0) { for (int i = 0; i < k; i++) m[v[i] * ps + 5] ^= 0x77; pause(); _exit(0); }
                    printf("%%d\n", c); break; }
        }
        fflush(stdout);
    }
    return 0;
}
""" % NPAGES


@pytest.fixture(scope="module")
def target_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("uffdtarget")
    (d / "t.c").write_text(TARGET_C)
    res = subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "t"), str(d / "t.c")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"gcc failed (make test runs scripts/setup.sh, which installs it): {res.stderr}")
    return d / "t"


class Target:
    def __init__(self, binary: Path) -> None:
        self.p = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.base = int(self.ask(None), 16)

    @property
    def pid(self) -> int:
        return self.p.pid

    def ask(self, cmd: str | None) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        if cmd is not None:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        return self.p.stdout.readline().strip()


@pytest.fixture
def target(target_bin: Path) -> Iterator[Target]:
    t = Target(target_bin)
    try:
        yield t
    finally:
        t.p.kill()
        t.p.wait()


def attach(pid: int) -> Process:
    uffd = asyncio.run(inject_userfaultfd(pid))
    uffd.api()
    return Process(pid, ns_pid(pid), start_time(pid), uffd, Pagemap(pid))


def scan(tracker: UffdTracker, proc: Process, lo: int, npages: int) -> set[int]:
    """One round on one process: indices of [lo, lo + npages) pages to send."""
    mem = ProcessMemory(proc.pid)
    try:
        ok, refused = register_all(proc, mem.regions())
        assert not [r for r, _ in refused if r.start <= lo < r.end], refused
        out: set[int] = set()
        for r in ok:
            for a, b in tracker.note_written(proc, proc.pagemap.written(r.start, r.end)):
                data = mem.read(a, (b - a) // PAGE)
                tracker.sent(proc.ns_pid, a, data)
                out.update(i for i in range((a - lo) // PAGE, (b - lo) // PAGE) if 0 <= i < npages)
        return out
    finally:
        mem.close()


def test_reports_exactly_the_written_pages_threads_and_mprotect(target: Target) -> None:
    tracker = UffdTracker(ContentTracker())
    proc = attach(target.pid)
    try:
        assert scan(tracker, proc, target.base, NPAGES) == set(range(NPAGES)), "the first scan sends every page"
        assert scan(tracker, proc, target.base, NPAGES) == set()
        target.ask("w 0 3 17 100 101 " + str(NPAGES - 1))
        assert scan(tracker, proc, target.base, NPAGES) == {0, 3, 17, 100, 101, NPAGES - 1}
        assert scan(tracker, proc, target.base, NPAGES) == set()
        target.ask("t 8 9 64")  # another thread of the same mm
        assert scan(tracker, proc, target.base, NPAGES) == {8, 9, 64}
        target.ask("k 20 21")  # written by the kernel (copy_to_user), not by the process
        assert scan(tracker, proc, target.base, NPAGES) == {20, 21}
        target.ask("p 50")  # splits the VMA in three and merges it back
        assert scan(tracker, proc, target.base, NPAGES) == set(), "mprotect alone writes nothing"
        target.ask("w 50 51")
        assert scan(tracker, proc, target.base, NPAGES) == {50, 51}
    finally:
        proc.close()


def test_new_mapping_and_munmap(target: Target) -> None:
    tracker = UffdTracker(ContentTracker())
    proc = attach(target.pid)
    try:
        scan(tracker, proc, target.base, NPAGES)
        extra = int(target.ask("m 16"), 16)  # mapped and touched after registration
        assert scan(tracker, proc, extra, 16) == set(range(16)), "a VMA mapped meanwhile is registered and sent whole"
        assert scan(tracker, proc, extra, 16) == set()
        target.ask("W 2 7")
        assert scan(tracker, proc, extra, 16) == {2, 7}
        target.ask("u")
        assert scan(tracker, proc, extra, 16) == set()
        again = int(target.ask("m 16"), 16)  # the same addresses, most likely: a new VMA carries no write-protect
        assert scan(tracker, proc, again, 16) == set(range(16))
    finally:
        proc.close()


def test_forked_child_is_a_new_process(target: Target) -> None:
    tracker = UffdTracker(ContentTracker())
    proc = attach(target.pid)
    child_pid = int(target.ask("f 1 2"))
    try:
        scan(tracker, proc, target.base, NPAGES)
        time.sleep(0.1)
        child = attach(child_pid)  # the fork dropped the parent's registration in the child
        try:
            assert scan(tracker, child, target.base, NPAGES) == set(range(NPAGES))
            assert scan(tracker, child, target.base, NPAGES) == set()
        finally:
            child.close()
        assert scan(tracker, proc, target.base, NPAGES) == set(), "the child's writes are not the parent's"
    finally:
        os.kill(child_pid, signal.SIGKILL)  # the target reaps it (or init, after the target)


def test_filter_skips_held_pages_and_sends_written_ones(target: Target) -> None:
    tracker = UffdTracker(ContentTracker())
    proc = attach(target.pid)
    mem = ProcessMemory(proc.pid)
    try:
        scan(tracker, proc, target.base, NPAGES)
        target.ask("w 4 5 90")
        tracker.freeze(proc, mem.regions(), Sources())
        data = mem.read(target.base, NPAGES)
        changed = tracker.diff(proc.ns_pid, target.base, data, record=False).changed
        pages = {(v - target.base) // PAGE + k for v, d in changed for k in range(len(d) // PAGE)}
        assert pages == {4, 5, 90}
        # An unknown process: nothing held, everything changed.
        assert tracker.diff(proc.ns_pid + 1, target.base, data[: 2 * PAGE], record=False).changed_pages == 2
    finally:
        mem.close()
        proc.close()


def smaps_flags(pid: int) -> list[str]:
    return re.findall(r"^VmFlags:(.*)$", Path(f"/proc/{pid}/smaps").read_text(), re.M)


def test_target_left_as_it_was(target: Target) -> None:
    fds = sorted(os.listdir(f"/proc/{target.pid}/fd"))
    flags = smaps_flags(target.pid)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{target.pid}/syscall").read_text().split()[0] != "0" and time.monotonic() < deadline:
        time.sleep(0.01)  # until it waits in read() for the next command
    ptrace.seize_and_interrupt(target.pid)  # blocked in read(): registers as of that syscall
    before = bytes(ptrace.getregs(target.pid))
    ptrace.detach(target.pid)
    proc = attach(target.pid)
    assert sorted(os.listdir(f"/proc/{target.pid}/fd")) == fds, "the target's own userfaultfd was closed"
    assert proc.uffd.leaked([target.pid]) is None
    assert proc.uffd.leaked([target.pid, os.getpid()]) == os.getpid(), "a holder of the fd is found (here: us)"
    mem = ProcessMemory(target.pid)
    register_all(proc, mem.regions())
    mem.close()
    assert any(" uw" in f for f in smaps_flags(target.pid))
    ptrace.seize_and_interrupt(target.pid)
    after = bytes(ptrace.getregs(target.pid))
    ptrace.detach(target.pid)
    assert after == before, "every register as it was, still in the same read()"
    proc.close()
    assert smaps_flags(target.pid) == flags, "closing tug's fd unregisters every range"
    assert target.ask("w 1") == "ok", "the interrupted read restarted"


KILLER = textwrap.dedent(
    """
    import asyncio, sys
    from tug.engine.source.trackers.uffd import inject_userfaultfd
    asyncio.run(inject_userfaultfd(int(sys.argv[1])))
    """
)


@pytest.mark.parametrize("delay_ms", [0, 20, 40, 60, 80])
def test_tug_killed_mid_injection_leaves_target_running(target: Target, delay_ms: int) -> None:
    """SIGKILL the process (and process group) that asked for the injection at
    different moments: the helper finishes on its own, the target runs on
    with its fd table unchanged."""
    fds = sorted(os.listdir(f"/proc/{target.pid}/fd"))
    tug = subprocess.Popen([sys.executable, "-c", KILLER, str(target.pid)], start_new_session=True)
    time.sleep(delay_ms / 1000)
    os.killpg(tug.pid, signal.SIGKILL)
    tug.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _tracer(target.pid):
        time.sleep(0.01)
    assert not _tracer(target.pid)
    assert target.ask("w 1 2") == "ok"
    assert sorted(os.listdir(f"/proc/{target.pid}/fd")) == fds


def test_tracer_killed_while_target_seized(target: Target) -> None:
    """What the kernel does when a tracer dies holding an interrupted tracee
    whose registers it did not change: the tracee resumes, its syscall restarts."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from tug.engine import ptrace
        ptrace.seize_and_interrupt({target.pid})
        print("seized", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "seized" in res.stdout and res.returncode == -signal.SIGKILL
    assert target.ask("w 3") == "ok"


def _tracer(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def test_parse_regions_checks_the_kernel_answer() -> None:
    raw = struct.pack("<6Q", 0x1000, 0x3000, PAGE_IS_WRITTEN | PAGE_IS_PRESENT, 0x5000, 0x6000, PAGE_IS_WRITTEN | PAGE_IS_FILE)
    got = parse_regions(raw, 2, 0x1000, 0x8000)
    assert got == [Written(0x1000, 0x3000, 10), Written(0x5000, 0x6000, 6)]
    assert [w.dumpable for w in got] == [True, False], "file pages are not in the process's pagemap"
    for bad in ((0x0, 0x2000), (0x1000, 0x1000), (0x1800, 0x2000), (0x7000, 0x9000)):
        with pytest.raises(UffdError):
            parse_regions(struct.pack("<3Q", *bad, PAGE_IS_WRITTEN), 1, 0x1000, 0x8000)
    with pytest.raises(UffdError):
        parse_regions(raw, 3, 0x1000, 0x8000)


def test_held_runs() -> None:
    h = PageSet()
    h.add(7, 0x10000, 0x10000 + 200 * PAGE)
    assert h.missing(7, 0x10000, 0x10000 + 200 * PAGE) == []
    h.forget(7, 0x10000 + 5 * PAGE, 0x10000 + 7 * PAGE)
    h.forget(7, 0x10000 + 100 * PAGE, 0x10000 + 101 * PAGE)
    assert h.missing(7, 0x10000, 0x10000 + 202 * PAGE) == [
        (0x10000 + 5 * PAGE, 0x10000 + 7 * PAGE),
        (0x10000 + 100 * PAGE, 0x10000 + 101 * PAGE),
        (0x10000 + 200 * PAGE, 0x10000 + 202 * PAGE),
    ]
    assert h.pages(7) == 197 and h.missing(8, 0, PAGE) == [(0, PAGE)]
    h.forget_pid(7)
    assert h.pages(7) == 0


def test_probe_on_a_throwaway_process() -> None:
    """What tug doctor and --tracker auto run: works on this kernel (6.18),
    and a migration's second question is answered without a second process."""
    from tug.engine.source.trackers import uffd

    assert asyncio.run(uffd.probe_now()) == ""

    async def twice() -> list[str]:
        return [await uffd.probe(), await uffd.probe()]

    assert asyncio.run(twice()) == ["", ""]
    assert uffd._probed == ""


def test_scans_leave_no_page_for_criu_to_dump_that_was_not_there(target: Target) -> None:
    """A uffd-wp marker in an empty entry shows in /proc/PID/pagemap as a
    swapped page, which CRIU would dump: the scans match only pages that
    exist, so untouched pages stay empty, before the freeze and after it
    (CRIU dumps with the registration in place; closing tug's fd drops it)."""
    empty = int(target.ask("n 32"), 16)
    tracker = UffdTracker(ContentTracker())
    proc = attach(target.pid)
    mem = ProcessMemory(target.pid)
    try:
        scan(tracker, proc, target.base, NPAGES)
        target.ask("r 9 10")  # only read: the shared zero page, nothing to send
        assert scan(tracker, proc, empty, 32) == set()
        target.ask("W 4 9")  # first touch after the scans, and a write over the zero page: reported written
        assert scan(tracker, proc, empty, 32) == {4, 9}

        def dumpable() -> set[int]:
            region = next(r for r in mem.regions() if r.start <= empty < r.end)
            return {(v - empty) // PAGE + k for v, n in mem.runs(region) for k in range(n)} & set(range(32))

        touched = "only the pages touched (10: the zero page, if pagemap shows it)"
        assert dumpable() - {10} == {4, 9}, touched
        tracker.freeze(proc, mem.regions(), Sources())
        assert dumpable() - {10} == {4, 9}, touched
        assert any(" uw" in f for f in smaps_flags(target.pid)), "still registered while CRIU would dump"
        proc.close()
        assert not any(" uw" in f for f in smaps_flags(target.pid)), "closing tug's fd unregisters"
    finally:
        mem.close()
        proc.close()


def test_injection_refused_on_a_stopped_process_leaves_it_stopped(target: Target) -> None:
    """A process in a group-stop is not ours to resume: the helper fails, the
    process stays stopped, and once continued it runs on unharmed."""
    fds = sorted(os.listdir(f"/proc/{target.pid}/fd"))
    os.kill(target.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while _state(target.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(UffdError, match="stopped"):
        asyncio.run(inject_userfaultfd(target.pid))
    assert _state(target.pid) == "T" and not _tracer(target.pid)
    os.kill(target.pid, signal.SIGCONT)
    assert target.ask("w 1") == "ok"
    assert sorted(os.listdir(f"/proc/{target.pid}/fd")) == fds


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class _Stream:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, data: bytes | memoryview) -> None:
        self.data += data

    async def close(self, meta: dict[str, Any] | None = None) -> None:
        pass


class _Stub:
    """Session and runc for UffdRounds: streams recorded, one container process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.bytes_sent = 0
        self.streams: list[_Stream] = []
        self.extra: list[int] = []

    async def open_stream(self, kind: str, meta: dict[str, Any]) -> _Stream:
        self.streams.append(_Stream())
        return self.streams[-1]

    async def pids(self, name: str) -> list[int]:
        return [self.pid, *self.extra]


def _rounds(pid: int) -> tuple[UffdRounds, _Stub]:
    stub = _Stub(pid)
    ctx = SourceContext(name="c", session=cast(Any, stub), agent=None, runc=cast(Any, stub), work=Path("/nonexistent"),
                        opts=MigrationOptions())
    return UffdRounds(ctx, parse_policy("max-iter=3")), stub


def test_rounds_fall_back_to_content_with_a_note(target: Target) -> None:
    """Injection refused (the process is stopped at round 0): its pages come
    from the content compare, and the notes say so; a tracked process's
    rounds come from the scans."""
    os.kill(target.pid, signal.SIGSTOP)
    rounds, stub = _rounds(target.pid)
    try:
        asyncio.run(rounds.round(0))
        assert any("compared by content instead" in n for n in rounds.ctx.notes)
        src = rounds.history_sources[0]
        assert src.uffd_written == 0 and src.content_changed >= NPAGES and src.fallback["process not attached"] == 1
    finally:
        os.kill(target.pid, signal.SIGCONT)
        rounds.close()
    rounds, stub = _rounds(target.pid)
    try:
        asyncio.run(rounds.round(0))
        target.ask("w 5 6 7")
        stats = asyncio.run(rounds.round(1))
        src = rounds.history_sources[1]
        assert src.uffd_written >= 3 and src.fallback["process not attached"] == 0
        assert stats.dirty_pages == src.uffd_written + src.content_changed
        assert "round 1 (uffd) of c: " in rounds.ctx.notes[-1]
    finally:
        rounds.close()
    assert not any(" uw" in f for f in smaps_flags(target.pid)), "close() unregistered everything"


def test_injection_refused_under_a_seccomp_filter(target: Target) -> None:
    """A filter could kill the process for the injected syscall: not tried."""
    assert target.ask("s") == "ok"  # an allow-all filter, but a filter
    with pytest.raises(UffdError, match="seccomp"):
        asyncio.run(inject_userfaultfd(target.pid))
    assert target.ask("w 2") == "ok" and not _tracer(target.pid)


def test_rounds_attach_new_processes_and_drop_exited_ones(target: Target) -> None:
    rounds, stub = _rounds(target.pid)
    child = int(target.ask("f 1"))
    try:
        asyncio.run(rounds.round(0))
        assert set(rounds.procs) == {target.pid}
        stub.extra = [child]  # forked after the start: attached by the next round
        asyncio.run(rounds.round(1))
        assert set(rounds.procs) == {target.pid, child}
        assert rounds.history_sources[1].uffd_written >= NPAGES, "the child's memory is new: sent whole"
        os.kill(child, signal.SIGKILL)
        stub.extra = []
        asyncio.run(rounds.round(2))
        assert set(rounds.procs) == {target.pid}, "the exited child is dropped"
    finally:
        rounds.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_vma_the_container_registered_itself_is_compared_by_content(target: Target) -> None:
    """The container's own userfaultfd on a VMA (its write-protect bits would
    mean nothing to us): registration refused, the region is the content
    compare's, and nothing in it counts as held."""
    tracker = UffdTracker(ContentTracker())
    proc = attach(target.pid)
    mem = ProcessMemory(target.pid)
    try:
        target.ask("m 8")
        scan(tracker, proc, target.base, NPAGES)  # registers and sends it, as ours
        target.ask("u")
        again = int(target.ask("m 8"), 16)
        assert target.ask("U") == "ok"
        region = next(r for r in mem.regions() if r.start <= again < r.end)
        ok, refused = register_all(proc, [region])
        assert ok == [] and [why for _, why in refused] == ["register EBUSY"]
        tracker.freeze(proc, mem.regions(), Sources())
        data = mem.read(again, 8)
        assert tracker.diff(proc.ns_pid, again, data, record=False).changed_pages == 8
    finally:
        mem.close()
        proc.close()
