"""``python -m bench quick|full``: compare migration strategies in the lab.

quick   64 and 256 MiB, 1000 pages/s (10% hot set), unshaped and 1gbit, 1 rep:
        a few minutes, enough to see the shape of the results.
full    64/256/1024 MiB x 0/1000/10000 pages/s x unlimited/1gbit/10gbit x 3 reps.

Every axis can be narrowed (``--sizes 64 --rates 0 --links unlimited
--strategies naive,stop-copy --reps 1``). Progress goes to stdout as runs
finish; the summary table follows, and the very last line is the path of
summary.md so scripts can pick it up with ``tail -1``.

Link shaping is lab-wide and the lab is shared: whatever the session changes is
put back to unshaped when it ends, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import conditions, lab, matrix, report
from .runner import INVALID, RunSettings, run_case

RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=tuple(matrix.PRESETS), help="quick (minutes) or full (the matrix)")
    ap.add_argument("--sizes", type=_ints, metavar="MIB,...", help="container memory sizes")
    ap.add_argument("--rates", type=_ints, metavar="PAGES_PER_S,...", help="dirty rates")
    ap.add_argument("--hot-set", type=float, metavar="F", help=f"fraction of memory dirtied (default {matrix.DEFAULT_HOT_SET})")
    ap.add_argument("--links", type=_names, metavar="LINK,...", help="unlimited, 1gbit, 10gbit, 1gbit+1ms ...")
    ap.add_argument("--strategies", type=_names, metavar="NAME,...",
                    help=f"from {', '.join(matrix.STRATEGIES)}, or precopy[-uffd]:<policy spec>, hybrid[-uffd]:<policy spec> (one policy term: the list is comma-separated)")
    ap.add_argument("--reps", type=int, metavar="N", help="repetitions per cell")
    ap.add_argument("--runtime", choices=("runc", "podman"), default="runc",
                    help="run the workload with runc (tug's bundles) or under each host's podman (bench/podman.py)")
    ap.add_argument("--out", type=Path, metavar="DIR", help="output directory (default bench/results/<UTC timestamp>)")
    ap.add_argument("--settle", type=float, default=2.0, metavar="S", help="seconds a fresh container runs before migrating")
    ap.add_argument("--timeout", type=float, default=900.0, metavar="S", help="limit for one migration command")
    ap.add_argument("--link-retries", type=int, default=3, metavar="N",
                    help="repeat a run up to N times when another lab user re-shaped the link during it")
    ap.add_argument("--warm-mib", type=int, metavar="MIB",
                    help="touch this much memory once before the first run (default: 2 x the largest size + 512; "
                         "0: no warm-up). On a VM whose memory the hypervisor backs lazily, the first touch of "
                         "fresh RAM is several times slower than later ones, and would land on the first runs")
    ap.add_argument("--dry-run", action="store_true", help="print the cases and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = matrix.plan(args.preset, sizes=args.sizes, rates=args.rates, hot_set=args.hot_set, links=args.links,
                           strategies=args.strategies, reps=args.reps)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    cases = plan.cases()
    print(f"plan {plan.describe()}", flush=True)
    from . import podman

    podman.RUNTIME["name"] = args.runtime
    if args.dry_run:
        for c in cases:
            print(f"  {c.index + 1:4d} {c.label()}")
        return 0

    started = datetime.now(timezone.utc)
    out = args.out or RESULTS / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    settings = RunSettings(session=str(os.getpid()), settle_s=args.settle, timeout_s=args.timeout, logs_dir=out / "logs")
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": None,
        "complete": False,
        "argv": sys.argv,
        "plan": {
            "preset": plan.preset,
            "description": plan.describe(),
            "sizes_mib": list(plan.sizes),
            "rates_pages_s": list(plan.rates),
            "hot_set": plan.hot_set,
            "links": [lk.name for lk in plan.links],
            "link_settings": [{"name": lk.name, "rate": lk.rate, "delay": lk.delay} for lk in plan.links],
            "strategies": [s.name for s in plan.strategies],
            "strategy_args": {s.name: list(s.migrate_args) if s.kind == "engine" else s.doc for s in plan.strategies},
            "reps": plan.reps,
            "settle_s": args.settle,
            "runtime": args.runtime,
            "timeout_s": args.timeout,
            "source_host": settings.src,
            "destination_host": settings.dst,
        },
        "conditions": conditions.collect(),
    }
    results = out / "results.json"
    runs: list[dict[str, Any]] = []
    code = 0
    warm = args.warm_mib if args.warm_mib is not None else 2 * max(plan.sizes) + 512
    if warm > 0:
        print(f"warm-up: touching {warm} MiB of memory once", flush=True)
        meta["warm_up"] = {"mib": warm, "seconds": warm_memory(warm)}
    try:
        current: matrix.Link | None = None
        for case in cases:
            if case.link != current:
                print(f"link shaping: {case.link.name} ({' '.join(['tug lab up', *case.link.up_args()])})", flush=True)
                lab.ensure(case.link)
                current = case.link
                meta.setdefault("lab_status", {})[case.link.name] = lab.status()
            for attempt in range(1 + args.link_retries):
                t0 = time.monotonic()
                rec = run_case(case, settings, attempt)
                runs.append(rec)
                report.write_results(results, meta, runs)
                print(_progress(case, rec, len(cases), time.monotonic() - t0), flush=True)
                if rec["status"] != INVALID:
                    break
                lab.ensure(case.link)  # put our shaping back, then repeat the run
        meta["complete"] = True
    except KeyboardInterrupt:
        print("interrupted: writing what was measured so far", flush=True)
        code = 130
    except lab.LabError as exc:
        print(f"bench: error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        try:
            lab.ensure(matrix.Link())  # back to unshaped: the lab is shared
            print("link shaping: back to unlimited", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported, never hides the results
            print(f"bench: warning: could not put the lab back to unshaped: {exc} (run 'tug lab up')",
                  file=sys.stderr, flush=True)
        meta["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report.write_results(results, meta, runs)
    pngs = report.plots(runs, meta["plan"], out) if runs else []
    text = report.summary(meta, runs, pngs)
    (out / "summary.md").write_text(text + "\n")
    print()
    print(report.table(report.groups(runs, meta["plan"])))
    ok = sum(1 for r in runs if r.get("status") == "ok")
    counted = sum(1 for r in runs if r.get("status") != INVALID)
    repeated = len(runs) - counted
    print(f"\n{ok}/{counted} runs ok" + (f" ({repeated} more repeated: link re-shaped by another lab user)" if repeated else "")
          + f"; results: {results}")
    print(out / "summary.md")
    return code


def warm_memory(mib: int) -> float:
    """Touch ``mib`` MiB in a child process (freed when it exits); returns seconds taken."""
    code = "import mmap,sys\nn=int(sys.argv[1])<<20\nm=mmap.mmap(-1,n)\nfor i in range(0,n,4096): m[i]=1\n"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code, str(mib)], check=True)
    return time.monotonic() - t0


def _progress(case: matrix.Case, rec: dict[str, Any], total: int, took: float) -> str:
    def num(key: str, fmt: str) -> str:
        v = rec.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "–"

    again = f" (again, #{rec['attempt'] + 1})" if rec.get("attempt") else ""
    head = f"[{case.index + 1:3d}/{total}] {case.label() + again:<44s} {rec['status']:<7s}"
    if rec["status"] == "error" and rec.get("client_downtime_ms") is None:
        return f"{head} {rec.get('excluded_reason') or rec.get('error')}"
    mb = rec["bytes_total"] / 1e6 if isinstance(rec.get("bytes_total"), (int, float)) else None
    line = (f"{head} client {num('client_downtime_ms', '.0f')} ms, engine {num('engine_downtime_ms', '.0f')} ms, "
            f"total {num('wall_s', '.2f')} s, {format(mb, '.1f') if mb is not None else '–'} MB, "
            f"rounds {rec.get('rounds_count', 0)}, src cpu {num('src_cpu_s', '.2f')} s ({took:.0f} s)")
    if rec["status"] == INVALID:
        line += f"\n          discarded, will repeat: {rec.get('excluded_reason')}"
    elif rec["status"] != "ok":
        line += f"\n          excluded: {rec.get('excluded_reason')}"
    return line


if __name__ == "__main__":
    sys.exit(main())
