"""Child processes with deadlines, and no orphans.

Every external tool (runc, criu, tc, ssh-keygen) goes through :func:`run` so
that a timeout or a cancelled task always kills and reaps the whole process
group: a half-finished ``runc checkpoint`` left running would keep the source
container frozen behind our back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tug.engine.errors import PreconditionError, RuntimeToolError


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the child's process group and wait for the child itself."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


async def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 60.0,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdout_devnull: bool = False,
) -> Completed:
    """Run ``argv`` to completion; raise :class:`RuntimeToolError` on failure.

    The child gets its own session so that the group kill on timeout or
    cancellation reaches grandchildren too (runc spawns criu, criu spawns
    helpers). Cancellation is honoured, but the reaping is shielded.
    """
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL if stdout_devnull else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise PreconditionError(f"{argv[0]}: command not found (run 'tug doctor')") from exc
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate(input)
    except TimeoutError:
        await asyncio.shield(_kill_group(proc))
        raise RuntimeToolError(
            f"{' '.join(argv[:3])} timed out after {timeout:g} s", argv=argv, returncode=None
        ) from None
    except BaseException:
        await asyncio.shield(_kill_group(proc))
        raise
    result = Completed(argv=tuple(argv), returncode=proc.returncode or 0, stdout=stdout or b"", stderr=stderr or b"")
    if check and result.returncode != 0:
        msg = (result.err.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise RuntimeToolError(
            f"{os.path.basename(argv[0])} {argv[1] if len(argv) > 1 else ''} failed: {msg}".replace("  ", " "),
            argv=argv,
            returncode=result.returncode,
            stderr=result.err,
        )
    return result
