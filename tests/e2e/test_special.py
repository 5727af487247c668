"""What a container holds besides memory and files: SysV shared memory, FIFOs,
file locks. Each moves with stop-copy and with pre-copy, and the process
finds it as before."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Lab, demo_container, lazy_wait, migrate, wait_for

#: Pre-copy twice: as it ends by default (as hybrid: the special files are
#: restored lazily, the memory served by the frozen source) and with --eager.
STRATEGIES = [("stop-copy",), ("precopy", "--policy", "max-iter=3"), ("precopy", "--eager", "--policy", "max-iter=3")]
IDS = ["stop-copy", "precopy", "precopy-eager"]


@pytest.fixture
def shm_demo(lab: Lab) -> Iterator[str]:
    """A demo container whose workload also holds a 4 MiB SysV segment: the
    first of its IPC namespace, so its id is 0."""
    yield from demo_container(lab, "ts", "--memory", "16", "--dirty-rate", "400", "--sysv-shm", "4")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_sysv_segment_with_id_0_moves(lab: Lab, shm_demo: str, strategy: tuple[str, ...]) -> None:
    before = lab.check("a", shm_demo)
    assert before["ok"], before
    assert before["verify"]["shm_id"] == 0 and before["verify"]["shm_pages"] == 1024
    res = migrate("a", shm_demo, lab.url("b"), "--strategy", *strategy)
    assert res.returncode == 0, res.stderr
    after = lab.check_moved_intact("b", shm_demo, before, res.json()["downtime_ms"], fault_wait_ms=lazy_wait(res.json()))
    # The same segment, by the same id, with every page the workload last wrote.
    assert after["verify"]["shm_id"] == 0 and after["verify"]["shm_same"] is True
    assert after["verify"]["shm_bad_pages"] == 0


def background(lab: Lab, host: str, name: str, script: str) -> None:
    """Start ``script`` in the container, detached from the exec that starts it."""
    lab.exec(host, name, "sh", "-c", f"({script}) </dev/null >/dev/null 2>&1 &")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_an_open_fifo_moves_with_its_buffered_bytes(lab: Lab, demo: str, strategy: tuple[str, ...]) -> None:
    """A process holds a named pipe of the rootfs open with bytes in it: the
    destination gets the pipe (made, not copied) and CRIU its bytes."""
    background(lab, "a", demo, "mkfifo -m 0620 /root/pipe && exec 3<>/root/pipe && echo buffered >&3 && exec sleep 100000")
    assert wait_for(lambda: "pipe" in lab.exec("a", demo, "ls", "/root"))
    time.sleep(0.3)
    res = migrate("a", demo, lab.url("b"), "--strategy", *strategy)
    assert res.returncode == 0, res.stderr
    assert lab.exec("b", demo, "sh", "-c", "ls -l /root/pipe").startswith("prw--w----")
    assert lab.exec("b", demo, "timeout", "5", "head", "-n1", "/root/pipe").strip() == "buffered"
    assert lab.check("b", demo)["ok"]


@pytest.fixture
def lock_demo(lab: Lab) -> Iterator[str]:
    """A demo container whose workload holds a POSIX write lock on /root/lockfile."""
    yield from demo_container(lab, "tl", "--memory", "16", "--dirty-rate", "200", "--lock", "/root/lockfile")


def lock_held(lab: Lab, host: str, name: str) -> bool:
    """Whether a process of ``name`` on ``host`` holds a POSIX lock on its
    /root/lockfile (/proc/locks: the holder's pid and the file's inode)."""
    st = lab.state(host, name)
    if st is None:
        return False
    pids = set(json.loads(subprocess.run(["runc", "--root", lab.runc_root(host), "ps", "--format", "json", name],
                                         capture_output=True, text=True, check=True).stdout))
    inode = os.stat(lab.bundle(host, name) / "rootfs" / "root" / "lockfile").st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and f[1] == "POSIX" and int(f[4]) in pids and int(f[5].rsplit(":", 1)[1]) == inode:
            return True
    return False


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_a_held_file_lock_moves(lab: Lab, lock_demo: str, strategy: tuple[str, ...]) -> None:
    """The workload holds a lock: tug finds it (CRIU refuses to dump held
    locks unless told) and the restored process holds it again."""
    assert lock_held(lab, "a", lock_demo)
    before = lab.check("a", lock_demo)
    res = migrate("a", lock_demo, lab.url("b"), "--strategy", *strategy)
    assert res.returncode == 0, res.stderr
    assert any("holds file locks" in n for n in res.json()["notes"])
    assert lock_held(lab, "b", lock_demo)
    lab.check_moved_intact("b", lock_demo, before, res.json()["downtime_ms"], fault_wait_ms=lazy_wait(res.json()))


def test_criu_options_reach_the_restore_with_the_containers_own(lab: Lab, demo: str, tmp_path: Path) -> None:
    """--criu-opt lines and the container's own org.criu.config file (it exists
    on both lab hosts) make one CRIU config for the restore; CRIU reads it:
    an option it does not know fails the restore, and the source resumes."""
    own = tmp_path / "own.conf"
    own.write_text("verbosity 4\n")
    cfg_path = lab.bundle("a", demo) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("annotations", {})["org.criu.config"] = str(own)  # as its admin would have started it
    cfg_path.write_text(json.dumps(cfg, indent=2))

    res = migrate("a", demo, lab.url("b"), "--criu-opt", "images-dir /elsewhere")
    assert res.returncode == 1 and "tug's to set" in res.stderr  # refused before anything happened
    assert lab.state("b", demo) is None
    res = migrate("a", demo, lab.url("b"), "--criu-opt", "no-such-criu-option")
    assert res.returncode == 1 and res.json()["outcome"] == "rolled-back", res.stderr
    assert lab.check("a", demo)["ok"] and lab.leftovers("b", demo) == []

    res = migrate("a", demo, lab.url("b"), "--criu-opt", "skip-in-flight")
    assert res.returncode == 0, res.stderr
    # The restore's options were the restore's: the container's later dumps
    # (runc reads the same file) get its own lines only.
    conf = lab.bundle("b", demo) / "criu.conf"
    assert conf.read_text().splitlines() == ["verbosity 4"]
    assert json.loads((lab.bundle("b", demo) / "config.json").read_text())["annotations"]["org.criu.config"] == str(conf)
    assert lab.check("b", demo)["ok"]
