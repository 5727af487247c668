"""The source's lazy dump: CRIU keeps the frozen container's memory and serves it.

``runc checkpoint --lazy-pages`` dumps everything but the memory, then CRIU
stays, holding the container's processes stopped (ptrace; the cgroup freezer
is thawed meanwhile), and serves their pages to whichever ``criu lazy-pages``
daemon connects to its page-server address, until that daemon says it has
them all. Then CRIU lets go: with ``--leave-running`` on a paused container it
puts the freezer back to FROZEN, so the source stays frozen (see runc.py), as
the commit point wants: after the destination ran, the source never resumes.

Two things here are not CRIU's defaults, for safety:

- CRIU's lazy server listens on 0.0.0.0 whatever address it is given
  (measured: runc 1.1.5, CRIU 4.2.1), so anyone who can reach the host could
  read the frozen container's memory. runc and CRIU run here in a network
  namespace of their own that holds only loopback; tug connects into it
  from a thread that entered it (runtime/network.py ``connect_in_netns``),
  and the only way in from the destination is tug's vetted reverse forward.
- CRIU is never SIGKILLed while it serves: that would release the processes
  while the freezer is thawed (a second running copy). It is stopped the way
  CRIU supports (SIGALRM, criu/tool.py ``DUMP_STOP``), which re-freezes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path

from tug.engine import proc
from tug.engine.criu.daemon import read_status, spawn_with_status_fd
from tug.engine.criu.gate import CriuGate
from tug.engine.criu.tool import DUMP_STOP, error_lines_from_text, log_error_lines, runs_criu
from tug.engine.errors import CriuError
from tug.engine.proc import reap_group
from tug.engine.runtime.network import connect_in_netns
from tug.engine.runtime.runc import Runc
from tug.transports.criu_pageserver import HEADER, PS_IOV_CLOSE

#: Where CRIU listens inside the dump's private network namespace (nothing else lives there).
LAZY_PORT = 27182
#: The shell step that gives the namespace a working loopback before runc starts.
_LO_UP = 'ip link set lo up && exec "$@"'


def lazy_dump_argv(runc_argv: list[str]) -> list[str]:
    """``runc checkpoint --lazy-pages`` in a fresh network namespace (pure, for tests)."""
    return ["unshare", "--net", "--", "sh", "-c", _LO_UP, "tug-lazy-dump", *runc_argv]


class LazyDump:
    def __init__(self, runc: Runc, name: str, *, image_dir: Path, work_dir: Path) -> None:
        self.runc = runc
        self.name = name
        self.image_dir = image_dir
        self.work_dir = work_dir
        self.log = work_dir / "dump.log"
        self.argv: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reaper: asyncio.Task[tuple[bytes, bytes]] | None = None
        #: Our idle connection to CRIU's lazy server (hold()).
        self._held: socket.socket | None = None
        #: The read end of CRIU's status pipe, until its ready byte is read.
        self._status: int | None = None
        #: Where a dump spawned before the freeze waits (spawn()).
        self.gate: CriuGate | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def netns(self) -> Path:
        """The dump's private network namespace (valid while it runs)."""
        assert self._proc is not None
        return Path(f"/proc/{self._proc.pid}/ns/net")

    async def spawn(self) -> None:
        """Before the freeze: start runc, its CRIU to be held at a gate (criu/gate.py).

        runc's start-up (and the namespace's, and its CRIU checks) then runs
        while the container still does; :meth:`at_gate` waits until CRIU's
        dump request waits there, and :meth:`start` lets it go once the
        container is frozen.
        """
        self.gate = CriuGate(self.work_dir / "gate")
        self.gate.make()
        await self._spawn()

    async def at_gate(self, timeout: float) -> None:
        """Wait until the spawned dump's CRIU waits at its gate (raises CriuError if it ends first)."""
        assert self.gate is not None and self._reaper is not None, "spawn() first"
        if await self.gate.held_before(self._reaper, timeout):
            return
        ended = self._reaper.done()
        self.abandon()
        await asyncio.shield(asyncio.wait({self._reaper}))
        raise self._failure("ended before its CRIU reached the gate" if ended
                            else f"did not reach its gate within {timeout:g} s")

    async def start(self, timeout: float) -> None:
        """Dump (frozen); return once CRIU serves the memory (raises CriuError if it never does)."""
        if self._proc is None:
            await self._spawn()
        elif self.gate is not None:
            self.gate.release()
        assert self._status is not None and self._proc is not None
        r, self._status = self._status, None
        try:
            async with asyncio.timeout(timeout):
                ready = await read_status(r, self._proc)
        except BaseException:
            await asyncio.shield(self.stop())
            raise
        if ready != b"\0":
            assert self._reaper is not None
            await asyncio.shield(self._reaper)
            raise self._failure("did not start serving")

    async def _spawn(self) -> None:
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        criu = self.gate.shim if self.gate is not None else None

        def argv_for(status_fd: int) -> list[str]:
            return lazy_dump_argv(self.runc.checkpoint_argv(
                self.name, image_dir=self.image_dir, work_dir=self.work_dir, tcp_established=True,
                page_server=f"127.0.0.1:{LAZY_PORT}", lazy_status_fd=status_fd, criu=criu,
            ))  # fmt: skip

        # Not tied to our life: if tug dies, CRIU must end gracefully, not with us (module doc).
        self._proc, self._status, self.argv = await spawn_with_status_fd(
            argv_for, die_with_parent=False, stdout=asyncio.subprocess.PIPE,
            env=self.runc.dump_env(self.name, self.work_dir, self.gate),
        )
        self._reaper = asyncio.create_task(reap_group(self._proc), name=f"tug-lazy-dump-{self._proc.pid}")

    def abandon(self) -> None:
        """A spawned dump whose gate never opened: close it, end runc (no CRIU ran). Idempotent."""
        if self.gate is None or self.gate.opened:
            return
        self.gate.close()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._status is not None:
            os.close(self._status)
            self._status = None

    async def connect(self) -> socket.socket:
        """A socket connected to CRIU's lazy server (for the reverse forward)."""
        return await asyncio.to_thread(connect_in_netns, self.netns, LAZY_PORT)

    async def hold(self) -> None:
        """Be CRIU's one client without asking it anything (hybrid: tug reads the frozen memory itself).

        A lazy server nobody connected to ignores a graceful stop's aftermath
        badly (seen: CRIU gone after SIGALRM, ``runc checkpoint`` waiting
        forever); a connected one ends its dump the supported way, and so it
        does when tug dies and the connection closes (as when post-copy's
        daemon loses its link): the processes are re-frozen, never let run.
        """
        if self._held is None:
            try:
                self._held = await self.connect()
            except OSError as exc:
                raise self._failure(f"could not be reached: {exc}") from None

    async def goodbye(self, timeout: float = 10.0) -> None:
        """Tell CRIU's lazy server that every page is in place, as the lazy-pages daemon would.

        For a fill CRIU did not serve (hybrid, pre-copy's pushed eager step):
        ``PS_IOV_CLOSE`` on the held connection (:meth:`hold`) and our end of
        stream, then its status read; CRIU then ends its dump (see :meth:`finish`).
        """
        if not self.running:
            raise self._failure("had ended before the fill did")
        await self.hold()
        sock, self._held = self._held, None
        assert sock is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendall(sock, HEADER.pack(PS_IOV_CLOSE, 0, 0, 0))
                # CRIU corks this socket (criu/page-xfer.c page_server_serve), so
                # its 4-byte answer would wait ~200 ms for TCP's timer; it goes
                # out at once when CRIU closes, which it does once it reads our
                # end of stream after the CLOSE.
                sock.shutdown(socket.SHUT_WR)
                status = b""
                while len(status) < 4 and (got := await loop.sock_recv(sock, 4 - len(status))):
                    status += got
        except TimeoutError:
            raise self._failure(f"did not answer the end of the fill within {timeout:g} s") from None
        except OSError as exc:
            raise self._failure(f"broke the connection that ends the fill: {exc}") from None
        finally:
            sock.close()
        if status != b"\0\0\0\0":
            raise self._failure(f"answered the end of the fill with {status.hex() or 'nothing'}")

    async def finish(self, timeout: float) -> None:
        """The destination has every page: CRIU ends on its own (raises CriuError if it fails)."""
        if self._reaper is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._reaper)
        except TimeoutError:
            await asyncio.shield(self.stop())
            raise self._failure(f"was still serving {timeout:g} s after the destination had every page") from None
        assert self._proc is not None
        if self._proc.returncode != 0:
            raise self._failure(f"exited with {self._proc.returncode}")

    async def stop(self) -> None:
        """End it gracefully (CRIU re-freezes the processes), then reap it. Idempotent."""
        self.abandon()
        if self._proc is None:
            return
        if self._proc.returncode is None:
            await proc.stop_group(self._proc, DUMP_STOP)
        if self._reaper is not None:
            await asyncio.shield(asyncio.wait({self._reaper}))
        if self._held is not None:
            self._held.close()
            self._held = None

    def _failure(self, what: str) -> CriuError:
        err = b""
        if self._reaper is not None and self._reaper.done() and not self._reaper.cancelled():
            _, err = self._reaper.result()
        stderr = (err or b"").decode(errors="replace")
        lines = log_error_lines(self.log) or error_lines_from_text(stderr) or stderr.splitlines()[-1:]
        return CriuError(
            f"the lazy dump of {self.name} {what}",
            argv=self.argv,
            returncode=self._proc.returncode if self._proc is not None else None,
            stderr=stderr,
            log_path=self.log if self.log.exists() else None,
            error_lines=lines,
        )


async def release_from_dump(init_pid: int, grace: float = DUMP_STOP.grace) -> bool:
    """Stop a CRIU still holding the container whose init is ``init_pid`` (ptrace).

    A ``tug migrate`` killed while its lazy dump served leaves runc and CRIU
    behind, the processes stopped under ptrace and the freezer thawed (runc
    says "running"). SIGALRM is how CRIU stops cleanly: it re-freezes them.
    Returns whether there was one. Only a CRIU binary tracer is signalled.
    """
    tracer = tracer_of(init_pid)
    if tracer is None or not runs_criu(tracer):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(tracer, signal.SIGALRM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline and tracer_of(init_pid) == tracer:
        await asyncio.sleep(0.05)
    if tracer_of(init_pid) == tracer:
        raise CriuError(f"CRIU (pid {tracer}) still holds the container's processes {grace:g} s after SIGALRM")
    return True


def tracer_of(pid: int) -> int | None:
    """The pid of the process tracing ``pid`` (CRIU while it holds the container), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                tracer = int(line.split()[1])
                return tracer or None
    except (OSError, ValueError):
        return None
    return None
