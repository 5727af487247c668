"""Container addresses in the lab: one per container name, kept across moves.

The table lives in the lab instance's run dir under a file lock, since
several lab users (tests, a benchmark, a person) start containers at once.
Each instance has its own table and hands out addresses of its own subnet.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator

from tug.engine.errors import ConfigError
from tug.engine.lab.layout import POOL, Lab, Layout


def address_table(layout: Layout) -> dict[str, str]:
    try:
        table: dict[str, str] = json.loads(layout.addresses_file.read_text())
    except (OSError, ValueError):
        return {}
    return table


@contextlib.contextmanager
def _addresses_locked(layout: Layout) -> Iterator[dict[str, str]]:
    """The address table under an exclusive lock; changes are written back.

    Several lab users (tests, a benchmark, a person) start containers at
    once: without the lock two of them could be handed the same address.
    """
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.addresses_lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = address_table(layout)
        before = dict(table)
        yield table
        if table != before:
            tmp = layout.addresses_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=2))
            tmp.replace(layout.addresses_file)


def address_of(lab: Lab, container: str, *, allocate: bool = False) -> str:
    """The lab address of a container, kept for its whole life in the lab."""
    table = address_table(lab.layout)
    if container in table:
        return table[container]
    if not allocate:
        raise ConfigError(f"no lab address for container {container!r} (start it with 'tug lab demo')")
    with _addresses_locked(lab.layout) as table:
        if container in table:
            return table[container]
        used = set(table.values())
        for i in POOL:
            addr = f"{lab.subnet}.{i}"
            if addr not in used:
                table[container] = addr
                return addr
    raise ConfigError("the lab's container address pool is exhausted (remove containers with 'tug lab rm')")


def release_address(layout: Layout, container: str) -> None:
    with _addresses_locked(layout) as table:
        table.pop(container, None)
