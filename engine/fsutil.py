"""Removing work directories that CRIU may have mounted things into.

A CRIU restore that dies half way leaves its cgroup "yard" (a tmpfs with every
cgroup hierarchy mounted below it) inside the work directory. ``rmtree`` alone
fails on those mount points and leaks mounts; so unmount first, deepest first,
lazily (MNT_DETACH) so a busy mount cannot block cleanup.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
from pathlib import Path

from tug.engine.errors import PreconditionError

MNT_DETACH = 2
# By name: ctypes.util.find_library runs ldconfig -p (a subprocess) per call.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[str]:
    root = os.path.realpath(path)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) > 4:
            mp = _unescape(parts[4])
            if mp == root or mp.startswith(root + "/"):
                found.append(mp)
    return sorted(found, key=lambda m: m.count("/"), reverse=True)


def unmount_all(path: Path) -> int:
    n = 0
    for mp in mounts_under(path):
        if _libc.umount2(mp.encode(), MNT_DETACH) == 0:
            n += 1
    return n


def remove_tree(path: Path) -> None:
    """rm -rf that first detaches any mount below ``path``."""
    if not path.exists():
        return
    unmount_all(path)
    shutil.rmtree(path, ignore_errors=True)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only root reaches: created 0700, or checked.

    Work and bundle directories hold container trees (setuid files, device
    images) and CRIU images (memory): other users of the host must not get in,
    and a default under a world-writable directory (/dev/shm) must not be a
    directory or symlink someone else planted there before us.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PreconditionError(
            f"{path} exists but is not a directory owned by uid {os.geteuid()} (a symlink or someone else's?): "
            "remove it, or point tug elsewhere (TUG_WORK_DIR / TUG_DATA_DIR)"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)
    return path
