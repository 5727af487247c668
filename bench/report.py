"""What a session leaves behind: results.json, summary.md and PNG plots.

results.json is the record: every run with all its figures *and* the
conditions it ran under, rewritten after each run so an interrupted session
still leaves everything measured so far. summary.md and the plots are derived
from it only, with medians over the repetitions that passed; a run that failed
(migration error, failed ``tug lab check``, link changed underneath) is listed
with its reason and never enters a median.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

INVALID = "invalid"  # bench.runner.INVALID; not imported so report works on results.json alone

GroupKey = tuple[str, int, int, float, str]  # strategy, memory MiB, rate, hot set, link


def write_results(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Atomically (rename) so a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**meta, "runs": runs}, indent=1, default=str))
    os.replace(tmp, path)


def _key(run: dict[str, Any]) -> GroupKey:
    w = run["workload"]
    return (run["strategy"], w["memory_mib"], w["dirty_rate"], w["hot_set"], run["link"]["name"])


def _median(values: Iterable[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


class Group:
    """The runs of one strategy x size x rate x link cell."""

    def __init__(self, key: GroupKey, runs: list[dict[str, Any]]) -> None:
        self.key = key
        #: Runs that count: "invalid" ones (link re-shaped by someone else
        #: during the run) were repeated and say nothing about the strategy.
        self.runs = [r for r in runs if r.get("status") != INVALID]
        self.ok = [r for r in runs if r.get("status") == "ok"]

    def p50(self, get: Callable[[dict[str, Any]], float | int | None]) -> float | None:
        return _median(get(r) for r in self.ok)

    def span(self, field: str) -> tuple[float, float] | None:
        vals = [float(r[field]) for r in self.ok if r.get(field) is not None]
        return (min(vals), max(vals)) if vals else None

    @property
    def client_p50(self) -> float | None:
        return self.p50(lambda r: r.get("client_downtime_ms"))


def groups(runs: list[dict[str, Any]], order: dict[str, Any]) -> list[Group]:
    """Runs grouped per cell, in the plan's order (link, size, rate, strategy)."""
    by: dict[GroupKey, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(_key(r), []).append(r)
    strategies: list[str] = order.get("strategies", [])
    links: list[str] = order.get("links", [])

    def sort_key(k: GroupKey) -> tuple[int, int, int, int]:
        s, mem, rate, _hot, link = k
        return (links.index(link) if link in links else 99, mem, rate, strategies.index(s) if s in strategies else 99)

    return [Group(k, by[k]) for k in sorted(by, key=sort_key)]


COLUMNS = ("strategy | memory MiB | RSS MiB | dirty pg/s | dirty MB/s | link | ok/runs | downtime p50 (client) ms "
           "| client min–max ms | reconnects | engine downtime p50 ms | heartbeat gap p50 ms | total s | MB sent "
           "| MB while down | rounds | fill ms | remote faults | fault p50/p99 ms | MB after commit "
           "| src CPU s | dst CPU s | src peak RSS MiB | x vs naive")


def table(gs: list[Group]) -> str:
    naive = {(g.key[1], g.key[2], g.key[3], g.key[4]): g.client_p50 for g in gs if g.key[0] == "naive"}
    lines = ["| " + COLUMNS + " |", "|" + "---|" * len(COLUMNS.split("|"))]
    for g in gs:
        strategy, mem, rate, _hot, link = g.key
        client = g.client_p50
        anchor = naive.get((mem, rate, _hot, link))
        ratio = f"{anchor / client:.2f}" if anchor and client else "–"
        span = g.span("client_downtime_ms")
        cells = [
            strategy,
            str(mem),
            _fmt(_div(g.p50(lambda r: (r.get("container_memory") or {}).get("rss_bytes")), 2**20), 0),
            str(rate),
            _fmt(g.p50(lambda r: r.get("measured_dirty_mb_s")), 2),
            link,
            f"{len(g.ok)}/{len(g.runs)}",
            _fmt(client, 0),
            f"{span[0]:.0f}–{span[1]:.0f}" if span else "–",
            str(sum(int(r.get("client_reconnects") or 0) for r in g.ok)),
            _fmt(g.p50(lambda r: r.get("engine_downtime_ms")), 0),
            _fmt(g.p50(lambda r: r.get("heartbeat_gap_ms")), 0),
            _fmt(g.p50(lambda r: r.get("wall_s")), 2),
            _fmt(_div(g.p50(lambda r: r.get("bytes_total")), 1e6), 1),
            _fmt(_div(g.p50(lambda r: r.get("frozen_bytes")), 1e6), 1),
            _fmt(g.p50(lambda r: r.get("rounds_count")), 0),
            _fmt(g.p50(lambda r: r.get("fill_ms")), 0),
            _fmt(g.p50(lambda r: r.get("remote_faults")), 0),
            _latency(g),
            _fmt(_div(g.p50(lambda r: r.get("bytes_after_commit")), 1e6), 1),
            _fmt(g.p50(lambda r: r.get("src_cpu_s")), 2),
            _fmt(g.p50(lambda r: r.get("dst_cpu_s")), 2),
            _fmt(_div(g.p50(lambda r: r.get("src_max_rss_kib")), 1024), 0),
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _latency(g: Group) -> str:
    p50 = g.p50(lambda r: (r.get("fault_latency_ms") or {}).get("p50"))
    p99 = g.p50(lambda r: (r.get("fault_latency_ms") or {}).get("p99"))
    return "–" if p50 is None or p99 is None else f"{p50:.2f}/{p99:.2f}"


def _div(v: float | None, by: float) -> float | None:
    return None if v is None else v / by


def summary(meta: dict[str, Any], runs: list[dict[str, Any]], plots: list[Path]) -> str:
    c = meta["conditions"]
    tug = c.get("tug", {})
    gs = groups(runs, meta.get("plan", {}))
    bad = [r for r in runs if r.get("status") not in ("ok", INVALID)]
    invalid = [r for r in runs if r.get("status") == INVALID]
    out = [
        f"# tug benchmark: {meta['plan']['preset']} ({meta['started_at']})",
        "",
        f"Plan: {meta['plan']['description']}",
        "",
        f"Machine: {c['cpu_model']}, {c['cpus']} CPUs, {c['mem_total_mib']} MiB; kernel {c['kernel']}; {c['os']}. "
        f"CRIU {c['criu']}, runc {c['runc']}, {c['rsync']}. "
        f"tug {tug.get('commit', '?')[:12] if tug.get('commit') else '?'}"
        f"{' + uncommitted changes (diff sha256 ' + tug['diff_sha256'][:12] + ')' if tug.get('dirty') else ''}.",
        "",
        table(gs),
        "",
        "Medians over the runs that passed (`ok/runs`). **Client downtime** is the longest wait for a reply seen by "
        "a client in the lab's client host that holds one TCP connection to the container's service across the "
        "migration and sends a request every 5 ms (TCP retransmission backoff included); **reconnects** counts "
        "connections it had to reopen, summed over the runs (a reconnect's time is inside the gap). **engine "
        "downtime** is the report's `downtime_ms` (naive: the script's span from `runc checkpoint` to `runc "
        "restore` returning, during which the container is dead); **heartbeat gap** is the longest gap between "
        "the workload's own heartbeat lines (every 10 ms, CLOCK_REALTIME). **total s** is the "
        "wall clock of the migration command. **MB** are 10^6 bytes on the wire (naive: rsync's `--stats` sent + "
        "received). **RSS** is the container's memory cgroup `rss` before the migration; **dirty MB/s** is measured "
        "from the workload's own counter while it settled. **src CPU** is user+sys of the migration command's whole "
        "process tree on the source (tug/runc/CRIU; naive: runc, CRIU, rsync, ssh) and **src peak RSS** the largest "
        "single process in it; **dst CPU** is the report's agent CPU (self + children), for naive only the restore "
        "(runc + CRIU) over ssh. **x vs naive** = naive's client downtime / this row's (higher is better).",
        "",
    ]
    if bad:
        out += [f"## Runs left out of the medians ({len(bad)} of {len(runs)})", "",
                "| # | strategy | memory MiB | dirty pg/s | link | status | reason |", "|---|---|---|---|---|---|---|"]
        for r in bad:
            w = r["workload"]
            reason = str(r.get("excluded_reason") or r.get("error") or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| {r['index'] + 1} | {r['strategy']} | {w['memory_mib']} | {w['dirty_rate']} | "
                       f"{r['link']['name']} | {r['status']} | {reason[:300]} |")
        out.append("")
    else:
        out += [f"All {len(runs) - len(invalid)} counted runs migrated and passed `tug lab check`.", ""]
    if invalid:
        out += [f"{len(invalid)} more run(s) were discarded and repeated because another user of the shared lab "
                "changed its link shaping while they ran (status `invalid` in results.json): "
                + ", ".join(f"#{r['index'] + 1} {r['strategy']} {r['workload']['memory_mib']} MiB {r['link']['name']}"
                            for r in invalid) + ".", ""]
    loads = [r["loadavg_before"][0] for r in runs if r.get("loadavg_before")]
    others = [r.get("other_containers", 0) for r in runs]
    warm = meta.get("warm_up")
    if warm:
        out += [f"Before the first run, {warm['mib']} MiB of memory were touched once ({warm['seconds']:.1f} s): on a "
                "VM whose RAM is backed lazily, first touches are several times slower and would otherwise land "
                "on the first runs.", ""]
    if loads:
        out += [f"Load average (1 min) before runs: {min(loads):.2f}–{max(loads):.2f}; containers of other lab "
                f"users present during runs: up to {max(others)}. The lab is shared: a busy neighbour shows up as "
                "noise in these figures.", ""]
    if plots:
        out += ["Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in plots), ""]
    return "\n".join(out)


# ---- plots -------------------------------------------------------------------


def plots(runs: list[dict[str, Any]], order: dict[str, Any], out_dir: Path) -> list[Path]:
    """Client downtime vs memory size and vs dirty rate, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = groups(runs, order)
    strategies = [s for s in order.get("strategies", []) if any(g.key[0] == s for g in gs)]
    links = [lk for lk in order.get("links", []) if any(g.key[4] == lk for g in gs)]
    sizes = sorted({g.key[1] for g in gs})
    rates = sorted({g.key[2] for g in gs})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(strategies)}
    written: list[Path] = []

    def figure(fname: str, rows: list[int], row_idx: int, x_idx: int, xlabel: str, row_label: str, xscale: str) -> None:
        if not rows or not links:
            return
        fig, axes = plt.subplots(len(rows), len(links), figsize=(5 * len(links), 3.6 * len(rows)), squeeze=False)
        for i, row in enumerate(rows):
            for j, link in enumerate(links):
                ax = axes[i][j]
                for s in strategies:
                    cell = sorted((g for g in gs if g.key[0] == s and g.key[4] == link and g.key[row_idx] == row),
                                  key=lambda g: g.key[x_idx])
                    pts = [(g.key[x_idx], g.client_p50, g.span("client_downtime_ms")) for g in cell]
                    pts = [p for p in pts if p[1] is not None]
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    ys = [float(p[1] or 0) for p in pts]
                    lo = [y - (p[2][0] if p[2] else y) for y, p in zip(ys, pts)]
                    hi = [(p[2][1] if p[2] else y) - y for y, p in zip(ys, pts)]
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=s, color=colors[s])
                if xscale == "log2":
                    ax.set_xscale("log", base=2)
                elif xscale == "symlog":
                    ax.set_xscale("symlog", linthresh=100)
                ticks = sorted({g.key[x_idx] for g in gs})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
                ax.set_title(f"{row_label} {row}, link {link}", fontsize=10)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("client downtime p50 (ms)")
                ax.set_ylim(bottom=0)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle("Client-visible downtime (median, bars: min–max over reps)")
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figure("downtime_vs_size.png", rates, 2, 1, "container memory (MiB)", "dirty pages/s", "log2")
    figure("downtime_vs_rate.png", sizes, 1, 2, "dirty rate (pages/s, 10% hot set)" if _hot(runs) == 0.1 else "dirty rate (pages/s)",
           "memory MiB", "symlog")
    return written


def _hot(runs: list[dict[str, Any]]) -> float | None:
    hs = {r["workload"]["hot_set"] for r in runs}
    return hs.pop() if len(hs) == 1 else None
