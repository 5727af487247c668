"""The ``tug`` command: a thin layer over the library.

Errors print as one line (``tug: error: ...``) and exit 1; usage errors exit 2.
Progress goes to stderr so that ``--json`` leaves stdout with exactly one JSON
document for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from tug.engine.errors import MigrationError
from tug.engine.events import Event, MigrationReport, Note, PhaseFinished, PhaseStarted, RoundCompleted, TransferProgress


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
        ("container", r.container),
        ("from -> to", f"{r.source} -> {r.destination}"),
        ("strategy", r.strategy + (f" (tracker {r.tracker}, {len(r.rounds)} rounds)" if r.tracker else "")),
        ("outcome", r.outcome),
        ("downtime", f"{r.downtime_ms:.0f} ms (source frozen {r.frozen_ms:.0f} ms)"),
        ("total time", f"{r.total_s:.2f} s"),
        ("bytes on the wire", f"{human_bytes(r.bytes_total)} ({human_bytes(r.frozen_bytes)} while frozen)"),
        ("  CRIU images", human_bytes(r.image_bytes)),
        *([("  page server", human_bytes(r.page_server_bytes))] if r.dump_streamed else []),
        ("  rootfs files", human_bytes(r.rootfs_bytes)),
    ]
    for phase, secs in r.phases.items():
        rows.append((f"  {phase}", f"{secs * 1000:.0f} ms, {human_bytes(r.bytes_by_phase.get(phase, 0))}"))
    if r.error is not None:
        rows.append(("error", f"[{r.error.phase}] {r.error.message}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _die(msg: str, code: int = 1) -> NoReturn:
    print(f"tug: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _run(coro: Any) -> Any:
    async def main() -> Any:
        # SIGTERM (what service managers and orchestrators send) ends a
        # migration like Ctrl-C: cancelled, rolled back, the source resumed.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        import uvloop
    except ImportError:  # only the import: an ImportError from inside coro must surface
        return asyncio.run(main())
    return uvloop.run(main())


# ---- migrate --------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from tug.engine.api import MigrationOptions, migrate

    opts = MigrationOptions(
        strategy=args.strategy,
        identity=Path(args.identity) if args.identity else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        agent_command=args.agent_command,
        connect_timeout=args.connect_timeout,
        tcp_close=args.tcp_close,
        policy=args.policy,
        tracker=args.tracker,
        stream_dump=args.stream_dump,
        lazy_restore=args.lazy_restore,
        fault=args.fault,
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
        report: MigrationReport = _run(go())
    except MigrationError as exc:
        progress._clear()
        failed: MigrationReport | None = getattr(exc, "report", None)
        if args.json and failed is not None:
            print(json.dumps(failed.to_dict()))
        if failed is not None and failed.outcome == "rolled-back" and failed.frozen_ms > 0:
            print(f"tug: error: {exc} (rolled back: the source container is running again)", file=sys.stderr)
        else:
            print(f"tug: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress._clear()
        last = interrupted[0] if interrupted else None
        if args.json and last is not None:
            print(json.dumps(last.to_dict()))
        if last is not None and last.outcome in ("rolled-back", "aborted"):
            _die(f"interrupted ({last.outcome}: the source container is running)", 130)
        _die(f"interrupted ({last.outcome if last else 'outcome unknown'}): check the container on both hosts", 130)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(summary(report))
    return 0


# ---- doctor ---------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from tug.engine import doctor

    rows = _run(doctor.run_checks(
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


# ---- lab --------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr)


def cmd_lab(args: argparse.Namespace) -> int:
    from tug.engine.lab import addresses, demo, hosts

    if args.lab_cmd == "up":
        lab = hosts.up(args.hosts, rate=args.rate, delay=args.delay, log=_say)
        for h in lab.hosts:
            print(f"{h.name}\t{h.url}")
    elif args.lab_cmd == "down":
        hosts.down(log=_say)
        _say("down")
    elif args.lab_cmd == "status":
        st = hosts.status()
        if args.json:
            print(json.dumps(st))
        elif not st["hosts"]:
            print("the lab is down")
        else:
            print(f"lab {'up' if st['up'] else 'DEGRADED'}: rate={st['rate'] or 'unlimited'} delay={st['delay'] or '0'}")
            for h in st["hosts"]:
                cs = ", ".join(f"{c['id']} ({c['status']})" for c in h["containers"]) or "-"
                print(f"  {h['name']}  {h['url']}  sshd {h['sshd']}  containers: {cs}")
        return 0 if st["up"] or not st["hosts"] else 1
    elif args.lab_cmd == "url":
        print(hosts.require().host(args.host).url)
    elif args.lab_cmd == "run":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        hosts.exec_in_host(args.host, argv)
    elif args.lab_cmd == "demo":
        h = hosts.require().host(args.host)
        spec = demo.WorkloadSpec(memory_mib=args.memory, dirty_rate=args.dirty_rate, hot_set=args.hot_set)
        bundle = demo.start(h, args.name, spec)
        _say(f"demo container {args.name} running on {h.name} ({args.memory} MiB, {args.dirty_rate} pages/s), bundle {bundle}")
    elif args.lab_cmd == "rm":
        lab = hosts.require()
        h = lab.host(args.host)
        if demo.remove(h, args.name):
            _say(f"removed {args.name} from {h.name}")
        if not any((Path(o.data_dir) / "containers" / args.name).exists() for o in lab.hosts):
            addresses.release_address(args.name)
    elif args.lab_cmd == "client":
        return _lab_client(args)
    elif args.lab_cmd == "check":
        h = hosts.require().host(args.host)
        result = demo.check(h, args.name)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    return 0


def _lab_client(args: argparse.Namespace) -> int:
    """Runs inside the lab's client namespace (re-executing itself there)."""
    from tug.engine.lab import addresses, client, hosts, layout

    address = addresses.address_of(args.name)
    if os.environ.get("TUG_LAB_IN_CLIENT") != "1":
        hosts.require()
        os.environ["TUG_LAB_IN_CLIENT"] = "1"
        argv = [sys.executable, "-m", "tug.engine", *sys.argv[1:]]
        os.execvp("nsenter", ["nsenter", f"--net=/run/netns/{layout.CLIENT_NS}", "--", *argv])

    async def until_signalled() -> dict[str, Any]:
        # SIGINT/SIGTERM end the run early and still print the result: a
        # script starts the client, migrates, then stops it.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        result: dict[str, Any] = await client.run(
            address, port=args.port, duration=args.duration, connections=args.connections,
            interval_ms=args.interval_ms, bulk_bytes=args.bulk, upload_bytes=args.upload, rate=args.rate, stop=stop,
        )
        return result

    result = _run(until_signalled())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['replies']} replies over {result['connections']} connection(s), longest gap "
              f"{result['max_gap_ms']:.0f} ms, {result['reconnects']} reconnects, {result['errors']} errors, "
              f"{result['out_of_order']} out of order")
        for key in ("bulk", "upload"):
            if key in result:
                print(f"{key}: {result[key]}")
    return 0 if result["ok"] else 1


