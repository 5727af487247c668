"""The lab's demo container: busybox plus the tug-workload program.

``start`` builds the image once (cached under the lab's data dir), copies it
into a host's bundle directory and runs it with runc. ``check`` asks the
workload to verify its memory and reads its heartbeat log: together they prove
a migration kept memory intact and the counter continuous.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.lab import podmandemo
from tug.engine.lab.addresses import address_of
from tug.engine.lab.layout import Lab, LabHost, Layout, sh
from tug.engine.lab.workload import analyze_heartbeat, build_workload, read_status, read_verify, verify_seq
from tug.engine.runtime import ipcns
from tug.engine.runtime import network as netif

APPLETS = (
    "sh", "ls", "cat", "echo", "sleep", "ps", "top", "kill", "wc", "head", "tail", "grep", "mkdir", "rm", "touch", "date",
    "env", "true", "false", "md5sum", "mkfifo", "timeout",
)


#: Where the workload keeps its state inside the container, unless a volume says otherwise.
STATE = "/state"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSpec:
    memory_mib: int = 64
    dirty_rate: int = 0
    hot_set: float = 1.0
    port: int = 7000
    #: MiB of SysV shared memory (0: none), dirtied and verified with the rest.
    sysv_shm_mib: int = 0
    #: A file (inside the container) the workload holds a POSIX write lock on.
    lock: str | None = None
    #: MiB mapped anew every 200 ms (the workload's --churn-mib): memory that
    #: appears while pre-copy runs.
    churn_mib: int = 0
    #: Where, inside the container, it keeps its state (heartbeat log, status, verify).
    state: str = STATE
    #: A pod's shared SysV semaphores and segment: their key (0: none) and this member's slot in them.
    pod_ipc_key: int = 0
    pod_slot: int = 0
    #: A pod member that does not attach the pod's SysV segment (the semaphores it uses still).
    pod_no_shm: bool = False
    #: A pod member's loopback peer: the port it keeps a connection to (0: none).
    pod_peer: int = 0

    def argv(self) -> list[str]:
        return [
            "/usr/bin/tug-workload", "--memory", str(self.memory_mib), "--dirty-rate", str(self.dirty_rate),
            "--hot-set", repr(self.hot_set), "--state", self.state, "--port", str(self.port),
            *(["--sysv-shm", str(self.sysv_shm_mib)] if self.sysv_shm_mib else []),
            *(["--lock", self.lock] if self.lock else []),
            *(["--churn-mib", str(self.churn_mib)] if self.churn_mib else []),
            *(["--pod-ipc", str(self.pod_ipc_key), "--pod-slot", str(self.pod_slot)] if self.pod_ipc_key else []),
            *(["--pod-peer", str(self.pod_peer)] if self.pod_peer else []),
            *(["--pod-no-shm"] if self.pod_ipc_key and self.pod_no_shm else []),
        ]


def image_rootfs(layout: Layout) -> Path:
    """The demo rootfs (busybox + workload), built once per lab instance and reused."""
    image_dir = layout.image_dir
    rootfs = image_dir / "rootfs"
    busybox = shutil.which("busybox")
    if busybox is None:
        raise PreconditionError("busybox not found (apt-get install busybox-static)")
    binary = build_workload(image_dir / "tug-workload")
    stamp = image_dir / "rootfs.stamp"
    want = f"{binary.stat().st_mtime_ns} {' '.join(APPLETS)}"
    if rootfs.exists() and stamp.exists() and stamp.read_text() == want:
        return rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    for d in ("bin", "usr/bin", "proc", "sys", "dev", "tmp", "etc", "state", "root"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    shutil.copy2(binary, rootfs / "usr/bin/tug-workload")
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/hostname").write_text("tug-demo\n")
    stamp.write_text(want)
    return rootfs


def endpoint_spec(lab: Lab, name: str) -> netif.EndpointSpec:
    """The container's address on the lab segment, and a MAC derived from it."""
    ip = address_of(lab, name, allocate=True)
    last = int(ip.rsplit(".", 1)[1])
    return netif.EndpointSpec(address=f"{ip}/24", mac=f"02:74:75:67:{(last >> 8) & 0xff:02x}:{last & 0xff:02x}")


#: The SysV key of a lab pod's semaphores (any key: each pod has its own IPC namespace).
POD_IPC_KEY = 0x54554730


