"""Fault injection from outside: a running ``tug migrate`` is watched through
its progress lines, and when it enters a phase the harness kills or stops a
real process (the agent, its SSH session, CRIU) or signals ``tug migrate``.

Production code knows nothing of this: every fault is something that happens
to real processes on real hosts.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..e2e.conftest import TUG, Lab, Result

PHASE_LINE = re.compile(r"\]\s+(\S+) \.\.\.$")


@dataclass
class Run:
    """A ``tug migrate`` on host ``src``, with its stderr read line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                m = PHASE_LINE.search(line.rstrip("\n"))
                if m:
                    self.phases.append(m.group(1))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_phase(self, phase: str, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while phase not in self.phases:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and self._reader is not None and not self._reader.is_alive()):
                    return False
                self._cv.wait(min(left, 0.5))
            return True

    def finish(self, timeout: float = 300) -> Result:
        # stdout only: stderr belongs to the reader thread (communicate() would race it for lines).
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=10)
        return Result(self.proc.returncode, out, "\n".join(self.lines))


def start_migrate(src: str, name: str, dest_url: str, *extra: str) -> Run:
    proc = subprocess.Popen(
        [TUG, "lab", "run", src, "--", "tug", "migrate", name, "--to", dest_url, "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1,
    )
    run = Run(proc)
    run._reader = threading.Thread(target=run._read, daemon=True)
    run._reader.start()
    return run


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def find(pred: Callable[[int, list[str]], bool]) -> list[int]:
    return [pid for pid in _pids() if (cmd := _cmdline(pid)) and pred(pid, cmd)]


def agent_pids(host: str) -> list[int]:
    """The tug agents serving migrations to lab host ``host``."""
    return find(lambda pid, cmd: any("tug.engine.agent" in c for c in cmd) and _env(pid).get("TUG_HOST") == host)


def criu_pids(host: str) -> list[int]:
    """CRIU processes started for lab host ``host`` (by runc or tug, on either side)."""
    def is_criu(pid: int, cmd: list[str]) -> bool:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return False
        return exe.endswith("/criu") and _env(pid).get("TUG_HOST") == host
    return find(is_criu)


def signal_all(pids: list[int], sig: int) -> int:
    n = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            pass
    return n


def running_copies(lab: Lab, name: str) -> dict[str, str]:
    """Host -> runc status, for every host that has the container."""
    out = {}
    for host in lab.urls:
        st = lab.state(host, name)
        if st is not None:
            out[host] = st["status"]
    return out
