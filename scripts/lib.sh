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

# A Python virtualenv outside the repository with the OpenAPI validator
# (PyPI `openapi-spec-validator`), created once; prints its python.
kiln_openapi_venv() {
  local venv="${KILN_CACHE:-$HOME/.cache/kiln}/venv"
  if ! "$venv/bin/python" -c 'import openapi_spec_validator' 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet 'openapi-spec-validator>=0.7,<0.8' >&2
  fi
  echo "$venv/bin/python"
}
