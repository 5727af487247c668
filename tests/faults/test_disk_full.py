"""The destination's disk fills up during the rootfs sync: a real ENOSPC.

The lab's bundles directory on host b is covered by a 2 MiB tmpfs while the
container's rootfs holds 8 MiB: the agent's writes fail for real, the stream
failure reaches the source, and the migration rolls back cleanly (the source
runs on, b keeps nothing), with the error saying what happened.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..e2e.conftest import Lab, demo_container, migrate

pytestmark = pytest.mark.e2e


@pytest.fixture
def small_disk(lab: Lab) -> Iterator[Path]:
    where = lab.layout.host_data_dir("b") / "containers"
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tug-test-full", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def fat(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab, prefix="full")


def test_destination_disk_full_rolls_back(lab: Lab, fat: str, small_disk: Path) -> None:
    big = lab.bundle("a", fat) / "rootfs" / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    res = migrate("a", fat, lab.url("b"))
    assert res.returncode == 1, res.stderr
    report = res.json()
    assert report["outcome"] in ("rolled-back", "aborted"), report
    assert "No space left on device" in report["error"]["message"], report["error"]
    st = lab.state("a", fat)
    assert st is not None and st["status"] == "running"
    assert lab.check("a", fat)["ok"]
    assert lab.state("b", fat) is None
    assert not (small_disk / fat).exists()
    assert lab.leftovers("b", fat) == []
