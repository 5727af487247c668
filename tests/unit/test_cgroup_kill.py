"""engine/runtime/cgroup.py against real cgroups: every process in a container's cgroup dies.

The test makes its own cgroup parent (``/tug-cgroup-test-PID``) in every
hierarchy mounted here (the v1 controllers and the unified one), a container
cgroup ``c1`` in it with a nested cgroup, and a sibling ``other``. Real
processes are started inside (they join before they exec, so what they fork
is inside too), as a killed ``criu restore`` leaves them: a plain one, a
tree in the nested cgroup, one in the v1 hierarchies only (invisible to the
unified hierarchy's ``cgroup.kill``), and the whole container frozen by the v1
freezer (a frozen task does not act on SIGKILL until thawed). After
``kill_container_cgroups``: every one of them is dead, the container's
cgroups are gone in every hierarchy, the sibling and the parent are intact.

Needs root and a mounted cgroup file system.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tug.engine.errors import UnsafePathError
from tug.engine.runtime import cgroup
from tug.engine.runtime.cgroup import Hierarchy

ROOT = Path("/sys/fs/cgroup")
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def mounted() -> list[Path]:
    """Every cgroup hierarchy at or below /sys/fs/cgroup, as the test sees them (not from the module)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[0] in ("cgroup", "cgroup2"):
            mp = Path(pre.split()[4])
            if mp == ROOT or mp.parent == ROOT:
                out.append(mp)
    return out


def is_v2(h: Path) -> bool:
    return (h / "cgroup.controllers").exists()


def make(h: Path, rel: str) -> Path:
    d = h / rel
    d.mkdir(exist_ok=True)
    if (d / "cpuset.cpus").exists():  # v1 cpuset: a cgroup without cpus/mems takes no task
        for f in ("cpuset.cpus", "cpuset.mems"):
            (d / f).write_text((d.parent / f).read_text())
    return d


def joiner(dirs: list[Path]) -> Callable[[], None]:
    def join() -> None:
        for d in dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    return join


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def parent() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (cgroups)")
    if not mounted():
        pytest.fail("no cgroup hierarchy mounted at /sys/fs/cgroup")
    rel = f"tug-cgroup-test-{os.getpid()}"
    # Orphans of the killed trees come to this process (and are reaped
    # below) instead of becoming zombies of an init that may not reap them.
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield rel
    finally:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for h in mounted():
            base = h / rel
            if not base.is_dir():
                continue
            for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [base]:
                for pid in (d / "cgroup.procs").read_text().split() if (d / "cgroup.procs").exists() else []:
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
                if (d / "freezer.state").exists():
                    (d / "freezer.state").write_text("THAWED")
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.02)


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


async def test_every_process_in_the_container_cgroup_dies_and_its_cgroups_go(parent: str, tmp_path: Path) -> None:
    hs = mounted()
    v1 = [h for h in hs if not is_v2(h)]
    for h in hs:
        make(h, parent)
        make(h, f"{parent}/c1")
        make(h, f"{parent}/c1/inner")
        make(h, f"{parent}/other")
    c1 = [h / parent / "c1" for h in hs]
    inner = [h / parent / "c1" / "inner" for h in hs]
    other = [h / parent / "other" for h in hs]

    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], dirs: list[Path]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, preexec_fn=joiner(dirs), stdin=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        plain = start(["sleep", "1000"], c1)
        pids = tmp_path / "tree"
        tree = start(["sh", "-c", f"sleep 1000 & echo $! >> {pids}; sleep 1000 & echo $! >> {pids}; wait"], inner)
        v1_only = start(["sleep", "1000"], [h / parent / "c1" for h in v1])
        sibling = start(["sleep", "1000"], other)
        for _ in range(200):
            if pids.exists() and len(pids.read_text().split()) == 2:
                break
            time.sleep(0.01)
        grandchildren = [int(x) for x in pids.read_text().split()]
        victims = [plain.pid, tree.pid, v1_only.pid, *grandchildren]
        unified = [d for d in c1 if is_v2(d.parent.parent)]
        if unified:
            assert str(v1_only.pid) not in (unified[0] / "cgroup.procs").read_text()
        freezer = [d for d in c1 if (d / "freezer.state").exists()]
        if freezer:  # the container is paused, as a source or a half-restored copy can be
            (freezer[0] / "freezer.state").write_text("FROZEN")
            for _ in range(200):
                if freezer[0].joinpath("freezer.state").read_text().strip() == "FROZEN":
                    break
                time.sleep(0.01)
            assert freezer[0].joinpath("freezer.state").read_text().strip() == "FROZEN"

        assert sorted(cgroup.container_cgroup_dirs("c1", f"/{parent}")) == sorted(c1)
        result = await cgroup.kill_container_cgroups("c1", f"/{parent}", timeout=10)

        assert result.ok, result.describe()
        assert set(victims) <= result.killed, result.describe()
        for p in (plain, tree, v1_only):
            assert p.wait(timeout=5) == -signal.SIGKILL
        for pid in grandchildren:
            reap(pid)
            assert not alive(pid)
        assert sorted(result.removed) == sorted(c1)
        for d in c1:
            assert not d.exists(), d
        assert sibling.poll() is None, "a sibling cgroup is none of the container's business"
        for d in other:
            assert str(sibling.pid) in (d / "cgroup.procs").read_text()
        assert all((h / parent).is_dir() for h in hs), "the parent stays"
        assert cgroup.container_cgroup_dirs("c1", f"/{parent}") == []
        again = await cgroup.kill_container_cgroups("c1", f"/{parent}")
        assert again.ok and not again.killed and not again.removed
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.kill()
        for d in c1:  # a frozen task dies only once thawed (if the code under test failed)
            with contextlib.suppress(OSError):
                (d / "freezer.state").write_text("THAWED")
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


