"""Rate-limited progress of one transfer, as TransferProgress events.

Shared by everything that moves bytes (file streams, page servers, pre-copy
rounds), on either side of the wire.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tug.engine.events import TransferProgress

ProgressFn = Callable[[TransferProgress], None]


class Meter:
    """Rate-limited progress reports for one transfer (at most ~10 a second)."""

    def __init__(self, phase: str, what: str, total: int | None, emit: ProgressFn | None) -> None:
        self.phase, self.what, self.total, self.emit = phase, what, total, emit
        self.done = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def add(self, n: int, *, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.emit is not None and (final or now - self._last >= 0.1):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-6)
            self.emit(TransferProgress(phase=self.phase, what=self.what, bytes_done=self.done, bytes_total=self.total, rate_bps=rate))
