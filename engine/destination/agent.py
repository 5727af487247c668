"""The destination agent: ``python -m tug.engine.agent``, started over SSH.

It speaks the tug protocol on stdin/stdout, obeys the source, and reports.
It owns everything it creates on this host until the source commits: if the
session ends before commit (source crashed, link lost, rollback), the agent
removes the bundle, the images and any container it restored, and kills and
reaps any CRIU page server it started, so a failed migration leaves nothing
behind here (no process, no listening port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tug.engine.criu import tool as criu
from tug.engine.criu.pageserver import NOT_FLUSHED
from tug.engine.destination.incoming import (
    INCOMING_MARKER,
    Incoming,
    check_name,
    stop_criu_daemons,
)
from tug.engine.destination.restore import RestoreCalls
from tug.engine.destination.staging import StagingCalls
from tug.engine.errors import MigrationError, PreconditionError, ProtocolError
from tug.engine.fsutil import remove_tree
from tug.engine.hostcfg import HostConfig
from tug.engine.runtime.network import EndpointSpec
from tug.transports import protocol as p
from tug.transports.session import Session

log = logging.getLogger("tug.agent")

SOFTWARE = "tug-agent/0.1"


class Agent(StagingCalls, RestoreCalls):
    """Dispatch, preflight, abort and cleanup; the call groups do the rest."""

    # ---- dispatch ----------------------------------------------------------

    async def handle_call(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        fn = getattr(self, f"call_{method}", None)
        if fn is None:
            raise ProtocolError(f"agent has no method {method!r}")
        log.info("call %s %s", method, {k: v for k, v in args.items() if not isinstance(v, (bytes, list))})
        result: dict[str, Any] = await fn(**args)
        return result

    # ---- calls -------------------------------------------------------------

    async def call_preflight(
        self, container: str, criu_version: str, cpuinfo: bytes = b"", network: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Can this host take ``container``? Nothing is changed here."""
        check_name(container)
        if network is not None:
            EndpointSpec.from_dict(network)
            if self.host.network is None:
                raise PreconditionError(
                    f"{container!r} has a network endpoint, but {self.host.name} has no bridge for it (set TUG_BRIDGE)"
                )
            if self.host.network.netns_path(container).exists() and not self.host.bundle_dir(container).exists():
                raise PreconditionError(f"destination {self.host.name} already has network namespace {self.host.network.netns(container)}")
        if os.geteuid() != 0:
            raise PreconditionError(f"the agent on {self.host.name} is not root")
        version = await criu.version()
        if not version.supported:
            raise PreconditionError(f"CRIU {version} on {self.host.name} is too old; need >= 4.2")
        runc_version = await self.runc.version()
        if await self.runc.state(container) is not None:
            raise PreconditionError(f"destination {self.host.name} already runs a container named {container!r}")
        bundle = self.host.bundle_dir(container)
        if bundle.exists() and not (bundle / INCOMING_MARKER).exists():
            raise PreconditionError(f"destination {self.host.name} already has a bundle for {container!r} at {bundle}")
        if cpuinfo:
            with tempfile.TemporaryDirectory(prefix="tug-cpuinfo-") as d:
                Path(d, "cpuinfo.img").write_bytes(cpuinfo)
                problem = await criu.cpuinfo_check(Path(d))
            if problem:
                raise PreconditionError(f"CPU of {self.host.name} cannot run this dump: {problem}")
        return {
            "host": self.host.name, "criu": str(version), "runc": runc_version, "bundle": str(bundle),
            # Can restores here run before their memory is in place (lazypages.py)?
            "lazy_restore": await criu.has_feature("uffd-noncoop"),
        }

    async def call_abort(self, container: str) -> dict[str, Any]:
        """Roll back: clean up; the answer carries the frames held here (they go back
        to the source) and which page servers had died on their own."""
        inc = self.incoming.get(container)
        frames = inc.endpoint.take_held() if inc is not None and inc.endpoint is not None else []
        failed: list[str] = []
        if inc is not None:
            failed = await self._cleanup(inc)
        return {"aborted": inc is not None, "frames": frames, "page_servers": failed}

    # ---- cleanup -----------------------------------------------------------

    async def _cleanup(self, inc: Incoming) -> list[str]:
        """Undo everything done for an uncommitted container.

        Returns how page servers that died on their own ended (their logs
        are kept); a server whose client merely went away is not news.
        """
        self.incoming.pop(inc.name, None)
        failed: list[str] = []
        for ps in inc.page_servers.values():
            if ps.failed_on_its_own and not ps.reported:
                err = ps.failure(kept_log=self._keep_log(inc, ps.log.name))
                if not any(NOT_FLUSHED in ln for ln in err.error_lines):
                    failed.append(str(err))
        await stop_criu_daemons(inc)
        if inc.store is not None:
            inc.store.close()
        if inc.committed:
            if inc.endpoint is not None:
                await inc.endpoint.close()
            return failed
        if inc.endpoint is not None:
            # Cut off first: the killed container's sockets would send resets
            # to peers the resumed source still talks to.
            await inc.endpoint.cut_off()
        with contextlib.suppress(MigrationError):
            if await self.runc.state(inc.name) is not None:
                await self.runc.delete(inc.name, force=True)
            if await self.runc.forget(inc.name):
                log.warning("removed the state a killed restore of %s left behind", inc.name)
        if inc.endpoint is not None:
            await inc.endpoint.remove()
        shutil.rmtree(inc.bundle, ignore_errors=True)
        remove_tree(inc.work)
        log.info("cleaned up uncommitted %s", inc.name)
        return failed

    async def cleanup_all(self) -> None:
        for inc in list(self.incoming.values()):
            await self._cleanup(inc)


class _PipeStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(1 << 20)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()


async def _stdio_stream() -> _PipeStream:
    """Protocol on the original stdin/stdout; stray prints go to stderr."""
    loop = asyncio.get_running_loop()
    out_fd = os.dup(1)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0))
    transport, proto = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, proto, reader, loop)
    return _PipeStream(reader, writer)


async def serve(host: HostConfig | None = None) -> None:
    host = host or HostConfig.from_env()
    agent = Agent(host)
    stream = await _stdio_stream()
    session = Session(stream, p.Role.AGENT, handler=agent)
    try:
        info = {"criu": str(await criu.version()), "runc": await agent.runc.version(), "pid": os.getpid()}
        await session.start(software=SOFTWARE, host=host.name, info=info)
        await session.wait_closed()
    except MigrationError as exc:
        log.error("session ended: %s", exc)
    finally:
        await asyncio.shield(agent.cleanup_all())
        await session.close()


def main() -> None:
    host = HostConfig.from_env()
    logs = host.data_dir / "logs"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    with contextlib.suppress(OSError):
        logs.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logs / "agent.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent[%(process)d] %(message)s", handlers=handlers)
    try:
        import uvloop
    except ImportError:  # only the import: an ImportError from inside serve() must surface
        asyncio.run(serve(host))
        return
    uvloop.run(serve(host))


if __name__ == "__main__":
    main()
