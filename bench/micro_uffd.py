"""Micro-benchmark: one pre-copy round's dirty-page search, uffd vs content.

``.venv/bin/python -m bench.micro_uffd [--mib 1024] [--written 0.01] [--reps 3] [--thp]``

A child process maps and touches ``--mib`` MiB; both trackers then look for
the pages it wrote since their previous round:

- uffd: the ``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING`` over the region
  (find the written pages and write-protect them again), without reading them;
- content: a round of the shadow compare (read every present page through
  /proc/PID/mem and compare it with the shadow).

Each is timed after the child wrote ``--written`` of its pages (spread over
the region) and with nothing written; the per-GiB figures and the source's
memory held by each tracker are printed. Not a test: timings depend on the
machine (and on what else runs on it) and are only printed.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time

from tug.engine.source.trackers.shadow import PAGE, ContentTracker, ProcessMemory
from tug.engine.source.trackers.uffd import Pagemap, inject_userfaultfd

CHILD = (
    "import ctypes, mmap, sys\n"
    "n = int(sys.argv[1]) << 20\n"
    "m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
    "if sys.argv[2] == 'thp': m.madvise(mmap.MADV_HUGEPAGE)\n"
    "for i in range(0, n, 4096): m[i] = 1\n"
    "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n"
    "for line in sys.stdin:\n"
    "    step = int(line)\n"
    "    for i in range(0, n, step * 4096): m[i] = (m[i] + 1) & 0xff\n"
    "    print('ok', flush=True)\n"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--written", type=float, default=0.01, help="fraction of pages written between rounds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--thp", action="store_true", help="madvise(MADV_HUGEPAGE) the child's memory")
    args = ap.parse_args()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.mib), "thp" if args.thp else "4k"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        base = int(child.stdout.readline())
        end = base + (args.mib << 20)
        gib = args.mib / 1024
        step = max(1, round(1 / args.written)) if args.written > 0 else 0

        def write() -> None:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(f"{step}\n")
            child.stdin.flush()
            child.stdout.readline()

        uffd = asyncio.run(inject_userfaultfd(child.pid))
        uffd.api()
        assert not uffd.register(base, end)
        pm = Pagemap(child.pid)
        t0 = time.perf_counter()
        pm.written(base, end)
        print(f"uffd    round 0 (protect {args.mib} MiB): {(time.perf_counter() - t0) * 1000:.1f} ms")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        content = ContentTracker()
        mem = ProcessMemory(child.pid)
        region = next(r for r in mem.regions() if r.start <= base < r.end)

        def content_round() -> int:
            return sum(content.scan(mem, v, n).changed_pages for v, n in mem.runs(region))

        t0 = time.perf_counter()
        content_round()
        print(f"content round 0 (shadow of {args.mib} MiB): {time.perf_counter() - t0:.2f} s, "
              f"shadow {content.shadow_bytes / 2**20:.0f} MiB, this process's peak RSS grew "
              f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024:.0f} MiB")
        results: dict[str, list[str]] = {}
        for label, writes in ((f"{args.written:.2%} written", True), ("nothing written", False)):
            for rep in range(args.reps):
                pm.written(base, end)  # nothing pending from the content rounds' writes
                if writes and step:
                    write()
                t0 = time.perf_counter()
                runs = pm.written(base, end)
                t_uffd = time.perf_counter() - t0
                found = sum((w.end - w.start) // PAGE for w in runs)
                content_round()
                if writes and step:
                    write()
                t0 = time.perf_counter()
                changed = content_round()
                t_content = time.perf_counter() - t0
                results.setdefault(label, []).append(
                    f"uffd scan+re-protect {t_uffd * 1000 / gib:7.2f} ms/GiB ({found} pages); "
                    f"content {t_content * 1000 / gib:8.1f} ms/GiB ({changed} pages)"
                )
        for label, lines in results.items():
            for rep, line in enumerate(lines):
                print(f"{label:>16s} rep {rep + 1}: {line}")
        mem.close()
        pm.close()
        uffd.close()
    finally:
        child.kill()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
