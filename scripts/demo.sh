#!/usr/bin/env bash
# `make demo`: a live migration in the built-in two-host lab, end to end.
# It runs in the lab instance TUG_LAB names (the default lab without it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TUG=.venv/bin/tug
PY=.venv/bin/python
MEM="${DEMO_MEMORY:-256}"
RATE="${DEMO_DIRTY_RATE:-500}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A client on the lab's client host holds a TCP connection to the container
# across a move; `tug lab check` runs only after it stopped, because the
# check's memory verification pauses the workload's loop (and its replies).
CLIENT_OUT="$(mktemp)"
CLIENT_PID=
trap '[ -n "$CLIENT_PID" ] && kill -INT "$CLIENT_PID" 2>/dev/null; rm -f "$CLIENT_OUT"' EXIT
client_start() {
  $TUG lab client demo --duration 600 --json >"$CLIENT_OUT" &
  CLIENT_PID=$!
  sleep 1
  echo "client: holding one TCP connection to demo ($($TUG lab status --json | $PY -c '
import json, sys
print(next(c["address"] for h in json.load(sys.stdin)["hosts"] for c in h["containers"] if c["id"] == "demo"))'):7000), a request every 5 ms"
}
client_stop() {
  kill -INT "$CLIENT_PID"
  wait "$CLIENT_PID" || true
  CLIENT_PID=
  $PY -c '
import json, sys
r = json.load(open(sys.argv[1]))
print("client: %d replies on the same connection: errors=%d reconnects=%d out_of_order=%d; longest wait for a reply %.0f ms"
      % (r["replies"], r["errors"], r["reconnects"], r["out_of_order"], r["max_gap_ms"]))
sys.exit(0 if r["ok"] else 1)' "$CLIENT_OUT"
}

runc_root() {  # where lab host $1 keeps its runc state (the instance's own)
  $TUG lab status --json | $PY -c '
import json, sys
print(next(h["runc_root"] for h in json.load(sys.stdin)["hosts"] if h["name"] == sys.argv[1]))' "$1"
}

step "lab: two hosts (network namespaces with their own sshd, runc root and data dir) and a client host"
$TUG lab up
for h in a b; do $TUG lab rm "$h" demo; done  # a previous demo run's container, if any

step "start the demo container on host a (${MEM} MiB of checked memory, ${RATE} pages/s dirtied)"
$TUG lab demo a demo --memory "$MEM" --dirty-rate "$RATE"
$TUG lab run a -- runc --root "$(runc_root a)" exec demo sh -c 'echo "written on a at $(date)" > /root/hello.txt'
$TUG lab check a demo >/dev/null && echo "demo is running on a; its memory checksum verifies"

step "live-migrate demo from a to b over SSH (stop-copy: everything moves while frozen)"
client_start
$TUG lab run a -- tug migrate demo --to "$($TUG lab url b)"
client_stop

step "check on b: running, counter continuous, memory intact, rootfs file carried over"
$TUG lab check b demo | $PY -c '
import json, sys
r = json.load(sys.stdin)
hb = r["heartbeat"]
print("ok=%s counter=%s memory_check=%s longest_heartbeat_gap=%.0f ms resets=%d"
      % (r["ok"], r["counter"], r["verify"]["ok"], hb["max_gap_ms"], hb["resets"]))
sys.exit(0 if r["ok"] else 1)'
$TUG lab run b -- runc --root "$(runc_root b)" exec demo cat /root/hello.txt

step "and back from b to a with iterative pre-copy (tracker auto: uffd where tug doctor finds it working, else content; p.haul's convergence rule; it ends as hybrid: a runs first, what changed since the last round follows from the frozen b)"
client_start
$TUG lab run b -- tug migrate demo --to "$($TUG lab url a)" --strategy precopy --policy phaul
client_stop
$TUG lab check a demo | $PY -c '
import json, sys
r = json.load(sys.stdin)
print("ok=%s counter=%s memory_check=%s resets=%d" % (r["ok"], r["counter"], r["verify"]["ok"], r["heartbeat"]["resets"]))
sys.exit(0 if r["ok"] else 1)'

step "and to b once more with post-copy (b runs first, its memory follows from the frozen a)"
client_start
$TUG lab run a -- tug migrate demo --to "$($TUG lab url b)" --strategy postcopy
client_stop
$TUG lab check b demo | $PY -c '
import json, sys
r = json.load(sys.stdin)
print("ok=%s counter=%s memory_check=%s resets=%d" % (r["ok"], r["counter"], r["verify"]["ok"], r["heartbeat"]["resets"]))
sys.exit(0 if r["ok"] else 1)'
$TUG lab status

step "done: the lab stays up for you to play with ('tug lab down${TUG_LAB:+ --lab $TUG_LAB}' removes it)"
