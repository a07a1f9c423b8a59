#!/usr/bin/env bash
# Builds the Kiln guest kernel from Debian's linux-source-6.1 with the config
# fragment guest/kernel/kiln.config. Cached under $KILN_CACHE_DIR/kernel/<key>,
# where <key> hashes the fragment and the kernel source package version, so it
# is rebuilt only when one of them changes. Prints the cache directory.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
frag=$here/guest/kernel/kiln.config
src_tar=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -1)
[ -n "$src_tar" ] || { echo "linux-source-6.1 is not installed (run scripts/setup-host.sh)" >&2; exit 1; }
src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( (cat "$frag"; echo "$src_ver"; cat "$0") | sha256sum | cut -c1-16)
out=$cache/kernel/$key
link_current() { ln -sfn "$key" "$cache/kernel/current"; }
if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
  link_current; echo "$out"; exit 0
fi
mkdir -p "$cache/kernel"
work=$(mktemp -d "$cache/kernel/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "==> building the guest kernel (linux-source $src_ver, about 3 minutes)" >&2
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1
make -s tinyconfig >/dev/null
KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$frag" >/dev/null
make -s olddefconfig >/dev/null
# Every option the fragment sets must have survived (dependencies can drop them).
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) grep -qx "$line" .config || { echo "kernel config lost: $line" >&2; missing=1; } ;; esac
done <"$frag"
[ $missing = 0 ] || exit 1
make -s -j"$(nproc)" bzImage >/dev/null 2>"$work/build.log" || { tail -50 "$work/build.log" >&2; exit 1; }
mkdir -p "$work/out"
cp arch/x86/boot/bzImage vmlinux .config "$work/out/"
mv .config "$work/out/config"
rm -rf "$out"
mv "$work/out" "$out"
link_current
echo "$out"
