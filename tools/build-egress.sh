#!/usr/bin/env bash
# Builds the egress sidecar as a self-contained one-dir program (PyInstaller, as execd: nothing is
# unpacked at start): build/egress/opensandbox-egress/ (the executable opensandbox-egress beside
# egress-lib/). It carries libnftables and the libraries it links (from this machine's nftables
# package: apt-get install nftables), loaded through ctypes, and dnspython.
#   tools/build-egress.sh            build (cached intermediates in build/egress/work)
#   tools/build-egress.sh --check    build, then start it (--help) to see that it runs
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/egress
log() { printf '[build-egress] %s\n' "$*" >&2; }
source "$top/tools/pyinstaller.sh"

lib=$(ldconfig -p | awk '$1 == "libnftables.so.1" {print $NF; exit}')
[[ -n $lib ]] || { log "libnftables.so.1 is missing: apt-get install nftables"; exit 1; }
# PyInstaller collects what an added library links (libmnl, libnftnl, libjansson, libgmp, libxtables).
# dnspython's names need the idna codec, which needs unicodedata (the daemons' builds leave it out).
kept=()
for module in "${excludes[@]}"; do [[ $module == unicodedata ]] || kept+=("$module"); done
excludes=("${kept[@]}")
daemon_args=(--add-binary "$lib:." --collect-submodules dns)
[[ -d "$out/opensandbox-egress" ]] || rm -f "$out/opensandbox-egress"  # the one-file build of earlier versions
build_daemon "$out" opensandbox-egress opensandbox_platform.egress.main egress-lib \
  aiohttp prometheus_client uvloop httptools aiodocker

if [[ ${1:-} == --check ]]; then
  "$out/opensandbox-egress/opensandbox-egress" --help >/dev/null
  log "check passed: --help"
fi