async def test_nothing_without_a_cgroup_parent() -> None:
    assert cgroup.container_cgroups_path("c1", None) is None
    assert cgroup.container_cgroup_dirs("c1", None) == []
    result = await cgroup.kill_container_cgroups("c1", None)
    assert result.ok and result.cgroups_path is None and not result.killed


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "a b", "../../system.slice", "c1\n", "caf\u00e9"])
def test_bad_container_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError):
        cgroup.container_cgroups_path(name, "/tug")


@pytest.mark.parametrize("path", ["/", "", "//", "/a/../b", "..", "/a/./b", "system.slice:tug:x", "/a\0b"])
async def test_bad_cgroup_paths_are_refused_before_anything_is_touched(path: str) -> None:
    with pytest.raises(UnsafePathError):
        await cgroup.kill_cgroup(path)
    with pytest.raises(UnsafePathError):
        cgroup.container_cgroups_path("c1", path if path not in ("", "//") else "/..")


def test_a_cgroup_holding_this_process_is_refused() -> None:
    h = Hierarchy(mount=ROOT / "memory", version=1, controllers=frozenset({"memory"}), own="/agent/session")
    for path in ("/agent", "/agent/session", "/agent//session/"):
        with pytest.raises(UnsafePathError, match="this process is in it"):
            cgroup.target_components(h, path)
    assert cgroup.target_components(h, "/agent/session/c1") == ["agent", "session", "c1"]
    assert cgroup.target_components(h, "/other/c1") == ["other", "c1"]
    assert cgroup.target_components(h, "c1") == ["agent", "session", "c1"], "relative: below our own, as runc does"


def test_this_process_own_cgroups_are_refused_for_real() -> None:
    """Each hierarchy's own cgroup of this process, as /proc/self/cgroup says (never emptied)."""
    for h in cgroup.hierarchies():
        if h.own is not None and h.own != "/":
            with pytest.raises(UnsafePathError):
                cgroup.target_components(h, h.own)


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    (tmp_path / "real" / "c1").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    start = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = cgroup.open_beneath(start, ["real", "c1"])
        os.close(fd)
        with pytest.raises(UnsafePathError, match="symlink"):
            cgroup.open_beneath(start, ["link", "c1"])
        with pytest.raises(UnsafePathError):
            cgroup.open_beneath(start, ["real", "..", "real"])
        with pytest.raises(FileNotFoundError):
            cgroup.open_beneath(start, ["real", "missing"])
    finally:
        os.close(start)


def test_hierarchies_are_only_those_under_sys_fs_cgroup() -> None:
    found = cgroup.hierarchies()
    assert sorted(h.mount for h in found) == sorted(mounted())
    assert all(h.mount == ROOT or h.mount.parent == ROOT for h in found)
