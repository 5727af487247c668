"""The conditions a result was measured under, recorded next to every figure.

A downtime figure means little without the machine (CPU model, cores,
kernel), the tools (CRIU, runc, rsync versions), the exact tug source (commit
plus a hash of uncommitted changes: the tree is often mid-change) and what else
was running in the lab. All of this goes into results.json.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _out(*argv: str, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.rstrip() if res.returncode == 0 else ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def git_state() -> dict[str, Any]:
    """Commit and whether the tree differs from it (read-only git commands)."""
    git = ("git", "--no-optional-locks", "-C", str(REPO))
    commit = _out(*git, "rev-parse", "HEAD") or None
    changed = [ln[3:] for ln in _out(*git, "status", "--porcelain", "--untracked-files=no").splitlines() if ln]
    diff = _out(*git, "diff", "HEAD") if changed else ""
    return {
        "commit": commit,
        "dirty": bool(changed),
        "changed_files": changed,
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def collect() -> dict[str, Any]:
    criu = _out("criu", "--version")
    runc = _out("runc", "--version")
    rsync = _out("rsync", "--version")
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_mib": mem_total_mib(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
        "criu": criu.splitlines()[0].replace("Version:", "").strip() if criu else None,
        "runc": runc.splitlines()[0].replace("runc version", "").strip() if runc else None,
        "rsync": " ".join(rsync.splitlines()[0].split()) if rsync else None,
        "tug": git_state(),
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()
