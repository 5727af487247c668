"""Structured data the engine emits: progress events and the final report.

The CLI, library callers and bench all consume these same objects, so they
are frozen dataclasses with plain-data fields and a ``to_dict`` for JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseStarted:
    phase: str
    at_s: float  # seconds since the migration started


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseFinished:
    phase: str
    at_s: float
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferProgress:
    phase: str
    what: str  # rootfs | images | pages
    bytes_done: int
    bytes_total: int | None
    rate_bps: float  # bytes per second over the whole transfer so far


@dataclass(frozen=True, slots=True, kw_only=True)
class Note:
    """Something worth telling the user that is not an error."""

    level: str  # info | warning
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundCompleted:
    index: int
    duration_ms: float
    pages_scanned: int
    dirty_pages: int
    pages_sent: int
    bytes: int
    bandwidth_bps: float
    dirty_rate_pps: float
    decision: str


Event = PhaseStarted | PhaseFinished | TransferProgress | Note | RoundCompleted


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    kind: str
    message: str
    phase: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationReport:
    #: The group's first container (the only one, unless several moved as one).
    container: str
    source: str
    destination: str
    strategy: str
    #: migrated | aborted (failed before anything changed) | rolled-back (source
    #: resumed, destination cleaned) | failed (rollback incomplete: see notes)
    outcome: str
    total_s: float
    #: From the freeze of the source to the destination's process running,
    #: as the engine measures it (includes the confirmation's trip back).
    downtime_ms: float
    frozen_ms: float
    bytes_total: int
    #: Bytes that crossed the wire while the container was frozen.
    frozen_bytes: int
    bytes_by_phase: dict[str, int]
    phases: dict[str, float]  # seconds per phase
    rounds: list[RoundCompleted] = field(default_factory=list)
    tracker: str | None = None
    #: The frozen dump's memory went straight to a CRIU page server on the
    #: destination (page_server_bytes of it, both ways) instead of image files.
    dump_streamed: bool = False
    page_server_bytes: int = 0
    image_bytes: int = 0
    rootfs_bytes: int = 0
    error: ErrorInfo | None = None
    notes: list[str] = field(default_factory=list)
    #: Where the frozen window went: pause_ms, dump_ms, rebuild_ms, restore_ms;
    #: with the content tracker dump_ms includes filtering and streaming the
    #: delta, of which delta_ms is the tail after CRIU finished.
    frozen_steps_ms: dict[str, float] = field(default_factory=dict)
    #: The network lock: frames sent to the container while it was frozen,
    #: held and then delivered to wherever it runs (held, delivered, dropped).
    held_frames: dict[str, int] = field(default_factory=dict)
    #: Lazy restore: ms the destination's lazy-pages daemon took, after the
    #: downtime, to fill the container's memory (None: restored eagerly).
    lazy_fill_ms: float | None = None
    #: Where the source gave up the container: "running" (the destination's
    #: processes ran before their memory was all there: lazy restores) or
    #: "confirmed" (they ran with all of it); None if it never got that far.
    commit_point: str | None = None
    #: From running to every page in place (the same as lazy_fill_ms).
    fill_ms: float | None = None
    #: Post-copy: page faults of the destination's processes, each served
    #: from the source. ``fault_latency_ms`` (p50, p99), for every lazy
    #: restore: from a fault to its page in place, as the destination's
    #: lazy-pages daemon logged them (the wait the faulting thread had).
    remote_faults: int | None = None
    fault_latency_ms: dict[str, float] | None = None
    #: Hybrid: pages the fill served from the destination's page store (the
    #: source confirmed them unchanged) and pages whose bytes came from the source.
    store_pages: int | None = None
    source_pages: int | None = None
    #: Wire bytes after the destination ran (the fill, the commit).
    bytes_after_commit: int | None = None
    #: Post-copy, hybrid: links lost during the fill and recovered (the fill resumed).
    link_recoveries: int = 0
    #: The destination agent's own CPU seconds, its children's (runc, CRIU),
    #: and its peak RSS; None when the migration did not reach commit.
    agent_cpu_s: float | None = None
    agent_children_cpu_s: float | None = None
    agent_max_rss_kib: float | None = None
    #: Every container the migration moved as one group, in restore order.
    containers: list[str] = field(default_factory=list)
    #: Each host mount that moved: container, destination (its path inside
    #: the container), mode (shared | copy), source (its path here), bytes
    #: (what the copy passes sent; 0 when shared).
    volumes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome == "migrated"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = _plain(self)
        return d
