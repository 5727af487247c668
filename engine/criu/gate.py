"""A gate between runc and the CRIU it runs: runc's start-up happens before the freeze.

``runc checkpoint`` spends 25-35 ms (measured here) before CRIU starts to
dump: the Go runtime, reading the container's state, a first CRIU run for its
version check, building the request. None of that depends on the container
being frozen, yet all of it sat inside the downtime. With the gate, runc is
started before the freeze and CRIU waits for it; the freeze then only has to
let CRIU go.

runc runs whatever its ``--criu PATH`` names as ``PATH swrk FD``, the request
waiting on that fd (a seqpacket socket; 3 for the dump, another for the
version check runc makes through go-criu). The gate is a small script there
(:data:`SHIM`). It peeks at the request's type without taking it:

- a version, feature or check request (runc's checks) runs CRIU at once;
- a dump (or, for a restore started early, the restore) waits: the script says so on the ``held`` fifo, then reads one byte
  from ``go``. ``1`` runs CRIU with the same arguments, and CRIU reads the
  request as if nothing had happened. Anything else, or the end of the fifo
  (tug closed the gate, or died), ends the script with an error: runc fails
  and nothing was dumped;
- any other request, or one it cannot read, fails the same way. A dump must
  never start before the freeze: CRIU would freeze the container itself,
  dump it, and let it run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import Any

from tug.engine.criu.tool import criu_binary
from tug.engine.errors import MigrationError

#: CRIU's request types (images/rpc.proto): what passes at once, what waits.
REQ_DUMP, REQ_RESTORE, REQ_CHECK, REQ_FEATURE_CHECK, REQ_VERSION = 1, 2, 3, 9, 10

SHIM = """\
import os, socket, sys
PASS, HOLD = {passes}, {holds}
real, gate = os.environ["TUG_CRIU_REAL"], os.environ["TUG_CRIU_GATE"]
sk = socket.socket(fileno=os.dup(int(sys.argv[2])))  # "swrk FD": runc's version check passes its own fd
head = sk.recv(8, socket.MSG_PEEK)
sk.close()
kind = head[1] if len(head) >= 2 and head[0] == 0x08 and head[1] < 0x80 else -1
if kind in HOLD:
    # Non-blocking opens: with tug's ends gone, never wait (ENXIO, or EOF below).
    # "go" is open before "held" is said: what tug writes to it once it has
    # read "held" stays readable even after tug closed its end.
    go = os.open(os.path.join(gate, "go"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        held = os.open(os.path.join(gate, "held"), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        sys.exit("tug's CRIU gate: closed before the freeze, nothing dumped")
    os.write(held, b"%d\\n" % os.getpid())
    os.close(held)
    os.set_blocking(go, True)
    if os.read(go, 1) != b"1":
        sys.exit("tug's CRIU gate: closed before the freeze, nothing dumped")
    os.close(go)
elif kind not in PASS:
    sys.exit("tug's CRIU gate: unexpected CRIU request type %d" % kind)
os.execv(real, [real] + sys.argv[1:])
"""


class CriuGate:
    """One gated runc call's gate: its script, its fifos, and the two ends tug holds."""

    def __init__(self, directory: Path, *, hold: int = REQ_DUMP) -> None:
        self.dir = directory
        #: The request type that waits (a dump, or a restore: destination/prestart.py).
        self.hold = hold
        self.shim = directory / "criu"
        self._held_fd: int | None = None
        self._go_fd: int | None = None
        self._held: asyncio.Future[int] | None = None
        self.opened = False

    def make(self) -> None:
        """Write the script and the fifos; hold both fifos open (read-write: never an early EOF)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        script = SHIM.format(passes={REQ_CHECK, REQ_FEATURE_CHECK, REQ_VERSION}, holds={self.hold})
        self.shim.write_text(f"#!{sys.executable} -IS\n{script}")
        self.shim.chmod(stat.S_IRWXU)
        for name in ("held", "go"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
            os.mkfifo(self.dir / name, 0o600)
        self._held_fd = os.open(self.dir / "held", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._go_fd = os.open(self.dir / "go", os.O_RDWR | os.O_CLOEXEC)

    @property
    def env(self) -> dict[str, str]:
        return {"TUG_CRIU_REAL": criu_binary(), "TUG_CRIU_GATE": str(self.dir)}

    async def held(self) -> int:
        """Wait until CRIU's dump request waits at the gate; returns the script's pid."""
        assert self._held_fd is not None, "make() first"
        if self._held is None:
            loop = asyncio.get_running_loop()
            self._held = loop.create_future()
            fd, fut = self._held_fd, self._held

            def readable() -> None:
                with contextlib.suppress(BlockingIOError):
                    line = os.read(fd, 64)
                    if line and not fut.done():
                        loop.remove_reader(fd)
                        fut.set_result(int(line.split()[0]))

            loop.add_reader(fd, readable)
        return await asyncio.shield(self._held)

    async def held_before(self, runner: asyncio.Future[Any], timeout: float) -> bool:
        """Whether CRIU's request waits at the gate before ``runner`` (runc, or
        what runs it) ends and within ``timeout``."""
        held = asyncio.ensure_future(self.held())
        try:
            await asyncio.wait({held, runner}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            held.cancel()
        return held.done() and not held.cancelled()

    def open(self) -> None:
        """Let CRIU go (the container is frozen)."""
        if self._go_fd is None:
            raise MigrationError("the CRIU gate was closed before it could open")
        os.write(self._go_fd, b"1")
        self.opened = True

    def release(self) -> None:
        """Let CRIU go and drop tug's ends: what was written stays readable."""
        self.open()
        self.close()

    async def abandon(self, runner: asyncio.Future[Any], timeout: float = 30.0) -> None:
        """Close a gate never opened and wait for ``runner`` to fail (no CRIU ran);
        cancelled if it does not end within ``timeout``."""
        self.close()
        if self.opened:
            return
        with contextlib.suppress(MigrationError, asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(runner), timeout)
        if not runner.done():
            runner.cancel()

    def close(self) -> None:
        """Release tug's ends: a script still waiting reads the end and fails (idempotent)."""
        if self._held_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._held_fd)
            os.close(self._held_fd)
            self._held_fd = None
        if self._go_fd is not None:
            os.close(self._go_fd)
            self._go_fd = None
        if self._held is not None and not self._held.done():
            self._held.cancel()
