#!/usr/bin/env bash
# Baseline for issue 13: podman's own route, what a podman user types (checkpoint --export, copy, restore --import).
# Caveat: on one machine the restored container joins host a's namespace path from config.dump (it still exists).
# Usage (from the worktree, TUG_LAB set, PATH=.venv/bin:$PATH): bash bench/podman/podman_export_import.sh NAME MEMORY_MIB
set -e
N=$1; MEM=$2
A="tug lab run a --"; B="tug lab run b --"
tug lab demo a $N --runtime podman --memory $MEM >/dev/null
.venv/bin/python - <<PY
from tug.engine.lab import hosts, demo
from tug.engine.runtime import network as netif
import tug.engine.lab.layout as L
lab = hosts.require(L.Layout("$TUG_LAB")); h = lab.host("b")
netif.create(h.network(), "$N", demo.endpoint_spec(lab, "$N"), up=True)
PY
T=/dev/shm/tuglab.$TUG_LAB-a/$N.tar.gz
t0=$(date +%s%N)
$A podman container checkpoint --tcp-established --export $T $N >/dev/null
t1=$(date +%s%N)
cp $T /dev/shm/tuglab.$TUG_LAB-b/$N.tar.gz
t2=$(date +%s%N)
$B podman container restore --tcp-established --import /dev/shm/tuglab.$TUG_LAB-b/$N.tar.gz >/dev/null 2>/dev/shm/tuglab.$TUG_LAB-b/err-$N || { tail -2 /dev/shm/tuglab.$TUG_LAB-b/err-$N; }
t3=$(date +%s%N)
echo "podman's own route, $MEM MiB: checkpoint --export $(( (t1-t0)/1000000 )) ms, copy $(( (t2-t1)/1000000 )) ms, restore --import $(( (t3-t2)/1000000 )) ms: downtime $(( (t3-t0)/1000000 )) ms, archive $(du -k $T | cut -f1) KiB"
tug lab check b $N | python3 -c 'import json,sys; d=json.load(sys.stdin); print("check on b:", d["ok"], d.get("reason"))' || true
$B podman ps -a --format '{{.Names}} {{.Status}}' | grep $N || true
tug lab rm a $N >/dev/null || true; tug lab rm b $N >/dev/null || true; rm -f $T /dev/shm/tuglab.$TUG_LAB-b/$N.tar.gz
rm -f /dev/shm/tuglab.$TUG_LAB-b/err-$N
