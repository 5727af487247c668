"""Frozen dumps whose runc started before the freeze, waiting at their CRIU gates.

The dump's runc runs (start-up, state, its CRIU version check, the request)
while the container still does; its CRIU waits at a gate (criu/gate.py)
until the frozen dump is asked for, with exactly the arguments it was started
with. A dump asked for differently, or never, is abandoned: its gate closes
and runc fails without having run CRIU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tug.engine.criu.gate import CriuGate

#: What a gated dump was started for: image dir, work dir, page server, parent path.
DumpKey = tuple[Path, Path, str | None, str | None]


class GatedDumps:
    def __init__(self) -> None:
        self._by_name: dict[str, tuple[DumpKey, CriuGate, asyncio.Task[None]]] = {}

    async def start(
        self, name: str, key: DumpKey, gate_dir: Path, run: Callable[[CriuGate], Coroutine[Any, Any, None]],
        timeout: float = 60.0,
    ) -> bool:
        """Start ``run(gate)`` and wait until its CRIU waits at the gate.
        False (nothing left running) if it ended first or took longer than ``timeout``."""
        gate = CriuGate(gate_dir)
        gate.make()
        task = asyncio.create_task(run(gate), name=f"tug-gated-dump-{name}")
        self._by_name[name] = (key, gate, task)
        if not await gate.held_before(task, timeout):
            await self.abandon(name)
            return False
        return True

    async def run(self, name: str, key: DumpKey) -> bool:
        """Let ``name``'s gated dump go and wait for it, if it was started for ``key``;
        False if there is none that fits (one that does not is abandoned)."""
        entry = self._by_name.pop(name, None)
        if entry is None:
            return False
        started_for, gate, task = entry
        if started_for != key:
            self._by_name[name] = entry
            await self.abandon(name)
            return False
        gate.release()
        await task
        return True

    async def abandon(self, name: str | None = None) -> None:
        """Close the gates of ``name``'s (or every) dump not let go, and wait for runc to fail. Idempotent."""
        for key in [name] if name is not None else list(self._by_name):
            entry = self._by_name.pop(key, None)
            if entry is None:
                continue
            _, gate, task = entry
            await gate.abandon(task)
