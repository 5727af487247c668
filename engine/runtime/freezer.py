"""The cgroup freezer, written directly: the freeze that opens the frozen window.

``runc pause`` writes the container's freezer (``freezer.state`` on cgroup v1,
``cgroup.freeze`` on v2) and waits for the kernel to finish; ``runc ps`` reads
its ``cgroup.procs``. Each is a process start, 6-20 ms measured here, and the
freeze and the file-lock check's pids both sit inside the downtime. tug does
the same writes and reads itself, on the cgroup runc recorded for the
container when it created it (its state file, read before the freeze: the
path a process inside the container could not have chosen). runc and CRIU
read the same freezer state afterwards, so the container is "paused" to them:
``runc resume``, ``runc state`` and CRIU's handling of a frozen cgroup work
unchanged. Where the state file or the cgroup is not what this module
expects, :meth:`Freezer.locate` says so with None and the callers use runc.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: How long a freeze may take before it is left to ``runc pause`` (which
#: retries the kernel's occasional stuck FREEZING on v1 its own way).
FREEZE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Freezer:
    """One container's freezer cgroup."""

    dir: Path
    version: int  # 1: freezer.state; 2: cgroup.freeze and cgroup.events

    @classmethod
    def locate(cls, state_file: Path) -> Freezer | None:
        """The freezer runc uses for the container whose ``state.json`` this is."""
        try:
            paths = json.loads(state_file.read_text()).get("cgroup_paths")
        except (OSError, ValueError):
            return None
        if not isinstance(paths, dict):
            return None
        # A hybrid host has both: runc freezes through v1's freezer there.
        for key, version, probe in (("freezer", 1, "freezer.state"), ("", 2, "cgroup.freeze")):
            raw = paths.get(key)
            if isinstance(raw, str) and raw:
                d = Path(raw)
                if _plain_below(d, CGROUP_ROOT) and (d / probe).is_file() and not d.is_symlink():
                    return cls(d, version)
                return None  # the controller runc uses is not where it should be
        return None

    def freeze(self, timeout: float = FREEZE_TIMEOUT_S) -> bool:
        """Freeze every process in the cgroup; False if the kernel did not finish in time."""
        deadline = time.monotonic() + timeout
        # (Thawing stays runc's: runc resume.)
        if self.version == 1:
            (self.dir / "freezer.state").write_text("FROZEN")
        else:
            (self.dir / "cgroup.freeze").write_text("1")
        pause = 0.0002
        while not self.frozen():
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return True

    def frozen(self) -> bool:
        if self.version == 1:
            return (self.dir / "freezer.state").read_text().strip() == "FROZEN"
        return "frozen 1" in (self.dir / "cgroup.events").read_text().splitlines()

    def pids(self) -> list[int]:
        """Every process in the cgroup and the cgroups below it (a container may nest its own)."""
        found: list[int] = []
        for top, dirs, _files in os.walk(self.dir, followlinks=False):
            with contextlib.suppress(FileNotFoundError):
                found += [int(p) for p in (Path(top) / "cgroup.procs").read_text().split()]
            dirs[:] = [d for d in dirs if not (Path(top) / d).is_symlink()]
        return found


def _plain_below(path: Path, root: Path) -> bool:
    """``path`` is absolute, below ``root``, with no '.' or '..' in it."""
    parts = path.parts
    return path.is_absolute() and parts[: len(root.parts)] == root.parts and len(parts) > len(root.parts) \
        and not any(p in (".", "..") for p in parts)
