"""The content tracker against a real process that writes pages we choose."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tug.engine import pagestream
from tug.engine.errors import ProtocolError
from tug.engine.procfs import parse_maps
from tug.engine.source.trackers.shadow import PAGE, ContentTracker, ProcessMemory, anon_runs

NPAGES = 256

# Maps NPAGES anonymous pages, touches them all, prints the address, then for
# each line "i j k" read from stdin writes one byte into those pages and
# answers "ok". Nothing else in its memory is written between commands.
DIRTIER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
int main(void) {
    size_t n = %d, ps = 4096;
    unsigned char *m = mmap(NULL, n * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 1;
    for (size_t i = 0; i < n; i++) memset(m + i * ps, (int)(i & 0xff), ps);
    printf("%%lx\n", (unsigned long)m); fflush(stdout);
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        char *p = line, *end;
        for (;;) {
            long i = strtol(p, &end, 10);
            if (end == p) break;
            m[i * ps + 7] ^= 0x5a;
            p = end;
        }
        printf("ok\n"); fflush(stdout);
    }
    return 0;
}
""" % NPAGES


@pytest.fixture(scope="module")
def dirtier_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dirtier")
    (d / "dirtier.c").write_text(DIRTIER_C)
    res = subprocess.run(["gcc", "-O1", "-o", str(d / "dirtier"), str(d / "dirtier.c")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"gcc failed (install gcc: make test runs scripts/setup.sh): {res.stderr}")
    return d / "dirtier"


@pytest.fixture
def dirtier(dirtier_bin: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    p = subprocess.Popen([str(dirtier_bin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    base = int(p.stdout.readline(), 16)
    try:
        yield p, base
    finally:
        p.kill()
        p.wait()


def dirty(p: subprocess.Popen[str], pages: list[int]) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(" ".join(map(str, pages)) + "\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


def scan_region(tracker: ContentTracker, mem: ProcessMemory, base: int) -> set[int]:
    """Indices (within the test region) of pages reported changed."""
    changed: set[int] = set()
    for region in mem.regions():
        for vaddr, n in mem.runs(region):
            for run_vaddr, data in tracker.scan(mem, vaddr, n).changed:
                for k in range(len(data) // PAGE):
                    idx = (run_vaddr - base) // PAGE + k
                    if 0 <= idx < NPAGES:
                        changed.add(idx)
    return changed


def test_reports_exactly_the_written_pages(dirtier: tuple[subprocess.Popen[str], int]) -> None:
    p, base = dirtier
    tracker = ContentTracker()
    mem = ProcessMemory(p.pid)
    try:
        assert scan_region(tracker, mem, base) == set(range(NPAGES)), "first scan sends every page"
        assert scan_region(tracker, mem, base) == set(), "unchanged pages are not sent again"
        written = [0, 3, 17, 100, 101, 102, NPAGES - 1]
        dirty(p, written)
        assert scan_region(tracker, mem, base) == set(written)
        assert scan_region(tracker, mem, base) == set()
        # Writing a page back to its old content is not a change worth sending.
        dirty(p, [5])
        dirty(p, [5])
        assert scan_region(tracker, mem, base) == set()
    finally:
        mem.close()


def test_shadow_holds_exactly_the_sent_bytes(dirtier: tuple[subprocess.Popen[str], int]) -> None:
    p, base = dirtier
    tracker = ContentTracker()
    mem = ProcessMemory(p.pid)
    try:
        scan_region(tracker, mem, base)
        dirty(p, [42])
        now = mem.read(base + 42 * PAGE, 1)
        assert tracker.shadow[(mem.ns_pid, base + 42 * PAGE)] != now
        scan_region(tracker, mem, base)
        assert tracker.shadow[(mem.ns_pid, base + 42 * PAGE)] == now
    finally:
        mem.close()


def test_diff_coalesces_runs() -> None:
    t = ContentTracker()
    data = bytes(PAGE * 6)
    assert [(v, len(d)) for v, d in t.diff(1, 0x1000, data).changed] == [(0x1000, 6 * PAGE)]
    changed = bytearray(data)
    for i in (1, 2, 4):
        changed[i * PAGE] = 1
    assert [(v, len(d) // PAGE) for v, d in t.diff(1, 0x1000, bytes(changed)).changed] == [(0x2000, 2), (0x5000, 1)]


def test_parse_maps_and_candidates() -> None:
    text = (
        "00400000-00401000 r-xp 00000000 08:01 123 /bin/x\n"
        "7f0000000000-7f0000010000 rw-p 00000000 00:00 0 \n"
        "7f0000010000-7f0000020000 rw-s 00000000 00:01 5 /dev/zero (deleted)\n"
        "7ffff7ff9000-7ffff7ffd000 r--p 00000000 00:00 0 [vvar]\n"
    )
    regions = parse_maps(text)
    assert [r.candidate for r in regions] == [True, True, False, False]


def test_anon_runs_use_present_and_skip_file_pages() -> None:
    P, F = 1 << 63, 1 << 61
    entries = (P, P, 0, P | F, P, 1 << 62)
    assert list(anon_runs(0x10000, entries)) == [(0x10000, 2), (0x14000, 2)]


def test_pagestream_roundtrip_any_split() -> None:
    run = bytes(range(256)) * 48
    payload = pagestream.encode_header(7, 0x4000, run) + run
    payload += pagestream.encode_header(9, 0x9000, b"\x01" * PAGE) + b"\x01" * PAGE
    for step in (1, 5, 4095, 4096, 4097, len(payload)):
        dec = pagestream.RunDecoder()
        got: dict[tuple[int, int], bytes] = {}
        for i in range(0, len(payload), step):
            for pid, vaddr, piece in dec.feed(payload[i : i + step]):
                assert len(piece) % PAGE == 0
                for k in range(len(piece) // PAGE):
                    got[(pid, vaddr + k * PAGE)] = bytes(piece[k * PAGE : (k + 1) * PAGE])
        dec.finish()
        assert sorted(got) == [(7, 0x4000), (7, 0x5000), (7, 0x6000), (9, 0x9000)]
        assert got[(9, 0x9000)] == b"\x01" * PAGE


def test_pagestream_rejects_bad_headers() -> None:
    with pytest.raises(ProtocolError):
        list(pagestream.RunDecoder().feed(pagestream.encode_header(1, 0x1001, bytes(PAGE))))
    dec = pagestream.RunDecoder()
    list(dec.feed(pagestream.encode_header(1, 0x1000, bytes(2 * PAGE)) + bytes(PAGE)))
    with pytest.raises(ProtocolError):
        dec.finish()
