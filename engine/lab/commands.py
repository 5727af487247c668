"""``tug lab ...``: the built-in lab's commands (the CLI's lab half)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tug.engine.lab.layout import DEFAULT, ENV
from tug.engine.runner import run


def _say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr)


def cmd_lab(args: argparse.Namespace) -> int:
    from tug.engine.lab import addresses, demo, hosts, instance

    layout = instance.current(args.lab)
    if args.lab_cmd == "up":
        lab = hosts.up(layout, args.hosts, rate=args.rate, delay=args.delay, log=_say)
        for h in lab.hosts:
            print(f"{h.name}\t{h.url}")
    elif args.lab_cmd == "down":
        hosts.down(layout, log=_say)
        _say(f"{layout.title} is down")
    elif args.lab_cmd == "status":
        return _lab_status(hosts.status(layout), as_json=args.json)
    elif args.lab_cmd == "url":
        print(hosts.require(layout).host(args.host).url)
    elif args.lab_cmd == "run":
        argv = args.argv
        if argv[:1] == ["--lab"] and len(argv) > 1:  # 'tug lab run a --lab NAME -- CMD'
            layout, argv = instance.current(argv[1]), argv[2:]
        argv = argv[1:] if argv[:1] == ["--"] else argv
        hosts.exec_in_host(layout, args.host, argv)
    elif args.lab_cmd == "demo":
        lab = hosts.require(layout)
        h = lab.host(args.host)
        spec = demo.WorkloadSpec(memory_mib=args.memory, dirty_rate=args.dirty_rate, hot_set=args.hot_set, sysv_shm_mib=args.sysv_shm,
                                 lock=args.lock, churn_mib=args.churn, pod_peer=demo.WorkloadSpec().port if args.loopback else 0)
        bundle = demo.start(lab, h, args.name, spec, volume=args.volume, runtime=args.runtime)
        _say(f"demo container {args.name} running on {h.name} ({args.memory} MiB, {args.dirty_rate} pages/s), bundle {bundle}")
    elif args.lab_cmd == "pod":
        lab = hosts.require(layout)
        h = lab.host(args.host)
        # Every member sets its semaphore of one SysV set in the pod's IPC
        # namespace, writes its slot of one SysV segment (--shm: which attach
        # it) and keeps a loopback connection to the holder's port: tug lab
        # check proves both namespaces are still shared after a move.
        spec = demo.WorkloadSpec(memory_mib=args.memory, dirty_rate=args.dirty_rate, pod_ipc_key=demo.POD_IPC_KEY,
                                 pod_no_shm=args.shm != "all")
        demo.start(lab, h, args.name, spec)
        members = [f"{args.name}-m{i}" for i in range(1, args.members + 1)]
        for i, member in enumerate(members, 1):
            demo.start(lab, h, member, dataclasses.replace(spec, port=spec.port + i, pod_slot=i, pod_peer=spec.port,
                                                           pod_no_shm=args.shm == "none"), netns_of=args.name)
        _say(f"pod {args.name} running on {h.name}: {args.name} holds the network and IPC namespaces, "
             f"{', '.join(members) or 'no members'} join them ({args.memory} MiB each)")
    elif args.lab_cmd == "rm":
        lab = hosts.require(layout)
        h = lab.host(args.host)
        if demo.remove(lab, h, args.name):
            _say(f"removed {args.name} from {h.name}")
        if not any((Path(o.data_dir) / "containers" / args.name).exists() for o in lab.hosts):
            addresses.release_address(layout, args.name)
    elif args.lab_cmd == "client":
        return _lab_client(args)
    elif args.lab_cmd == "check":
        h = hosts.require(layout).host(args.host)
        result = demo.check(h, args.name)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    return 0


def _lab_status(st: dict[str, Any], *, as_json: bool) -> int:
    name = "the lab" if st["instance"] == DEFAULT else f"lab {st['instance']}"
    if as_json:
        print(json.dumps(st))
    elif not st["hosts"]:
        print(f"{name} is down")
    else:
        print(f"{name} {'up' if st['up'] else 'DEGRADED'}: subnet {st['subnet']} rate={st['rate'] or 'unlimited'} "
              f"delay={st['delay'] or '0'}")
        for h in st["hosts"]:
            cs = ", ".join(f"{c['id']} ({c['status']})" for c in h["containers"]) or "-"
            print(f"  {h['name']}  {h['url']}  sshd {h['sshd']}  containers: {cs}")
    return 0 if st["up"] or not st["hosts"] else 1


def _lab_client(args: argparse.Namespace) -> int:
    """Runs inside the lab's client namespace (re-executing itself there)."""
    from tug.engine.lab import addresses, client, hosts, instance

    lab = hosts.require(instance.current(args.lab))
    address = addresses.address_of(lab, args.name)
    if os.environ.get("TUG_LAB_IN_CLIENT") != "1":
        os.environ["TUG_LAB_IN_CLIENT"] = "1"
        os.environ["TUG_LAB"] = lab.layout.instance
        argv = [sys.executable, "-m", "tug.engine", *sys.argv[1:]]
        os.execvp("nsenter", ["nsenter", f"--net=/run/netns/{lab.layout.client_ns}", "--", *argv])

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

    result = run(until_signalled())
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



