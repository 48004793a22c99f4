#!/usr/bin/env bash
# The web console's terminal emulator, vendored at build time (never committed, never a CDN):
# xterm.js and its fit addon are fetched with npm, each tarball checked against the integrity
# pinned here, and the files the console serves are unpacked with their licenses into
# src/opensandbox_platform/server/console/static/vendor/. Idempotent: a complete vendor/ of the
# pinned versions is left alone. `tools/setup.sh run` calls it; so does the server image's build.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dest=$top/src/opensandbox_platform/server/console/static/vendor
log() { printf '[vendor-console] %s\n' "$*" >&2; }

# name@version  integrity (npm's dist.integrity)  files to keep (paths inside the package)
PACKAGES=(
  "@xterm/xterm@6.0.0|sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg==|lib/xterm.js css/xterm.css LICENSE"
  "@xterm/addon-fit@0.11.0|sha512-jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g==|lib/addon-fit.js LICENSE"
)
stamp=$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)
[[ -f $dest/.stamp && $(cat "$dest/.stamp") == "$stamp" ]] && exit 0

command -v npm >/dev/null || { log "npm is needed to vendor xterm.js (apt-get install npm)"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$dest" && mkdir -p "$dest"
for entry in "${PACKAGES[@]}"; do
  IFS='|' read -r spec integrity files <<<"$entry"
  tarball=$(cd "$work" && npm pack "$spec" --silent)
  actual="sha512-$(openssl dgst -sha512 -binary "$work/$tarball" | base64 -w0)"
  [[ $actual == "$integrity" ]] || { log "$spec: integrity $actual is not the pinned $integrity"; exit 1; }
  name=${spec%@*}; name=${name#@xterm/}
  mkdir -p "$work/$name" && tar xzf "$work/$tarball" -C "$work/$name"
  for file in $files; do
    target=$dest/$(basename "$file")
    [[ $file == LICENSE ]] && target=$dest/$name.LICENSE
    cp "$work/$name/package/$file" "$target"
  done
  log "vendored $spec"
done
echo "$stamp" >"$dest/.stamp"
