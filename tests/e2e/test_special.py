"""What a container holds besides memory and files: SysV shared memory, FIFOs,
file locks. Each moves with stop-copy and with pre-copy, and the process
finds it as before."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import Lab, demo_container, migrate

STRATEGIES = [("stop-copy",), ("precopy", "--policy", "max-iter=3")]


@pytest.fixture
def shm_demo(lab: Lab) -> Iterator[str]:
    """A demo container whose workload also holds a 4 MiB SysV segment: the
    first of its IPC namespace, so its id is 0."""
    yield from demo_container(lab, "ts", "--memory", "16", "--dirty-rate", "400", "--sysv-shm", "4")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s[0])
def test_sysv_segment_with_id_0_moves(lab: Lab, shm_demo: str, strategy: tuple[str, ...]) -> None:
    before = lab.check("a", shm_demo)
    assert before["ok"], before
    assert before["verify"]["shm_id"] == 0 and before["verify"]["shm_pages"] == 1024
    res = migrate("a", shm_demo, lab.url("b"), "--strategy", *strategy)
    assert res.returncode == 0, res.stderr
    after = lab.check_moved_intact("b", shm_demo, before, res.json()["downtime_ms"], fault_wait_ms=res.json()["fill_ms"] or 0.0)
    # The same segment, by the same id, with every page the workload last wrote.
    assert after["verify"]["shm_id"] == 0 and after["verify"]["shm_same"] is True
    assert after["verify"]["shm_bad_pages"] == 0