def _volume_arg(value: str) -> tuple[Path, str]:
    """``HOSTDIR:CONTAINERDIR``, both absolute."""
    host_dir, sep, inside = value.partition(":")
    if not sep or not host_dir.startswith("/") or not inside.startswith("/") or ".." in Path(inside).parts or inside == "/":
        raise ConfigError(f"--volume takes HOSTDIR:CONTAINERDIR, both absolute paths (got {value!r})")
    return Path(host_dir), inside


def volume_dir(host: LabHost, name: str) -> Path:
    """The host directory a demo started with ``--volume`` keeps its state in."""
    return Path(host.data_dir) / "volumes" / name


def state_dir(bundle: Path) -> Path:
    """Where the workload's state is on the host: the source of the bind
    mount at its state dir (``--state``, /state unless a volume was put
    elsewhere: a volume, wherever a migration put it), else in the rootfs."""
    inside = STATE
    try:
        spec = json.loads((bundle / "config.json").read_text())
        args = (spec.get("process") or {}).get("args") or []
        if "--state" in args[:-1]:
            inside = str(args[args.index("--state") + 1])
        for m in spec.get("mounts") or []:
            if isinstance(m, dict) and m.get("destination") == inside and m.get("source"):
                return Path(m["source"])
    except (OSError, ValueError):
        pass
    return bundle / "rootfs" / inside.lstrip("/")


