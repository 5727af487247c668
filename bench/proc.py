"""Run one child process and account for it: wall time, CPU time, peak RSS.

Why not ``subprocess.run``: it reaps the child with ``waitpid`` and throws its
resource usage away. Here the child is reaped with :func:`os.wait4`, whose
rusage covers the child *and every descendant it waited for* (runc, CRIU,
rsync's ssh). That is exactly the "cost on the source host" of a migration
command. ``ru_maxrss`` is the largest peak RSS of any single process in that
tree (the kernel keeps a maximum, not a sum), so it is labelled as such.

stdout/stderr go to files rather than pipes so a chatty child can never block
on a full pipe while we sit in ``wait4``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildResult:
    """What one child process did and cost."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    #: Wall clock from just before fork to the moment wait4 returned.
    wall_s: float
    #: CPU time of the child and its waited-for descendants.
    user_s: float
    sys_s: float
    #: Largest peak RSS of one process in the tree, KiB (Linux ru_maxrss unit).
    max_rss_kib: int
    timed_out: bool = False

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def last_error_line(self) -> str:
        """The most useful one-line reason for a failure, for results.json."""
        for text in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()]
            if errors:
                return errors[-1]
            if lines:
                return lines[-1]
        return f"exit {self.returncode}"


def run_child(
    argv: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stop_signal: int = signal.SIGINT,
    grace_s: float = 30.0,
) -> ChildResult:
    """Run ``argv`` to completion (stdin /dev/null) and return its accounting.

    On timeout the child gets ``stop_signal`` (SIGINT: ``tug migrate`` rolls
    back and resumes the source on it), then SIGKILL after ``grace_s``. Only
    the child we started is signalled, by pid.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        timed_out = threading.Event()
        lock = threading.Lock()
        reaped = False
        timers: list[threading.Timer] = []

        def _send(sig: int) -> None:
            # Under the lock and only before the reap: never signal a reused pid.
            with lock:
                if not reaped:
                    _signal(child.pid, sig)

        def _stop() -> None:
            timed_out.set()
            _send(stop_signal)
            killer = threading.Timer(grace_s, _send, args=(signal.SIGKILL,))
            killer.daemon = True
            timers.append(killer)
            killer.start()

        timer = threading.Timer(timeout, _stop)
        timer.daemon = True
        timers.append(timer)
        timer.start()
        # Wait for the exit without reaping, then reap under the lock: a
        # timer's kill can then never hit a pid the kernel has reused.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - t0
        with lock:
            _pid, status, usage = os.wait4(child.pid, 0)
            reaped = True
        for t in timers:
            t.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
        out.seek(0)
        err.seek(0)
        return ChildResult(
            argv=argv,
            returncode=child.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            wall_s=wall,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            max_rss_kib=int(usage.ru_maxrss),
            timed_out=timed_out.is_set(),
        )


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateResult:
    """One migration attempt by any strategy, in one shape for the runner.

    ``report`` is tug's JSON report for engine strategies, and a dict with the
    same keys built by the harness for baselines, so the report module never
    needs to know which kind produced a run.
    """

    #: migrated | rolled-back | aborted | failed (tug's outcomes), or
    #: error (the command did not produce a report) | timeout.
    outcome: str
    error: str | None
    #: Wall clock of the whole migration command(s), seconds.
    wall_s: float
    report: dict[str, Any] | None
    src_cpu_user_s: float
    src_cpu_sys_s: float
    src_max_rss_kib: int
    #: Destination CPU (agent + its children for tug), None when unknown.
    dst_cpu_s: float | None
    dst_max_rss_kib: float | None
    #: How the destination figures were obtained (they differ by strategy).
    dst_cpu_note: str
    exit_code: int
    #: Full stdout+stderr, kept in the results' logs/ directory.
    log: str
