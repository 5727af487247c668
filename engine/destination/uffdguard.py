"""A lazily restored container must never run with missing pages: the guard sees to it.

While ``criu lazy-pages`` fills a restored container's memory, it alone holds
the processes' userfaultfds. If it dies first (killed, or the agent that
started it killed: it dies with the agent), the kernel releases them and every
page still missing reads as zeros from then on: a running container with
silently corrupted memory. Holding the userfaultfds in the agent is not
enough, since the agent can die too.

So the agent starts this small process next to the daemon, in a session of
its own (it outlives the agent). It takes a duplicate of each userfaultfd as
the daemon gets them during the restore (``pidfd_getfd``), which keeps the
faulting threads waiting instead of reading zeros, and then waits for a
verdict on stdin:

- ``settled``: the daemon filled everything. The guard lets go and exits.
- ``failed``, end of input (the agent is gone), or the daemon dying without a
  verdict within :data:`VERDICT_S`: the guard freezes the container
  (``runc pause``), or kills it where the freezer cannot take a thread that
  waits on a page inside a system call, and only then lets go.

Protocol on stdin, one word per line: ``restored`` (the restore is over: no
more userfaultfds will come), then ``settled`` or ``failed``.

Run as ``python -m tug.engine.destination.uffdguard DAEMON_PID RUNC_ROOT NAME``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import subprocess
import sys
import time

#: How often the daemon's fds are looked at while the restore runs.
POLL_S = 0.002
#: How long a dead daemon's verdict may take to come from the agent.
VERDICT_S = 5.0
_SYS_PIDFD_GETFD = 438  # the same number on x86-64 and arm64 (asm-generic)
_libc = ctypes.CDLL(None, use_errno=True)


def uffd_fds_of(pidfd: int, pid: int, seen: set[int]) -> list[int]:
    """Duplicates here of the userfaultfds ``pid`` holds whose fd numbers are not in ``seen`` (which gains them)."""
    out: list[int] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        if int(name) in seen:
            continue
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[userfaultfd]":
                continue
        except OSError:
            continue
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
        if fd >= 0:
            out.append(fd)
            seen.add(int(name))
    return out


def _runc(root: str, *args: str) -> bool:
    try:
        return subprocess.run(["runc", "--root", root, *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def stop_container(root: str, name: str) -> str:
    """Freeze it, or kill it if it cannot be frozen; says which."""
    if _runc(root, "pause", name):
        return "frozen"
    _runc(root, "kill", name, "KILL")
    return "killed"


class Guard:
    def __init__(self, daemon_pid: int, root: str, name: str) -> None:
        self.daemon_pid = daemon_pid
        self.root = root
        self.name = name
        self.pidfd = os.pidfd_open(daemon_pid)
        self.held: list[int] = []
        self.seen: set[int] = set()
        self.buf = b""

    def _line(self, timeout: float) -> str | None:
        """The agent's next word; "" at end of input; None if none came in ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([0], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(0, 256)
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def _daemon_gone(self, timeout: float) -> bool:
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def run(self) -> str:
        # While the restore runs: take each userfaultfd as the daemon gets it.
        while True:
            self.held += uffd_fds_of(self.pidfd, self.daemon_pid, self.seen)
            word = self._line(POLL_S)
            if word == "restored":
                self.held += uffd_fds_of(self.pidfd, self.daemon_pid, self.seen)
                break
            if word is not None:  # failed, or the agent is gone
                return self._stop()
        # While the memory fills: wait for the verdict, or the daemon's end.
        while True:
            if self._daemon_gone(0):
                word = self._line(VERDICT_S)
            else:
                ready, _, _ = select.select([0, self.pidfd], [], [])
                word = self._line(0) if 0 in ready else None
                if word is None:
                    continue
            if word == "settled":
                self._release()
                return "released"
            return self._stop()

    def _stop(self) -> str:
        how = stop_container(self.root, self.name)
        self._release()
        return how

    def _release(self) -> None:
        for fd in self.held:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held = []


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[0].isdigit():
        print("usage: python -m tug.engine.destination.uffdguard DAEMON_PID RUNC_ROOT NAME", file=sys.stderr)
        return 2
    try:
        guard = Guard(int(argv[0]), argv[1], argv[2])
    except OSError as exc:  # the daemon is already gone: nothing to hold
        print(f"uffdguard: {exc}", file=sys.stderr)
        return 1
    print(f"uffdguard {argv[2]}: {guard.run()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
