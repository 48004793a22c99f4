#!/usr/bin/env bash
# Builds the image of one program from a self-contained PyInstaller build, without any registry:
#   tools/build-image.sh controller IMAGE     images/controller.Dockerfile (opensandbox-controller)
#   tools/build-image.sh server IMAGE         images/server.Dockerfile (opensandbox-server)
#   tools/build-image.sh execd IMAGE          images/execd.Dockerfile (tools/build-execd.sh)
#   tools/build-image.sh task-executor IMAGE  images/task-executor.Dockerfile (tools/build-task-executor.sh)
#   tools/build-image.sh egress IMAGE         images/egress.Dockerfile (tools/build-egress.sh)
#   tools/build-image.sh code-interpreter IMAGE  Debian + Jupyter kernels (tools/code-interpreter-image.sh)
#
# controller and server are built one-dir (build/<name>/opensandbox-<name>/: the executable beside
# its libraries; nothing is unpacked at start, so a read-only root file system works) and copied
# with the few system libraries they link (glibc's, resolved with ldd on this machine: the build
# needs this glibc) into an image FROM scratch: no shell, no package manager, no Python.
# execd's and the task executor's images are FROM localhost/opensandbox-test-base:latest
# (tools/test-image.sh): execd's init container needs `cp`; both are one-dir builds too.
# An unqualified IMAGE (opensandbox/controller:dev) is also tagged docker.io/IMAGE: that is the
# name a kubelet looks for, so an image loaded into a node's runtime is found with pullPolicy Never.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
name=${1:?usage: tools/build-image.sh controller|server|execd|task-executor|egress|code-interpreter IMAGE}
image=${2:?usage: tools/build-image.sh controller|server|execd|task-executor|egress|code-interpreter IMAGE}
# A root file system, not a program: debootstrap and apt, no PyInstaller build.
[[ $name != code-interpreter ]] || exec "$(dirname "$0")/code-interpreter-image.sh" "$image"
base=localhost/opensandbox-test-base:latest
engine=${CONTAINER_ENGINE:-podman}
log() { printf '[build-image] %s\n' "$*" >&2; }
source "$top/tools/pyinstaller.sh"
cd "$top"

# Modules a program never imports that the environment would drag in.
common_excludes=(tkinter unittest pydoc doctest lib2to3 xmlrpc sqlite3 _sqlite3 curses readline
  distutils setuptools pkg_resources opensandbox opensandbox_cli opensandbox_mcp docker pytest
  mypy ruff PyInstaller cryptography OpenSSL cffi _cffi_backend)

build_onedir() {  # prog entry-module extra-pyinstaller-args...: build/<prog>/opensandbox-<prog>/
  local prog=$1 module=$2
  shift 2
  exclude_args "${common_excludes[@]}"
  build_program onedir "$top/build/$prog" "opensandbox-$prog" "$module" --contents-directory lib \
    "${excluded_args[@]}" "$@"
}

# The system libraries the bundle links that it does not carry (glibc's): their paths. The
# bootloader links before it sets the library path (so it needs e.g. zlib from the system); the
# bundled libraries resolve among themselves.
system_libs() {
  local dir=$1 exe=$2
  {
    ldd "$exe"
    find "$dir" -type f \( -name '*.so*' -o -perm -u+x \) -print0 | LD_LIBRARY_PATH=$dir/lib xargs -0 ldd 2>/dev/null
  } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/lib64\// {print $1}' \
    | grep -v "^$dir" | sort -u
}

stage_libs() {  # name: writes build/<name>/syslibs/ with the libraries, resolved, at their paths
  local prog=$1 out=$top/build/$1
  rm -rf "$out/syslibs" && mkdir -p "$out/syslibs"
  while read -r lib; do
    mkdir -p "$out/syslibs$(dirname "$lib")"
    cp -L "$lib" "$out/syslibs$lib"
  done < <(system_libs "$out/opensandbox-$prog" "$out/opensandbox-$prog/opensandbox-$prog")
  log "system libraries: $(cd "$out/syslibs" && find . -type f | sort | tr '\n' ' ')"
}

case $name in
  controller)
    build_onedir controller opensandbox_platform.controller.main \
      --exclude-module fastapi --exclude-module starlette --exclude-module uvicorn \
      --exclude-module aiodocker --exclude-module websockets --exclude-module httptools \
      --exclude-module uvloop
    stage_libs controller
    ;;
  server)
    "$top/tools/vendor-console.sh"  # the console's xterm.js, shipped with its page and script
    static=src/opensandbox_platform/server/console/static
    build_onedir server opensandbox_platform.server.main \
      --collect-submodules uvicorn --collect-submodules opensandbox_platform.server \
      --add-data "$top/$static:opensandbox_platform/server/console/static" \
      --hidden-import uvloop --hidden-import httptools
    stage_libs server
    ;;
  execd | task-executor | egress)
    "$top/tools/test-image.sh"  # the local base (no registry)
    "tools/build-$name.sh"
    ;;
  *) log "unknown program $name (controller, server, execd, task-executor or egress)"; exit 2 ;;
esac

log "$engine build $image"
build_args=()
[[ $name != execd && $name != task-executor && $name != egress ]] || build_args=(--build-arg "BASE_IMAGE=$base")
# SOURCE_HASH (set by harness/images.py): recorded as a label, so an image built from the same
# sources is reused instead of rebuilt.
[[ -z ${SOURCE_HASH:-} ]] || build_args+=(--label "opensandbox.io/source-hash=$SOURCE_HASH")
"$engine" build -q -f "images/$name.Dockerfile" "${build_args[@]}" -t "$image" . >/dev/null
first=${image%%/*}
if [[ $image == */* && $first != *.* && $first != *:* && $first != localhost ]]; then
  "$engine" tag "$image" "docker.io/$image"
fi
log "built $image ($("$engine" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.1f MB", $1/1e6}'))"
if [[ $name != execd ]]; then  # the image starts: every library it needs is in it
  "$engine" run --rm --read-only --network none "$image" --help >/dev/null \
    || { log "$image does not start"; exit 1; }
  log "$image starts (--help, read-only root)"
fi
