"""Volumes: a host mount moves as shared (verified) or copied (its open files
consistent with the restored processes), or the migration is refused before
anything changes; tmpfs content inside the container moves with CRIU's dump.

The demo container started with ``tug lab demo --volume`` keeps its state
directory (the heartbeat log it holds open and appends to every 10 ms, its
status and verify files) on a bind mount of a host directory: ``tug lab
check`` then reads them where the config's mount says, so a heartbeat that
continues without a reset or a skipped value after the move proves the copy
was exactly the file the frozen process had open.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..faults.harness import refuse_restore_on
from .conftest import Lab, demo_container, lazy_wait, migrate, on, tug

BIND = {"destination": "/data", "type": "bind", "source": "/srv/tug-data", "options": ["rbind", "rw"]}


@pytest.fixture
def vdemo(lab: Lab) -> Iterator[str]:
    """A demo container whose /state is a host directory bind-mounted in."""
    yield from demo_container(lab, "tv", "--memory", "16", "--dirty-rate", "200", "--volume")


def state_mount(lab: Lab, host: str, name: str) -> str:
    cfg = json.loads((lab.bundle(host, name) / "config.json").read_text())
    return next(str(m["source"]) for m in cfg["mounts"] if m["destination"] == "/state")


def volumes_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["destination"]: v for v in report["volumes"]}


def test_an_undecided_volume_is_refused_before_anything_changes(lab: Lab, demo: str) -> None:
    cfg_path = lab.bundle("a", demo) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mounts"].append(BIND)  # as the container's admin would have started it
    cfg_path.write_text(json.dumps(cfg, indent=2))

    res = migrate("a", demo, lab.url("b"))
    assert res.returncode == 1
    report = res.json()
    assert report["outcome"] == "aborted", report
    assert report["error"]["kind"] == "precondition", report["error"]
    assert "/srv/tug-data -> /data" in report["error"]["message"]
    assert "--volume /data=shared" in res.stderr and "--volume /data=copy" in res.stderr
    assert "nothing was changed" in res.stderr
    st = lab.state("a", demo)
    assert st is not None and st["status"] == "running"
    assert lab.state("b", demo) is None and lab.leftovers("b", demo) == []

    # A --volume for a path the container does not mount from the host is a mistake too.
    res = migrate("a", demo, lab.url("b"), "--volume", "/data=shared", "--volume", "/nothere=copy")
    assert res.returncode == 1 and "/nothere" in res.stderr
    assert lab.state("b", demo) is None and lab.leftovers("b", demo) == []


def test_copied_volume_moves_with_its_open_files(lab: Lab, vdemo: str, tmp_path: Path) -> None:
    src_dir = state_mount(lab, "a", vdemo)
    before = lab.check("a", vdemo)
    assert before["ok"], before
    res = migrate("a", vdemo, lab.url("b"), "--volume", "/state=copy")
    assert res.returncode == 0, res.stderr
    report = res.json()
    vol = volumes_of(report)["/state"]
    assert vol["mode"] == "copy" and vol["bytes"] > 0
    # The copy is b's own, under its bundle; the config's mount points at it.
    there = state_mount(lab, "b", vdemo)
    assert there.startswith(str(lab.bundle("b", vdemo))), there
    mid = lab.check_moved_intact("b", vdemo, before, report["downtime_ms"], fault_wait_ms=lazy_wait(report))
    # The source's directory is its admin's data: left where it was.
    assert Path(src_dir).is_dir()

    # Back, into a directory of the user's choosing, with pre-copy rounds
    # carrying the volume's changes along with the rootfs's.
    dest = tmp_path / "state-copy"
    res = migrate("b", vdemo, lab.url("a"), "--volume", f"/state=copy:{dest}", "--strategy", "precopy", "--policy", "max-iter=3")
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert volumes_of(report)["/state"]["mode"] == "copy"
    assert state_mount(lab, "a", vdemo) == str(dest)
    lab.check_moved_intact("a", vdemo, mid, report["downtime_ms"], fault_wait_ms=lazy_wait(report))
    shutil.rmtree(dest, ignore_errors=True)


def test_a_data_directory_of_the_users_moves_with_copy(lab: Lab, tmp_path: Path) -> None:
    """``tug lab demo --volume HOSTDIR:CONTAINERDIR``: the workload appends a
    checksummed record every 10 ms to a file in the user's directory mounted
    at /data. After a copy move, b's own copy holds every record up to the
    freeze, none torn or lost, and the workload goes on appending to it; the
    user's directory on a is left as it was."""
    data = tmp_path / "data"
    gen = demo_container(lab, "tu", "--memory", "16", "--dirty-rate", "200", "--volume", f"{data}:/data")
    name = next(gen)
    try:
        before = lab.check("a", name)
        assert before["ok"] and before["state"] == str(data), before
        res = migrate("a", name, lab.url("b"), "--volume", "/data=copy")
        assert res.returncode == 0, res.stderr
        report = res.json()
        assert volumes_of(report)["/data"]["bytes"] > 0
        after = lab.check_moved_intact("b", name, before, report["downtime_ms"], fault_wait_ms=lazy_wait(report))
        assert after["state"].startswith(str(lab.bundle("b", name))), after["state"]
        assert after["heartbeat"]["torn"] == 0 and after["heartbeat"]["skipped"] == 0
        assert (data / "heartbeat.log").is_file()  # the user's directory stays on a
    finally:
        next(gen, None)


