"""What a migration measured, and the report made of it.

The driver counts into one :class:`Tally` as the phases run; the report, the
CLI's summary and the benchmark all read the :class:`MigrationReport` built
from it, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from tug.engine.errors import MigrationError
from tug.engine.events import ErrorInfo, MigrationReport, RoundCompleted


@dataclass(slots=True)
class Tally:
    t0: float = field(default_factory=time.monotonic)
    #: When the source froze, and when the destination answered running.
    frozen_at: float | None = None
    running_at: float | None = None
    #: Wire bytes at the freeze, and those moved while frozen.
    frozen_sent_at_freeze: int = 0
    frozen_bytes: int = 0
    bytes_by_phase: dict[str, int] = field(default_factory=dict)
    image_bytes: int = 0
    rootfs_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    #: Steps inside the frozen window, in ms (pause, dump, rebuild, restore).
    timings: dict[str, float] = field(default_factory=dict)
    held_frames: dict[str, int] = field(default_factory=dict)
    lazy_fill_ms: float | None = None
    agent_usage: dict[str, float] = field(default_factory=dict)
    #: Wire bytes when the destination answered running, and those moved after it.
    wire_at_running: int = 0
    bytes_after_commit: int | None = None
    #: What the fill after the commit point cost (the strategy's fill_stats).
    fill: dict[str, Any] = field(default_factory=dict)
    #: Links lost during the fill and recovered.
    link_recoveries: int = 0

    def report(
        self,
        *,
        container: str,
        containers: list[str],
        volumes: list[dict[str, Any]],
        source: str,
        destination: str,
        strategy: str,
        outcome: str,
        phases: dict[str, float],
        bytes_total: int,
        rounds: list[RoundCompleted],
        tracker: str | None,
        dump_streamed: bool,
        page_server_bytes: int,
        exc: BaseException | None = None,
        phase: str = "",
        commit_point: str | None = None,
    ) -> MigrationReport:
        now = time.monotonic()
        downtime = 0.0
        if self.frozen_at is not None:
            downtime = ((self.running_at or now) - self.frozen_at) * 1000
        return MigrationReport(
            container=container,
            containers=containers,
            volumes=volumes,
            source=source,
            destination=destination,
            strategy=strategy,
            outcome=outcome,
            total_s=now - self.t0,
            downtime_ms=downtime if outcome == "migrated" else 0.0,
            frozen_ms=downtime,
            bytes_total=bytes_total,
            frozen_bytes=self.frozen_bytes,
            bytes_by_phase=dict(self.bytes_by_phase),
            phases=phases,
            image_bytes=self.image_bytes,
            rootfs_bytes=self.rootfs_bytes,
            error=error_info(exc, phase) if exc is not None else None,
            notes=list(self.notes),
            rounds=list(rounds),
            tracker=tracker,
            dump_streamed=dump_streamed,
            page_server_bytes=page_server_bytes,
            frozen_steps_ms=dict(self.timings),
            held_frames=dict(self.held_frames),
            lazy_fill_ms=self.lazy_fill_ms,
            commit_point=commit_point,
            fill_ms=self.lazy_fill_ms,
            remote_faults=self.fill.get("remote_faults"),
            fault_latency_ms=self.fill.get("fault_latency_ms"),
            store_pages=self.fill.get("store_pages"),
            source_pages=self.fill.get("source_pages"),
            bytes_after_commit=self.bytes_after_commit,
            link_recoveries=self.link_recoveries,
            agent_cpu_s=self.agent_usage.get("cpu_s"),
            agent_children_cpu_s=self.agent_usage.get("children_cpu_s"),
            agent_max_rss_kib=self.agent_usage.get("max_rss_kib"),
        )


def error_info(exc: BaseException, phase: str) -> ErrorInfo:
    """The report's view of an error: kind, one-line message, CRIU's details."""
    kind = exc.kind if isinstance(exc, MigrationError) else ("cancelled" if isinstance(exc, asyncio.CancelledError) else "internal")
    details: dict[str, Any] = {}
    lines = getattr(exc, "error_lines", None)
    if lines:
        details["error_lines"] = list(lines)
    log_path = getattr(exc, "log_path", None)
    if log_path:
        details["log_path"] = str(log_path)
    return ErrorInfo(kind=kind, message=str(exc) or type(exc).__name__, phase=phase, details=details)
