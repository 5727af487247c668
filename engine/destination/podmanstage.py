"""Receiving a podman container: the destination's podman owns the result.

The container is recreated under this host's podman before the freeze:
``podman create`` with the source's image id (which must be here: nothing is
pulled), command and ulimits, in the endpoint's network namespace path; its
overlay is mounted and bind-mounted at the staging bundle's ``rootfs``, so
tug's rootfs sync writes the source's writable layer into the new container's
own. Once the endpoint namespace exists, ``podman init`` + ``podman stop``
make podman write its spec without ever running the workload. The restore
links CRIU's images in as ``userdata/checkpoint`` and lets ``podman container
restore`` run them under podman's conmon (see runtime/podman.py); lazily
through a CRIU config file (:func:`lazy_config`) where userfaultfd allows.

The bind mount is the dangerous part: the staging bundle is removed with
``rmtree`` on cleanup, which must never reach through it into the container's
overlay, so it is unmounted first and the bundle is left alone if it cannot be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tug.engine.destination.incoming import Incoming
from tug.engine.errors import PreconditionError, ProtocolError
from tug.engine.hostcfg import HostConfig
from tug.engine.runtime import network as netif
from tug.engine.runtime.podman import Podman, PodmanContainer
from tug.engine.runtime.runc import Runc

log = logging.getLogger("tug.agent")

#: In the staging bundle: the podman container made for it (its description).
MARKER = "podman.json"
#: In the container's userdata: the CRIU config file its spec names.
CRIU_CONF = "tug-criu.conf"


def parse(info: Any) -> dict[str, Any]:
    """The source's description of a podman container, checked (it is input)."""
    if not isinstance(info, dict):
        raise ProtocolError("podman: a description is a map")
    image, argv, ulimits = info.get("image_id"), info.get("argv"), info.get("ulimits", [])
    if not isinstance(image, str) or not image or not all(c in "0123456789abcdef" for c in image):
        raise ProtocolError("podman: the image is named by its id (hex)")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ProtocolError("podman: the command is a non-empty list of strings")
    if not isinstance(ulimits, list) or not all(isinstance(u, str) and "=" in u for u in ulimits):
        raise ProtocolError("podman: ulimits are NAME=SOFT:HARD strings")
    return {"image_id": image, "image_name": str(info.get("image_name", "")), "argv": argv, "ulimits": ulimits}


async def preflight(container: str, info: Any) -> None:
    """The image is here (by id) and the name is free in this host's podman. Changes nothing."""
    desc = parse(info)
    pm = Podman()
    if not await pm.has_image(desc["image_id"]):
        raise PreconditionError(
            f"this host's podman has no image {desc['image_id'][:12]} ({desc['image_name'] or 'no name'}), which "
            f"{container!r} runs: tug pulls nothing; load the same image here (podman save / podman load) first"
        )
    if await pm.inspect(container) is not None:
        raise PreconditionError(f"this host's podman already has a container named {container!r}")


def _spec_of(desc: dict[str, Any], name: str) -> PodmanContainer:
    return PodmanContainer(
        id="", name=name, status="", pid=0, conmon_pid=0, image_id=desc["image_id"], image_name=desc["image_name"],
        bundle=Path(), rootfs=Path(), argv=tuple(desc["argv"]), runc_root=Path(), cgroup_parent="", netns_path="",
        ulimits=tuple(desc["ulimits"]),
    )


async def prepare(host: HostConfig, inc: Incoming, info: Any) -> None:
    """Create and mount the container; bind its overlay at the staging rootfs."""
    desc = parse(info)
    if host.network is None:
        raise PreconditionError("a podman container's endpoint needs TUG_BRIDGE here")
    netns = host.network.netns_path(inc.name)
    if not netns.exists():
        # podman create insists the path exists; the endpoint replaces it later.
        await asyncio.to_thread(netif.add_netns, host.network.netns(inc.name))
    inc.podman = desc
    inc.podman_made = True
    # Written before podman is asked: a fresh agent sweeping after this one died knows to remove it.
    (inc.bundle / MARKER).write_text(json.dumps(desc))
    merged = await Podman().create_mounted(_spec_of(desc, inc.name), name=inc.name, netns_path=str(netns),
                                           cgroup_parent=host.cgroup_parent or "")
    await _run(["mount", "--bind", str(merged), str(inc.bundle / "rootfs")])


async def leftover(inc: Incoming) -> None:
    """A dead agent's staging bundle (``tug recover``, a sweep): its podman container
    is removed with it, unless podman runs it (then the restore ran)."""
    try:
        inc.podman = parse(json.loads((inc.bundle / MARKER).read_text()))
    except (OSError, ValueError):
        return
    inc.podman_made = True
    found = await Podman().inspect(inc.name)
    if found is not None and found.status in ("running", "paused"):
        raise PreconditionError(f"this host's podman runs {inc.name!r}: refusing to discard it")


