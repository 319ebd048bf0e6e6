#!/usr/bin/env bash
# Installs the Debian packages shoal's tests and benchmarks use as real peers and tools.
# Idempotent: does nothing when everything is there. Needs root to install.
set -euo pipefail

PACKAGES=(
  iproute2 nftables iputils-ping procps psmisc curl dnsutils systemd
  redis-server tcpdump tshark iperf3 wrk socat bc
  haproxy nginx-light libnginx-mod-stream dnsmasq-base unbound dnsperf
  serf wireguard-go wireguard-tools python3 chromium
  clang llvm libbpf-dev # crates/ingress's sockmap test and bench compile its BPF program
  # Real containers on shoal networks (tests/cni.rs): podman with CNI.
  podman runc containernetworking-plugins
  # The Docker Swarm peer (benches/swarm, tests/docker_parity.rs): dockerd 20.10 and the static
  # busybox its image is made of.
  docker.io containerd busybox-static
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-test-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: missing ${missing[*]}; run as root to install them (tests that need them will skip or fail)" >&2
  exit 0
fi
echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Packages must not start their daemons here: a dockerd in this host's own network namespace
# would rewrite its firewall. Without a policy of the host's own, deny every start during the
# install.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts some of these as system services; the tests run their own instances.
for svc in redis-server nginx haproxy unbound dnsmasq docker.socket docker containerd; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
done
echo "install-test-deps: done"
