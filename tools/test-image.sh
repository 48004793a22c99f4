#!/usr/bin/env bash
# Builds localhost/opensandbox-test-base:latest once: a Debian minbase root (glibc, a shell,
# coreutils, busybox, bubblewrap for execd's isolated sessions, no Python) made by debootstrap and
# imported into podman. The tarball is cached in $OSB_CACHE so a new podman store re-imports it in
# seconds. The image carries its content version as a label: an older image is rebuilt.
set -euo pipefail
image=localhost/opensandbox-test-base:latest
cache=${OSB_CACHE:-$HOME/.cache/opensandbox-dev}
version=2  # 2: bubblewrap added (isolated sessions)
tarball=$cache/opensandbox-test-base-v$version.tar
label=opensandbox.io/test-base-version
log() { printf '[test-image] %s\n' "$*" >&2; }

have=$(podman image inspect --format "{{index .Labels \"$label\"}}" "$image" 2>/dev/null || true)
[[ $have == "$version" ]] && exit 0
if [[ ! -f $tarball ]]; then
  command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 1; }
  # The Debian mirror this machine's apt already uses.
  mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '($1 == "URIs:" || $1 == "deb") && $2 !~ /security/ {print $2; exit}' || true)
  [[ -n $mirror ]] || { log "no Debian mirror found in /etc/apt/sources.list*"; exit 1; }
  suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  log "debootstrap --variant=minbase $suite (a few minutes, once per machine)"
  # busybox brings httpd and nc for tests that need a server in a container without Python;
  # bubblewrap, execd's isolated sessions.
  debootstrap --variant=minbase --include=busybox,ca-certificates,bubblewrap "$suite" "$root" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $cache/debootstrap.log"; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  if [[ -e $root/usr/bin/python3 ]]; then log "unexpected: python3 in the minbase root"; exit 1; fi
  mkdir -p "$cache"
  tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
podman import -q --change 'CMD ["/bin/bash"]' --change "LABEL $label=$version" "$tarball" "$image" >/dev/null
log "imported $image"
