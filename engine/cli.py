"""The ``tug`` command: a thin layer over the library.

Errors print as one line (``tug: error: ...``) and exit 1; usage errors exit 2.
Progress goes to stderr so that ``--json`` leaves stdout with exactly one JSON
document for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from tug.engine.errors import MigrationError
from tug.engine.events import Event, MigrationReport, Note, PhaseFinished, PhaseStarted, RoundCompleted, TransferProgress
from tug.engine.runner import die, run


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """Live progress on stderr: one rewritten line on a terminal, plain lines otherwise."""

    def __init__(self, stream: Any = sys.stderr, quiet: bool = False) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.quiet = quiet
        self._line = False

    def _clear(self) -> None:
        if self._line:
            self.stream.write("\r\033[K")
            self._line = False

    def __call__(self, ev: Event) -> None:
        if self.quiet:
            return
        if isinstance(ev, TransferProgress):
            total = f" / {human_bytes(ev.bytes_total)}" if ev.bytes_total else ""
            text = f"[{ev.phase}] {ev.what}: {human_bytes(ev.bytes_done)}{total} at {human_bytes(ev.rate_bps)}/s"
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self._line = True
                self.stream.flush()
            return
        self._clear()
        if isinstance(ev, PhaseStarted):
            self.stream.write(f"[{ev.at_s:7.3f}s] {ev.phase} ...\n")
        elif isinstance(ev, PhaseFinished):
            self.stream.write(f"[{ev.at_s:7.3f}s] {ev.phase} done in {ev.duration_s * 1000:.0f} ms\n")
        elif isinstance(ev, RoundCompleted):
            self.stream.write(
                f"          round {ev.index}: {ev.dirty_pages} dirty pages, {human_bytes(ev.bytes)} "
                f"in {ev.duration_ms:.0f} ms (link ~{human_bytes(ev.bandwidth_bps)}/s) -> {ev.decision}\n"
            )
        elif isinstance(ev, Note):
            prefix = "warning: " if ev.level == "warning" else ""
            self.stream.write(f"          {prefix}{ev.message}\n")
        self.stream.flush()


def summary(r: MigrationReport) -> str:
    rows = [
        ("container" if len(r.containers) <= 1 else "containers", ", ".join(r.containers) or r.container),
        ("from -> to", f"{r.source} -> {r.destination}"),
        ("strategy", r.strategy + (f" (tracker {r.tracker}, {len(r.rounds)} rounds)" if r.tracker else "")),
        ("outcome", r.outcome),
        ("downtime", f"{r.downtime_ms:.0f} ms (source frozen {r.frozen_ms:.0f} ms)"),
        *([("commit point", _commit_point(r))] if r.commit_point else []),
        ("total time", f"{r.total_s:.2f} s"),
        ("bytes on the wire", f"{human_bytes(r.bytes_total)} ({human_bytes(r.frozen_bytes)} while frozen)"),
        ("  CRIU images", human_bytes(r.image_bytes)),
        *([("  page server", human_bytes(r.page_server_bytes))] if r.dump_streamed else []),
        ("  rootfs files", human_bytes(r.rootfs_bytes)),
        *[(f"  volume {v['destination']}", f"{v['mode']}" + (f", {human_bytes(v['bytes'])}" if v["mode"] == "copy" else ""))
          for v in r.volumes],
    ]
    for phase, secs in r.phases.items():
        rows.append((f"  {phase}", f"{secs * 1000:.0f} ms, {human_bytes(r.bytes_by_phase.get(phase, 0))}"))
    if r.error is not None:
        rows.append(("error", f"[{r.error.phase}] {r.error.message}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _commit_point(r: MigrationReport) -> str:
    if r.commit_point != "running":
        return "confirmed (the destination ran with all its memory)"
    text = "running (memory filled after"
    text += f": {r.fill_ms:.0f} ms" if r.fill_ms is not None else ""
    if r.bytes_after_commit is not None:
        text += f", {human_bytes(r.bytes_after_commit)}"
    if r.remote_faults is not None:
        text += f", {r.remote_faults} remote faults"
        if r.fault_latency_ms:
            text += f" p50 {r.fault_latency_ms['p50']:.2f} ms p99 {r.fault_latency_ms['p99']:.2f} ms"
    return text + ")"


# ---- migrate --------------------------------------------------------------


def parse_timeouts(items: list[str]) -> dict[str, float]:
    from tug.engine.api import DEFAULT_TIMEOUTS

    out: dict[str, float] = {}
    for item in items:
        phase, sep, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not sep or phase not in DEFAULT_TIMEOUTS or not seconds > 0:
            die(f"--timeout takes PHASE=SECONDS with a phase of {', '.join(DEFAULT_TIMEOUTS)}, got {item!r}", 2)
        out[phase] = seconds
    return out


def cmd_migrate(args: argparse.Namespace) -> int:
    from tug.engine.api import DEFAULT_TIMEOUTS, MigrationOptions, migrate

    opts = MigrationOptions(
        strategy=args.strategy,
        identity=Path(args.identity) if args.identity else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        agent_command=args.agent_command,
        connect_timeout=args.connect_timeout,
        link_recovery=args.link_recovery,
        tcp_close=args.tcp_close,
        policy=args.policy,
        tracker=args.tracker,
        eager=args.eager,
        stream_dump=args.stream_dump,
        lazy_restore=args.lazy_restore,
        volumes=tuple(args.volume),
        pod=args.pod,
        criu_opts=tuple(args.criu_opt),
        runtime=args.runtime,
        timeouts={**DEFAULT_TIMEOUTS, **parse_timeouts(args.timeout)},
    )
    progress = Progress(quiet=args.quiet)
    interrupted: list[MigrationReport | None] = []

    async def go() -> MigrationReport:
        try:
            return await migrate(args.container, args.to, options=opts, on_event=progress)
        except asyncio.CancelledError as exc:  # Ctrl-C or SIGTERM, after the rollback
            interrupted.append(getattr(exc, "report", None))
            raise

    try:
        report: MigrationReport = run(go())
    except MigrationError as exc:
        progress._clear()
        failed: MigrationReport | None = getattr(exc, "report", None)
        if args.json and failed is not None:
            print(json.dumps(failed.to_dict()))
        if failed is not None and failed.outcome == "rolled-back" and failed.frozen_ms > 0:
            print(f"tug: error: {exc} (rolled back: the source container is running again)", file=sys.stderr)
        else:
            print(f"tug: error: {exc}", file=sys.stderr)
        if failed is not None:
            for note in failed.notes:
                if "tug recover" in note:
                    print(f"tug: {note}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress._clear()
        last = interrupted[0] if interrupted else None
        if args.json and last is not None:
            print(json.dumps(last.to_dict()))
        if last is not None and last.outcome in ("rolled-back", "aborted"):
            die(f"interrupted ({last.outcome}: the source container is running)", 130)
        for note in last.notes if last is not None else []:
            if "tug recover" in note:
                die(f"interrupted: {note}", 130)
        die(f"interrupted ({last.outcome if last else 'outcome unknown'}): check the container on both hosts", 130)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(summary(report))
    return 0


# ---- recover --------------------------------------------------------------


def cmd_recover(args: argparse.Namespace) -> int:
    from tug.engine.options import MigrationOptions
    from tug.engine.source.recover import recover

    opts = MigrationOptions(
        identity=Path(args.identity) if args.identity else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        agent_command=args.agent_command,
    )
    try:
        rep = run(recover(args.container, args.to, options=opts))
    except MigrationError as exc:
        print(f"tug: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep.to_dict()))
    else:
        for note in rep.notes:
            print(f"  {note}", file=sys.stderr)
        print(f"{rep.container}: {rep.action} (source was {rep.source_before or 'absent'}, "
              f"destination {rep.destination_before or 'absent'})")
    return 0


# ---- doctor ---------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from tug.engine import doctor

    rows = run(doctor.run_checks(
        args.to, identity=Path(args.identity) if args.identity else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
    ))
    if args.json:
        print(json.dumps({"ok": doctor.verdict(rows), "checks": [r.__dict__ if hasattr(r, "__dict__") else
              {"name": r.name, "status": r.status, "detail": r.detail, "fix": r.fix} for r in rows]}))
    else:
        print(doctor.render(rows))
        print("\nmigration can work on this host" if doctor.verdict(rows) else "\nmigration cannot work on this host: see the FAIL rows")
    return 0 if doctor.verdict(rows) else 1


# ---- parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from tug.engine.api import DEFAULT_TIMEOUTS, STRATEGIES, MigrationOptions
    from tug.engine.lab.commands import add_lab_parser

    ap = argparse.ArgumentParser(prog="tug", description="Live-migrate running containers between hosts with CRIU.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("migrate", help="live-migrate a running container (or several, as one group) to another host")
    m.add_argument("container", nargs="+",
                   help="the container; several move as one group: one freeze, one commit point, one rollback "
                        "(restored in the order given)")
    m.add_argument("--to", required=True, metavar="URL", help="destination, ssh://user@host[:port]")
    m.add_argument("--strategy", default="stop-copy", choices=STRATEGIES)
    m.add_argument("--runtime", default="auto", choices=("auto", "runc", "podman"),
                   help="whose container: tug's runc root, this host's podman, or auto (runc's, else podman's)")
    m.add_argument("--policy", default="phaul", metavar="SPEC",
                   help="precopy: when to do the final dump, e.g. phaul, incus, qemu, 'max-iter=8,min-dirty=64,max-growth=1.1'")
    m.add_argument("--tracker", default="auto", choices=("auto", "content", "soft-dirty", "uffd"),
                   help="precopy, hybrid: how dirty pages are found (auto: soft-dirty if the kernel has it, else uffd "
                        "where tug doctor's probe passes, else content; hybrid: uffd or content)")
    m.add_argument("--eager", action="store_true",
                   help="precopy: every page on the destination before its processes run (the commit point waits "
                        "for it). Default: precopy ends as hybrid where the destination has userfaultfd (a group's "
                        "too, each member's own): a shorter frozen window, but the frozen source serves what "
                        "changed until the destination's memory is filled")
    m.add_argument("--lazy-restore", action=argparse.BooleanOptionalAction, default=MigrationOptions().lazy_restore,
                   help="the destination's processes run before their memory is in place; a local CRIU lazy-pages "
                        "daemon fills it and the commit waits for that (default: %(default)s)")
    m.add_argument("--stream-dump", action=argparse.BooleanOptionalAction, default=MigrationOptions().stream_dump,
                   help="stop-copy: stream the frozen dump's memory to a CRIU page server on the destination while "
                        "CRIU dumps (overlaps dump and transfer; needs sshd TCP forwarding) instead of dumping to "
                        "files first (default: %(default)s)")
    m.add_argument("--criu-opt", action="append", default=[], metavar="OPT",
                   help="an extra CRIU option for the destination's restore, as a line of a CRIU config file "
                        "('ext-unix-sk', 'skip-in-flight'); repeat for each. The container's own org.criu.config "
                        "annotation still applies where its file exists on the destination")
    m.add_argument("--pod", action="store_true",
                   help="move each named container with every container that joins its network namespace (its pod), "
                        "as one group")
    m.add_argument("--volume", action="append", default=[], metavar="PATH=MODE",
                   help="how a host mount of the container moves, by its path inside the container: PATH=shared "
                        "(the destination has the same storage there; verified), PATH=copy or PATH=copy:DESTDIR "
                        "(tug copies it like the rootfs); repeat for each; a host mount not named refuses the migration")
    m.add_argument("--identity", "-i", metavar="KEY", help="SSH private key (default: $TUG_SSH_IDENTITY or ~/.ssh)")
    m.add_argument("--known-hosts", metavar="FILE", help="known_hosts to check the destination's host key against")
    m.add_argument("--agent-command", metavar="CMD", help="command that starts the agent on the destination")
    m.add_argument("--connect-timeout", type=float, default=15.0, metavar="S")
    m.add_argument("--link-recovery", type=float, default=30.0, metavar="S",
                   help="postcopy/hybrid: seconds a link lost during the fill may take to come back (default 30)")
    m.add_argument("--tcp-close", action="store_true",
                   help="restore established TCP connections closed instead of intact (for clients that reconnect)")
    m.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    m.add_argument("--timeout", action="append", default=[], metavar="PHASE=S",
                   help="deadline of one phase in seconds, e.g. restore=60 (repeatable; phases: "
                        + ", ".join(DEFAULT_TIMEOUTS) + ")")
    m.set_defaults(fn=cmd_migrate)

    r = sub.add_parser(
        "recover",
        help="finish or undo a migration a failure left frozen (deletes the source if the destination runs "
             "the container, else resumes the source)",
    )
    r.add_argument("container")
    r.add_argument("--to", required=True, metavar="URL", help="the migration's destination, ssh://user@host[:port]")
    r.add_argument("--identity", "-i", metavar="KEY")
    r.add_argument("--known-hosts", metavar="FILE")
    r.add_argument("--agent-command", metavar="CMD")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_recover)

    d = sub.add_parser("doctor", help="check that this host (and a destination) can migrate")
    d.add_argument("--to", metavar="URL", help="also check ssh reachability of this destination")
    d.add_argument("--identity", "-i", metavar="KEY")
    d.add_argument("--known-hosts", metavar="FILE")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_doctor)

    add_lab_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except MigrationError as exc:
        die(str(exc))
    except KeyboardInterrupt:
        die("interrupted", 130)
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
