"""The benchmark on podman containers (``python -m bench ... --runtime podman``).

The workload then runs under each lab host's own podman (``tug lab demo
--runtime podman``): its files are in the container's overlay, its OCI bundle
is podman's ``userdata``, and it is "running on" a host when that host's podman
says so. The baseline ``podman-export`` is what a podman user types by hand:
``podman container checkpoint --export``, copy over ssh, ``podman container
restore --import``. Caveat of one machine: the imported container joins the
network namespace *path* its ``config.dump`` names, host a's, which still
exists here, so its network did not really move (on two machines that path
would not exist, and podman would need a network that exists on both).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from .lab import TUG, Host, LabInfo
from .proc import MigrateResult, run_child

#: Whose containers the session runs: "runc" (tug's bundles) or "podman".
RUNTIME = {"name": "runc"}


def active() -> bool:
    return RUNTIME["name"] == "podman"


def env(host: Host) -> dict[str, str]:
    base = Path(host.data_dir) / "podman"
    return {**os.environ, "CONTAINERS_CONF": str(base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(base / "storage.conf")}


def inspect(host: Host, name: str) -> dict[str, Any] | None:
    res = subprocess.run(["podman", "container", "inspect", name], capture_output=True, text=True, env=env(host),
                         stdin=subprocess.DEVNULL)
    items = json.loads(res.stdout or "[]") if res.returncode == 0 else []
    return items[0] if items else None


def bundle(host: Host, name: str) -> Path:
    data = inspect(host, name)
    return Path(str(data["StaticDir"])) if data else Path("/nonexistent")


def rootfs(host: Host, name: str) -> Path:
    data = inspect(host, name)
    merged = ((data or {}).get("GraphDriver") or {}).get("Data", {}).get("MergedDir")
    return Path(str(merged)) if merged else Path("/nonexistent")


def running(host: Host, name: str) -> bool:
    data = inspect(host, name)
    return bool(data) and (data or {}).get("State", {}).get("Status") == "running"


def address(host: Host, name: str) -> str:
    spec = json.loads((bundle(host, name) / "tug-network.json").read_text())
    return str(spec["address"]).split("/")[0]


def export_import(name: str, src: Host, dst: Host, lab: LabInfo, timeout: float) -> MigrateResult:
    """podman's own route, by hand (module doc)."""
    q = shlex.quote
    ssh = (f"ssh -i {q(lab.identity)} -o UserKnownHostsFile={q(lab.known_hosts)} "
           "-o StrictHostKeyChecking=yes -o BatchMode=yes")
    # One machine plays both hosts: the two sides' archives must be two files.
    archive, received = f"/dev/shm/bench-podman-{name}.{src.name}.tar.gz", f"/dev/shm/bench-podman-{name}.{dst.name}.tar.gz"
    script = "\n".join([
        "set -euo pipefail",
        'mark() { echo "@@ $1 $EPOCHREALTIME"; }',
        "mark checkpoint",
        f"podman container checkpoint --tcp-established --export {archive} {q(name)} >/dev/null",
        "mark copy",
        f"cat {archive} | {ssh} root@{dst.address} {q(f'cat > {received}')}",
        "mark restore",
        f"{ssh} root@{dst.address} "
        + q(f"podman container restore --tcp-established --import {received} >/dev/null; rc=$?; rm -f {received}; exit $rc"),
        "mark end",
        f"echo @@bytes $(stat -c %s {archive})",
        f"podman rm --force --time 0 {q(name)} >/dev/null; rm -f {archive}",
    ])
    child = run_child([TUG, "lab", "run", src.name, "--", "bash", "-c", script], timeout=timeout)
    marks = {ln.split()[1]: float(ln.split()[2]) for ln in child.stdout.splitlines()
             if ln.startswith("@@ ") and len(ln.split()) == 3}
    size = next((int(ln.split()[1]) for ln in child.stdout.splitlines() if ln.startswith("@@bytes ")), 0)
    order = ["checkpoint", "copy", "restore", "end"]
    ok = child.returncode == 0 and "end" in marks
    span = (marks["end"] - marks["checkpoint"]) if ok else None
    error = None if ok else f"podman-export failed: {child.last_error_line()}"
    report: dict[str, Any] = {
        "strategy": "podman-export", "outcome": "migrated" if ok else "failed",
        # The container is stopped by the checkpoint and runs again once the import returns.
        "downtime_ms": span * 1000 if span is not None else None, "frozen_ms": span * 1000 if span is not None else None,
        "total_s": span, "bytes_total": size, "frozen_bytes": size, "bytes_by_phase": {"copy": size},
        "phases": {a: marks[b] - marks[a] for a, b in zip(order, order[1:]) if a in marks and b in marks},
        "rounds": [], "tracker": None, "image_bytes": size, "rootfs_bytes": 0,
        "error": None if ok else {"kind": "podman-export", "message": error, "phase": "?"},
    }
    return MigrateResult(
        outcome="timeout" if child.timed_out else report["outcome"], error=error, wall_s=child.wall_s, report=report,
        src_cpu_user_s=child.user_s, src_cpu_sys_s=child.sys_s, src_max_rss_kib=child.max_rss_kib,
        dst_cpu_s=None, dst_max_rss_kib=None, dst_cpu_note="not measured (podman restore over ssh)",
        exit_code=child.returncode, log=f"$ podman-export script\n{script}\n--- stdout\n{child.stdout}\n--- stderr\n{child.stderr}",
    )
