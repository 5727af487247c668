"""A process as /proc shows it: its mappings and its pid inside its container.

Read by both sides (the source's trackers and frozen server, the
destination's SysV attach and ptrace injection), so it belongs to neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Mappings the kernel special-cases; CRIU never dumps their pages.
SPECIAL = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]", "[uprobes]")


@dataclass(frozen=True, slots=True)
class Region:
    start: int
    end: int
    perms: str
    path: str

    @property
    def private(self) -> bool:
        return len(self.perms) > 3 and self.perms[3] == "p"

    @property
    def candidate(self) -> bool:
        """Could CRIU dump pages of this mapping into the process's pagemap?"""
        return self.private and self.perms[0] == "r" and self.path not in SPECIAL


def parse_maps(text: str) -> list[Region]:
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        out.append(Region(int(lo, 16), int(hi, 16), parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def ns_pid(pid: int) -> int:
    """The pid as the container sees it (innermost NSpid): CRIU's name for it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...);
    [] if the process is gone. The name may hold spaces and parens: cut at the last one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[-1].split()


def thread_state(pid: int, tid: int) -> str:
    """The thread's state letter (``T``: stopped, ``Z``: zombie ...), "" if gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
