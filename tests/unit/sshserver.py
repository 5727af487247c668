"""An in-process asyncssh server for transport tests: key-only, one fresh
host key and client key per test, and a silent stand-in for the tug agent."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh


async def quiet_agent(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Stands in for the tug agent: says nothing, waits for stdin to close."""
    await process.stdin.read()
    process.exit(0)


async def start_server(
    tmp_path: Path, *, server_factory: Callable[[], asyncssh.SSHServer] | None = None,
    process_factory: Callable[[asyncssh.SSHServerProcess[bytes]], Any] = quiet_agent, **options: Any,
) -> tuple[asyncssh.SSHAcceptor, asyncssh.SSHKey, Path]:
    """A server on 127.0.0.1 (any port), its host key, and the client's identity file."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    ident = tmp_path / "id"
    ident.write_bytes(client_key.export_private_key())
    os.chmod(ident, 0o600)
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        server_factory=server_factory,
        process_factory=process_factory,
        encoding=None,
        **options,
    )
    return server, host_key, ident


def known_hosts(tmp_path: Path, port: int, host_key: asyncssh.SSHKey) -> Path:
    """A known_hosts file that trusts ``host_key`` on 127.0.0.1:``port``."""
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n")
    return known
