"""Running one command of the CLI: its coroutine, its signals, its exit.

Shared by :mod:`tug.engine.cli` and the lab's commands. SIGINT and SIGTERM
only cancel the command (the engine then rolls back and reports); SIGUSR1
prints where every task waits, for a report of a hang.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from typing import Any, NoReturn


def die(msg: str, code: int = 1) -> NoReturn:
    print(f"tug: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _dump_tasks() -> None:
    for t in asyncio.all_tasks():
        print(f"--- task {t.get_name()}", file=sys.stderr)
        t.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def run(coro: Any) -> Any:
    # A command's objects made so far (modules, classes, the parsed options)
    # live as long as it does: out of every later collection. The migration
    # itself makes containers per packet and per page run, and full
    # collections kept walking all of this (~2% of a migration's CPU).
    gc.collect()
    gc.freeze()

    async def main() -> Any:
        # SIGTERM (what service managers and orchestrators send) ends a
        # migration like Ctrl-C: cancelled, rolled back, the source resumed.
        # Both only cancel: a second one during the rollback must not abort
        # it half way (asyncio's own SIGINT handler raises KeyboardInterrupt
        # on the second Ctrl-C), and the engine finishes the rollback first.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        # SIGUSR1: where every task waits, on stderr (for a report of a hang).
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        try:
            return await coro
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        import uvloop
    except ImportError:  # only the import: an ImportError from inside coro must surface
        return asyncio.run(main())
    return uvloop.run(main())
