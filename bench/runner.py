"""One benchmark run: fresh container, settle, migrate, measure, verify, clean up.

The figures that matter and where each comes from:

* **client downtime**: the longest wait for a reply seen by ``tug lab
  client`` in the lab's client host, which holds one TCP connection to the
  container's service across the migration and sends a request every 5 ms.
  That is what a user of the service saw, TCP retransmission backoff
  included, independent of what the engine believes. A broken connection is
  reopened and counted (``client_reconnects``); the gap then spans the
  reconnect. The client is stopped shortly after the command returns and
  *before* ``tug lab check``, whose memory verification runs inside the
  workload's loop and would add a gap of its own.
* **heartbeat gap**: the largest CLOCK_REALTIME gap between consecutive
  heartbeat lines (one every 10 ms) the workload wrote, from the last line
  before the migration command started: the process's own view.
* **engine downtime**: the report's ``downtime_ms`` (for naive: the script's
  checkpoint-start to restore-end span).
* **total**: wall clock of the migration command, as a user would time it.
* **CPU / peak RSS on the source**: rusage of the command's process tree
  (:mod:`bench.proc`); on the destination what the report carries.

A run counts only if the migration reported success, the container runs on the
destination and ``tug lab check`` passes (running, counter continuous, memory
intact), and the link shaping was not changed under it by someone else using
the lab. Anything else is recorded with its reason and left out of medians.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tug.engine.lab.workload import analyze_heartbeat

from . import baselines, lab
from .matrix import PAGE_BYTES, Case, Strategy
from .proc import MigrateResult, run_child

#: Pause after the migration command returns before the client is stopped and
#: the heartbeat log read: the restored process writes its first line within
#: one 10 ms tick. A request still waiting for a retransmission when the client
#: is stopped is waited for, so its gap is counted however long it is.
POST_MIGRATE_S = 0.5


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    session: str
    src: str = "a"
    dst: str = "b"
    #: Seconds a fresh container runs before it is migrated.
    settle_s: float = 2.0
    #: Seconds one migration command may take before it is interrupted.
    timeout_s: float = 900.0
    logs_dir: Path | None = None


def container_name(settings: RunSettings, case: Case, attempt: int = 0) -> str:
    base = f"bench-{settings.session}-{case.index + 1}"
    return f"{base}-r{attempt}" if attempt else base


def migrate_engine(strategy: Strategy, name: str, src: lab.Host, dst: lab.Host, timeout: float) -> MigrateResult:
    """``tug lab run SRC -- tug migrate NAME --to URL --json ...``, accounted."""
    argv = [lab.TUG, "lab", "run", src.name, "--", "tug", "migrate", name, "--to", dst.url, "--json",
            *strategy.migrate_args]
    child = run_child(argv, timeout=timeout)
    report: dict[str, Any] | None = None
    try:
        parsed = json.loads(child.stdout)
        report = parsed if isinstance(parsed, dict) else None
    except json.JSONDecodeError:
        pass
    if report is not None:
        outcome = str(report.get("outcome", "error"))
    else:
        outcome = "timeout" if child.timed_out else "error"
    error = None
    if child.returncode != 0 or outcome != "migrated":
        err = (report or {}).get("error") or {}
        error = err.get("message") if isinstance(err, dict) and err.get("message") else child.last_error_line()
        if child.timed_out:
            error = f"timed out after {timeout:g} s: {error}"
    agent_cpu = (report or {}).get("agent_cpu_s")
    agent_kids = (report or {}).get("agent_children_cpu_s")
    dst_cpu = None if agent_cpu is None else float(agent_cpu) + float(agent_kids or 0.0)
    return MigrateResult(
        outcome=outcome,
        error=error,
        wall_s=child.wall_s,
        report=report,
        src_cpu_user_s=child.user_s,
        src_cpu_sys_s=child.sys_s,
        src_max_rss_kib=child.max_rss_kib,
        dst_cpu_s=dst_cpu,
        dst_max_rss_kib=(report or {}).get("agent_max_rss_kib"),
        dst_cpu_note="report: agent_cpu_s + agent_children_cpu_s" if dst_cpu is not None else "not in the report",
        exit_code=child.returncode,
        log=f"$ {' '.join(argv)}\n--- stdout\n{child.stdout}\n--- stderr\n{child.stderr}",
    )


def migrate(strategy: Strategy, name: str, src: lab.Host, dst: lab.Host, info: lab.LabInfo, timeout: float) -> MigrateResult:
    if strategy.kind == "baseline":
        assert strategy.baseline is not None
        return baselines.BASELINES[strategy.baseline](name, src, dst, info, timeout)
    return migrate_engine(strategy, name, src, dst, timeout)


def _link_dict(link: Any) -> dict[str, Any] | None:
    return None if link is None else {"name": link.name, "rate": link.rate, "delay": link.delay}


#: Status of a run spoiled by someone else re-shaping the lab's link during
#: it: not the strategy's fault, so the session repeats it (see __main__).
INVALID = "invalid"


def run_case(case: Case, settings: RunSettings, attempt: int = 0) -> dict[str, Any]:
    """Run one case and return its record (never raises for a failed run)."""
    name = container_name(settings, case, attempt)
    w = case.workload
    rec: dict[str, Any] = {
        "index": case.index,
        "container": name,
        "strategy": case.strategy.name,
        "strategy_kind": case.strategy.kind,
        "strategy_args": list(case.strategy.migrate_args),
        "rep": case.rep,
        "attempt": attempt,
        "workload": dataclasses.asdict(w),
        "link": _link_dict(case.link),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": list(os.getloadavg()),
        "settle_s": settings.settle_s,
        "status": "error",
        "outcome": None,
        "error": None,
    }
    try:
        info = lab.info()
    except lab.LabError:  # the lab went away (someone ran `tug lab down`): bring it back
        lab.ensure(case.link)
        info = lab.info()
    src, dst = info.hosts[settings.src], info.hosts[settings.dst]
    log_parts: list[str] = []
    client: lab.TcpClient | None = None
    try:
        rec["other_containers"] = lab.others_containers()
        if info.link != case.link:  # someone re-shaped the lab since the last run
            lab.ensure(case.link)
        rec["link_before"] = _link_dict(lab.current_link())
        stamp = lab.state_stamp()

        lab.start_demo(src, name, w)
        st0 = lab.workload_status(src, name)
        time.sleep(settings.settle_s)
        st1 = lab.workload_status(src, name)
        dt = (st1["realtime_ns"] - st0["realtime_ns"]) / 1e9
        rate = (st1["dirtied_total"] - st0["dirtied_total"]) / dt if dt > 0 else None
        rec["measured_dirty_pages_s"] = rate
        rec["measured_dirty_mb_s"] = rate * PAGE_BYTES / 1e6 if rate is not None else None
        rec["workload_pages"] = {"pages": st1.get("pages"), "hot_pages": st1.get("hot_pages")}
        rec["container_memory"] = lab.container_memory(src, name)
        client = lab.TcpClient(name, limit_s=settings.timeout_s + 300)
        client.wait_connected()
        since = lab.last_heartbeat_counter(src, name)
        rec["since_counter"] = since

        mr = migrate(case.strategy, name, src, dst, info, settings.timeout_s)
        log_parts.append(mr.log)
        rec["link_after"] = _link_dict(lab.current_link())
        rec["lab_reshaped_during_run"] = lab.state_stamp() != stamp
        rec.update(_figures(mr))

        ended = dst if lab.running_on(dst, name) else src if lab.running_on(src, name) else None
        rec["ended_on"] = ended.name if ended else None
        time.sleep(POST_MIGRATE_S)
        tcp = client.stop()
        client = None
        rec["tcp_client"] = {k: tcp.get(k) for k in ("replies", "errors", "reconnects", "out_of_order", "max_gap_ms", "ok")}
        rec["client_downtime_ms"] = tcp["max_gap_ms"] if tcp.get("replies") else None
        rec["client_reconnects"] = tcp.get("reconnects")
        if ended is not None:
            log = lab.heartbeat_log(ended, name)
            if log.exists():
                hb = analyze_heartbeat(log, since_counter=since)
                rec["heartbeat"] = dataclasses.asdict(hb)
                rec["heartbeat_gap_ms"] = hb.max_gap_ms if hb.lines >= 2 else None
            check = lab.check(ended, name)
            rec["check"] = check
            rec["check_ok"] = bool(check.get("ok"))
        rec["status"], rec["excluded_reason"] = _verdict(rec, mr, dst.name)
        if rec["lab_reshaped_during_run"] or rec.get("link_before") != rec.get("link_after"):
            rec["status"] = INVALID
            rec["excluded_reason"] = (f"the lab's link shaping was changed during the run by another lab user "
                                      f"({(rec.get('link_before') or {}).get('name')} -> "
                                      f"{(rec.get('link_after') or {}).get('name')} at the end)")
    except lab.LabError as exc:
        rec["status"], rec["error"] = "error", str(exc)
        rec["excluded_reason"] = f"harness: {exc}"
    except (OSError, ValueError, KeyError) as exc:
        rec["status"], rec["error"] = "error", f"{type(exc).__name__}: {exc}"
        rec["excluded_reason"] = f"harness: {rec['error']}"
    finally:
        if client is not None:
            with contextlib.suppress(lab.LabError):
                client.stop(timeout=30)
        for host in (src, dst):
            lab.remove(host, name)
        baselines.cleanup(name)
        if settings.logs_dir is not None:
            settings.logs_dir.mkdir(parents=True, exist_ok=True)
            suffix = f"-r{attempt}" if attempt else ""
            path = settings.logs_dir / f"{case.index + 1:04d}-{case.strategy.name.replace(':', '_')}{suffix}.log"
            path.write_text("\n".join(log_parts) or "(no migration output)\n")
            rec["log"] = str(path)
    return rec


def _figures(mr: MigrateResult) -> dict[str, Any]:
    """The migration's own figures, flattened for results.json."""
    r = mr.report or {}
    rounds = r.get("rounds") or []
    return {
        "outcome": mr.outcome,
        "error": mr.error,
        "exit_code": mr.exit_code,
        "wall_s": mr.wall_s,
        "engine_downtime_ms": r.get("downtime_ms"),
        "frozen_ms": r.get("frozen_ms"),
        "engine_total_s": r.get("total_s"),
        "bytes_total": r.get("bytes_total"),
        "frozen_bytes": r.get("frozen_bytes"),
        "bytes_by_phase": r.get("bytes_by_phase"),
        "phases_s": r.get("phases"),
        "rounds_count": len(rounds),
        "rounds": rounds,
        "tracker": r.get("tracker"),
        "image_bytes": r.get("image_bytes"),
        "rootfs_bytes": r.get("rootfs_bytes"),
        "frozen_steps_ms": r.get("frozen_steps_ms"),
        "commit_point": r.get("commit_point"),
        "fill_ms": r.get("fill_ms"),
        "remote_faults": r.get("remote_faults"),
        "fault_latency_ms": r.get("fault_latency_ms"),
        "bytes_after_commit": r.get("bytes_after_commit"),
        "link_recoveries": r.get("link_recoveries"),
        "src_cpu_s": mr.src_cpu_user_s + mr.src_cpu_sys_s,
        "src_cpu_user_s": mr.src_cpu_user_s,
        "src_cpu_sys_s": mr.src_cpu_sys_s,
        "src_max_rss_kib": mr.src_max_rss_kib,
        "dst_cpu_s": mr.dst_cpu_s,
        "dst_agent_cpu_s": r.get("agent_cpu_s"),
        "dst_agent_children_cpu_s": r.get("agent_children_cpu_s"),
        "dst_max_rss_kib": mr.dst_max_rss_kib,
        "dst_cpu_note": mr.dst_cpu_note,
        "report": mr.report,
    }


def _verdict(rec: dict[str, Any], mr: MigrateResult, dst: str) -> tuple[str, str | None]:
    """ok | failed | error, and why a run is left out of the medians."""
    if mr.report is None:
        return "error", f"no report: {mr.error}"
    if mr.outcome != "migrated":
        return "failed", f"outcome {mr.outcome}: {mr.error}"
    if rec.get("ended_on") != dst:
        return "failed", f"container not running on {dst} after the migration"
    if not rec.get("check_ok"):
        return "failed", f"check failed: {(rec.get('check') or {}).get('reason') or 'no check'}"
    if rec.get("client_downtime_ms") is None:
        return "failed", "the TCP client got no replies"
    if rec.get("link_before") != rec.get("link"):
        return "failed", f"could not apply link shaping {rec.get('link')}: lab reports {rec.get('link_before')}"
    return "ok", None
