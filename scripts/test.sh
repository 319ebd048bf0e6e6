#!/usr/bin/env bash
# The one command that passes the tests: installs the Debian packages the tests need (as root),
# then runs every test of the workspace. Root-only tests (network namespaces) run as root; as
# another user they skip loudly, and under CI=true they fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo test --workspace --locked --no-fail-fast "$@"
