#!/usr/bin/env python3
"""Splits a whole-machine profile of one wrk run into the parts of the request's route, in CPU
microseconds per request (crates/return/BENCH.md).

usage: perf_split.py RUN [HZ]
  RUN.data  perf record -a -g -F HZ -e cpu-clock, taken around the wrk run (HZ default 499)
  RUN.wrk   that wrk run's output (its "N requests in" line)
  DETAIL=bucket  also prints the stacks the bucket's samples were charged at

Only the request's own work counts: samples of wrk, nginx, HAProxy, ksoftirqd, kworkers and
the idle task, and samples of any other process taken inside network softirq (the machine is
shared, so other processes' own CPU is left out). Each kernel sample goes to the first frame,
from the leaf up, that names a part of the route, so a copy or an allocation is charged to
the layer that asked for it.
"""
import collections
import os
import re
import subprocess
import sys

OURS = ("wrk", "nginx", "haproxy", "ksoftirqd", "swapper", "kworker")
SOFTIRQ = ("net_rx_action", "__netif_receive_skb", "process_backlog", "veth_poll",
           "do_softirq", "handle_softirqs")
# (bucket, group, function-name prefixes), tried in this order on each frame.
BUCKETS = [
    ("conntrack", "netfilter", ("nf_conntrack", "nf_ct", "__nf_conntrack", "__nf_ct",
                                "nf_confirm", "ipv4_conntrack", "hash_conntrack", "nf_tcp",
                                "nf_udp")),
    ("nat", "netfilter", ("nf_nat", "__nf_nat", "nf_xfrm")),
    ("nftables", "netfilter", ("nft_", "nf_tables", "__nft")),
    ("vxlan", "overlay", ("vxlan", "udp_tunnel", "iptunnel", "ip_tunnel", "__iptunnel",
                          "udp_gro", "udp4_gro", "udp4_lib_lookup")),
    ("udp", "overlay", ("udp",)),
    ("veth", "devices+skb", ("veth_",)),
    ("macvlan", "overlay", ("macvlan_",)),
    ("bridge", "devices+skb", ("br_",)),
    ("nf_hook", "netfilter", ("nf_hook",)),
    ("routing", "ip+routing", ("fib_", "ip_route", "rt_", "ipv4_dst", "dst_", "ip_mkroute",
                               "__mkroute", "fib4", "ip_rt")),
    ("tcp", "tcp+sockets", ("tcp_", "__tcp", "inet_csk", "inet_ehash", "__inet_lookup",
                            "inet_")),
    ("ip", "ip+routing", ("ip_", "__ip_", "ip4_", "ipv4_")),
    ("gro", "overlay", ("gro_", "napi_gro", "dev_gro", "inet_gro", "skb_gro")),
    ("dev", "devices+skb", ("__dev_queue_xmit", "dev_hard_start", "netif_", "__netif", "napi_",
                            "__napi", "process_backlog", "net_rx_action", "dev_", "eth_",
                            "validate_xmit", "neigh_")),
    ("skb", "devices+skb", ("skb_", "__skb", "kfree_skb", "__kfree_skb", "consume_skb",
                            "kmem_cache", "__alloc_skb", "build_skb", "napi_alloc")),
    ("sockets", "tcp+sockets", ("sock_", "__sys_", "__x64_sys", "do_syscall", "ep_", "do_epoll",
                                "vfs_", "__sock", "sk_", "release_sock", "lock_sock",
                                "entry_SYSCALL", "syscall_exit", "copy_", "_copy", "rep_movs",
                                "__fsnotify", "ksys_", "do_writev", "do_iter")),
    ("sched", "tcp+sockets", ("schedule", "__schedule", "try_to_wake", "finish_task",
                              "pick_next", "enqueue", "dequeue", "update_", "__wake_up", "futex",
                              "hrtimer", "psi_")),
]
GROUPS = ["endpoints", "tcp+sockets", "netfilter", "ip+routing", "overlay", "devices+skb",
          "other"]


def samples(path):
    """(comm, [(function, dso)] leaf first) of each sample in a perf.data file."""
    out = subprocess.run(["perf", "script", "-i", path, "-F", "comm,ip,sym,dso"],
                         capture_output=True, text=True, check=True).stdout
    cur = None
    for line in out.splitlines():
        if not line.strip():
            if cur:
                yield cur
            cur = None
        elif not line[0].isspace():
            cur = (line.split()[0], [])
        elif cur is not None:
            parts = line.split(None, 1)
            sym = parts[1] if len(parts) > 1 else "?"
            dso = re.search(r"\(([^)]*)\)\s*$", sym)
            fn = re.sub(r"\+0x[0-9a-f]+", "", sym.split(" (")[0]).strip()
            cur[1].append((fn, dso.group(1) if dso else ""))
    if cur:
        yield cur


def charge(comm, frames):
    """(bucket, group, where) of one sample, or None when it is not the request's work."""
    fns = [f for f, _ in frames]
    softirq = any(f.startswith(SOFTIRQ) for f in fns)
    who = comm.split("/")[0].split("-")[0]
    if not (who.startswith(OURS) or softirq) or (who == "swapper" and not softirq):
        return None
    if frames and "kernel" not in frames[0][1]:
        return f"user:{who}", "endpoints", ""
    for i, fn in enumerate(fns):
        for bucket, group, prefixes in BUCKETS:
            if fn.startswith(prefixes):
                if not softirq and group == "tcp+sockets" and bucket != "tcp":
                    # A process's own system calls and scheduling, outside the network stack.
                    return f"{bucket}({who})", "endpoints", ""
                return bucket, group, " < ".join(fns[i:i + 4])
    return f"kernel({who})", "other", ""


def main():
    run = sys.argv[1]
    hz = float(sys.argv[2]) if len(sys.argv) > 2 else 499.0
    with open(f"{run}.wrk") as f:
        requests = next(float(l.split()[0]) for l in f if "requests in" in l)
    detail = os.environ.get("DETAIL")
    buckets, groups, where = collections.Counter(), collections.Counter(), collections.Counter()
    total = ours = 0
    for comm, frames in samples(f"{run}.data"):
        total += 1
        c = charge(comm, frames)
        if c is None:
            continue
        ours += 1
        buckets[c[0]] += 1
        groups[c[1]] += 1
        if c[0] == detail:
            where[c[2]] += 1

    def us(n):
        return n / hz / requests * 1e6

    print(f"{run}: {requests:.0f} requests, {us(ours):.1f} CPU µs/req "
          f"({ours} of {total} samples)")
    print("  " + "  ".join(f"{g} {us(groups[g]):.1f}" for g in GROUPS))
    for b, n in buckets.most_common():
        print(f"    {b:22s} {us(n):6.2f}")
    for w, n in where.most_common(25):
        print(f"      {us(n):5.2f} {w}")


if __name__ == "__main__":
    main()
