"""Stop-copy: freeze, dump, move, restore; nothing before the freeze.

The frozen dump streams its memory to a CRIU page server on the destination
while CRIU dumps (``MigrationOptions.stream_dump``, the default), so dump and
transfer overlap; without it the dump goes to local files sent afterwards.
"""

from __future__ import annotations

from tug.engine.source.strategies.base import Strategy


class StopCopy(Strategy):
    name = "stop-copy"

    @property
    def dump_to_destination(self) -> bool:
        return self.opts.stream_dump
