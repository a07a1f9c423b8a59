#!/usr/bin/env bash
# Builds kiln-init (static) and packs it as /init into a gzip'd newc cpio.
# Output: $CACHE/initramfs/<sha256-prefix>/{initramfs.img,kiln-init}, with
# $CACHE/initramfs/current pointing at it. Prints the directory.
# Idempotent: an existing initramfs for the same kiln-init is reused.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
target_dir="$repo/target-guest"
triple=x86_64-unknown-linux-gnu

# The explicit --target keeps RUSTFLAGS away from build scripts/proc-macros.
# Stripped: a smaller initramfs unpacks faster (TCG makes every byte count).
RUSTFLAGS="-C target-feature=+crt-static" \
CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build --quiet --release -p kiln-guest --bin kiln-init \
  --target "$triple" --target-dir "$target_dir" --manifest-path "$repo/Cargo.toml" >&2

bin="$target_dir/$triple/release/kiln-init"
if ! file "$bin" | grep -q 'static'; then
  echo "build-initramfs: $bin is not statically linked" >&2
  exit 1
fi

hash="$(sha256sum "$bin" | cut -c1-16)"
dir="$cache/initramfs/$hash"
if [[ ! -s "$dir/initramfs.img" ]]; then
  mkdir -p "$cache/initramfs"
  tmp="$(mktemp -d "$cache/initramfs/.build.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  chmod 0755 "$tmp"
  mkdir -p "$tmp/root"
  install -m 0755 "$bin" "$tmp/root/init"
  (cd "$tmp/root" && printf 'init\n' | cpio --quiet -o -H newc -R 0:0) | gzip -1 > "$tmp/initramfs.img"
  install -m 0755 "$bin" "$tmp/kiln-init"
  rm -rf "$tmp/root"
  # Publish atomically: a concurrent build of the same hash wins or loses whole.
  if ! mv -T "$tmp" "$dir" 2>/dev/null; then
    rm -rf "$tmp"
  fi
  trap - EXIT
fi
ln -sfn "$hash" "$cache/initramfs/current.tmp.$$"
mv -T "$cache/initramfs/current.tmp.$$" "$cache/initramfs/current"
echo "$dir"
