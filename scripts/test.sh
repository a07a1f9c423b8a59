#!/usr/bin/env bash
# The README's second command: sets up what is missing (as quickstart.sh
# does), then runs the whole test suite: formatting, clippy, unit and
# component tests, and end-to-end tests on real microVMs, one group at a
# time, printing how long each group took. Every group runs even when an
# earlier one failed; the exit code says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

set -e
kiln_prepare
set +e

# Tests start the servers they need: no command of theirs starts the
# embedded one on first use (the product's default; e2e_up tests it with
# the variable unset).
export KILN_AUTO_UP=0

failed=()
times=()
group() {
  local name=$1
  shift
  local t0=$SECONDS
  echo "==> $name" >&2
  "$@"
  local rc=$?
  local took=$((SECONDS - t0))
  times+=("$(printf '%-28s %5d s  %s' "$name" "$took" "$([ $rc = 0 ] && echo ok || echo FAILED)")")
  echo "==> $name: ${took} s (exit $rc)" >&2
  [ $rc = 0 ] || failed+=("$name")
}

group "cargo fmt --check" cargo fmt --all -- --check
group "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
# Unit and component tests, one crate a group (kiln-cli's own unit tests
# too; its end-to-end tests below).
for c in crates/*/; do
  c=$(basename "$c")
  [ "$c" = kiln-cli ] && continue
  group "$c" cargo test -p "$c" --no-fail-fast "$@"
done
group "kiln-cli unit tests" cargo test -p kiln-cli --bins --no-fail-fast "$@"
# kiln-cli's tests of the control-plane commands against real `kiln server`
# processes (no microVMs), one file a group.
for f in crates/kiln-cli/tests/*.rs; do
  t=$(basename "$f" .rs)
  case "$t" in e2e_*) continue ;; esac
  group "$t" cargo test -p kiln-cli --test "$t" --no-fail-fast "$@"
done
# End-to-end tests on real microVMs, one file a group.
for f in crates/kiln-cli/tests/e2e_*.rs; do
  t=$(basename "$f" .rs)
  group "$t" cargo test -p kiln-cli --test "$t" --no-fail-fast "$@"
done
# The same tests of kiln run, exec/cp/logs, snapshots, fork and templates
# again through the embedded server: each test starts `kiln up -d` on its
# state directory and every command goes through its API
# (tests/common/mod.rs).
for t in e2e_run e2e_sandboxes e2e_snapshots e2e_templates; do
  group "$t (kiln up)" env KILN_E2E_ROUTE=up cargo test -p kiln-cli --test "$t" --no-fail-fast "$@"
done

echo >&2
echo "==> time per group" >&2
printf '  %s\n' "${times[@]}" >&2
if [ -z "${KILN_FIRECRACKER_BIN:-}" ]; then
  echo "==> Firecracker conformance: SKIPPED (KILN_FIRECRACKER_BIN is not set; docs/vmm-drivers.md says how to build one and run it)" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "==> FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "==> all groups passed" >&2
