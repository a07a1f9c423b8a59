#!/usr/bin/env bash
# Installs the host packages Kiln needs on Debian 12 (bookworm). Idempotent.
#
# QEMU 10 comes from bookworm-backports. We never name a mirror: the
# backports source reuses the URI (and keyring) of the Debian source this
# machine's apt already uses.
set -euo pipefail

log() { printf '==> %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup-host.sh must run as root (it installs apt packages)" >&2
    exit 1
  fi
}

# Prints the URI of the configured Debian archive (the one serving bookworm).
debian_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822: the stanza whose Suites has "bookworm"; print its first URI.
    uri=$(awk -v RS= '{
            suites = 0; u = ""
            n = split($0, lines, "\n")
            for (i = 1; i <= n; i++) {
              if (lines[i] ~ /^Suites:/ && (" " lines[i] " ") ~ / bookworm /) suites = 1
              if (lines[i] ~ /^URIs:/) { split(lines[i], w, " "); u = w[2] }
            }
            if (suites && u != "") { print u; exit }
          }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return 0; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" && $0 ~ / bookworm( |$)/ {
            for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return 0; fi
  done
  return 1
}

enable_backports() {
  local target=/etc/apt/sources.list.d/kiln-bookworm-backports.sources
  if [ -f "$target" ] || grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then
    return 0
  fi
  local uri
  if ! uri=$(debian_uri); then
    echo "cannot find the Debian bookworm source in /etc/apt; add bookworm-backports by hand" >&2
    exit 1
  fi
  log "enabling bookworm-backports from $uri"
  cat >"$target" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  APT_UPDATED=0
}

PACKAGES=(
  e2fsprogs cpio zstd xz-utils
  # guest kernel build
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
  # bare-metal conformance guest
  nasm
  # test images and registry
  busybox-static docker-registry skopeo umoci debootstrap
  # networking
  iproute2 nftables
  # eBPF programs of kiln-net (crates/kiln-net/bpf, compiled by its build.rs)
  clang llvm libbpf-dev
  # network tests: ICMP reachability from namespaces
  iputils-ping
  # the node protocol's gRPC code (crates/kiln-api/proto, compiled by its build.rs)
  protobuf-compiler
  # the OpenAPI validator's virtualenv (scripts/lib.sh kiln_openapi_venv)
  python3-venv
)
BACKPORTS_PACKAGES=(qemu-system-x86 qemu-system-data qemu-utils)

# vsock for QEMU (the agent channel over vhost-user-vsock): a Rust crate
# (cargo install), built once into cargo's bin directory (about 1.5 min on 2 cores).
VHOST_VSOCK_VERSION=0.3.0

install_vhost_vsock() {
  local bin="${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock"
  if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "vhost-device-vsock $VHOST_VSOCK_VERSION" ]; then
    return 0
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    # Optional: only QEMU's vsock agent channel (and its tests) need it.
    echo "warning: no cargo on PATH here: vhost-device-vsock not installed (QEMU's vsock agent channel unavailable)" >&2
    return 0
  fi
  log "installing vhost-device-vsock $VHOST_VSOCK_VERSION (cargo install, ~1.5 min)"
  cargo install --locked --quiet vhost-device-vsock --version "$VHOST_VSOCK_VERSION"
}

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
  [ -n "$v" ] && [ "$v" -ge 10 ] && [ -f /usr/share/qemu/qboot.rom ]
}

main() {
  need_root
  APT_UPDATED=1
  enable_backports
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ] || ! qemu_ok; then
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" = 0 ] || [ ! -f /var/lib/apt/periodic/kiln-updated ] ; then
      log "apt-get update"
      apt-get update -qq
      mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/kiln-updated
    fi
    if [ ${#missing[@]} -gt 0 ]; then
      log "installing ${missing[*]}"
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! qemu_ok; then
      log "installing QEMU from bookworm-backports"
      apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BACKPORTS_PACKAGES[@]}" >/dev/null
    fi
  fi
  qemu_ok || { echo "QEMU >= 10 with qboot.rom is still missing after install" >&2; exit 1; }
  install_vhost_vsock
}

main "$@"