# ---- parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from tug.engine.api import STRATEGIES, MigrationOptions

    ap = argparse.ArgumentParser(prog="tug", description="Live-migrate running containers between hosts with CRIU.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("migrate", help="live-migrate a running container to another host")
    m.add_argument("container")
    m.add_argument("--to", required=True, metavar="URL", help="destination, ssh://user@host[:port]")
    m.add_argument("--strategy", default="stop-copy", choices=STRATEGIES)
    m.add_argument("--policy", default="phaul", metavar="SPEC",
                   help="precopy: when to do the final dump, e.g. phaul, incus, qemu, 'max-iter=8,min-dirty=64,max-growth=1.1'")
    m.add_argument("--tracker", default="auto", choices=("auto", "content", "soft-dirty"),
                   help="precopy: how dirty pages are found (auto: soft-dirty if the kernel has it, else content)")
    m.add_argument("--lazy-restore", action=argparse.BooleanOptionalAction, default=MigrationOptions().lazy_restore,
                   help="the destination's processes run before their memory is in place; a local CRIU lazy-pages "
                        "daemon fills it and the commit waits for that (default: %(default)s)")
    m.add_argument("--stream-dump", action=argparse.BooleanOptionalAction, default=MigrationOptions().stream_dump,
                   help="stop-copy: stream the frozen dump's memory to a CRIU page server on the destination while "
                        "CRIU dumps (overlaps dump and transfer; needs sshd TCP forwarding) instead of dumping to "
                        "files first (default: %(default)s)")
    m.add_argument("--identity", "-i", metavar="KEY", help="SSH private key (default: $TUG_SSH_IDENTITY or ~/.ssh)")
    m.add_argument("--known-hosts", metavar="FILE", help="known_hosts to check the destination's host key against")
    m.add_argument("--agent-command", metavar="CMD", help="command that starts the agent on the destination")
    m.add_argument("--connect-timeout", type=float, default=15.0, metavar="S")
    m.add_argument("--tcp-close", action="store_true",
                   help="restore established TCP connections closed instead of intact (for clients that reconnect)")
    m.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    m.add_argument("--fault", help=argparse.SUPPRESS)
    m.set_defaults(fn=cmd_migrate)

    d = sub.add_parser("doctor", help="check that this host (and a destination) can migrate")
    d.add_argument("--to", metavar="URL", help="also check ssh reachability of this destination")
    d.add_argument("--identity", "-i", metavar="KEY")
    d.add_argument("--known-hosts", metavar="FILE")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_doctor)

    lab = sub.add_parser("lab", help="the built-in test lab: several hosts on this machine")
    ls = lab.add_subparsers(dest="lab_cmd", required=True)
    up = ls.add_parser("up", help="create the lab (idempotent)")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--rate", help="shape each host's link, e.g. 1gbit")
    up.add_argument("--delay", help="add latency to each host's link, e.g. 1ms")
    ls.add_parser("down", help="remove everything the lab created")
    st = ls.add_parser("status")
    st.add_argument("--json", action="store_true")
    u = ls.add_parser("url", help="print the ssh URL of a host")
    u.add_argument("host")
    r = ls.add_parser("run", help="run a command inside a host: tug lab run a -- CMD")
    r.add_argument("host")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    dm = ls.add_parser("demo", help="start the demo workload container on a host")
    dm.add_argument("host")
    dm.add_argument("name")
    dm.add_argument("--memory", type=int, default=64, metavar="MIB")
    dm.add_argument("--dirty-rate", type=int, default=0, metavar="PAGES_PER_S")
    dm.add_argument("--hot-set", type=float, default=1.0, metavar="FRACTION")
    rm = ls.add_parser("rm", help="delete a container and its bundle from a host")
    rm.add_argument("host")
    rm.add_argument("name")
    cl = ls.add_parser("client", help="hold connections to a demo container from the lab's client host")
    cl.add_argument("name")
    cl.add_argument("--duration", type=float, default=10.0, metavar="S",
                    help="seconds to hold the connections (SIGINT or SIGTERM ends the run early, result still printed)")
    cl.add_argument("--connections", type=int, default=1)
    cl.add_argument("--interval-ms", type=float, default=5.0)
    cl.add_argument("--bulk", type=int, default=0, metavar="BYTES", help="also download BYTES, verified")
    cl.add_argument("--upload", type=int, default=0, metavar="BYTES", help="also upload BYTES, verified")
    cl.add_argument("--rate", type=float, default=2 << 20, metavar="BYTES_PER_S", help="pace of bulk/upload")
    cl.add_argument("--port", type=int, default=7000)
    cl.add_argument("--json", action="store_true")
    ck = ls.add_parser("check", help="verify a demo container: running, counter continuous, memory intact")
    ck.add_argument("host")
    ck.add_argument("name")
    lab.set_defaults(fn=cmd_lab)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except MigrationError as exc:
        _die(str(exc))
    except KeyboardInterrupt:
        _die("interrupted", 130)
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
