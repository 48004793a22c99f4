#!/usr/bin/env bash
# Builds the task-executor as one self-contained executable (PyInstaller, one-file):
# build/task-executor/opensandbox-task-executor. Like execd's (tools/build-execd.sh), it runs in images
# without Python (glibc-based, glibc as new as this build machine's or newer).
#   tools/build-task-executor.sh            build (cached intermediates in build/task-executor/work)
#   tools/build-task-executor.sh --check    build, then start it on 127.0.0.1 and run a task
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/task-executor
log() { printf '[build-task-executor] %s\n' "$*" >&2; }

cd "$top"
mkdir -p "$out/work"
cat >"$out/work/task_executor_entry.py" <<'PY'
from opensandbox_platform.task_executor.main import main

main()
PY

# The executor needs the stdlib, execd's HTTP server and ctypes; everything else stays out (see
# tools/build-execd.sh for why each of these matters).
excludes=(ssl _ssl _hashlib tkinter unittest pydoc doctest lib2to3 xmlrpc sqlite3 _sqlite3 curses readline
  decimal _decimal unicodedata _multibytecodec _codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr
  _codecs_tw pydantic pydantic_core fastapi starlette uvicorn httpx httpcore anyio h11 yaml lightkube
  opensandbox multiprocessing distutils setuptools pkg_resources aiohttp prometheus_client uvloop httptools)
args=()
for module in "${excludes[@]}"; do args+=(--exclude-module "$module"); done

log "pyinstaller (one-file)"
uv run --group dev pyinstaller --onefile --noconfirm --clean --log-level WARN \
  --name opensandbox-task-executor \
  --distpath "$out" --workpath "$out/work/build" --specpath "$out/work" \
  --paths "$top/src" \
  --strip \
  "${args[@]}" \
  "$out/work/task_executor_entry.py"

binary=$out/opensandbox-task-executor
log "built $binary ($(du -h "$binary" | cut -f1))"

if [[ ${1:-} == --check ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  state=$(mktemp -d)
  "$binary" --host 127.0.0.1 --port "$port" --data-dir "$state" &
  pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$state"' EXIT
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { log "no answer from /health"; exit 1; }
  curl -sf -X POST "http://127.0.0.1:$port/tasks" -d '{"id":"check","command":["echo","built-ok"]}' >/dev/null
  task=$(curl -sf "http://127.0.0.1:$port/tasks/check?since=1&wait=10")
  grep -q '"state":"succeeded"' <<<"$task" && grep -q 'built-ok' <<<"$task" || { log "unexpected task: $task"; exit 1; }
  log "check passed: /health and a task"
fi
