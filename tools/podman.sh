#!/usr/bin/env bash
# Podman as the Docker engine for tests of the docker runtime.
#   tools/podman.sh configure   write /etc/containers/containers.conf for this host (root only)
#   tools/podman.sh up          configure, prune stale port rules, start `podman system service` on
#                               .podman/docker.sock, and build the test image once (cached)
#   tools/podman.sh prune-nat   remove the port-forwarding rules podman left for containers gone
#   tools/podman.sh down        stop the service
#   tools/podman.sh status      exit 0 when the service answers
# Prints `export DOCKER_HOST=...` on up, and writes it to .podman/env.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
state=$top/.podman
sock=$state/docker.sock
log() { printf '[podman] %s\n' "$*" >&2; }

configure() {
  command -v podman >/dev/null || { log "podman is missing: apt-get install podman runc"; exit 1; }
  [[ $(id -u) == 0 ]] || { log "not root: leaving /etc/containers/containers.conf alone"; return; }
  local conf=/etc/containers/containers.conf nofile nproc
  nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
  # runc is refused limits close to the hard ones here (no CAP_SYS_RESOURCE): stay well below.
  ((nproc > 32768)) && nproc=32768
  ((nofile > 65536)) && nofile=65536
  # crun fails on this host's hybrid cgroup v1 layout, and podman's default ulimits (nofile=1048576)
  # and nproc exceed the hard limits here: use runc, cgroupfs, and limits within what the host allows.
  local want
  want=$(cat <<CONF
# Written by tools/podman.sh (opensandbox-platform tests).
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
)
  if [[ ! -f $conf ]] || [[ $(cat "$conf") != "$want" ]]; then
    [[ -f $conf ]] && ! grep -q 'tools/podman.sh' "$conf" && cp "$conf" "$conf.orig"
    echo "$want" >"$conf"
    log "wrote $conf"
  fi
}

answers() { curl -sf --unix-socket "$sock" http://d/_ping >/dev/null 2>&1; }

# podman (netavark) now and then leaves the NAT rules of a removed container's published port behind:
# a DNAT of 127.0.0.1:PORT (a port in the kernel's ephemeral range) to an address nobody has. Whatever
# listens on that port later (a test's server on port 0) never gets its connections: they time out
# after two minutes. Remove the rules of containers that no longer exist and whose port no live
# container publishes (those rules are shared per port).
prune_nat() {
  [[ $(id -u) == 0 ]] && command -v iptables >/dev/null || return 0
  local rules published line id port chain pruned=0
  rules=$(iptables -t nat -S NETAVARK-HOSTPORT-DNAT 2>/dev/null) || return 0
  published=$(podman ps --format '{{.Ports}}' 2>/dev/null)
  while IFS= read -r line; do
    [[ $line =~ --dport\ ([0-9]+).*podman\ id:\ ([0-9a-f]{64}).*-j\ (NETAVARK-DN-[0-9A-F]+) ]] || continue
    port=${BASH_REMATCH[1]} id=${BASH_REMATCH[2]} chain=${BASH_REMATCH[3]}
    podman container exists "$id" 2>/dev/null && continue
    grep -q ":$port->" <<<"$published" && continue
    eval "iptables -t nat ${line/#-A/-D}" || continue
    while IFS= read -r dn; do
      eval "iptables -t nat ${dn/#-A/-D}" || true
    done < <(iptables -t nat -S "$chain" 2>/dev/null | grep -E -- "--dport $port( |$)")
    pruned=$((pruned + 1))
  done <<<"$rules"
  ((pruned)) && log "removed the NAT rules of $pruned published port(s) of containers that are gone"
  return 0
}

up() {
  configure
  prune_nat
  mkdir -p "$state"
  if ! answers; then
    rm -f "$sock"
    setsid podman system service --time=0 "unix://$sock" >"$state/service.log" 2>&1 &
    echo $! >"$state/service.pid"
    for _ in $(seq 100); do answers && break; sleep 0.1; done
    answers || { log "podman service did not answer; see $state/service.log"; exit 1; }
    log "service up on $sock"
  fi
  echo "export DOCKER_HOST=unix://$sock" >"$state/env"
  "$top/tools/test-image.sh"
  cat "$state/env"
}

down() {
  if [[ -f $state/service.pid ]]; then
    kill "$(cat "$state/service.pid")" 2>/dev/null || true
    rm -f "$state/service.pid" "$sock"
    log "service stopped"
  fi
}

case ${1:-} in
  configure) configure ;;
  up) up ;;
  down) down ;;
  status) answers ;;
  prune-nat) prune_nat ;;
  *) echo "usage: $0 configure|up|down|status|prune-nat" >&2; exit 2 ;;
esac
