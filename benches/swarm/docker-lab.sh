#!/usr/bin/env bash
# A real 3-node Docker Swarm peer for the benchmark suite (benches/swarm): Debian's docker.io
# (dockerd 20.10, its own containerd) in three network namespaces on one bridge, so nothing of
# Docker's touches this host's own network namespace, firewall, /var/lib/docker or /run/docker.
#
#   docker-lab.sh run DIR PREFIX NET BIP POOL   make the lab, print "ready", hold it until stdin
#                                               closes (or SIGINT/SIGTERM), then remove all of it
#   docker-lab.sh down DIR PREFIX               remove what a crashed `run` left behind
#
# DIR is a fresh directory for the nodes' state (DIR/nN/docker.sock is node N's API); PREFIX
# names the namespaces (PREFIX-n1..3, PREFIX-sw holding the bridge and the client address
# NET.254); NET is the first three octets of the underlay /24 (nodes NET.1-3). BIP (docker0's
# address/len) and POOL (base/len of the daemons' local networks, cut into /24s) keep Docker's
# own addresses inside 198.18.0.0/15 too. The caller (the suite) holds stdin: when it exits,
# however it exits, the pipe closes and this script tears the lab down.
set -u

cmd=${1:-}
dir=${2:?usage: docker-lab.sh run DIR PREFIX NET BIP POOL | down DIR PREFIX}
prefix=${3:?namespace prefix}
net=${4:-}
bip=${5:-}
pool=${6:-}
# The daemons' cgroup parent: where their containers' processes are found again at teardown.
cg="$prefix"

log() { echo "docker-lab: $*" >&2; }

# A node: private mount and UTS namespaces inside its network namespace. `ip netns exec` mounts
# a fresh /sys for the namespace, which hides the cgroup v1 hierarchies dockerd needs, so they
# are mounted again; /run/docker, /etc/docker and /var/lib/docker are the node's own (libnetwork
# writes some overlay files under /var/lib/docker whatever --data-root says).
node_up() {
  local i=$1 r="$dir/n$i"
  mkdir -p "$r/data" "$r/exec" "$r/etc" "$r/varlib"
  ip netns exec "$prefix-n$i" unshare -m -u --propagation private sh -c "
    hostname $prefix-n$i &&
    mount -t tmpfs $prefix-run /run/docker &&
    mount -t tmpfs $prefix-cg /sys/fs/cgroup &&
    for s in cpu cpuacct cpuset memory devices freezer blkio pids; do
      mkdir /sys/fs/cgroup/\$s && mount -t cgroup -o \$s cgroup /sys/fs/cgroup/\$s; done &&
    mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified &&
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd &&
    mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified &&
    mount --bind $r/etc /etc/docker &&
    mount --bind $r/varlib /var/lib/docker &&
    exec dockerd --data-root $r/data --exec-root $r/exec --pidfile $r/docker.pid \
      -H unix://$r/docker.sock --exec-opt native.cgroupdriver=cgroupfs --cgroup-parent $cg \
      --default-ulimit nofile=20000:20000 --default-runtime runc --storage-driver overlay2 \
      --bip $bip --default-address-pool base=$pool,size=24" \
    >"$r/dockerd.log" 2>&1 </dev/null &
  disown
  echo $! >"$r/launcher.pid"
}

d() {
  local i=$1
  shift
  /usr/bin/docker -H "unix://$dir/n$i/docker.sock" "$@"
}

# Docker labs running on this host, one file each: the host paths below are shared by them and
# removed only by the last one to go.
labs=/run/shoal-docker-labs

