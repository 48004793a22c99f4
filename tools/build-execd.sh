#!/usr/bin/env bash
# Builds execd as a self-contained one-dir program (PyInstaller) and assembles what every sandbox gets
# at /opt/opensandbox, in build/execd/opensandbox/:
#   execd          the executable (PyInstaller's bootloader; runs without Python)
#   execd-lib/     its libraries and bytecode, loaded in place (nothing is unpacked at start)
#   bootstrap.sh   images/execd-bootstrap.sh, the sandbox container's entrypoint
# It runs in images without Python (glibc-based, glibc as new as this build machine's or newer).
#   tools/build-execd.sh            build (cached intermediates in build/execd/work)
#   tools/build-execd.sh --check    build, then start it and ask /ping on 127.0.0.1
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/execd
log() { printf '[build-execd] %s\n' "$*" >&2; }
source "$top/tools/pyinstaller.sh"

# The kernel bridge runs with the image's Python, so it ships as a source file, not bytecode.
code=src/opensandbox_platform/execd/code
daemon_args=(--add-data "$top/$code/bridge.py:${code#src/}")
build_daemon "$out/dist" execd opensandbox_platform.execd.main execd-lib
rm -rf "$out/opensandbox" "$out/opensandbox-execd"  # (the latter: the one-file build of earlier versions)
cp -a "$out/dist/execd" "$out/opensandbox"
install -m 0755 "$top/images/execd-bootstrap.sh" "$out/opensandbox/bootstrap.sh"
log "assembled $out/opensandbox ($(du -sh "$out/opensandbox" | cut -f1))"

if [[ ${1:-} == --check ]]; then
  state=$(mktemp -d)
  start_for_check "$out/opensandbox/execd" /ping --state-dir "$state" --envs-file "$state/.env"
  events=$(curl -sfN -X POST "http://127.0.0.1:$port/command" -d '{"command":"echo built-ok"}')
  grep -q '"text":"built-ok"' <<<"$events" || { log "unexpected command output: $events"; exit 1; }
  # /code: a clear 4xx, whether this machine has kernels (the bridge ran, from the bundled source) or not.
  answer=$(curl -s -X POST "http://127.0.0.1:$port/code/context" -d '{"language":"no-such-language"}')
  grep -Eq '"code":"(UNSUPPORTED_LANGUAGE|NO_KERNELS)"' <<<"$answer" || { log "unexpected /code answer: $answer"; exit 1; }
  log "check passed: /ping, a command and /code answer"
fi