def test_a_failed_copy_leaves_no_copy(lab: Lab, vdemo: str, tmp_path: Path) -> None:
    """CRIU's restore fails on b: the source resumes, and the directory the
    copy went into is gone again (tug made it)."""
    refuse_restore_on(lab, "a", vdemo, "b", tmp_path)
    dest = tmp_path / "never"
    res = migrate("a", vdemo, lab.url("b"), "--volume", f"/state=copy:{dest}")
    assert res.returncode == 1
    assert res.json()["outcome"] == "rolled-back"
    assert not dest.exists()
    assert lab.check("a", vdemo)["ok"]
    assert lab.leftovers("b", vdemo) == []


def test_shared_volume_is_verified_then_kept(lab: Lab, vdemo: str) -> None:
    """The lab's hosts share one file system, so the same path is the same
    storage: verified, the mount stays as it was."""
    src_dir = state_mount(lab, "a", vdemo)
    before = lab.check("a", vdemo)
    res = migrate("a", vdemo, lab.url("b"), "--volume", "/state=shared")
    assert res.returncode == 0, res.stderr
    report = res.json()
    assert volumes_of(report)["/state"]["mode"] == "shared"
    assert volumes_of(report)["/state"]["bytes"] == 0
    assert state_mount(lab, "b", vdemo) == src_dir
    lab.check_moved_intact("b", vdemo, before, report["downtime_ms"], fault_wait_ms=lazy_wait(report))
    assert not any(p.name.startswith(".tug-volume-check-") for p in Path(src_dir).iterdir())
    # Removing the container from a leaves the directory its copy on b still writes to ...
    tug("lab", "rm", "a", vdemo, check=True)
    assert Path(src_dir).is_dir() and lab.check("b", vdemo)["ok"]
    # ... and the last copy takes it along.
    tug("lab", "rm", "b", vdemo, check=True)
    assert not Path(src_dir).exists()


def test_shared_volume_that_is_not_shared_is_refused(lab: Lab, vdemo: str) -> None:
    """The source sees other storage at the path than the destination does
    (here: tug migrate runs in a mount namespace with a tmpfs over it): the
    nonce it writes is not found there, and nothing changes."""
    src_dir = state_mount(lab, "a", vdemo)
    script = f'mount -t tmpfs tugtest "{src_dir}" && exec tug migrate {vdemo} --to {lab.url("b")} --json --volume /state=shared'
    res = on("a", "unshare", "-m", "--propagation", "private", "sh", "-c", script)
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["outcome"] == "aborted", report
    assert "not the same storage" in res.stderr
    st = lab.state("a", vdemo)
    assert st is not None and st["status"] == "running"
    assert lab.check("a", vdemo)["ok"]
    assert lab.state("b", vdemo) is None and lab.leftovers("b", vdemo) == []


def test_tmpfs_content_moves_with_the_dump(lab: Lab, demo: str) -> None:
    lab.exec("a", demo, "sh", "-c", "echo in-memory-file > /dev/shm/kept")
    res = migrate("a", demo, lab.url("b"))
    assert res.returncode == 0, res.stderr
    assert lab.exec("b", demo, "cat", "/dev/shm/kept").strip() == "in-memory-file"
