"""Baselines: how people move a container without tug, measured the same way.

``naive`` is the anchor every table row is compared with: what an operator
types by hand today, run from the source host as one shell script so it pays
the same one-time wrapper cost (``tug lab run a -- ...``) as ``tug migrate``:

1. ``runc checkpoint --tcp-established`` into a tmpfs directory (CRIU
   refuses to dump established connections without the flag). This kills the
   container: from here on it is down, and there is no way back if a later
   step fails. Then its network namespace is deleted, so its address leaves
   the segment.
2. ``rsync -a`` the image directory to the destination over ssh (the lab's
   key and known_hosts, strict host key checking).
3. ``rsync -a`` the bundle (config.json + rootfs) the same way. The rootfs is
   copied after the checkpoint on purpose: that is what carries the files the
   process wrote up to its last instant (the heartbeat log among them).
4. Over ssh on the destination: rewrite the bundle's ``cgroupsPath`` and
   network namespace path (``sed``), recreate the endpoint with ``ip`` (a
   netns, a veth on the lab bridge, the same IP and MAC), then
   ``runc restore -d --tcp-established``.

Each step prints a ``@@ <step> <CLOCK_REALTIME>`` marker (bash's
``$EPOCHREALTIME``: no fork) so phase durations come from the script itself;
rsync's ``--stats`` give the bytes on the wire, and bash's ``times`` on the
destination gives the CPU of the restore (runc + CRIU). The rsync receivers
on the destination run under sshd and are not counted there: the
destination's CPU for naive is a lower bound, and results.json says so.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tug.engine.fsutil import remove_tree

from .lab import TUG, Host, LabInfo
from .proc import MigrateResult, run_child

#: Where naive keeps its images: tmpfs like tug's work dirs, but outside the
#: lab's own /dev/shm/tuglab-* directories (other tests inspect those).
NAIVE_ROOT = Path("/dev/shm/bench-naive")

BaselineFn = Callable[[str, Host, Host, LabInfo, float], MigrateResult]


def _paths(name: str, host: Host) -> tuple[Path, Path]:
    base = NAIVE_ROOT / name / host.name
    return base / "images", base / "work"


def naive(name: str, src: Host, dst: Host, lab: LabInfo, timeout: float) -> MigrateResult:
    """Checkpoint, rsync, restore by hand; see the module docstring."""
    return _naive(name, src, dst, lab, timeout, mux=False)


def naive_mux(name: str, src: Host, dst: Host, lab: LabInfo, timeout: float) -> MigrateResult:
    """naive, but the ssh connection is opened (ControlMaster) before the checkpoint.

    Each ssh connection costs about 0.3 s in the lab (key exchange, sshd
    start), and plain naive opens three while the container is dead. An
    experienced operator multiplexes them; this variant measures that, so
    the anchor is not made weaker than it needs to be. The master ssh runs in
    the script's foreground process tree, so its CPU is counted.
    """
    return _naive(name, src, dst, lab, timeout, mux=True)


def endpoint(host: Host, name: str) -> dict[str, str]:
    """The container's address (CIDR) and MAC, as ``tug lab demo`` recorded them in its bundle."""
    data: dict[str, str] = json.loads((host.bundle(name) / "tug-network.json").read_text())
    return data


