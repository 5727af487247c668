"""A container that plants symlinks, devices and setuid files in its own rootfs
cannot use tug's rootfs sync to write or read files of either host.

The lab's hosts share one file system, so a victim file under /tmp is a file
of the destination host and of the source host at once: exactly what a real
attack aims at.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Lab, demo_container, migrate

VICTIM = b"root:x:0:0:destination host file:/root:/bin/sh\n"


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    v = tmp_path / "passwd"
    v.write_bytes(VICTIM)
    os.chmod(v, 0o644)
    yield v


@pytest.fixture
def hostile(lab: Lab) -> Iterator[str]:
    yield from demo_container(lab, prefix="h")


def test_planted_symlinks_do_not_reach_the_hosts(lab: Lab, hostile: str, victim: Path) -> None:
    root = lab.bundle("a", hostile) / "rootfs"
    (root / "motd").write_bytes(b"pwned::0:0::/:/bin/sh\n")
    # The name tug's destination used to write through (engine/rootfs.py before the fix).
    os.symlink(str(victim), root / ".motd.tug-tmp")
    # A symlinked directory on the way to files the sync creates.
    os.symlink(str(victim.parent), root / "hostdir")
    os.mknod(root / "hostnull", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chown(root / "suid", 0, 0)
    os.chmod(root / "suid", 0o4755)

    res = migrate("a", hostile, lab.url("b"))
    assert res.returncode == 0, res.stderr
    assert res.json()["outcome"] == "migrated"

    assert victim.read_bytes() == VICTIM and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert sorted(p.name for p in victim.parent.iterdir()) == ["passwd"]
    dst = lab.bundle("b", hostile) / "rootfs"
    assert (dst / "motd").read_bytes() == b"pwned::0:0::/:/bin/sh\n"
    assert os.readlink(dst / ".motd.tug-tmp") == str(victim)
    assert os.readlink(dst / "hostdir") == str(victim.parent)
    assert not os.path.lexists(dst / "hostnull"), "device nodes are not copied"
    assert "special files not copied" in res.stderr
    st = os.lstat(dst / "suid")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 0
    # Nothing of tug's temporaries stays in the container's tree.
    assert [p.name for p in dst.iterdir() if p.name.startswith(".tug-")] == []
    # The destination's bundles are root-only: a setuid file in a container's
    # rootfs is no way up for the host's other users.
    assert stat.S_IMODE(lab.bundle("b", hostile).parent.stat().st_mode) & 0o077 == 0


def test_a_rootfs_of_many_entries_migrates(lab: Lab, hostile: str) -> None:
    """A manifest bigger than one part (tests/unit/test_large_calls.py shows a
    300k-entry one, which used to exceed the 16 MiB frame limit, fits in parts)
    crosses in parts and the tree arrives whole."""
    root = lab.bundle("a", hostile) / "rootfs" / "many"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for d in range(40):
            os.mkdir(f"directory-{d:04d}", dir_fd=fd)
            for i in range(1000):
                os.close(os.open(f"directory-{d:04d}/some-file-name-{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    res = migrate("a", hostile, lab.url("b"))
    assert res.returncode == 0, res.stderr
    dst = lab.bundle("b", hostile) / "rootfs" / "many"
    assert sum(1 for _ in dst.glob("directory-*/*")) == 40_000
    assert "rootfs_plan" not in res.stderr
    assert lab.check("b", hostile)["ok"]
