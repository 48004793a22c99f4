#!/usr/bin/env bash
# Installs what a make target needs, idempotently:
#   tools/setup.sh run      uv and the Python environment (and what the local runtime's jails need)
#   tools/setup.sh test     the above, the Debian packages of the tests, and the cluster binaries
#   tools/setup.sh cluster  the cluster binaries (and their build dependencies)
# Debian packages are installed when running as root; otherwise a missing one is named and we stop.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[setup] %s\n' "$*" >&2; }

# The local runtime's jails: bwrap, slirp4netns (their way out), nft (their network policy),
# libseccomp (their system-call filter), nsenter (util-linux); they run the host's /usr, so the code
# interpreter's Python kernel (python3-ipykernel) and the data stack agents expect come from Debian.
RUN_DEBS=(bubblewrap slirp4netns nftables libseccomp2 util-linux curl
  python3-ipykernel python3-numpy python3-pandas python3-matplotlib)
# gcc: the security battery's probe (tests/security/probe.c) is built statically; apache2-utils:
# htpasswd, for the test registry's optional auth (tools/registry.sh); chromium and its WebDriver:
# the web console's tests run in a real headless browser (tests/e2e/test_console.py).
TEST_DEBS=(podman runc uidmap debootstrap openssl containerd containernetworking-plugins iptables iproute2 gcc libc6-dev
  apache2-utils chromium chromium-driver)

ensure_debs() {
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  if [[ $(id -u) != 0 ]]; then
    log "missing Debian packages: ${missing[*]}"
    log "install them with: sudo apt-get install -y ${missing[*]}"
    exit 1
  fi
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_uv() {
  command -v uv >/dev/null && return
  export PATH=$HOME/.local/bin:$PATH
  command -v uv >/dev/null && return
  log "installing uv from PyPI"
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
  command -v uv >/dev/null || { log "uv is not on PATH after install; add ~/.local/bin to PATH"; exit 1; }
}

python_env() {
  ensure_uv
  (cd "$top" && uv sync --quiet --frozen)
}

console_vendor() {  # the web console's terminal emulator (xterm.js), fetched with npm; `required`: the tests need it
  if ! command -v npm >/dev/null; then
    if [[ ${1:-} != required && $(id -u) != 0 ]]; then
      log "npm is missing: the console's terminal stays off until tools/vendor-console.sh runs (apt-get install npm)"
      return 0
    fi
    ensure_debs npm
  fi
  "$top/tools/vendor-console.sh"
}

cluster_bins() {
  command -v go >/dev/null || { log "Go is needed to build the test cluster's binaries (apt-get install golang or see go.dev)"; exit 1; }
  "$top/tools/build-tools.sh"
}

case ${1:-run} in
  run) ensure_debs "${RUN_DEBS[@]}"; python_env; console_vendor ;;
  test) ensure_debs "${RUN_DEBS[@]}" "${TEST_DEBS[@]}"; python_env; console_vendor required; cluster_bins ;;
  cluster) ensure_debs openssl curl; cluster_bins ;;
  *) echo "usage: $0 run|test|cluster" >&2; exit 2 ;;
esac
