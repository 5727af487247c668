#!/usr/bin/env bash
# Issue 13 prototype, by hand (not tug): route (b) for a podman demo container, a -> b in the lab.
# tug lab demo (podman) on a; on b: endpoint namespace (link down), podman create + init + stop + mount;
# runc pause + checkpoint --leave-running on podman's runc state; rsync of the overlay; CRIU images linked
# into userdata/checkpoint; podman container restore (non-exported). Prints each step's time and checks b.
# Usage (from the worktree, TUG_LAB set, PATH=.venv/bin:$PATH): bash bench/podman/route_b_by_hand.sh NAME MEMORY_MIB
set -e
N=$1; MEM=$2
A="tug lab run a --"; B="tug lab run b --"
tug lab demo a $N --runtime podman --memory $MEM >/dev/null
ID=$($A podman inspect $N --format '{{.Id}}')
# destination: endpoint namespace (link down) as tug would make it
.venv/bin/python - <<PY
from tug.engine.lab import hosts, demo
from tug.engine.runtime import network as netif
import tug.engine.lab.layout as L
lab = hosts.require(L.Layout("$TUG_LAB")); h = lab.host("b")
netif.create(h.network(), "$N", demo.endpoint_spec(lab, "$N"), up=False)
PY
t0=$(date +%s%N)
$B podman create --name $N --network ns:/run/netns/tug-$TUG_LAB.b-$N --cgroup-parent /tuglab.$TUG_LAB-b localhost/tug-demo:latest /usr/bin/tug-workload --memory $MEM --dirty-rate 0 --hot-set 1.0 --state /state --port 7000 >/dev/null
$B podman init $N >/dev/null; $B podman stop -t 0 $N >/dev/null
MB=$($B podman mount $N); UD=$($B podman inspect $N --format '{{.StaticDir}}')
t1=$(date +%s%N); echo "prepare on b (create+init+stop+mount): $(( (t1-t0)/1000000 )) ms"
IMG=/dev/shm/tuglab.$TUG_LAB-b/route-b-$N; rm -rf $IMG; mkdir -p $IMG /dev/shm/tuglab.$TUG_LAB-a/w-$N
MA=$($A podman mount $N)
t2=$(date +%s%N)
runc pause $ID
runc checkpoint --leave-running --tcp-established --image-path $IMG --work-path /dev/shm/tuglab.$TUG_LAB-a/w-$N $ID
t3=$(date +%s%N)
rsync -aHAX --delete $MA/ $MB/
ln -s $IMG $UD/checkpoint
t4=$(date +%s%N)
$B podman container restore --tcp-established $N >/dev/null
t5=$(date +%s%N)
runc delete --force $ID; $A podman rm -f -t 0 $N >/dev/null; tug lab rm a $N >/dev/null || true
echo "frozen dump (runc checkpoint on podman's state): $(( (t3-t2)/1000000 )) ms; rootfs rsync+link: $(( (t4-t3)/1000000 )) ms; podman restore on b: $(( (t5-t4)/1000000 )) ms; downtime $(( (t5-t2)/1000000 )) ms"
tug lab check b $N | python3 -c 'import json,sys; d=json.load(sys.stdin); print("check on b:", d["ok"], d["runtime"], d["counter"], d["heartbeat"]["max_gap_ms"])'
$B podman ps --format '{{.Names}} {{.Status}}'; echo "a lists: $($A podman ps -a --format '{{.Names}}')"
$B podman exec $N cat /etc/hostname; $B podman stop -t 1 $N >/dev/null; $B podman rm $N >/dev/null && echo "stop+rm on b ok"
tug lab rm b $N >/dev/null || true
rm -rf "$IMG" /dev/shm/tuglab.$TUG_LAB-a/w-$N
