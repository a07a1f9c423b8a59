# Shared steps of quickstart.sh and test.sh (sourced, not run).

kiln_prepare() {
  if [ "$(id -u)" = 0 ]; then
    bash scripts/setup-host.sh
  else
    sudo bash scripts/setup-host.sh
  fi
  bash scripts/build-kernel.sh >/dev/null
  bash scripts/build-initramfs.sh >/dev/null
  echo "==> building kiln" >&2
  cargo build --release --quiet -p kiln-cli -p kiln-testkit
}
