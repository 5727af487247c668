"""The demo container under a lab host's own podman.

The image is the lab's demo rootfs imported once (``podman import``) and then
saved as an OCI archive every other host loads, so all hosts hold the same
image by digest and nothing is pulled. The container joins a network
namespace the lab prepares exactly as for a runc demo (``--network ns:PATH``):
tug's endpoint move (same address, connections kept) then applies unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.lab.layout import Lab, LabHost

IMAGE = "localhost/tug-demo:latest"


def podman(host: LabHost, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman of lab host ``host``, in the host's network namespace, output to files
    (conmon keeps inherited pipes open)."""
    import os
    import tempfile

    env = {**os.environ, **host.podman_env()}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        res = subprocess.run(["nsenter", f"--net=/run/netns/{host.netns}", "--", "podman", *argv],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, text=True)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(res.args, res.returncode, out.read(), err.read())
    if check and done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise PreconditionError(f"podman {' '.join(argv[:2])} on {host.name}: {lines[-1] if lines else done.returncode}")
    return done


def ensure_image(lab: Lab, host: LabHost, rootfs: Path) -> None:
    """The demo image (of the demo ``rootfs``) on ``host``: loaded from the lab's archive, made once."""
    if podman(host, "image", "exists", IMAGE, check=False).returncode == 0:
        return
    archive = lab.layout.image_dir / "podman-image.tar"
    stamp = lab.layout.image_dir / "podman-image.stamp"
    want = (lab.layout.image_dir / "rootfs.stamp").read_text()
    if archive.exists() and stamp.exists() and stamp.read_text() == want:
        podman(host, "load", "-i", str(archive))
        return
    tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True).stdout
    res = subprocess.run(["podman", "import", "-", IMAGE], input=tar, env={**os.environ, **host.podman_env()},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if res.returncode != 0:
        raise PreconditionError(f"podman import of the demo image on {host.name} failed: "
                                f"{res.stderr.decode(errors='replace').strip()[-300:]}")
    archive.unlink(missing_ok=True)
    podman(host, "save", "--format", "oci-archive", "-o", str(archive), IMAGE)
    stamp.write_text(want)


def inspect(host: LabHost, name: str) -> dict[str, Any] | None:
    res = podman(host, "container", "inspect", name, check=False)
    if res.returncode != 0:
        return None
    items = json.loads(res.stdout or "[]")
    return items[0] if items else None


def state_dir(host: LabHost, name: str) -> Path | None:
    """The workload's /state on the host: in the container's mounted overlay."""
    data = inspect(host, name)
    if data is None:
        return None
    merged = ((data.get("GraphDriver") or {}).get("Data") or {}).get("MergedDir")
    if not merged:
        merged = podman(host, "mount", name).stdout.strip()
    return Path(merged) / "state"


def start(host: LabHost, name: str, argv: list[str], netns: Path) -> Path:
    """Run ``argv`` as podman container ``name`` in network namespace ``netns`` (the image is there)."""
    if inspect(host, name) is not None:
        raise ConfigError(f"host {host.name}'s podman already has a container named {name!r}")
    podman(host, "run", "-d", "--name", name, "--network", f"ns:{netns}", "--cgroup-parent", host.cgroup_parent,
           "--hostname", name, IMAGE, *argv)
    state = state_dir(host, name)
    deadline = time.monotonic() + 30
    while state is not None and time.monotonic() < deadline:
        if (state / "status.json").exists():
            return state
        time.sleep(0.05)
    raise PreconditionError(f"podman demo container {name} started but its workload wrote no status within 30 s")


def bundle(host: LabHost, name: str) -> Path:
    """The OCI bundle podman gives runc: the container's userdata directory."""
    data = inspect(host, name)
    if data is None:
        raise PreconditionError(f"podman on {host.name} has no container {name!r}")
    return Path(str(data["StaticDir"]))


def signal(host: LabHost, name: str, sig: str) -> None:
    podman(host, "kill", "--signal", sig, name)


def remove(host: LabHost, name: str) -> bool:
    if inspect(host, name) is None:
        return False
    podman(host, "rm", "--force", "--time", "0", name)
    return True


def status(host: LabHost, name: str) -> str | None:
    data = inspect(host, name)
    return None if data is None else str((data.get("State") or {}).get("Status", ""))


def listed(host: LabHost) -> list[str]:
    """Names ``podman ps`` lists on ``host`` (running ones)."""
    res = podman(host, "ps", "--format", "{{.Names}}")
    return res.stdout.split()




def containers(host: LabHost) -> list[dict[str, Any]]:
    """The host's podman containers, as ``tug lab status`` lists runc's (name as id)."""
    if not Path(host.podman_env()["CONTAINERS_CONF"]).exists():
        return []
    res = podman(host, "ps", "--all", "--format", "json", check=False)
    if res.returncode != 0:
        return []
    return [
        {"id": (c.get("Names") or ["?"])[0], "status": str(c.get("State", "")), "pid": int(c.get("Pid") or 0),
         "runtime": "podman"}
        for c in json.loads(res.stdout or "[]") or []
    ]
