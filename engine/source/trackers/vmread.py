"""Many runs of another process's memory in one call: ``process_vm_readv``.

Why: ``/proc/PID/mem`` reads one run per ``pread``, and inside the kernel
looks up one page at a time and copies each twice (into a bounce page, then
out); ``process_vm_readv`` takes up to IOV_MAX runs per call, pins pages in
batches and copies each once. Measured here (one process reading another's
touched memory into a reused buffer): 512 MiB in 4 MiB reads 0.056-0.077 s
of CPU against 0.09 s; 16384 scattered single pages 0.016 s against 0.035 s
(one call per 1024 pages against a ``pread`` each).

It names the process by pid, not by an open file: a pid freed and reused
meanwhile would be another process. The caller holds the process's pidfd,
opened before anything else of it, and a read counts only if the pidfd
still reports the process alive afterwards: while it lives (a zombie
included) its pid cannot be reused. Whatever this does not read (a run
unmapped or made unreadable meanwhile, the call refused) the caller reads
through ``/proc/PID/mem``, which also reads mappings the process itself
cannot (the kernel's FOLL_FORCE), as before.
"""

from __future__ import annotations

import ctypes
import select
from collections.abc import Sequence

# By name: ctypes.util.find_library runs ldconfig -p (a subprocess) per call.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
#: The iovec counts and flags are unsigned long: without argtypes, ctypes would pass C ints.
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_ulong]
#: The kernel's limit on iovecs per call (UIO_MAXIOV).
IOV_MAX = 1024


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def alive(pidfd: int) -> bool:
    """Has the process of ``pidfd`` not exited? (A pidfd polls readable once it has.)"""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def read_vectored(pid: int, pidfd: int, pieces: Sequence[tuple[int, int]], into: bytearray) -> int:
    """Read ``pieces`` ((address, bytes) in process ``pid``) into ``into``, one
    after the other from its start; how many bytes were read from the first
    piece on before one could not be (0: none, the call failed, or the
    process of ``pidfd`` is gone, so ``pid`` may no longer be it)."""
    n = len(pieces)
    if not 0 < n <= IOV_MAX or sum(size for _, size in pieces) > len(into):
        return 0
    local, remote = (_Iovec * n)(), (_Iovec * n)()
    holder = (ctypes.c_char * len(into)).from_buffer(into)
    try:
        base = ctypes.addressof(holder)
        at = 0
        for i, (vaddr, size) in enumerate(pieces):
            local[i].base, local[i].len = base + at, size
            remote[i].base, remote[i].len = vaddr, size
            at += size
        got = int(_libc.process_vm_readv(pid, ctypes.addressof(local), n, ctypes.addressof(remote), n, 0))
    finally:
        del holder  # releases the export of ``into``
    return got if got > 0 and alive(pidfd) else 0
