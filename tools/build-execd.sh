#!/usr/bin/env bash
# Builds execd as one self-contained executable (PyInstaller, one-file): build/execd/opensandbox-execd.
# It runs in images without Python (glibc-based, glibc as new as this build machine's or newer).
#   tools/build-execd.sh            build (cached intermediates in build/execd/work)
#   tools/build-execd.sh --check    build, then start it and ask /ping on 127.0.0.1
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/execd
log() { printf '[build-execd] %s\n' "$*" >&2; }

cd "$top"
mkdir -p "$out/work"
# The entry script: PyInstaller wants a file, not a module path.
cat >"$out/work/execd_entry.py" <<'PY'
from opensandbox_platform.execd.main import main

main()
PY

# Excluded: what execd never imports but the stdlib or site-packages would drag in. `ssl` is also
# kept out at run time (main.py), so leaving OpenSSL out of the bundle loses nothing.
# _hashlib would bring OpenSSL's libcrypto (hashlib falls back to its built-in hashes); the CJK
# codecs, unicodedata and _decimal are big extension modules execd never loads.
excludes=(ssl _ssl _hashlib tkinter unittest pydoc doctest lib2to3 xmlrpc sqlite3 _sqlite3 curses readline
  decimal _decimal unicodedata _multibytecodec _codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr
  _codecs_tw pydantic pydantic_core fastapi starlette uvicorn httpx httpcore anyio h11 yaml lightkube
  opensandbox multiprocessing distutils setuptools pkg_resources)
args=()
for module in "${excludes[@]}"; do args+=(--exclude-module "$module"); done

log "pyinstaller (one-file)"
uv run --group dev pyinstaller --onefile --noconfirm --clean --log-level WARN \
  --name opensandbox-execd \
  --distpath "$out" --workpath "$out/work/build" --specpath "$out/work" \
  --paths "$top/src" \
  --strip \
  "${args[@]}" \
  "$out/work/execd_entry.py"

binary=$out/opensandbox-execd
log "built $binary ($(du -h "$binary" | cut -f1))"

if [[ ${1:-} == --check ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  state=$(mktemp -d)
  "$binary" --host 127.0.0.1 --port "$port" --state-dir "$state" --envs-file "$state/.env" &
  pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$state"' EXIT
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/ping" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$port/ping" >/dev/null || { log "no answer from /ping"; exit 1; }
  events=$(curl -sfN -X POST "http://127.0.0.1:$port/command" -d '{"command":"echo built-ok"}')
  grep -q '"text":"built-ok"' <<<"$events" || { log "unexpected command output: $events"; exit 1; }
  log "check passed: /ping and a command answer"
fi
