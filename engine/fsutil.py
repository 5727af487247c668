"""Removing work directories that CRIU may have mounted things into.

A CRIU restore that dies half way leaves its cgroup "yard" (a tmpfs with every
cgroup hierarchy mounted below it) inside the work directory. ``rmtree`` alone
fails on those mount points and leaks mounts; so unmount first, deepest first,
lazily (MNT_DETACH) so a busy mount cannot block cleanup.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


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
