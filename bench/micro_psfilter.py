"""Micro-benchmark: the content tracker's frozen step, filter server vs dump-then-diff.

``.venv/bin/python -m bench.micro_psfilter [--mib 512] [--written 0.003] [--repeat 3]``

Like ``bench.micro_tracker`` this measures an engine internal on one machine,
without the lab: a small C program holds ``--mib`` of anonymous memory with a
per-page pattern; the tracker records all of it (pre-copy's round 0), then a
fraction ``--written`` of its pages is rewritten (through /proc/PID/mem) and
the process is stopped, so every dump below sees the same memory. Then, each
``--repeat`` times:

* **filter**: ``criu dump --leave-running --page-server`` into
  :class:`tug.engine.source.psfilter.FilterServer`, whose sink only counts the
  changed runs (no network: this is the filter's own throughput);
* **filter, corked**: the same without uncorking CRIU's socket (see
  ``tug.engine.criu.uncork``): what any page server CRIU talks to pays, the
  destination's ``criu page-server`` included;
* **old**: ``criu dump --leave-running`` to tmpfs, then the removed
  ``Precopy.send_final`` loop (pagemaps read, pages files mmap'd and sliced,
  ``ContentTracker.diff`` per run in a worker thread), kept here verbatim
  but for ``record=False`` (so every repetition sees the same shadow) as the
  yardstick. Both must report the same changed pages or the benchmark fails.

Reported per path: wall time, pages/s and MiB/s over the dump's private
pages, the CPU of this process (event loop, diff) and of CRIU, and the tmpfs
the old path needs. Not a test: numbers depend on the machine (and on what
else runs on it) and are only printed.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tug.engine.criu import images
from tug.engine.criu.tool import criu_binary
from tug.engine.source.psfilter import FilterServer
from tug.engine.source.trackers.shadow import PAGE, ContentTracker, ProcessMemory

PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
    if (argc != 3)
        return 64;
    size_t pages = strtoull(argv[1], NULL, 10);
    uint64_t *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 65;
    for (size_t i = 0; i < pages * 512; i++)  /* every page distinct, none zero */
        mem[i] = (i + 1) * 0x9E3779B97F4A7C15ull;
    FILE *out = fopen(argv[2], "w");
    if (!out)
        return 66;
    fprintf(out, "%lx\n", (unsigned long)mem);
    fclose(out);
    for (;;)
        pause();
}
"""


@dataclass
class Sample:
    wall_s: float
    own_cpu_s: float
    criu_cpu_s: float
    changed: int
    dump_s: float = 0.0  # old path: the CRIU part of wall_s
    pages: int = 0  # filter path: private pages CRIU sent


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def start_program(work: Path, mib: int) -> tuple[subprocess.Popen[bytes], int, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("needs gcc")
    (work / "prog.c").write_text(PROGRAM)
    subprocess.run([gcc, "-O2", "-o", str(work / "prog"), str(work / "prog.c")], check=True)
    info = work / "info"
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", str(work / "prog"), str(mib * 256), str(info)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "GLIBC_TUNABLES": "glibc.pthread.rseq=0"},  # no kernel writes while stopped
    )  # fmt: skip
    while not info.exists():
        if proc.poll() is not None:
            raise SystemExit(f"program exited with {proc.returncode}")
        time.sleep(0.01)
    pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    return proc, pid, int(info.read_text(), 16)


def round0(tracker: ContentTracker, pid: int) -> tuple[int, float]:
    """What pre-copy's first round leaves in the shadow: every dumpable page."""
    t0 = time.perf_counter()
    mem = ProcessMemory(pid)
    n = 0
    try:
        for region in mem.regions():
            for vaddr, count in mem.runs(region):
                n += tracker.scan(mem, vaddr, count).scanned
    finally:
        mem.close()
    return n, time.perf_counter() - t0


def write_pages(pid: int, base: int, mib: int, frac: float) -> int:
    """Rewrite ``frac`` of the big region's pages (evenly spread), one byte each."""
    pages = mib * 256
    count = max(1, round(pages * frac))
    step = pages // count
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        for k in range(count):
            addr = base + k * step * PAGE + 123
            old = os.pread(fd, 1, addr)
            os.pwrite(fd, bytes([old[0] ^ 0xFF]), addr)
    finally:
        os.close(fd)
    return count


async def filter_once(criu: str, pid: int, tracker: ContentTracker, work: Path, uncork: bool = True) -> Sample:
    images_dir = work / "filter-img"
    shutil.rmtree(images_dir, ignore_errors=True)
    changed = 0

    async def sink(p: int, vaddr: int, data: bytes) -> None:
        nonlocal changed
        changed += len(data) // PAGE

    fs = FilterServer.listen(tracker, images_dir, uncork=uncork)
    c0, k0, t0 = cpu_self(), cpu_children(), time.perf_counter()
    serve = asyncio.create_task(fs.serve(sink))
    proc = await asyncio.create_subprocess_exec(
        criu, "dump", "-t", str(pid), "-D", str(images_dir), "--leave-running", "-o", "dump.log",
        "--page-server", "--address", "127.0.0.1", "--port", str(fs.port),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    rc = await proc.wait()
    await serve
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"criu dump --page-server failed ({rc}): see {images_dir / 'dump.log'}")
    if uncork and fs.uncork_result:
        print(f"warning: CRIU's socket stayed corked: {fs.uncork_result}")
    return Sample(wall, cpu_self() - c0, cpu_children() - k0, changed, pages=fs.stats.pages)