def _naive(name: str, src: Host, dst: Host, lab: LabInfo, timeout: float, *, mux: bool) -> MigrateResult:
    src_img, src_work = _paths(name, src)
    dst_img, dst_work = _paths(name, dst)
    src_bundle, dst_bundle = src.bundle(name), dst.bundle(name)
    q = shlex.quote
    ssh = (f"ssh -i {q(lab.identity)} -o UserKnownHostsFile={q(lab.known_hosts)} "
           "-o StrictHostKeyChecking=yes -o BatchMode=yes")
    control = NAIVE_ROOT / name / "ssh-control"
    mux_setup: list[str] = []
    if mux:
        ssh += f" -o ControlPath={q(str(control))}"
        mux_setup = [
            f"{ssh} -o ControlMaster=yes -N root@{dst.address} &",
            "master=$!",
            # The master's own exit status (255 after -O exit) is not the script's.
            f"trap 'rc=$?; {ssh} -O exit root@{dst.address} 2>/dev/null || true; wait $master || true; exit $rc' EXIT",
            f"for i in $(seq 100); do {ssh} -O check root@{dst.address} 2>/dev/null && break; sleep 0.05; done",
        ]
        ssh += " -o ControlMaster=no"
    dest_cgroup = f"{dst.cgroup_parent}/{name}"
    ep = endpoint(src, name)
    src_ns, dst_ns = f"tug-{src.tug_host}-{name}", f"tug-{dst.tug_host}-{name}"  # the lab's endpoint netns convention
    outer = "nv" + hashlib.sha1(f"{dst.tug_host}/{name}".encode()).hexdigest()[:12]
    cfg = q(str(dst_bundle / "config.json"))
    remote = "; ".join([
        "set -e",
        f"sed -i 's#\"cgroupsPath\": *\"[^\"]*\"#\"cgroupsPath\": \"{dest_cgroup}\"#' {cfg}",
        # The endpoint by hand: same IP and MAC, the veth's outer end on the lab bridge.
        f"sed -i 's#/run/netns/{src_ns}\"#/run/netns/{dst_ns}\"#' {cfg}",
        f"ip netns add {dst_ns}",
        f"ip -n {lab.bridge_netns} link add {outer} type veth peer name eth0 netns {dst_ns}",
        f"ip -n {lab.bridge_netns} link set {outer} master br0 up",
        f"ip -n {dst_ns} link set lo up",
        f"ip -n {dst_ns} link set eth0 address {ep['mac']}",
        f"ip -n {dst_ns} addr add {ep['address']} dev eth0",
        f"ip -n {dst_ns} link set eth0 up",
        f"mkdir -p {q(str(dst_work))}",
        f"runc --root {q(dst.runc_root)} restore -d --tcp-established --image-path {q(str(dst_img))} "
        f"--work-path {q(str(dst_work))} --bundle {q(str(dst_bundle))} {q(name)} </dev/null >/dev/null "
        f"2>{q(str(dst_work / 'runc.err'))} || {{ cat {q(str(dst_work / 'runc.err'))} >&2; exit 1; }}",
        "echo @@times",
        "times",
    ])
    script = "\n".join([
        "set -euo pipefail",
        'mark() { echo "@@ $1 $EPOCHREALTIME"; }',
        f"mkdir -p {q(str(src_work))}",
        *mux_setup,
        "mark checkpoint",
        f"runc --root {q(src.runc_root)} checkpoint --tcp-established --image-path {q(str(src_img))} "
        f"--work-path {q(str(src_work))} {q(name)}",
        # The dead container's address must leave the segment before it reappears on the destination.
        f"ip netns del {src_ns}",
        "mark rsync-images",
        f"rsync -a --mkpath --stats -e {q(ssh)} {q(str(src_img))}/ root@{dst.address}:{q(str(dst_img))}/",
        "mark rsync-bundle",
        f"rsync -a --mkpath --stats -e {q(ssh)} {q(str(src_bundle))}/ root@{dst.address}:{q(str(dst_bundle))}/",
        "mark restore",
        f"{ssh} root@{dst.address} {q('bash -c ' + q(remote))}",
        "mark end",
    ])
    child = run_child([TUG, "lab", "run", src.name, "--", "bash", "-c", script], timeout=timeout)
    parsed = _parse(child.stdout)
    marks: dict[str, float] = parsed["marks"]
    order = ["checkpoint", "rsync-images", "rsync-bundle", "restore", "end"]
    phases = {a: marks[b] - marks[a] for a, b in zip(order, order[1:]) if a in marks and b in marks}
    by_phase: dict[str, int] = parsed["bytes"]
    ok = child.returncode == 0 and "end" in marks
    error = None
    if not ok:
        failed_step = next((s for s in reversed(order) if s in marks), "start")
        error = f"naive step {failed_step} failed: {child.last_error_line()}"
        if child.timed_out:
            error = f"timed out after {timeout:g} s in step {failed_step}"
    span_s = (marks["end"] - marks["checkpoint"]) if ok else None
    total_bytes = sum(by_phase.values())
    report: dict[str, Any] = {
        "strategy": "naive-mux" if mux else "naive",
        "outcome": "migrated" if ok else "failed",
        # The container dies at the checkpoint and runs again once restore
        # returns: the scripted span is this baseline's "engine" downtime.
        "downtime_ms": span_s * 1000 if span_s is not None else None,
        "frozen_ms": span_s * 1000 if span_s is not None else None,
        "total_s": span_s,
        "bytes_total": total_bytes,
        "frozen_bytes": total_bytes,
        "bytes_by_phase": by_phase,
        "phases": phases,
        "rounds": [],
        "tracker": None,
        "image_bytes": parsed["sizes"].get("rsync-images", 0),
        "rootfs_bytes": parsed["sizes"].get("rsync-bundle", 0),
        "error": None if ok else {"kind": "naive", "message": error, "phase": next((s for s in reversed(order) if s in marks), "start")},
    }
    return MigrateResult(
        outcome="timeout" if child.timed_out else report["outcome"],
        error=error,
        wall_s=child.wall_s,
        report=report,
        src_cpu_user_s=child.user_s,
        src_cpu_sys_s=child.sys_s,
        src_max_rss_kib=child.max_rss_kib,
        dst_cpu_s=parsed["dst_cpu_s"],
        dst_max_rss_kib=None,
        dst_cpu_note="runc restore + CRIU only (bash times over ssh); rsync receivers not counted",
        exit_code=child.returncode,
        log=f"$ naive script\n{script}\n--- stdout\n{child.stdout}\n--- stderr\n{child.stderr}",
    )