def add_lab_parser(sub: Any) -> None:
    lab = sub.add_parser("lab", help="the built-in test lab: several hosts on this machine")
    instance_help = (f"the lab instance (1-8 of a-z0-9; default: ${ENV}, else '{DEFAULT}'): "
                     "instances coexist, each with its own namespaces, paths, cgroups and subnet")
    lab.add_argument("--lab", metavar="NAME", default=None, help=instance_help)
    # Also after the subcommand; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab", metavar="NAME", default=argparse.SUPPRESS, help=instance_help)
    ls = lab.add_subparsers(dest="lab_cmd", required=True, parser_class=_parser_with(common))
    up = ls.add_parser("up", help="create the lab (idempotent)")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--rate", help="shape each host's link, e.g. 1gbit")
    up.add_argument("--delay", help="add latency to each host's link, e.g. 1ms")
    ls.add_parser("down", help="remove everything the lab (this instance only) created")
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
    dm.add_argument("--churn", type=int, default=0, metavar="MIB", help="map this much new memory every 200 ms")
    dm.add_argument("--sysv-shm", type=int, default=0, metavar="MIB",
                    help="the workload also holds a SysV shared memory segment of MIB (the first of its IPC "
                         "namespace: id 0), dirtied and verified with its memory")
    dm.add_argument("--lock", metavar="PATH", help="the workload holds a POSIX write lock on PATH (inside the container)")
    dm.add_argument("--loopback", action="store_true",
                    help="the workload also keeps a TCP connection to its own server over the container's loopback "
                         "(a GET every 50 ms), which tug lab check verifies")
    dm.add_argument("--runtime", choices=("runc", "podman"), default="runc",
                    help="run it with runc (a bundle of tug's) or under the host's own podman")
    dm.add_argument("--volume", nargs="?", const=True, default=None, metavar="HOSTDIR:CONTAINERDIR",
                    help="keep the workload's state (its open heartbeat log, a checksummed record every 10 ms) on "
                         "HOSTDIR bind-mounted at CONTAINERDIR (alone: a lab directory at /state): a volume to move "
                         "with tug migrate --volume CONTAINERDIR=copy|shared")
    pd = ls.add_parser("pod", help="start a pod: a demo container holding the network namespace, and members joining it")
    pd.add_argument("host")
    pd.add_argument("name")
    pd.add_argument("--members", type=int, default=2, metavar="N")
    pd.add_argument("--memory", type=int, default=16, metavar="MIB")
    pd.add_argument("--dirty-rate", type=int, default=200, metavar="PAGES_PER_S")
    pd.add_argument("--shm", choices=("all", "members", "none"), default="all",
                    help="which containers attach the pod's SysV segment: all, the members only (not the holder), "
                    "or none (default all)")
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


def _parser_with(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """An ArgumentParser class whose every instance also takes ``common``'s options."""

    class WithCommon(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["parents"] = [*kwargs.get("parents", []), common]
            super().__init__(*args, **kwargs)

    return WithCommon
