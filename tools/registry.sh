#!/usr/bin/env bash
# A container registry for the local test cluster: the CNCF distribution registry (built from the Go
# module proxy by tools/build-tools.sh), serving HTTPS with a certificate from the cluster's CA, so the
# real node's containerd pulls from it and pods push to it.
#   tools/registry.sh up [NAME]      start registry NAME (default: registry) and wait until it answers
#   tools/registry.sh down [NAME]    stop it (its storage stays until tools/cluster.sh down)
#   tools/registry.sh status [NAME]  exit 0 when it answers
#   tools/registry.sh address [NAME] print HOST:PORT
# Environment for `up`: OSB_REGISTRY_PORT (default 5000), OSB_REGISTRY_HTPASSWD="USER:PASSWORD"
# (htpasswd auth: every request needs that user; without it the registry is open).
# It listens on the real node's bridge address (10.77.0.1, tools/node.sh), the one address that the
# host (podman, containerd) and the pods all reach; tools/node.sh up starts the default registry and
# down stops every registry. State in .cluster/registries/NAME/ (storage, config, certificate,
# htpasswd), log in .cluster/logs/registry-NAME.log. containerd trusts it through
# .cluster/node/certs.d/HOST:PORT/hosts.toml, written here.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
source "$top/tools/common.sh"
NODE_IP=10.77.0.1
NAME=${2:-registry}
[[ $NAME =~ ^[a-z0-9-]+$ ]] || { echo "registry name must be [a-z0-9-]+" >&2; exit 2; }
dir=$state/registries/$NAME
pidfile=$state/pids/registry-$NAME.pid
certs_d=$state/node/certs.d

log() { printf '[registry] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

alive() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

address() {
  [[ -f $dir/address ]] && cat "$dir/address" && return
  echo "$NODE_IP:${OSB_REGISTRY_PORT:-5000}"
}

answers() { curl -s -o /dev/null --cacert "$pki/ca.crt" "https://$(address)/v2/"; }

status() { alive && answers; }

certificate() {  # a serving certificate for the node address, signed by the cluster's CA
  [[ -f $dir/tls.crt ]] && return
  [[ -f $pki/ca.key ]] || die "no cluster CA in $pki: run tools/cluster.sh up"
  openssl genrsa -out "$dir/tls.key" 2048 2>/dev/null
  openssl req -new -key "$dir/tls.key" -subj "/CN=opensandbox-dev-registry" -out "$dir/tls.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=IP:$NODE_IP" >"$dir/tls.ext"
  openssl x509 -req -in "$dir/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$dir/tls.ext" -out "$dir/tls.crt" 2>/dev/null || die "could not sign the certificate"
  rm -f "$dir/tls.csr" "$dir/tls.ext"
}

htpasswd_auth() {  # the config's auth section, and the htpasswd file (bcrypt, as the registry requires)
  local creds=${OSB_REGISTRY_HTPASSWD:-}
  rm -f "$dir/htpasswd"
  [[ -n $creds ]] || return 0
  [[ $creds == *:* ]] || die "OSB_REGISTRY_HTPASSWD must be USER:PASSWORD"
  command -v htpasswd >/dev/null || die "htpasswd is missing: apt-get install apache2-utils (tools/setup.sh test)"
  htpasswd -Bbn "${creds%%:*}" "${creds#*:}" >"$dir/htpasswd" 2>/dev/null || die "htpasswd failed"
  printf 'auth:\n  htpasswd:\n    realm: opensandbox-dev\n    path: %s\n' "$dir/htpasswd"
}

trust_on_node() {  # containerd (config_path = .cluster/node/certs.d) verifies it with the cluster CA
  local addr; addr=$(address)
  mkdir -p "$certs_d/$addr"
  printf 'server = "https://%s"\n\n[host."https://%s"]\n  capabilities = ["pull", "resolve", "push"]\n  ca = "%s"\n' \
    "$addr" "$addr" "$pki/ca.crt" >"$certs_d/$addr/hosts.toml"
}

up() {
  if status; then log "already up: $NAME at $(address)"; trust_on_node; return; fi
  stop
  [[ -x $bin/registry ]] || die "$bin/registry is missing: run tools/build-tools.sh (make tools)"
  # (Not `ip | grep -q`: grep's early exit kills ip with SIGPIPE, which pipefail reports as a failure.)
  grep -q " inet $NODE_IP/" <<<"$(ip -o addr show)" \
    || die "$NODE_IP is not on this host: the registry listens on the real node's bridge (tools/node.sh up)"
  mkdir -p "$dir/storage" "$state/logs" "$state/pids"
  echo "$NODE_IP:${OSB_REGISTRY_PORT:-5000}" >"$dir/address"
  certificate
  cat >"$dir/config.yml" <<YAML
# Written by tools/registry.sh.
version: 0.1
log: {level: info, formatter: text}
storage:
  filesystem: {rootdirectory: $dir/storage}
  delete: {enabled: true}
http:
  addr: $(address)
  secret: $(openssl rand -hex 16)
  tls: {certificate: $dir/tls.crt, key: $dir/tls.key}
$(htpasswd_auth)
YAML
  # No telemetry: the registry sends nothing anywhere.
  OTEL_TRACES_EXPORTER=none OTEL_METRICS_EXPORTER=none OTEL_LOGS_EXPORTER=none \
    setsid "$bin/registry" serve "$dir/config.yml" >"$state/logs/registry-$NAME.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  local deadline=$((SECONDS + 20))
  until answers; do
    alive || { tail -n 20 "$state/logs/registry-$NAME.log" >&2; die "the registry exited"; }
    ((SECONDS < deadline)) || die "the registry does not answer at $(address); see $state/logs/registry-$NAME.log"
    sleep 0.1
  done
  trust_on_node
  log "ready: $NAME at https://$(address)${OSB_REGISTRY_HTPASSWD:+ (htpasswd auth)}"
}

stop() {
  [[ -f $pidfile ]] || return 0
  local pid; pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

down() {
  stop
  [[ -f $dir/address ]] && rm -rf "${certs_d:?}/$(cat "$dir/address")"
  log "down: $NAME"
}

down_all() {  # every registry (tools/node.sh down: the bridge address goes away)
  local f
  for f in "$state"/pids/registry-*.pid; do
    [[ -f $f ]] || continue
    f=${f##*/registry-}
    "$0" down "${f%.pid}"
  done
}

case ${1:-} in
  up) up ;;
  down) down ;;
  down-all) down_all ;;
  status) status ;;
  address) address ;;
  *) echo "usage: $0 up|down|status|address [NAME] | down-all" >&2; exit 2 ;;
esac
