"""``tug doctor``'s podman and docker rows, with a real checkpoint/restore probe.

The probe must not touch the user's podman: it runs a podman of its own
(storage, run root, tmp dir and events file in a throwaway directory, given
by ``CONTAINERS_CONF``/``CONTAINERS_STORAGE_CONF``), imports a one-file image
(busybox, no network), runs ``busybox sleep``, checkpoints and restores it with
podman's own commands, and removes everything, mounts included.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from tug.engine import proc
from tug.engine.errors import MigrationError
from tug.engine.runtime.podman import Podman, installed

#: Without CAP_SYS_RESOURCE runc cannot raise rlimits to podman's defaults.
ULIMITS = '["nofile=1024:1024", "nproc=4096:4096"]'


def write_config(base: Path, run: Path, *, runtime: str = "runc") -> dict[str, str]:
    """A podman of its own under ``base`` (persistent) and ``run`` (run-time):
    the environment that selects it."""
    base.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    (base / "containers.conf").write_text(
        "[containers]\n"
        f"default_ulimits = {ULIMITS}\n"
        "[engine]\n"
        f'runtime = "{runtime}"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{run}/events.log"\n'
        f'tmp_dir = "{run}/tmp"\n'
        f'static_dir = "{base}/libpod"\n'
        f'volume_path = "{base}/volumes"\n'
        "[network]\n"
        f'network_config_dir = "{base}/networks"\n'
    )
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/storage"\nrunroot = "{run}/storage"\n'
    )
    return {"CONTAINERS_CONF": str(base / "containers.conf"), "CONTAINERS_STORAGE_CONF": str(base / "storage.conf")}


def busybox_tar() -> bytes:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise FileNotFoundError("busybox (apt-get install busybox-static)")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
    return out.getvalue()


async def reset(env: dict[str, str], *dirs: Path) -> None:
    """Remove a private podman's containers and images, its mounts, its dirs."""
    pm = Podman(env=env)
    await pm._run("rm", "--all", "--force", "--time", "0", timeout=60, check=False)
    await pm._run("rmi", "--all", "--force", timeout=60, check=False)
    for d in dirs:
        for target in reversed(_mounts_under(d)):
            await proc.run(["umount", "-l", target], timeout=20, check=False)
        shutil.rmtree(d, ignore_errors=True)


def _mounts_under(d: Path) -> list[str]:
    prefix = str(d).rstrip("/") + "/"
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    return [f.split()[1] for f in lines if len(f.split()) > 1 and (f.split()[1] + "/").startswith(prefix)]


async def probe() -> str | None:
    """Checkpoint and restore a container with this machine's podman: None if it works, else why."""
    tmp = Path(tempfile.mkdtemp(prefix="tug-podman-probe."))
    run = Path(f"/run/tug-podman-probe.{os.getpid()}")
    env = write_config(tmp / "base", run)
    pm = Podman(env=env)
    try:
        await proc.run(["podman", "import", "-", "localhost/tug-probe:latest"], input=busybox_tar(), env=env, timeout=60,
                       via_files=True)
        await pm._run("run", "-d", "--name", "probe", "--network", "none", "localhost/tug-probe:latest",
                      "/bin/busybox", "sleep", "600", timeout=60)
        await pm._run("container", "checkpoint", "probe", timeout=60)
        await pm._run("container", "restore", "probe", timeout=60)
        got = await pm.require("probe")
        return None if got.status == "running" else f"restored container is {got.status}"
    except (MigrationError, OSError) as exc:
        return str(exc)
    finally:
        await reset(env, tmp, run)


async def rows() -> list[tuple[str, str, str, str]]:
    """(name, status, detail, fix) rows for podman and docker."""
    out: list[tuple[str, str, str, str]] = []
    if installed() is None:
        out.append(("podman", "warn", "not installed: tug migrates runc containers only",
                    "apt-get install podman (or scripts/setup.sh) to migrate podman containers"))
    else:
        pm = Podman()
        try:
            info = await pm.info()
            host, store = info.get("host") or {}, info.get("store") or {}
            oci = host.get("ociRuntime") or {}
            out.append(("podman", "ok", f"{(info.get('version') or {}).get('Version', '?')} "
                        f"(cgroup manager {host.get('cgroupManager', '?')}, events {host.get('eventLogger', '?')})", ""))
            name = str(oci.get("name", "?"))
            good = name == "runc"
            out.append(("podman OCI runtime", "ok" if good else "warn",
                        f"{name} {oci.get('path', '')} {str(oci.get('version', '')).splitlines()[0] if oci.get('version') else ''}".strip(),
                        "" if good else "tug drives runc's checkpoint on podman's state: set runtime = \"runc\" in containers.conf"))
            out.append(("podman storage", "ok", f"driver {store.get('graphDriverName', '?')}, root {store.get('graphRoot', '?')}, "
                        f"run root {store.get('runRoot', '?')}", ""))
        except MigrationError as exc:
            out.append(("podman", "FAIL", f"podman info failed: {exc}", "run 'podman info' to see why"))
        why = await probe()
        out.append(("podman checkpoint/restore", "ok" if why is None else "warn",
                    "a throwaway container checkpointed and restored by this podman (private storage)"
                    if why is None else f"does not work here: {why}",
                    "" if why is None else "podman containers cannot be migrated until this works"))
    docker = shutil.which("docker")
    out.append(("docker", "warn",
                f"client {docker}; tug refuses docker containers with a clear error" if docker else
                "not installed; tug refuses docker containers",
                "docker's checkpoint/restore is experimental and restoring from a custom directory has been broken "
                "since 17.12: tug would need dockerd to adopt a restored container (or containerd's "
                "task API under it); migrate with podman or plain runc"))
    return out