up() {
  mkdir -p "$dir" "$labs"
  # Host paths the daemons create when missing (the mount points above, containerd's shim
  # sockets, libmount's utab): remembered so that teardown removes only what a lab made.
  for p in /run/docker /var/lib/docker /etc/docker /run/containerd /run/mount; do
    [ -e "$p" ] || echo "$p" >>"$labs/created"
  done
  echo "$dir" >"$labs/$prefix"
  mkdir -p /run/docker /var/lib/docker /etc/docker
  ip netns add "$prefix-sw" || return 1
  ip -n "$prefix-sw" link set lo up
  ip -n "$prefix-sw" link add br0 type bridge
  ip -n "$prefix-sw" link set br0 up
  ip -n "$prefix-sw" addr add "$net.254/24" dev br0
  for i in 1 2 3; do
    ip netns add "$prefix-n$i" || return 1
    ip -n "$prefix-n$i" link set lo up
    # Made inside the node, its peer moved straight into the switch: the host's namespace
    # never holds either end.
    ip -n "$prefix-n$i" link add eth0 type veth peer name p$i netns "$prefix-sw"
    ip -n "$prefix-sw" link set p$i master br0 up
    ip -n "$prefix-n$i" addr add "$net.$i/24" dev eth0
    ip -n "$prefix-n$i" link set eth0 up
  done
  for i in 1 2 3; do node_up $i; done
  for i in 1 2 3; do
    local ok=0
    for _ in $(seq 1 240); do
      if d $i version >/dev/null 2>&1; then ok=1; break; fi
      kill -0 "$(cat "$dir/n$i/launcher.pid")" 2>/dev/null || break
      sleep 0.25
    done
    if [ $ok = 0 ]; then
      log "dockerd of node $i did not start: $(tail -n 3 "$dir/n$i/dockerd.log" | tr '\n' ' ')"
      return 1
    fi
  done
  # The image every task runs: a static busybox (httpd, nc, nslookup), imported, so nothing
  # is pulled from a registry (the nodes have no default route).
  local bb="$dir/image"
  mkdir -p "$bb/rootfs/bin" "$bb/rootfs/tmp" "$bb/rootfs/www/cgi-bin"
  cp "$(command -v busybox)" "$bb/rootfs/bin/busybox" || return 1
  for a in sh httpd nc nslookup sleep cat echo hostname ip wget; do
    ln -sf busybox "$bb/rootfs/bin/$a"
  done
  echo ok >"$bb/rootfs/www/index.html"
  # The client's address as the task sees it (busybox httpd's CGI REMOTE_ADDR).
  printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "$REMOTE_ADDR"\n' \
    >"$bb/rootfs/www/cgi-bin/ip"
  chmod +x "$bb/rootfs/www/cgi-bin/ip"
  tar -C "$bb/rootfs" -cf "$bb/bb.tar" . || return 1
  for i in 1 2 3; do d $i import "$bb/bb.tar" bb:latest >/dev/null || return 1; done
}

down() {
  # Containers first (each in its own namespaces; found by the daemons' cgroup parent), then
  # the daemons and their containerd and shims (found in the nodes' network namespaces).
  for c in /sys/fs/cgroup/pids/"$cg"; do
    [ -d "$c" ] && find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null
  done
  for i in 1 2 3; do
    for f in "$dir/n$i/docker.pid" "$dir/n$i/launcher.pid"; do
      [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null
    done
  done
  for ns in "$prefix-n1" "$prefix-n2" "$prefix-n3" "$prefix-sw"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
  done
  # Every process gone before the namespaces, cgroups and files go.
  for _ in $(seq 1 50); do
    left=0
    for ns in "$prefix-n1" "$prefix-n2" "$prefix-n3" "$prefix-sw"; do
      [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && left=1
    done
    [ $left = 0 ] && break
    sleep 0.1
  done
  # Task namespaces Docker made for containers and overlays live under the nodes' private
  # /run/docker and vanish with their last process; the nodes' own go here.
  for ns in "$prefix-n1" "$prefix-n2" "$prefix-n3" "$prefix-sw"; do
    ip netns del "$ns" 2>/dev/null
  done
  for c in /sys/fs/cgroup/*/"$cg"; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -f "$labs/$prefix"
  if [ -d "$labs" ] && [ -z "$(ls "$labs" | grep -vx created)" ]; then
    if [ -f "$labs/created" ]; then
      while read -r p; do
        case "$p" in
          /run/containerd | /run/mount) rm -rf "$p" ;;
          *) rmdir "$p" 2>/dev/null ;;
        esac
      done <"$labs/created"
    fi
    rm -rf "$labs"
  fi
  rm -rf "$dir"
}

case "$cmd" in
  run)
    if [ -z "$pool" ]; then
      log "usage: docker-lab.sh run DIR PREFIX NET BIP POOL (e.g. 198.19.65 198.19.66.1/24 198.19.80.0/20)"
      exit 64
    fi
    if [ -e "$dir" ]; then log "$dir exists"; exit 1; fi
    trap 'down; exit 130' INT TERM
    if up; then
      echo ready
      # Hold the lab until the suite closes our stdin (it exited, or is done with the peer). The
      # reader runs in the background so that a signal's trap runs at once, not after it.
      cat <&0 >/dev/null &
      reader=$!
      trap 'kill $reader 2>/dev/null; down; exit 130' INT TERM
      wait $reader
    else
      log "bringing the Docker lab up failed; removing it"
    fi
    down
    ;;
  down) down ;;
  *)
    log "usage: docker-lab.sh run DIR PREFIX NET | down DIR PREFIX"
    exit 64
    ;;
esac
