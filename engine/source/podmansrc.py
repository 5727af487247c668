"""Which runtime a migration's container belongs to, and what podman's need.

``--runtime auto`` takes runc's container if tug's runc root knows the name,
else podman's. A podman container moves through :class:`PodmanRunc` (the
engine's runc code on podman's OCI state) and the destination recreates it
under its own podman from what :func:`wire` sends: the image *id* (the
destination must hold that image; nothing is pulled), the command, ulimits.
What the podman route cannot do yet is refused here, before anything changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tug.engine.errors import ConfigError, PreconditionError
from tug.engine.options import MigrationOptions
from tug.engine.runtime.podman import Podman, PodmanContainer, installed
from tug.engine.runtime.podmanrunc import PodmanRunc
from tug.engine.runtime.runc import Runc

RUNTIMES = ("auto", "runc", "podman")


async def resolve(
    runc: Runc, names: Sequence[str], opts: MigrationOptions, *, check: bool = True
) -> tuple[Runc, PodmanContainer | None]:
    """The runc adapter the migration uses, and the podman container if it is one.
    ``check``: refuse what the podman route cannot do (not for ``tug recover``,
    which finds a frozen container and must act on it)."""
    if opts.runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {opts.runtime!r} (one of {', '.join(RUNTIMES)})")
    if opts.runtime == "runc":
        return runc, None
    if opts.runtime == "auto" and (len(names) != 1 or installed() is None or await runc.state(names[0]) is not None):
        return runc, None
    if installed() is None:
        raise PreconditionError("podman is not installed here (apt-get install podman, or scripts/setup.sh)")
    if len(names) != 1:
        raise ConfigError("podman containers move one at a time for now (no groups, no pods); nothing was changed")
    podman = Podman()
    found = await podman.inspect(names[0])
    if found is None:
        if opts.runtime == "podman":
            raise ConfigError(f"container {names[0]!r} not found in this host's podman")
        return runc, None
    if check:
        check_options(opts, found)
    return PodmanRunc(found, podman, log_dir=runc.log_dir), found


def check_options(opts: MigrationOptions, c: PodmanContainer) -> None:
    """What the podman route does not do (yet): refused before anything changes."""
    why = None
    if c.status != "running":
        why = f"it is {c.status}; only a running container can be migrated"
    elif opts.tcp_close or opts.criu_opts:
        why = "--tcp-close and --criu-opt reach runc through the spec tug writes, and podman writes its own"
    elif opts.volumes or opts.pod:
        why = "--volume and --pod are runc-only for now"
    elif not c.netns_path:
        why = ("it is on a podman network; tug moves the network endpoints it manages "
               "(a container started with --network ns:PATH in a namespace tug made, as tug lab demo does)")
    if why is not None:
        raise ConfigError(f"podman container {c.name!r}: {why}; nothing was changed")


def wire(c: PodmanContainer) -> dict[str, Any]:
    """What the destination's podman needs to recreate it."""
    return {"image_id": c.image_id, "image_name": c.image_name, "argv": list(c.argv), "ulimits": list(c.ulimits)}