_NUM = r"([\d,]+)"


def _parse(stdout: str) -> dict[str, Any]:
    """Step markers, rsync --stats per step, and the destination's ``times``."""
    marks: dict[str, float] = {}
    sent: dict[str, int] = {}
    sizes: dict[str, int] = {}
    dst_cpu: float | None = None
    step = ""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("@@ "):
            _, step, ts = line.split()
            marks[step] = float(ts)
        elif m := re.match(rf"Total bytes (?:sent|received): {_NUM}", line):
            sent[step] = sent.get(step, 0) + int(m.group(1).replace(",", ""))
        elif m := re.match(rf"Total file size: {_NUM}", line):
            sizes[step] = int(m.group(1).replace(",", ""))
        elif line == "@@times" and i + 2 < len(lines):
            # bash `times`: line 1 the shell itself, line 2 its children (runc, CRIU).
            dst_cpu = sum(_bash_time(t) for t in (lines[i + 1].split() + lines[i + 2].split()))
    return {"marks": marks, "bytes": sent, "sizes": sizes, "dst_cpu_s": dst_cpu}


def _bash_time(text: str) -> float:
    m = re.fullmatch(r"(\d+)m([\d.]+)s", text)
    return int(m.group(1)) * 60 + float(m.group(2)) if m else 0.0


def cleanup(name: str) -> None:
    """Remove naive's image directories (tmpfs) for this container."""
    remove_tree(NAIVE_ROOT / name)
    try:
        NAIVE_ROOT.rmdir()
    except OSError:
        pass  # other runs still use it, or already gone


#: Baselines by the name a :class:`bench.matrix.Strategy` refers to.
def _podman_export(name: str, src: Host, dst: Host, lab: LabInfo, timeout: float) -> MigrateResult:
    from .podman import export_import

    return export_import(name, src, dst, lab, timeout)


BASELINES: dict[str, BaselineFn] = {"naive": naive, "naive-mux": naive_mux, "podman-export": _podman_export}
