"""The source's side of a link lost during the fill: reconnect and reattach.

Why (issue 10, "the commit point, stated and kept"): once the destination's
processes run, the source never resumes, so a dropped SSH connection during
the lazy fill must not end the migration. The fill's byte streams survive on
both hosts (transports/tunnel.py, engine/destination/relay.py) and the agent
waits (engine/destination/reattach.py); this module opens a fresh SSH
connection within the recovery deadline, retrying with backoff, and starts a
new session with the waiting agent over it. If the deadline passes, the
caller fails as before the recovery existed: both sides stay frozen and the
error names ``tug recover``.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable
from typing import Any

from tug.engine.errors import MigrationError, ProtocolError, TransportError
from tug.engine.hostcfg import HostConfig
from tug.engine.options import MigrationOptions
from tug.engine.source.container import open_session
from tug.transports import protocol as p
from tug.transports.session import Session
from tug.transports.ssh import AgentProcess, SshTarget, default_agent_command

#: First and longest pause between two reconnect attempts.
BACKOFF_S = (0.2, 2.0)


def attach_command(opts: MigrationOptions, path: str) -> str:
    base = opts.agent_command or default_agent_command()
    return f"{base} --attach {shlex.quote(path)}"


async def reattach(
    target: SshTarget,
    opts: MigrationOptions,
    host: HostConfig,
    attach: dict[str, Any],
    *,
    on_notice: Callable[[p.Notice], None],
    deadline: float,
) -> tuple[AgentProcess, Session]:
    """A new SSH connection and session with the agent waiting at ``attach`` (its path and token)."""
    path, token = attach.get("path"), attach.get("token")
    if not isinstance(path, str) or not isinstance(token, str):
        raise ProtocolError("the agent gave no place to reattach")
    pause, last = BACKOFF_S[0], "no attempt"
    while (left := deadline - time.monotonic()) > 0:
        try:
            agent, session, _ = await open_session(
                target, opts, host, info={"reattach": True}, on_notice=on_notice,
                agent_command=attach_command(opts, path), connect_timeout=max(1.0, min(opts.connect_timeout, left)),
                preamble=token.encode() + b"\n",
            )
            return agent, session
        except MigrationError as exc:
            last = str(exc)
        await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(pause * 2, BACKOFF_S[1])
    raise TransportError(f"the link did not come back within {opts.link_recovery:g} s (last attempt: {last})")
