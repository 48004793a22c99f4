#!/usr/bin/env bash
# Builds execd as one self-contained executable (PyInstaller, one-file): build/execd/opensandbox-execd.
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
onefile_args=(--add-data "$top/$code/bridge.py:${code#src/}")
build_onefile "$out" opensandbox-execd opensandbox_platform.execd.main

if [[ ${1:-} == --check ]]; then
  state=$(mktemp -d)
  start_for_check "$out/opensandbox-execd" /ping --state-dir "$state" --envs-file "$state/.env"
  events=$(curl -sfN -X POST "http://127.0.0.1:$port/command" -d '{"command":"echo built-ok"}')
  grep -q '"text":"built-ok"' <<<"$events" || { log "unexpected command output: $events"; exit 1; }
  # /code: a clear 4xx, whether this machine has kernels (the bridge ran, from the bundled source) or not.
  answer=$(curl -s -X POST "http://127.0.0.1:$port/code/context" -d '{"language":"no-such-language"}')
  grep -Eq '"code":"(UNSUPPORTED_LANGUAGE|NO_KERNELS)"' <<<"$answer" || { log "unexpected /code answer: $answer"; exit 1; }
  log "check passed: /ping, a command and /code answer"
fi
