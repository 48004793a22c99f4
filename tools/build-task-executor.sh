#!/usr/bin/env bash
# Builds the task-executor as a self-contained one-dir program (PyInstaller):
# build/task-executor/opensandbox-task-executor/ holds the executable opensandbox-task-executor and
# its libraries in lib/ (loaded in place: nothing is unpacked at start). Like execd's
# (tools/build-execd.sh), it runs in images without Python (glibc-based, glibc as new as this build
# machine's or newer).
#   tools/build-task-executor.sh            build (cached intermediates in build/task-executor/work)
#   tools/build-task-executor.sh --check    build, then start it on 127.0.0.1 and run a task
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/task-executor
log() { printf '[build-task-executor] %s\n' "$*" >&2; }
source "$top/tools/pyinstaller.sh"

# The executor needs the stdlib, execd's HTTP server and ctypes: execd's exclusions, and a few more.
[[ ! -f $out/opensandbox-task-executor ]] || rm "$out/opensandbox-task-executor"  # an earlier one-file build
build_daemon "$out" opensandbox-task-executor opensandbox_platform.task_executor.main lib \
  aiohttp prometheus_client uvloop httptools

if [[ ${1:-} == --check ]]; then
  state=$(mktemp -d)
  start_for_check "$out/opensandbox-task-executor/opensandbox-task-executor" /health --data-dir "$state"
  curl -sf -X POST "http://127.0.0.1:$port/tasks" -d '{"id":"check","command":["echo","built-ok"]}' >/dev/null
  task=$(curl -sf "http://127.0.0.1:$port/tasks/check?since=1&wait=10")
  grep -q '"state":"succeeded"' <<<"$task" && grep -q 'built-ok' <<<"$task" || { log "unexpected task: $task"; exit 1; }
  log "check passed: /health and a task"
fi
