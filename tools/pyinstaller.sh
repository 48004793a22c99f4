# Sourced by tools/build-execd.sh, tools/build-task-executor.sh and tools/build-image.sh (which set
# `top` and `log`): PyInstaller builds of a program's main(), all one-dir (the executable beside a
# directory of its libraries: nothing is unpacked at start, so the daemons listen within tens of ms
# and charge no unpacked copy to the sandbox's memory), and a start of a daemon for their --check.
# The executables run without Python (glibc-based, glibc as new as this build machine's or newer).

# Excluded: what the daemons never import but the stdlib or site-packages would drag in. `ssl` is also
# kept out at run time (their main.py), so leaving OpenSSL out of the bundle loses nothing.
# _hashlib would bring OpenSSL's libcrypto (hashlib falls back to its built-in hashes); the CJK
# codecs, unicodedata and _decimal are big extension modules they never load.
excludes=(ssl _ssl _hashlib tkinter unittest pydoc doctest lib2to3 xmlrpc sqlite3 _sqlite3 curses readline
  decimal _decimal unicodedata _multibytecodec _codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr
  _codecs_tw pydantic pydantic_core fastapi starlette uvicorn httpx httpcore anyio h11 yaml lightkube
  opensandbox multiprocessing distutils setuptools pkg_resources)

# build_program MODE OUT NAME MODULE [PYINSTALLER-ARG...]: a PyInstaller build (MODE onefile or
# onedir) named NAME in OUT that runs MODULE's main(); intermediates cached in OUT/work.
build_program() {
  local mode=$1 out=$2 name=$3 module=$4 entry
  shift 4
  mkdir -p "$out/work"
  entry=${module%.main}
  entry=$out/work/${entry##*.}_entry.py  # PyInstaller wants a file, not a module path
  printf 'from %s import main\n\nmain()\n' "$module" >"$entry"
  log "pyinstaller --$mode $name"
  (cd "$top" && uv run --group dev pyinstaller "--$mode" --noconfirm --clean --log-level WARN \
    --name "$name" --distpath "$out" --workpath "$out/work/build" --specpath "$out/work" \
    --paths "$top/src" --strip "$@" "$entry")
  log "built $out/$name ($(du -sh "$out/$name" | cut -f1))"
}

# exclude_args MODULE...: sets `excluded_args` to --exclude-module for each.
exclude_args() {
  excluded_args=()
  local module
  for module in "$@"; do excluded_args+=(--exclude-module "$module"); done
}

# build_daemon OUT NAME MODULE CONTENTS [EXCLUDE...]: a daemon's one-dir build OUT/NAME/ (the
# executable OUT/NAME/NAME, its libraries in OUT/NAME/CONTENTS/), without `excludes` and EXCLUDE; the
# array `daemon_args` (if set) adds PyInstaller arguments. What makes the daemons start fast and small:
# - tools/pyinstaller-hooks/rthooks.dat replaces PyInstaller's run-time hook for `inspect` (it imports
#   inspect and zipfile and reads base_library.zip's index at every start, for tracebacks' source
#   lines in frozen programs);
# - bytecode compiled without column tables (PYTHONNODEBUGRANGES: tracebacks lose only their ^^^
#   markers) and with --optimize 2 (no docstrings; the daemons' asserts only narrow types): smaller
#   code objects, less memory per imported module;
# - the bytecode archive stored, not zlib-compressed (PYINSTALLER_ZLIB_COMPRESSION_LEVEL=0): 2.3 MiB
#   more on disk, ~6 ms (11%) less to start, as measured with bench/coldstart_bench.py.
build_daemon() {
  local out=$1 name=$2 module=$3 contents=$4
  shift 4
  exclude_args "${excludes[@]}" "$@"
  PYTHONNODEBUGRANGES=1 PYINSTALLER_ZLIB_COMPRESSION_LEVEL=0 \
    build_program onedir "$out" "$name" "$module" --contents-directory "$contents" \
    --additional-hooks-dir "$top/tools/pyinstaller-hooks" --optimize 2 "${excluded_args[@]}" "${daemon_args[@]}"
}

# start_for_check BINARY PATH [ARG...]: starts BINARY --host 127.0.0.1 --port $port ARG... in the
# background and returns once GET PATH answers (fails otherwise); sets `port`. On exit it is stopped
# and $state (if set) removed.
start_for_check() {
  local binary=$1 path=$2
  shift 2
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$binary" --host 127.0.0.1 --port "$port" "$@" &
  check_pid=$!
  trap 'kill $check_pid 2>/dev/null; wait $check_pid 2>/dev/null; [[ -z ${state:-} ]] || rm -rf "$state"' EXIT
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port$path" >/dev/null && return 0
    sleep 0.1
  done
  log "no answer from $path"
  exit 1
}
