"""Fault latencies read from CRIU's lazy-pages daemon log (its -v4 lines, as CRIU 4.2 writes them)."""

from __future__ import annotations

from tug.engine.destination.lazypages import fault_latencies, latency_summary

LOG = """\
(00.041989) uffd: Waiting for incoming connections on lazy-pages.socket
(00.206526) uffd: Received PID: 1, uffd: 11
(00.208802) uffd: 1-11: #PF at 0x123a0000
(00.208900) uffd: 1-12: #PF at 0x5000
(00.224404) uffd: 1-11: uffd_copy: 0x123a0000/4096
(00.297554) uffd: 1-11: uffd_copy: 0x4c8000/4096
(00.303893) uffd: 1-11: #PF at 0x4dd000
(00.310000) uffd: 1-11: uffd_copy: 0x4dc000/16384
(00.320000) uffd: 1-12: zero page at 0x5000
(00.330000) uffd: 1-11: #PF at 0x9000
(00.340000) uffd: 1-11: uffd_copy: 0x8000/4096
"""


def test_each_fault_is_paired_with_the_copy_that_filled_it() -> None:
    lat = fault_latencies(LOG)
    # 0x123a0000 by its own copy; 0x4dd000 inside a background run; 1-12's zero page; 0x9000 never filled.
    assert [round(x * 1e6) for x in lat] == [15602, 6107, 111100]


def test_summary() -> None:
    assert latency_summary([]) == {}
    s = latency_summary([0.001 * k for k in range(1, 101)])
    assert round(s["p50"]) == 51 and round(s["p99"]) == 100


def test_lines_of_other_shapes_are_ignored() -> None:
    assert fault_latencies("garbage\n(xx) uffd: 1-1: #PF at 0x10\n(00.1) pie: 1-1: uffd_copy: 0x0/4096\n") == []
