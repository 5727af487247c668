"""Micro-benchmark: the content tracker's diff, old per-page dict vs block shadow.

``.venv/bin/python -m bench.micro_tracker [--mib 256] [--written 0.003]``

Unlike the rest of ``bench`` this measures a library internal, without the lab:
the CPU a pre-copy round and the frozen-window delta spend in
``ContentTracker.diff``, which is what bounds the scan rate and adds to the
downtime. It replays what precopy.py does with synthetic memory: round 0
(every page new), a round after a fraction of the pages was written, the final
delta over a dump file read through mmap as the removed ``Precopy.send_final`` did
(the filter server replaced it: see ``bench.micro_psfilter``), and a
round with nothing written. The old implementation is kept here, verbatim, as
the yardstick; both must return the same runs or the benchmark fails.

Not a test: timings depend on the machine and are only printed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Protocol

from tug.engine.source.trackers.shadow import CHUNK_PAGES, PAGE, ContentTracker, ScanResult

PID = 1
#: A typical anonymous mmap address: page aligned, not block aligned, so every
#: chunk starts and ends mid-block as in a real process.
BASE = 0x7F3A1C3F5000


class Differ(Protocol):
    def diff(self, pid: int, vaddr: int, data: bytes, *, record: bool = True) -> ScanResult: ...


class DictTracker:
    """The tracker before the block shadow: a dict entry per page."""

    def __init__(self) -> None:
        self.shadow: dict[tuple[int, int], bytes] = {}

    def diff(self, pid: int, vaddr: int, data: bytes, *, record: bool = True) -> ScanResult:
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


def write_pages(chunks: list[bytes], frac: float, rng: random.Random) -> list[bytes]:
    """Memory after the workload wrote one byte into ``frac`` of its pages."""
    npages = len(chunks) * CHUNK_PAGES
    out = list(chunks)
    touched: dict[int, bytearray] = {}
    for p in rng.sample(range(npages), round(npages * frac)):
        c, k = divmod(p, CHUNK_PAGES)
        buf = touched.setdefault(c, bytearray(chunks[c]))
        buf[k * PAGE + rng.randrange(PAGE)] ^= 0xFF
    for c, buf in touched.items():
        out[c] = bytes(buf)
    return out


Runs = list[tuple[int, int]]


def scan_round(t: Differ, chunks: list[bytes]) -> Runs:
    """A pre-copy round: diff each chunk as the scanner reads it."""
    runs: Runs = []
    for c, data in enumerate(chunks):
        res = t.diff(PID, BASE + c * CHUNK_PAGES * PAGE, data)
        runs += [(v, len(d)) for v, d in res.changed]
    return runs


def final_delta(t: Differ, path: str, nchunks: int) -> Runs:
    """The frozen-window delta: the dump's pages sliced from an mmap."""
    runs: Runs = []
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            for c in range(nchunks):
                off = c * CHUNK_PAGES * PAGE
                res = t.diff(PID, BASE + off, mm[off : off + CHUNK_PAGES * PAGE])
                runs += [(v, len(d)) for v, d in res.changed]
        finally:
            mm.close()
    return runs


class NoDiff:
    """Slices like the final step but compares nothing: the floor under it."""

    def diff(self, pid: int, vaddr: int, data: bytes, *, record: bool = True) -> ScanResult:
        return ScanResult(scanned=len(data) // PAGE, changed=[])


PHASES = ("round 0 (every page new)", "round, {pct} written", "final delta (mmap), {pct} written", "round, nothing written")


def run_once(make: Callable[[], Differ], states: list[list[bytes]], dump: str) -> tuple[list[float], list[Runs]]:
    t = make()
    times, results = [], []
    steps: list[Callable[[], Runs]] = [
        lambda: scan_round(t, states[0]),
        lambda: scan_round(t, states[1]),
        lambda: final_delta(t, dump, len(states[2])),
        lambda: scan_round(t, states[2]),
    ]
    for step in steps:
        t0 = time.perf_counter()
        results.append(step())
        times.append(time.perf_counter() - t0)
    return times, results


def shadow_memory(make: Callable[[], Differ], chunks: list[bytes]) -> int:
    """Bytes the tracker holds after round 0 (traced separately: tracing slows it)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        t = make()
        scan_round(t, chunks)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="container memory (default 256)")
    ap.add_argument("--written", type=float, default=0.003, help="fraction of pages written between steps (default 0.003)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    args = ap.parse_args()

    rng = random.Random(42)
    nchunks = max(1, args.mib * (1 << 20) // (CHUNK_PAGES * PAGE))
    m0 = [rng.randbytes(CHUNK_PAGES * PAGE) for _ in range(nchunks)]
    m1 = write_pages(m0, args.written, rng)
    m2 = write_pages(m1, args.written, rng)
    fd, dump = tempfile.mkstemp(prefix="tug-micro-", suffix=".img", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in m2:
                f.write(chunk)
        impls: dict[str, Callable[[], Differ]] = {"old (dict/page)": DictTracker, "new (blocks)": ContentTracker}
        best = {name: [float("inf")] * len(PHASES) for name in impls}
        expect: list[Runs] | None = None
        for _ in range(args.repeat):
            for name, make in impls.items():
                times, results = run_once(make, [m0, m1, m2], dump)
                if expect is None:
                    expect = results
                elif results != expect:
                    raise SystemExit(f"{name} returned different runs than the old tracker")
                best[name] = [min(a, b) for a, b in zip(best[name], times)]
        mem = {name: shadow_memory(make, m0) for name, make in impls.items()}
        floor = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            final_delta(NoDiff(), dump, nchunks)
            floor = min(floor, time.perf_counter() - t0)
    finally:
        os.unlink(dump)

    npages = nchunks * CHUNK_PAGES
    pct = f"{args.written * 100:g}%"
    print(
        f"ContentTracker.diff, {nchunks * CHUNK_PAGES * PAGE >> 20} MiB ({npages} pages) in {nchunks} runs of "
        f"{CHUNK_PAGES} pages from {BASE:#x}, {round(npages * args.written)} pages written per step, "
        f"best of {args.repeat}"
    )
    old, new = impls
    print(f"{'':36}{old:>17}{new:>15}{'speedup':>10}")
    for i, phase in enumerate(PHASES):
        a, b = best[old][i], best[new][i]
        print(f"{phase.format(pct=pct):36}{a * 1000:14.1f} ms{b * 1000:12.1f} ms{a / b:9.1f}x")
    print(f"{'  (final: mmap slicing alone)':36}{floor * 1000:14.1f} ms{floor * 1000:12.1f} ms")
    print(f"{'shadow memory after round 0':36}{mem[old] / 2**20:13.1f} MiB{mem[new] / 2**20:11.1f} MiB")


if __name__ == "__main__":
    main()
