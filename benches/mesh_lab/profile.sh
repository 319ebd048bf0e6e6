#!/usr/bin/env bash
# Profiles the kernel path's route part by part (crates/return/BENCH.md): the mesh-lab
# section's lab (3 nodes, nginx tasks on node2 and node3, HAProxy in node1 to plain nginx on
# the underlay), then one `wrk -t2 -c50` run per route under `perf record -a -g`, each split
# by perf_split.py. Root; needs wrk, nginx, haproxy, curl, perf, python3.
#
# usage: benches/mesh_lab/profile.sh [SHOAL_BINARY]   (DUR=10 seconds per run, OUT=directory)
#
# Routes: k kernel path (host -> node1:8400, DNAT), h HAProxy (host -> node1:8200),
# d direct (host -> node2's nginx), u underlay from node1's namespace to node2's nginx,
# s overlay alone (from node1's ingress sandbox to a task), o node1's namespace to a task
# (through the link into the sandbox, then the overlay; no DNAT).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shoal=$(realpath "${1:-$here/../../target/release/shoal}")
lab=kp$(($$ % 100000))
net=198.18.$((200 + $$ % 50))
dur=${DUR:-10}
out=${OUT:-$(mktemp -d /tmp/shoal-kprof.XXXX)}
mkdir -p "$out"
chmod 755 "$out"
mkdir -p "$out/www" && head -c 1024 /dev/zero | tr '\0' x >"$out/www/1k" && chmod -R a+rX "$out"
cleanup() {
  for p in "$out"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  "$shoal" lab down --lab "$lab" >/dev/null 2>&1 || true
}
trap cleanup EXIT
for port in 8080 18080; do
  printf 'worker_processes 1;\nerror_log %s/nginx-%s.err;\nevents { worker_connections 4096; }\nhttp { access_log off; server { listen %s reuseport; location / { root %s/www; } } }\n' \
    "$out" "$port" "$port" "$out" >"$out/nginx-$port.conf"
done
"$shoal" lab up --lab "$lab" --nodes 3 --subnet "$net.0/24" >/dev/null
on() { local n=$1; shift; "$shoal" --lab "$lab" --node "$n" "$@"; }
on node1 swarm init >/dev/null
token=$(on node1 swarm join-token -q worker)
for n in node2 node3; do on $n swarm join --token "$token" "$net.1:2377" >/dev/null; done
on node1 service create --name web --replicas 2 --constraint 'node.hostname!=node1' \
  --publish published=8400,target=8080,mesh=kernel -- \
  sh -c "exec nginx -c $out/nginx-8080.conf -g \"daemon off; pid $out/task-\$\$.pid;\"" >/dev/null
for n in 2 3; do
  ip netns exec "$lab-node$n" nginx -c "$out/nginx-18080.conf" -g "pid $out/plain-$n.pid;"
done
printf 'global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind %s.1:8200\n  default_backend b\nbackend b\n  balance roundrobin\n  server s2 %s.2:18080\n  server s3 %s.3:18080\n' \
  "$net" "$net" "$net" >"$out/haproxy.cfg"
ip netns exec "$lab-node1" haproxy -D -f "$out/haproxy.cfg" -p "$out/haproxy.pid"
# A task's overlay address: the first backend of node1's DNAT map.
task=""
for _ in $(seq 60); do
  task=$(ip netns exec "$lab-node1" nft list table ip shoal-mesh 2>/dev/null |
    grep -o '0 : [0-9.]*' | head -1 | cut -d' ' -f3) || true
  [ -n "$task" ] && curl -sf -m 1 -o /dev/null "http://$net.1:8400/1k" && break
  sleep 1
done
[ -n "$task" ] || { echo "the kernel path never answered" >&2; exit 1; }
run() { # NAME URL [NETNS]
  local ns=()
  [ -n "${3:-}" ] && ns=(ip netns exec "$3")
  perf record -q -a -g -F 499 -e cpu-clock -o "$out/$1.data" -- \
    "${ns[@]}" wrk -t2 -c50 -d"${dur}s" --latency "$2" >"$out/$1.wrk" 2>&1
  echo "$1 $(grep Requests/sec "$out/$1.wrk") p99 $(awk '$1=="99%"{print $2}' "$out/$1.wrk")"
}
run k "http://$net.1:8400/1k"
run h "http://$net.1:8200/1k"
run d "http://$net.2:18080/1k"
run u "http://$net.2:18080/1k" "$lab-node1"
run s "http://$task:8080/1k" "$lab-node1-ingress"
run o "http://$task:8080/1k" "$lab-node1"
cd "$out"
for r in k h d u s o; do python3 "$here/perf_split.py" "$r" >"$r.split" && head -2 "$r.split"; done
echo "profiles and wrk outputs in $out"
