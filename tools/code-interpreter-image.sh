#!/usr/bin/env bash
# Builds the code-interpreter image without any registry: a Debian root made by debootstrap with
# Python 3, ipykernel and the data stack (numpy, pandas, matplotlib) from Debian's packages, plus
# a bash kernel (bash_kernel, PyPI) and JavaScript and TypeScript kernels (tslab, npm, on Debian's
# nodejs), imported into podman.
#   tools/code-interpreter-image.sh IMAGE      (make code-interpreter-image; tools/build-image.sh code-interpreter IMAGE)
# execd is not in the image: the runtimes inject it (docker: copied in; kubernetes: init container).
# The root file system is cached as a tarball in $OSB_CACHE, keyed by this script's hash, so a new
# podman store re-imports it in seconds and a changed package list builds a new one.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
image=${1:?usage: tools/code-interpreter-image.sh IMAGE}
cache=${OSB_CACHE:-$HOME/.cache/opensandbox-dev}
log() { printf '[code-interpreter-image] %s\n' "$*" >&2; }

DEBS=(bash ca-certificates procps python3 python3-ipykernel python3-numpy python3-pandas python3-matplotlib
  python3-pexpect python3-filetype nodejs)
BASH_KERNEL=bash_kernel==0.10.0
BASH_KERNEL_SHA256=da28513230f5307c7a49e87352366304dc52b66faa207d6caed1b2bdec03c1fa
TSLAB=tslab@1.0.22

hash=$(sha256sum "$0" | cut -c1-12)
tarball=$cache/opensandbox-code-interpreter-$hash.tar
label=opensandbox.io/rootfs-hash

if [[ $(podman image inspect --format "{{index .Labels \"$label\"}}" "$image" 2>/dev/null) == "$hash" ]]; then
  exit 0
fi

build_rootfs() {
  local root=$1 mirror suite wheels
  command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 1; }
  command -v npm >/dev/null || { log "npm is missing (the JavaScript kernel comes from npm)"; exit 1; }
  mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '($1 == "URIs:" || $1 == "deb") && $2 !~ /security/ {print $2; exit}' || true)
  [[ -n $mirror ]] || { log "no Debian mirror found in /etc/apt/sources.list*"; exit 1; }
  suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
  log "debootstrap --variant=minbase $suite, then apt-get install Python, ipykernel, numpy, pandas, matplotlib, nodejs (minutes, once)"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$cache/code-interpreter-debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $cache/code-interpreter-debootstrap.log"; exit 1; }
  # apt inside the new root resolves the packages' dependencies (debootstrap's --include does not
  # configure them all); it reaches the same Debian mirror, through this machine's resolver.
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  if ! chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
    "apt-get update -qq && apt-get install -y -qq --no-install-recommends ${DEBS[*]}" \
    >>"$cache/code-interpreter-debootstrap.log" 2>&1; then
    umount "$root/proc"
    log "apt-get install in the new root failed; see $cache/code-interpreter-debootstrap.log"
    exit 1
  fi
  umount "$root/proc"
  rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

  # bash_kernel: pure Python (its dependencies pexpect and filetype are Debian's), unpacked where
  # Debian's python3 looks for local packages (/usr/local/lib/python3.X/dist-packages), with the
  # kernelspec its installer would write.
  wheels=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary :all: -d "$wheels" "$BASH_KERNEL"
  echo "$BASH_KERNEL_SHA256  $(ls "$wheels"/bash_kernel-*.whl)" | sha256sum -c --quiet \
    || { log "bash_kernel wheel does not match its pinned sha256"; exit 1; }
  local site
  site=$root$(chroot "$root" python3 -c 'import sys; print(f"/usr/local/lib/python3.{sys.version_info[1]}/dist-packages")')
  mkdir -p "$site" "$root/usr/local/share/jupyter/kernels/bash"
  python3 -m zipfile -e "$wheels"/bash_kernel-*.whl "$site"
  rm -rf "$wheels"
  cat >"$root/usr/local/share/jupyter/kernels/bash/kernel.json" <<'EOF'
{"argv": ["/usr/bin/python3", "-m", "bash_kernel", "-f", "{connection_file}"], "display_name": "Bash",
 "language": "bash", "codemirror_mode": "shell", "env": {"PS1": "$"}}
EOF

  # tslab: JavaScript and TypeScript kernels on Debian's nodejs; its zeromq binding ships prebuilt
  # N-API binaries in the npm package (no install script, nothing fetched at install or run time).
  npm install --silent --no-audit --no-fund --ignore-scripts --prefix "$root/usr/local/lib/tslab" "$TSLAB" >/dev/null
  # tslab type-checks JavaScript too; it finds Node's types in ./node_modules/@types up from the
  # kernel's working directory, else in its own node_modules/@types, where npm did not put them.
  mkdir -p "$root/usr/local/lib/tslab/node_modules/tslab/node_modules"
  ln -sfn ../../@types "$root/usr/local/lib/tslab/node_modules/tslab/node_modules/@types"
  mkdir -p "$root/usr/local/share/jupyter/kernels/jslab" "$root/usr/local/share/jupyter/kernels/tslab"
  local tslab=/usr/local/lib/tslab/node_modules/.bin/tslab
  printf '{"argv": ["%s", "kernel", "--config-path", "{connection_file}", "--js"], "display_name": "JavaScript", "language": "javascript"}\n' \
    "$tslab" >"$root/usr/local/share/jupyter/kernels/jslab/kernel.json"
  printf '{"argv": ["%s", "kernel", "--config-path", "{connection_file}"], "display_name": "TypeScript", "language": "typescript"}\n' \
    "$tslab" >"$root/usr/local/share/jupyter/kernels/tslab/kernel.json"
  mkdir -p "$root/workspace"
}

if [[ ! -f $tarball ]]; then
  mkdir -p "$cache"
  root=$(mktemp -d)
  trap 'mountpoint -q "$root/proc" && umount "$root/proc"; rm -rf "$root"' EXIT
  build_rootfs "$root"
  tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
podman import -q \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'WORKDIR /workspace' \
  --change "LABEL $label=$hash" \
  --change 'CMD ["sleep", "infinity"]' \
  "$tarball" "$image" >/dev/null
first=${image%%/*}
if [[ $image == */* && $first != *.* && $first != *:* && $first != localhost ]]; then
  podman tag "$image" "docker.io/$image"
fi
log "built $image ($(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