def _spec(
    name: str, host: LabHost, workload: WorkloadSpec, volume: Path | None = None, netns: Path | None = None,
    ipc: str | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["runc", "spec"], cwd=d, check=True, capture_output=True)
        spec: dict[str, Any] = json.loads(Path(d, "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = workload.argv()
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["hostname"] = name
    spec["linux"]["cgroupsPath"] = f"{host.cgroup_parent}/{name}"
    netif.set_netns_path_in_spec(spec, netns or host.network().netns_path(name))
    if ipc is not None:
        ipcns.set_path_in_spec(spec, Path(ipc))
    if volume is not None:
        spec["mounts"].append({"destination": workload.state, "type": "bind", "source": str(volume), "options": ["rbind", "rw"]})
    return spec


def start(
    lab: Lab, host: LabHost, name: str, workload: WorkloadSpec, *, volume: bool | str | None = False,
    netns_of: str | None = None, runtime: str = "runc",
) -> Path:
    """Create and run demo container ``name`` on ``host`` of ``lab``; returns its bundle.

    ``volume``: its state (the heartbeat log it keeps open and appends to,
    one checksummed record every 10 ms, its status and verify files) lives
    on a host directory bind-mounted into it, a volume a migration must move
    (``--volume PATH=...``): ``"HOSTDIR:CONTAINERDIR"`` names both (HOSTDIR
    is the user's: ``tug lab rm`` leaves it), True a directory of the lab's
    at /state.
    ``netns_of``: a pod's member, it joins that container's network
    namespace (its address, its loopback) and its IPC namespace (its SysV
    objects) instead of getting its own.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid container name {name!r}")
    if sh("runc", "--root", host.runc_root, "state", name, check=False).returncode == 0:
        raise ConfigError(f"host {host.name} already has a container named {name!r}")
    if runtime == "podman":
        if volume or netns_of is not None:
            raise ConfigError("the podman demo has no --volume and no pods (yet): start those under runc")
        return _start_podman(lab, host, name, workload)
    bundle = Path(host.data_dir) / "containers" / name
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    sh("cp", "-a", str(image_rootfs(lab.layout)), str(bundle / "rootfs"))
    joined = host.network().netns_path(netns_of) if netns_of is not None else None
    if joined is None:
        endpoint = endpoint_spec(lab, name)
        netif.create(host.network(), name, endpoint, up=True)
        netif.save_spec(bundle, endpoint)
    elif not joined.exists():
        shutil.rmtree(bundle)
        raise ConfigError(f"{netns_of!r} has no network namespace on {host.name} to join")
    ipc = None
    if netns_of is not None:
        held = sh("runc", "--root", host.runc_root, "state", netns_of, check=False)
        if held.returncode != 0:
            shutil.rmtree(bundle)
            raise ConfigError(f"{netns_of!r} does not run on {host.name}: no IPC namespace to join")
        ipc = "/proc/%d/ns/ipc" % json.loads(held.stdout)["pid"]
    vdir = None
    if isinstance(volume, str) and volume:
        # HOSTDIR:CONTAINERDIR: the user's directory, bind-mounted where the workload keeps its state.
        vdir, inside = _volume_arg(volume)
        vdir.mkdir(parents=True, exist_ok=True)
        workload = dataclasses.replace(workload, state=inside)
    elif volume:
        vdir = volume_dir(host, name)
        shutil.rmtree(vdir, ignore_errors=True)
        vdir.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(_spec(name, host, workload, vdir, joined, ipc), indent=2))
    log = Path(host.data_dir) / "logs"
    log.mkdir(parents=True, exist_ok=True)
    with open("/dev/null", "rb") as null_in, open("/dev/null", "wb") as null_out:
        res = subprocess.run(
            ["nsenter", f"--net=/run/netns/{host.netns}", "--", "runc", "--root", host.runc_root,
             "--log", str(log / f"runc-{name}.log"), "run", "-d", "--bundle", str(bundle), name],
            stdin=null_in, stdout=null_out, stderr=null_out,
        )
    if res.returncode != 0:
        shutil.rmtree(bundle, ignore_errors=True)
        if joined is None:
            netif.delete(host.network(), name)
        tail = [ln for ln in (log / f"runc-{name}.log").read_text(errors="replace").splitlines() if ln.strip()]
        raise PreconditionError(f"runc run {name} failed: {tail[-1] if tail else f'exit {res.returncode}'}")
    state = state_dir(bundle)
    deadline = time.monotonic() + 30  # the first touch of fresh memory is slow here
    while time.monotonic() < deadline:
        if (state / "status.json").exists():
            return bundle
        time.sleep(0.05)
    raise PreconditionError(f"demo container {name} started but its workload wrote no status within 30 s")


#: Seconds a check gives a pod's peers to show up fresh (a move just ended).
POD_SETTLE_S = 5.0
#: The longest a pod peer may have been silent, in ms, for the pod to count as shared.
POD_STALE_MS = 1000


def _verify(host: LabHost, name: str, runtime: str, state: Path, deadline: float) -> dict[str, Any] | None:
    """Ask the workload to verify itself (SIGUSR1); its answer, or None by the deadline."""
    before = verify_seq(state)
    if runtime == "podman":
        podmandemo.signal(host, name, "USR1")
    else:
        sh("runc", "--root", host.runc_root, "kill", name, str(int(signal.SIGUSR1)))
    while time.monotonic() < deadline:
        verify = read_verify(state)
        if verify is not None and int(verify.get("seq", 0)) > before:
            return verify
        time.sleep(0.05)
    return None


def _pod_problems(pod: Any) -> list[str]:
    """What the workload's pod report says is broken: the shared semaphores or
    segment (IPC namespace) or the loopback connection to its peer (network namespace)."""
    if not isinstance(pod, dict):
        return []
    out = []
    for key, what in (("shm", "SysV shared memory segment"), ("ipc", "SysV semaphores")):
        if pod.get(f"{key}_id", -1) < 0:
            continue
        if not pod.get(f"{key}_same"):
            out.append(f"the pod's {what}: gone")
        elif not pod.get(f"{key}_peers"):
            out.append(f"the pod's {what}: no other member uses it (not one IPC namespace)")
        elif int(pod.get(f"{key}_stale_ms", 0)) > POD_STALE_MS:
            out.append(f"the pod's {what}: a member stopped using it {pod[f'{key}_stale_ms']} ms ago")
    if pod.get("peer_port"):
        if pod.get("peer_errors") or pod.get("peer_reconnects"):
            out.append(f"the loopback connection to port {pod['peer_port']} broke "
                       f"({pod.get('peer_errors')} errors, {pod.get('peer_reconnects')} reconnects)")
        elif not 0 <= int(pod.get("peer_reply_age_ms", -1)) <= POD_STALE_MS:
            out.append(f"no reply on the loopback connection to port {pod['peer_port']} for {pod.get('peer_reply_age_ms')} ms")
    return out


def _start_podman(lab: Lab, host: LabHost, name: str, workload: WorkloadSpec) -> Path:
    """The demo under the host's podman, in an endpoint namespace made as for runc."""
    for other in lab.hosts:  # every host holds the image (by digest): a migration pulls nothing
        podmandemo.ensure_image(lab, other, image_rootfs(lab.layout))
    endpoint = endpoint_spec(lab, name)
    netif.create(host.network(), name, endpoint, up=True)
    try:
        state = podmandemo.start(host, name, workload.argv(), host.network().netns_path(name))
        # tug manages this endpoint: the spec file in the OCI bundle (podman's userdata) says so.
        netif.save_spec(podmandemo.bundle(host, name), endpoint)
        return state
    except BaseException:
        podmandemo.remove(host, name)
        netif.delete(host.network(), name)
        raise


def remove(lab: Lab, host: LabHost, name: str) -> bool:
    """Delete container ``name`` and its bundle from ``host``; True if anything was there.

    A ``--volume`` directory goes only when no host's copy of ``name`` still
    mounts it: a volume migrated as ``shared`` stays where it was made, so
    removing the container from its first host must not pull the directory
    from under the copy running on another (it is still writing there)."""
    existed = podmandemo.remove(host, name)
    existed = sh("runc", "--root", host.runc_root, "state", name, check=False).returncode == 0 or existed
    if existed:
        sh("runc", "--root", host.runc_root, "delete", "--force", name)
    bundle = Path(host.data_dir) / "containers" / name
    if bundle.exists():
        shutil.rmtree(bundle)
        existed = True
    in_use = {state_dir(Path(o.data_dir) / "containers" / name) for o in lab.hosts
              if (Path(o.data_dir) / "containers" / name).exists()}
    for vdir in {volume_dir(o, name) for o in lab.hosts} - in_use:
        if vdir.exists():
            shutil.rmtree(vdir)
            existed = True
    if host.network().netns_path(name).exists():
        netif.delete(host.network(), name)
        existed = True
    ipc = ipcns.ns_dir(Path(host.data_dir)) / name  # a pod's, made there by a migration
    if ipc.exists():
        ipcns.remove(ipc)
        existed = True
    return existed


def check(host: LabHost, name: str, timeout: float = 20.0) -> dict[str, Any]:
    """Is ``name`` running on ``host`` with intact memory and an unbroken counter?"""
    res = sh("runc", "--root", host.runc_root, "state", name, check=False)
    runtime = "runc"
    if res.returncode == 0:
        st = json.loads(res.stdout)
        status, state = st["status"], state_dir(Path(st["bundle"]))
    elif (pm_status := podmandemo.status(host, name)) is not None:
        runtime, status = "podman", pm_status
        state = podmandemo.state_dir(host, name) or Path("/nonexistent")
    else:
        return {"host": host.name, "container": name, "running": False, "ok": False, "reason": "no such container"}
    out: dict[str, Any] = {"host": host.name, "container": name, "runtime": runtime, "status": status,
                           "running": status == "running", "state": str(state)}
    if status != "running":
        return {**out, "ok": False, "reason": f"container is {status}"}
    deadline = time.monotonic() + timeout
    pod_deadline = time.monotonic() + POD_SETTLE_S
    while True:
        verify = _verify(host, name, runtime, state, deadline)
        if verify is None:
            return {**out, "ok": False, "reason": f"workload did not answer the verify request within {timeout:g} s"}
        pod_problems = _pod_problems(verify.get("pod"))
        # Just after a move a peer may not have written or answered yet: ask again, briefly.
        if not pod_problems or time.monotonic() >= pod_deadline:
            break
        time.sleep(0.1)
    hb = analyze_heartbeat(state / "heartbeat.log")
    status = read_status(state)
    problems = list(pod_problems)
    if not verify.get("ok"):
        problems.append(f"memory checksum failed ({verify.get('bad_pages')} bad pages)")
    if hb.resets or hb.backwards:
        problems.append(f"counter went backwards {hb.backwards} times / reset {hb.resets} times")
    if hb.skipped:
        problems.append(f"counter skipped values {hb.skipped} times")
    if hb.torn:
        problems.append(f"{hb.torn} heartbeat record(s) torn or altered (checksum)")
    return {
        **out,
        "ok": not problems,
        "reason": "; ".join(problems),
        "counter": status.get("counter"),
        "memory_mib": status.get("memory_mib"),
        "verify": verify,
        "heartbeat": {
            "lines": hb.lines,
            "first_counter": hb.first_counter,
            "last_counter": hb.last_counter,
            "resets": hb.resets,
            "backwards": hb.backwards,
            "skipped": hb.skipped,
            "torn": hb.torn,
            "max_gap_ms": hb.max_gap_ms,
        },
    }