async def old_once(criu: str, pid: int, tracker: ContentTracker, work: Path) -> tuple[Sample, int]:
    images_dir = Path(tempfile.mkdtemp(prefix="tug-micro-psfilter-", dir="/dev/shm"))
    try:
        c0, k0, t0 = cpu_self(), cpu_children(), time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            criu, "dump", "-t", str(pid), "-D", str(images_dir), "--leave-running", "-o", "dump.log",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        if await proc.wait() != 0:
            raise SystemExit(f"criu dump failed: see {images_dir / 'dump.log'}")
        dumped = time.perf_counter()
        changed = await old_send_final(tracker, images_dir)
        wall = time.perf_counter() - t0
        tmpfs = sum(p.stat().st_size for p in images_dir.glob("pages-*.img"))
        return Sample(wall, cpu_self() - c0, cpu_children() - k0, changed, dumped - t0), tmpfs
    finally:
        shutil.rmtree(images_dir, ignore_errors=True)


async def old_send_final(tracker: ContentTracker, images_dir: Path) -> int:
    """The removed Precopy.send_final, minus the sending (record=False: see the module doc)."""
    plan: list[tuple[int, Path, list[tuple[int, int, int]]]] = []
    for pm_path in sorted(images_dir.glob("pagemap-*.img")):
        pid = images.process_pagemap_pid(pm_path.name)
        if pid is None:
            continue
        pm = images.read_pagemap(pm_path.read_bytes())
        plan.append((pid, images_dir / images.pages_file_name(pm.pages_id), images.page_layout(pm)))
    changed = 0
    for pid, pages_path, layout in plan:
        with open(pages_path, "rb") as f:
            size = pages_path.stat().st_size
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) if size else None
            try:
                for vaddr, n, off in layout:
                    data = mm[off : off + n * PAGE] if mm is not None else b""
                    res = await asyncio.to_thread(tracker.diff, pid, vaddr, data, record=False)
                    changed += res.changed_pages
            finally:
                if mm is not None:
                    mm.close()
    return changed


def row(name: str, samples: list[Sample], pages: int) -> str:
    wall = statistics.median(s.wall_s for s in samples)
    own = statistics.median(s.own_cpu_s for s in samples)
    criu = statistics.median(s.criu_cpu_s for s in samples)
    mib = pages * PAGE / 2**20
    return (
        f"{name:34}{wall * 1000:9.0f} ms{pages / wall / 1000:10.0f} k{mib / wall:10.0f}"
        f"{own:10.2f} s{criu:9.2f} s"
    )


async def run(args: argparse.Namespace) -> None:
    criu = criu_binary()
    with tempfile.TemporaryDirectory(prefix="tug-micro-psfilter-") as d:
        work = Path(d)
        proc, pid, base = start_program(work, args.mib)
        try:
            tracker = ContentTracker()
            scanned, r0 = round0(tracker, pid)
            written = write_pages(pid, base, args.mib, args.written)
            os.killpg(pid, signal.SIGSTOP)
            load = os.getloadavg()
            filt: list[Sample] = []
            corked: list[Sample] = []
            old: list[Sample] = []
            tmpfs = 0
            for _ in range(args.repeat):
                filt.append(await filter_once(criu, pid, tracker, work))
                corked.append(await filter_once(criu, pid, tracker, work, uncork=False))
                sample, tmpfs = await old_once(criu, pid, tracker, work)
                old.append(sample)
            if len({s.changed for s in filt + corked + old}) != 1:
                raise SystemExit(f"paths disagree on the changed pages: {[s.changed for s in filt + corked + old]}")
        finally:
            os.kill(pid, signal.SIGKILL)
            proc.wait()
    print(
        f"frozen step of the content tracker: {args.mib} MiB process, {filt[0].pages} private pages dumped, {scanned} in the shadow "
        f"(round 0 took {r0:.2f} s), {written} pages written, {filt[0].changed} pages changed per dump; "
        f"median of {args.repeat}; load average before: {load[0]:.2f}"
    )
    print(f"{'':34}{'wall':>12}{'pages/s':>11}{'MiB/s':>10}{'CPU here':>12}{'CPU criu':>11}")
    pages = filt[0].pages  # what CRIU dumped: the shadow's pages plus its own few
    print(row("filter (criu --page-server)", filt, pages))
    print(row("filter, CRIU's socket left corked", corked, pages))
    print(row("old: criu dump to tmpfs + diff", old, pages))
    dump = statistics.median(s.dump_s for s in old)
    print(f"{'  of which criu dump to tmpfs':34}{dump * 1000:9.0f} ms")
    print(f"{'  of which mmap + diff':34}{(statistics.median(s.wall_s for s in old) - dump) * 1000:9.0f} ms")
    print(f"tmpfs for the old path: {tmpfs / 2**20:.0f} MiB (the filter path writes none)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="process memory (default 512)")
    ap.add_argument("--written", type=float, default=0.003, help="fraction of pages written after round 0 (default 0.003)")
    ap.add_argument("--repeat", type=int, default=3, help="median of N (default 3)")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
