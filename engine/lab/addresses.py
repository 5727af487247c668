"""Container addresses in the lab: one per container name, kept across moves.

The table lives in the lab's run dir under a file lock, since several lab
users (tests, a benchmark, a person) start containers at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator

from tug.engine.errors import ConfigError
from tug.engine.lab.layout import ADDRESSES, POOL, RUN_DIR, SUBNET


def _address_table() -> dict[str, str]:
    try:
        table: dict[str, str] = json.loads(ADDRESSES.read_text())
    except (OSError, ValueError):
        return {}
    return table


@contextlib.contextmanager
def _addresses_locked() -> Iterator[dict[str, str]]:
    """The address table under an exclusive lock; changes are written back.

    Several lab users (tests, a benchmark, a person) start containers at
    once: without the lock two of them could be handed the same address.
    """
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / "addresses.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _address_table()
        before = dict(table)
        yield table
        if table != before:
            tmp = ADDRESSES.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=2))
            tmp.replace(ADDRESSES)


def address_of(container: str, *, allocate: bool = False) -> str:
    """The lab address of a container, kept for its whole life in the lab."""
    table = _address_table()
    if container in table:
        return table[container]
    if not allocate:
        raise ConfigError(f"no lab address for container {container!r} (start it with 'tug lab demo')")
    with _addresses_locked() as table:
        if container in table:
            return table[container]
        used = set(table.values())
        for i in POOL:
            addr = f"{SUBNET}.{i}"
            if addr not in used:
                table[container] = addr
                return addr
    raise ConfigError("the lab's container address pool is exhausted (remove containers with 'tug lab rm')")


def release_address(container: str) -> None:
    with _addresses_locked() as table:
        table.pop(container, None)
