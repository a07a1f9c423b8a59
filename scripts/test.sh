#!/usr/bin/env bash
# The README's second command: sets up what is missing (as quickstart.sh
# does), then runs the whole test suite: formatting, clippy, unit tests and
# end-to-end tests on real microVMs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

kiln_prepare
echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --no-fail-fast "$@"
