#!/usr/bin/env bash
# The local test cluster: a real Kubernetes control plane plus kwok fake nodes, on this machine.
#   tools/cluster.sh up      start etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
#   tools/cluster.sh down    stop every process `up` started and remove the state
#   tools/cluster.sh status  exit 0 when the API server is ready
#   tools/cluster.sh kill-apiserver | start-apiserver   fault injection for tests (SIGKILL, start again)
# Unless OSB_REAL_NODE=0, `up` also starts a real node (tools/node.sh: kubelet + containerd + a CNI
# bridge) and fails when it cannot; `down` always stops whatever tools/node.sh started.
# Binaries come from tools/build-tools.sh (cached in $OSB_CACHE). State, logs, certificates and the
# admin kubeconfig live in .cluster/ (git-ignored); `source .cluster/env` sets KUBECONFIG and PATH.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
source "$top/tools/common.sh"
ETCD_PORT=${OSB_ETCD_PORT:-12379}
SERVICE_CIDR=10.96.0.0/16
KWOK_NODES=${OSB_KWOK_NODES:-2}
REAL_NODE=${OSB_REAL_NODE:-1}
NODE_IP=10.77.0.1  # the real node's address on its bridge (tools/node.sh)
log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

kubectl() { "$bin/kubectl" --kubeconfig "$state/kubeconfig" "$@"; }

# --- certificates ---------------------------------------------------------------------------------
cert() {  # cert NAME SUBJECT [SANS]: a client/server certificate signed by the cluster CA
  local name=$1 subj=$2 sans=${3:-}
  [[ -f $pki/$name.crt ]] && return
  openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  local ext=$pki/$name.ext
  echo "basicConstraints=CA:FALSE" >"$ext"
  echo "keyUsage=critical,digitalSignature,keyEncipherment" >>"$ext"
  echo "extendedKeyUsage=serverAuth,clientAuth" >>"$ext"
  [[ -n $sans ]] && echo "subjectAltName=$sans" >>"$ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$ext"
}

make_pki() {
  mkdir -p "$pki"
  if [[ ! -f $pki/ca.crt ]]; then
    openssl genrsa -out "$pki/ca.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=opensandbox-dev-ca" -days 3650 \
      -out "$pki/ca.crt" 2>/dev/null
  fi
  cert apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client"
  cert admin "/O=system:masters/CN=kubernetes-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kwok "/O=system:masters/CN=kwok"
  [[ -f $pki/sa.key ]] || {
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  }
}

kubeconfig() {  # kubeconfig NAME CERT: a kubeconfig for a client certificate
  write_kubeconfig "$state/$1" "$2" "$pki/$2.crt" "$pki/$2.key"
}

# --- processes ------------------------------------------------------------------------------------
start() {  # start NAME CMD...: run in its own session, log to .cluster/logs/NAME.log
  local name=$1; shift
  mkdir -p "$state/logs" "$state/pids"
  setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$name.pid"
}

alive() { [[ -f $state/pids/$1.pid ]] && kill -0 "$(cat "$state/pids/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for WHAT SECONDS CMD...: retry CMD every 0.2 s, fail with the log's tail
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${secs}s; see $state/logs/"
    sleep 0.2
  done
}

api_ready() { curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
  "https://127.0.0.1:$API_PORT/readyz" >/dev/null; }

status() { [[ -f $state/kubeconfig ]] && alive kube-apiserver && api_ready; }

real_node() { [[ $REAL_NODE != 0 ]]; }

start_apiserver() {
  # The admission plugins a real cluster enables by default are on without flags; add NodeRestriction
  # as kubeadm does. With a real node, the API server dials its kubelet at its InternalIP (its host
  # name resolves nowhere) and advertises the node's bridge address instead of loopback.
  local advertise=127.0.0.1 node_flags=()
  if real_node; then
    advertise=$NODE_IP
    node_flags=(--kubelet-preferred-address-types InternalIP)
  fi
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address "$advertise" --secure-port "$API_PORT" "${node_flags[@]}" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" --kubelet-certificate-authority "$pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --allow-privileged --profiling=false --v 1
  wait_for kube-apiserver 60 api_ready
}

kill_apiserver() {  # fault injection for tests: SIGKILL, as a crash would
  local f=$state/pids/kube-apiserver.pid pid
  [[ -f $f ]] || die "no kube-apiserver to kill"
  pid=$(cat "$f")
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  rm -f "$f"
}

