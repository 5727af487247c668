"""The runc adapter: every runc invocation tug makes, in one place.

The important trick lives in :meth:`Runc.checkpoint_frozen`: runc has no
"dump and keep frozen" mode (plain checkpoint kills the container,
``--leave-running`` lets it run on and diverge). Pausing first puts the
container's cgroup freezer in FROZEN; CRIU records the freezer's original
state and puts it back after a ``--leave-running`` dump, so the container stays
frozen and resumable until we either ``resume`` (rollback) or ``delete``
(commit). Verified on runc 1.1.5 with CRIU 4.2.1.

Both the frozen dump and :meth:`Runc.predump` can send their memory to a CRIU
page server (``--page-server ADDR:PORT``): then the image dir receives every
image except pagemaps and pages. ``--parent-path`` is relative to the image
dir and must exist locally (runc stats it; CRIU reads its inventory.img).

A dump that times out or is cancelled is not killed outright: CRIU would
leave its parasite in the container and the container running. It is
interrupted the way CRIU itself supports (:data:`tug.engine.criu.tool.DUMP_STOP`),
so the source is left exactly as before the dump: frozen, and resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as _signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tug.engine import proc
from tug.engine.criu.gate import CriuGate
from tug.engine.criu.netlockskip import skip_env
from tug.engine.criu.probes import kill_orphaned_probes
from tug.engine.criu.tool import DUMP_STOP, error_from_tool
from tug.engine.errors import ConfigError, PreconditionError, RuntimeToolError
from tug.engine.fsutil import remove_tree
from tug.engine.runtime.freezer import Freezer
from tug.engine.runtime.gateddumps import GatedDumps


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerState:
    id: str
    pid: int
    status: str  # created | running | paused | stopped
    bundle: Path

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"


class Runc:
    """runc bound to one state root (one "host" in the lab)."""

    def __init__(self, root: Path, *, binary: str = "runc", log_dir: Path | None = None) -> None:
        self.root = root
        self.binary = binary
        self.log_dir = log_dir
        #: Containers whose processes hold file locks: their dumps carry them
        #: (``--file-locks``; CRIU refuses to dump held locks otherwise).
        self.file_locks: set[str] = set()
        #: Frozen dumps started before the freeze, at their gates (gateddumps.py).
        self.gated = GatedDumps()
        #: Containers whose network tug's own lock holds while frozen: their
        #: dumps skip CRIU's (criu/netlockskip.py).
        self.net_held: set[str] = set()

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def _id(self, name: str) -> str:
        """runc's id of container ``name`` (its state dir under the root)."""
        return name

    async def version(self) -> str:
        res = await proc.run([self.binary, "--version"], timeout=10)
        first = res.out.splitlines()[0] if res.out else ""
        return first.replace("runc version", "").strip()

    async def state(self, name: str) -> ContainerState | None:
        res = await proc.run(self._argv("state", name), timeout=15, check=False)
        if res.returncode != 0:
            if "does not exist" in res.err or "not exist" in res.err:
                return None
            raise RuntimeToolError(
                f"runc state {name} failed: {res.err.strip()}", argv=res.argv, returncode=res.returncode, stderr=res.err
            )
        data = json.loads(res.out)
        return ContainerState(id=data["id"], pid=int(data.get("pid", 0)), status=data["status"], bundle=Path(data["bundle"]))

    async def require(self, name: str) -> ContainerState:
        st = await self.state(name)
        if st is None:
            from tug.engine.runtime.podman import not_runc_hint

            raise ConfigError(f"container {name!r} not found on this host (runc root {self.root}){await not_runc_hint(name)}")
        return st

    def visible_spec(self, raw: bytes) -> bytes:
        """The container's spec as a migration sees it (podman's drops its own mounts)."""
        return raw

    async def containers(self) -> list[ContainerState]:
        res = await proc.run(self._argv("list", "--format", "json"), timeout=15)
        items = json.loads(res.out or "null") or []
        return [
            ContainerState(id=i["id"], pid=int(i.get("pid", 0)), status=i["status"], bundle=Path(i["bundle"]))
            for i in items
        ]

    async def pids(self, name: str) -> list[int]:
        """Host pids of every process in the container, running or frozen.

        Read from the cgroup runc recorded (what ``runc ps`` reads too, but
        that is a process start of ~10 ms of CPU, and the pre-copy rounds ask
        every round), else from ``runc ps``."""
        return await self.cgroup_pids(name, await asyncio.to_thread(self.freezer, name))

    async def _ps(self, name: str) -> list[int]:
        res = await proc.run(self._argv("ps", "--format", "json", name), timeout=15)
        return [int(p) for p in json.loads(res.out or "[]")]

    async def pause(self, name: str) -> None:
        await proc.run(self._argv("pause", name), timeout=30)

    def freezer(self, name: str) -> Freezer | None:
        """The container's freezer cgroup, as runc recorded it (read before a freeze)."""
        return Freezer.locate(self.root / self._id(name) / "state.json")

    async def freeze(self, name: str, freezer: Freezer | None) -> None:
        """Pause ``name`` through ``freezer`` itself (runtime/freezer.py), else with runc."""
        if freezer is not None and await asyncio.to_thread(freezer.freeze):
            return
        await self.pause(name)

    async def cgroup_pids(self, name: str, freezer: Freezer | None) -> list[int]:
        """Host pids of the container's processes (from its cgroup, else runc ps);
        frozen or not, ``freezer`` as found before the freeze."""
        if freezer is not None:
            with contextlib.suppress(OSError, ValueError):
                return await asyncio.to_thread(freezer.pids)
        return await self._ps(name)

    async def resume(self, name: str) -> None:
        await proc.run(self._argv("resume", name), timeout=30)

    async def kill(self, name: str, sig: int = _signal.SIGTERM) -> None:
        await proc.run(self._argv("kill", name, str(int(sig))), timeout=15)

    async def delete(self, name: str, *, force: bool = True) -> None:
        args = ["delete", "--force", name] if force else ["delete", name]
        await proc.run(self._argv(*args), timeout=60)

    async def forget(self, name: str) -> bool:
        """Remove what a ``runc restore`` killed half way left in the state root.

        runc then no longer knows the container (``state`` says it does not
        exist) but its state directory, with the rootfs bind-mounted at
        ``criu-root``, remains, and the next restore of that name fails with
        "container with given ID already exists". Only for a container runc
        does not know: a live one is never touched.
        """
        leftover = self.root / name
        if not leftover.exists() or await self.state(name) is not None:
            return False
        remove_tree(leftover)
        return True

    async def run_detached(self, name: str, bundle: Path) -> None:
        """Start a container whose stdio is /dev/null.

        CRIU cannot dump fds that point at deleted files or at our pipes, so
        the container gets /dev/null; runc's own errors go to its --log file.
        """
        log = self._log_file(name)
        argv = [self.binary, "--root", str(self.root), "--log", str(log), "run", "-d", "--bundle", str(bundle), name]
        try:
            await proc.run(argv, timeout=60, stdout_devnull=True)
        except RuntimeToolError as exc:
            raise RuntimeToolError(
                f"runc run {name} failed: {self._tail(log) or exc}", argv=argv, returncode=exc.returncode
            ) from None

    def checkpoint_argv(
        self,
        name: str,
        *,
        image_dir: Path,
        work_dir: Path,
        pre_dump: bool = False,
        tcp_established: bool = False,
        page_server: str | None = None,
        parent_path: str | None = None,
        lazy_status_fd: int | None = None,
        criu: Path | None = None,
    ) -> list[str]:
        """``runc checkpoint`` for a frozen final dump or a pre-dump (pure).

        A pre-dump never stops the container and dumps no sockets, so it gets
        neither ``--leave-running`` nor ``--tcp-established``. With
        ``lazy_status_fd`` the dump is lazy: CRIU keeps the memory in the frozen
        processes and serves it on ``page_server`` (it listens there), saying
        on that fd when it is ready (see source/lazydump.py).
        """
        if parent_path is not None and (parent_path.startswith("/") or not parent_path):
            raise ConfigError(f"--parent-path must be relative to the image dir, got {parent_path!r}")
        argv = self._argv("checkpoint", "--pre-dump" if pre_dump else "--leave-running")
        if criu is not None:  # a gate in front of CRIU (criu/gate.py): a global flag, before the command
            argv[1:1] = ["--criu", str(criu)]
        argv += ["--image-path", str(image_dir), "--work-path", str(work_dir)]
        if tcp_established and not pre_dump:
            argv.append("--tcp-established")
        if page_server is not None:
            argv += ["--page-server", page_server]
        if parent_path is not None:
            argv += ["--parent-path", parent_path]
        if lazy_status_fd is not None:
            argv += ["--lazy-pages", "--status-fd", str(lazy_status_fd)]
        # A dump started before the freeze (criu is a gate) cannot know yet:
        # with the flag CRIU carries whichever locks there are, and none is fine.
        if not pre_dump and (name in self.file_locks or criu is not None):
            argv.append("--file-locks")
        argv.append(name)
        return argv

    def dump_env(self, name: str, work_dir: Path, gate: CriuGate | None = None) -> dict[str, str] | None:
        """The environment of a frozen dump of ``name`` (None: ours)."""
        return criu_env(work_dir, net_held=name in self.net_held, gate=gate)

    async def checkpoint_frozen(
        self,
        name: str,
        *,
        image_dir: Path,
        work_dir: Path,
        tcp_established: bool = False,
        page_server: str | None = None,
        parent_path: str | None = None,
        timeout: float = 300,
    ) -> None:
        """Dump a *paused* container and leave it paused (see module doc).

        With ``page_server`` the memory goes there; with ``parent_path`` too,
        pages unchanged since that pre-dump are sent as holes.
        """
        await self._checkpoint(
            name, "checkpoint", image_dir, work_dir, timeout,
            tcp_established=tcp_established, page_server=page_server, parent_path=parent_path,
        )

    async def predump(
        self,
        name: str,
        *,
        image_dir: Path,
        work_dir: Path,
        page_server: str,
        parent_path: str | None = None,
        timeout: float = 300,
    ) -> None:
        """Pre-dump a running container's memory (needs kernel soft-dirty).

        CRIU freezes the container only to collect its pages and tracks what
        it writes from then on; the next pre-dump (or the final dump) with
        ``parent_path`` sends only the pages written since.
        """
        await self._checkpoint(
            name, "pre-dump", image_dir, work_dir, timeout,
            pre_dump=True, page_server=page_server, parent_path=parent_path,
        )

    async def prestart_checkpoint(
        self, name: str, *, image_dir: Path, work_dir: Path, page_server: str | None, parent_path: str | None,
        timeout: float = 300,
    ) -> bool:
        """Before the freeze: start the frozen dump's runc, its CRIU held at a gate
        until :meth:`checkpoint_frozen` asks for the same dump (runtime/gateddumps.py)."""
        return await self.gated.start(
            name, (image_dir, work_dir, page_server, parent_path), work_dir / "gate",
            lambda gate: self._checkpoint(name, "checkpoint", image_dir, work_dir, timeout, tcp_established=True,
                                          page_server=page_server, parent_path=parent_path, gate=gate),
        )

    async def _checkpoint(
        self, name: str, action: str, image_dir: Path, work_dir: Path, timeout: float,
        gate: CriuGate | None = None, **kw: Any,
    ) -> None:
        key = (image_dir, work_dir, kw.get("page_server"), kw.get("parent_path"))
        if gate is None and not kw.get("pre_dump") and await self.gated.run(name, key):
            return
        image_dir.mkdir(parents=True, exist_ok=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        argv = self.checkpoint_argv(name, image_dir=image_dir, work_dir=work_dir,
                                    criu=gate.shim if gate is not None else None, **kw)
        env = None if kw.get("pre_dump") else self.dump_env(name, work_dir, gate)
        try:
            # Timed out or cancelled: CRIU is interrupted first, so that it cures
            # its parasites and re-freezes the container before anything is killed.
            await proc.run(argv, timeout=timeout, stop=DUMP_STOP, env=env, watch=kill_orphaned_probes)
        except RuntimeToolError as exc:
            raise error_from_tool(exc, f"{action} of {name}", work_dir / "dump.log") from None

    async def restore_detached(
        self,
        name: str,
        *,
        bundle: Path,
        image_dir: Path,
        work_dir: Path,
        tcp_established: bool = False,
        lazy_pages: bool = False,
        file_locks: bool = False,
        net_held: bool = False,
        gate: CriuGate | None = None,
        timeout: float = 300,
    ) -> int:
        """Restore detached; returns the container's pid (from runc's pid file:
        a ``runc state`` would be one more process start in the frozen window).
        CRIU options runc lacks (e.g. tcp-close) go in a
        CRIU config file named by the bundle's ``org.criu.config`` annotation.
        With ``lazy_pages`` a ``criu lazy-pages`` daemon must already serve
        ``work_dir`` (see lazypages.py). ``net_held``: tug holds the restored
        namespace's network until the restore is over, so CRIU's lock is
        skipped (criu/netlockskip.py)."""
        work_dir.mkdir(parents=True, exist_ok=True)
        pid_file = work_dir / "restored.pid"
        pid_file.unlink(missing_ok=True)
        argv = self._argv(
            "restore", "-d", "--image-path", str(image_dir), "--work-path", str(work_dir), "--bundle", str(bundle),
            "--pid-file", str(pid_file),
        )
        if gate is not None:  # its CRIU waits for the restore call (destination/prestart.py)
            argv[1:1] = ["--criu", str(gate.shim)]
        if tcp_established:
            argv.append("--tcp-established")
        if lazy_pages:
            argv.append("--lazy-pages")
        if file_locks:
            argv.append("--file-locks")
        argv.append(name)
        try:
            await proc.run(argv, timeout=timeout, stdout_devnull=True, env=criu_env(work_dir, net_held=net_held, gate=gate),
                           watch=kill_orphaned_probes)
        except RuntimeToolError as exc:
            raise error_from_tool(exc, f"restore of {name}", work_dir / "restore.log") from None
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise RuntimeToolError(f"runc restore of {name} wrote no pid to {pid_file}: {exc}", argv=argv) from None

    def _log_file(self, name: str) -> Path:
        d = self.log_dir or (self.root / "logs")
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{name}.log"

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""


def criu_env(work_dir: Path, *, net_held: bool, gate: CriuGate | None) -> dict[str, str] | None:
    """The environment a runc call hands its CRIU: CRIU's network lock skipped
    (criu/netlockskip.py), a gate in front of it (criu/gate.py); None: ours."""
    env = {**(skip_env(work_dir) if net_held else {}), **(gate.env if gate is not None else {})}
    return env or None


def require_runc() -> str:
    from shutil import which

    found = which("runc")
    if not found:
        raise PreconditionError("runc: not installed (apt-get install runc, or run scripts/setup.sh)")
    return found


def is_root() -> bool:
    return os.geteuid() == 0
