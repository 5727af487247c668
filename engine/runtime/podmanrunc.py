"""runc on a podman container's OCI state, so the engine's runc code moves it unchanged.

Podman runs runc with the container's id (not its name) under its own state
root (``/run/runc`` unless ``--runtime-flag root=``). The engine names
containers by name everywhere, and the name is what is the same on both hosts;
this adapter translates the name into the id in every runc command line, so
pause, the frozen dump, resume (rollback) and the pre-copy trackers work on a
podman container as they do on tug's own. Deleting the container after the
commit also removes podman's record of it, so the source's podman no longer
lists it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tug.engine.runtime.podman import Podman, PodmanContainer
from tug.engine.runtime.runc import ContainerState, Runc


class PodmanRunc(Runc):
    def __init__(self, container: PodmanContainer, podman: Podman, *, log_dir: Path | None = None) -> None:
        super().__init__(container.runc_root, log_dir=log_dir)
        self.podman = podman
        self.container = container

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *self._ids(args)]

    def _id(self, name: str) -> str:
        return self._ids([name])[0]

    def _ids(self, args: Sequence[str]) -> list[str]:
        return [self.container.id if a == self.container.name else a for a in args]

    def checkpoint_argv(self, name: str, **kw: Any) -> list[str]:
        """(runc's appends the name after its global flags: translated here too.)"""
        return self._ids(super().checkpoint_argv(name, **kw))

    async def state(self, name: str) -> ContainerState | None:
        st = await super().state(name)
        return replace(st, id=name) if st is not None else None

    async def delete(self, name: str, *, force: bool = True) -> None:
        await super().delete(name, force=force)
        if name == self.container.name:
            await self.podman.forget_after_runc_delete(name)

    def visible_spec(self, raw: bytes) -> bytes:
        """The spec without podman's own bind mounts (hosts, resolv.conf, hostname,
        .containerenv, /dev/shm: files in this container's userdata dirs), which
        the destination's podman makes for its container: they are not volumes."""
        spec = json.loads(raw)
        own = f"/overlay-containers/{self.container.id}/userdata/"
        spec["mounts"] = [m for m in spec.get("mounts") or []
                          if not (isinstance(m, dict) and own in str(m.get("source", "")) + "/")]
        return json.dumps(spec, indent=2).encode()
