#!/usr/bin/env bash
# The benchmark suite (as root): every side-by-side comparison in network namespaces on this
# machine, then BENCHMARKS.md, BENCHMARKS.json and the SVG charts.
#
#   scripts/bench.sh                 full run: the report at the repository root (tens of minutes)
#   scripts/bench.sh --quick         smoke run for CI: one short round each, a few minutes; the
#                                    report in $CARGO_TARGET_DIR/bench (or target/bench), checked
#   scripts/bench.sh [--only mesh dns ...] [--out DIR] [--rounds N]   passed to the suite
#                                    (`cargo bench -p shoal --bench system -- --list` lists them)
#
# Installs the peers first (scripts/install-test-deps.sh: HAProxy, nginx, socat, iperf3, wrk,
# wireguard-go, unbound, dnsmasq, dnsperf, serf, ...). Fails when a row failed (--strict) or the
# report is missing; a peer that is not installed is a row that says so, not a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/bench.sh: run as root (the benchmarks build network namespaces)" >&2
  exit 1
fi
scripts/install-test-deps.sh
# Where the suite writes (its defaults): --out DIR; else the repository root for a full run of
# every section; else (--quick, --only) $CARGO_TARGET_DIR/bench or target/bench.
quick=0 only=0 out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --quick) quick=1 ;;
    --only) only=1 ;;
    --out) out="${args[$((i + 1))]:-}" ;;
  esac
done
if [ -z "$out" ]; then
  if [ "$quick" = 1 ] || [ "$only" = 1 ]; then
    out="${CARGO_TARGET_DIR:-target}/bench"
  else
    out="."
  fi
fi
stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
start=$(date +%s)
# The same packages as the suite selects when it builds the other benchmarks: one feature
# resolution, one build of everything.
cargo bench --locked -p shoal -p shoal-dns -p shoal-ingress -p shoal-vxlan --bench system -- \
  --strict "$@"
for f in BENCHMARKS.md BENCHMARKS.json; do
  if [ ! -s "$out/$f" ] || [ ! "$out/$f" -nt "$stamp" ]; then
    echo "scripts/bench.sh: $out/$f was not written by this run" >&2
    exit 1
  fi
done
echo "scripts/bench.sh: report in $out/BENCHMARKS.md ($(( $(date +%s) - start )) s)"