async def drop_placeholder(host: HostConfig, inc: Incoming) -> None:
    """Before the endpoint is made: its namespace must not exist (an existing one
    reads as a leftover of tug's, whose interfaces would be removed with it)."""
    if inc.podman_made and host.network is not None:
        await asyncio.to_thread(netif.remove_netns, host.network.netns(inc.name))


async def status_here(runc: Runc, host: HostConfig, container: str) -> str | None:
    """This host's copy of ``container`` (``tug recover``): runc's, else podman's where
    a staging bundle says tug made it there."""
    st = await runc.state(container)
    if st is not None:
        return st.status
    if not (host.bundle_dir(container) / MARKER).exists():
        return None
    found = await Podman().inspect(container)
    return found.status if found is not None else None


def adopted(host: HostConfig, container: str) -> None:
    """A kept podman copy is podman's for good: tug's staging bundle goes."""
    bundle = host.bundle_dir(container)
    if (bundle / MARKER).exists() and not os.path.ismount(bundle / "rootfs"):
        shutil.rmtree(bundle, ignore_errors=True)


async def init_stopped(inc: Incoming) -> None:
    """After the endpoint exists: podman writes its spec (joining that namespace),
    which then names the CRIU config file of :func:`lazy_config`."""
    made = await Podman().init_stopped(inc.name)
    await asyncio.to_thread(_name_criu_conf, made)


def _name_criu_conf(made: PodmanContainer) -> None:
    """podman's restore reads the spec init wrote (``userdata/config.json``) and runc hands
    CRIU the file its ``org.criu.config`` annotation names: an empty one in userdata, so it
    goes with the container (every later checkpoint of it reads it too)."""
    spec_path = made.bundle / "config.json"
    spec = json.loads(spec_path.read_text())
    conf = made.bundle / CRIU_CONF
    conf.write_text("")
    spec.setdefault("annotations", {})["org.criu.config"] = str(conf)
    spec_path.write_text(json.dumps(spec, indent=2))


async def before_restore(inc: Incoming) -> PodmanContainer:
    """The overlay back to podman, CRIU's images where its restore reads them."""
    await unbind(inc)
    pm = Podman()
    await pm.unmount(inc.name)
    made = await pm.require(inc.name)
    link = made.checkpoint_dir
    if link.is_symlink() or link.exists():
        raise PreconditionError(f"{link} exists: not a container tug prepared")
    os.symlink(inc.images, link)
    return made


async def run_restore(inc: Incoming, made: PodmanContainer, *, tcp_established: bool, file_locks: bool) -> None:
    """podman restores what tug received, under its conmon."""
    await Podman().restore(inc.name, tcp_established=tcp_established, file_locks=file_locks)
    if inc.network is not None:
        netif.save_spec(made.bundle, inc.network)  # the next move finds its endpoint


async def pid_of(inc: Incoming) -> int:
    return (await Podman().require(inc.name)).pid


@contextlib.contextmanager
def lazy_config(made: PodmanContainer, inc: Incoming, lazy: bool) -> Iterator[None]:
    """During a lazy restore: CRIU restores lazily, from tug's lazy-pages daemon's work
    dir (its socket and logs are there); emptied once podman's restore returned.
    podman passes runc no ``--lazy-pages``, but CRIU lets this file override every
    option runc sends (criu/cr-service.c), work dir included."""
    conf = made.bundle / CRIU_CONF
    if lazy:
        conf.write_text(f"lazy-pages\nwork-dir {inc.criu_work}\n")
    try:
        yield
    finally:
        conf.write_text("")


async def unbind(inc: Incoming) -> None:
    root = inc.bundle / "rootfs"
    if os.path.ismount(root):
        await _run(["umount", str(root)])


async def remove(host: HostConfig, inc: Incoming) -> None:
    """The container podman made here for it, gone (stopped, running or half-restored),
    and the placeholder namespace if the endpoint never replaced it."""
    await unbind(inc)
    if inc.podman_made:
        await Podman().remove(inc.name)
        if inc.endpoint is None and host.network is not None:
            await asyncio.to_thread(netif.remove_netns, host.network.netns(inc.name))


def bundle_removable(inc: Incoming) -> bool:
    """Never rmtree a staging bundle whose rootfs is still the container's overlay."""
    return not os.path.ismount(inc.bundle / "rootfs")


async def _run(argv: list[str]) -> None:
    res = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise PreconditionError(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")