up() {
  if status; then
    log "already up"
    fence_fake_addresses
    if real_node; then "$top/tools/node.sh" up || die "the real node did not start (OSB_REAL_NODE=0 skips it); see $state/logs/kubelet.log and containerd.log"; fi
    return
  fi
  [[ -x $bin/kube-apiserver && -x $bin/etcd && -x $bin/kwok ]] \
    || die "cluster binaries missing in $bin: run tools/build-tools.sh (make cluster-up does)"
  "$top/tools/node.sh" down || die "could not stop the real node left from an earlier run (tools/node.sh down)"
  down_processes
  mkdir -p "$state"
  make_pki
  kubeconfig kubeconfig admin
  kubeconfig controller-manager.kubeconfig controller-manager
  kubeconfig scheduler.kubeconfig scheduler
  kubeconfig kwok.kubeconfig kwok

  start etcd "$bin/etcd" --data-dir "$state/etcd" --name dev \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "dev=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_for etcd 20 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

  start_apiserver

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$state/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$state/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$state/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --controllers '*' \
    --concurrent-gc-syncs 50 --kube-api-qps 200 --kube-api-burst 400 --v 1
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$state/scheduler.kubeconfig" \
    --authentication-kubeconfig "$state/scheduler.kubeconfig" \
    --authorization-kubeconfig "$state/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --kube-api-qps 500 --kube-api-burst 1000 --v 1
  start kwok "$bin/kwok" --kubeconfig "$state/kwok.kubeconfig" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --manage-nodes-with-label-selector= --manage-single-node= \
    --cidr 10.244.0.0/16 --node-ip 10.244.255.254 --node-lease-duration-seconds 40 \
    --server-address 127.0.0.1:10247

  fence_fake_addresses
  add_kwok_nodes
  # Pods need the namespace's default ServiceAccount, which the controller-manager creates.
  wait_for "default ServiceAccount" 60 kubectl get serviceaccount default -n default
  wait_for "kwok nodes" 60 nodes_ready
  write_env
  if real_node; then
    "$top/tools/node.sh" up || die "the real node did not start (OSB_REAL_NODE=0 skips it); see $state/logs/kubelet.log and containerd.log"
  fi
  log "ready: source $state/env"
}

add_kwok_nodes() {
  local i
  for ((i = 0; i < KWOK_NODES; i++)); do
    kubectl apply -f - >/dev/null <<NODE
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels:
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: kwok-node-$i
    type: kwok
spec: {}
status:
  allocatable: {cpu: "1000", memory: 4Ti, pods: "10000"}
  capacity: {cpu: "1000", memory: 4Ti, pods: "10000"}
NODE
  done
}

nodes_ready() {
  local n
  n=$(kubectl get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)
  ((n >= KWOK_NODES))
}

write_env() {
  cat >"$state/env" <<ENV
# Written by tools/cluster.sh: source it to use the local cluster.
export KUBECONFIG=$state/kubeconfig
export PATH=$bin:\$PATH
ENV
}

# kwok pod IPs and service IPs exist only in the API server. Routing them to `unreachable` makes
# any connection to one fail at once on this host, instead of leaving through the default gateway
# (tests may only ever reach loopback and what they created). DNAT of pod traffic to the API
# server's service IP happens before routing, so the real node's pods are unaffected.
FENCED_CIDRS=(10.244.0.0/16 "$SERVICE_CIDR")
fence_fake_addresses() {
  local cidr
  for cidr in "${FENCED_CIDRS[@]}"; do ip route replace unreachable "$cidr" || die "cannot fence $cidr"; done
}
unfence_fake_addresses() {
  local cidr
  for cidr in "${FENCED_CIDRS[@]}"; do ip route del unreachable "$cidr" 2>/dev/null || true; done
}

down_processes() {
  local f pid names=(kwok kube-scheduler kube-controller-manager kube-apiserver etcd)
  for name in "${names[@]}"; do
    f=$state/pids/$name.pid
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

down() {
  # The real node first: its pods' mounts live below $state, which is removed afterwards.
  "$top/tools/node.sh" down || die "tools/node.sh down failed: $state is kept (it may hold mounts)"
  down_processes
  unfence_fake_addresses
  rm -rf "$state"
  log "down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  kill-apiserver) kill_apiserver ;;
  start-apiserver) start_apiserver ;;
  *) echo "usage: $0 up|down|status|kill-apiserver|start-apiserver" >&2; exit 2 ;;
esac
