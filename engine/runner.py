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


#: mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next allocation instead of handing it back.

    Why: a migration allocates and frees buffers of one to a few MiB all the
    time (protocol frames, page runs), which glibc's default thresholds map
    and unmap, or trim off the heap, each time: the kernel then zeroes every
    page again on its next first touch. With these, a 1 GiB pre-copy took
    half the page faults on the source (~137,000 instead of ~270,000 for the
    whole tree). Peak RSS stays what the migration had in use at once, plus
    at most the trim threshold. Set in this process only: an environment
    variable (GLIBC_TUNABLES) would reach CRIU and runc too.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its own defaults


def run(coro: Any) -> Any:
    # A command's objects made so far (modules, classes, the parsed options)
    # live as long as it does: out of every later collection. The migration
    # itself makes containers per packet and per page run, and full
    # collections kept walking all of this (~2% of a migration's CPU).
    gc.collect()
    gc.freeze()
    # Young collections every 50,000 allocations instead of 700: per packet
    # and per page run the engine makes short-lived tuples and lists (freed
    # by their reference counts, not by the collector), and collecting every
    # 700 of them walked whatever was alive at the time (perf, 1 GiB
    # pre-copy: gc_collect_main 1.4-1.8% of the source's samples, 0.9-1.1%).
    gc.set_threshold(50_000, 20, 100)
    _keep_freed_memory()

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
