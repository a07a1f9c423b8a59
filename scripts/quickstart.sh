#!/usr/bin/env bash
# The README's first command: sets up this Debian 12 host (apt packages, QEMU
# 10 from bookworm-backports, the guest kernel, kiln-init's initramfs, Kiln
# itself) and runs a command in a microVM booted from an OCI image.
# Idempotent: a second run rebuilds nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

kiln_prepare
img=$(target/release/kiln-testkit image busybox)
echo "==> kiln run $img -- echo hello from a Kiln microVM" >&2
exec target/release/kiln run "$img" -- echo "hello from a Kiln microVM"
