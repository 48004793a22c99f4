#!/usr/bin/env bash
# A real node for the local test cluster: kubelet + its own containerd (runc, cgroupfs) + a CNI bridge.
#   tools/node.sh up                 start containerd and kubelet; the node registers and turns Ready
#   tools/node.sh down               stop them, kill pod processes, remove mounts, cgroups, bridge, state
#   tools/node.sh status             exit 0 when kubelet and containerd run and the node is Ready
#   tools/node.sh load-image IMAGE   copy a podman image into the node's containerd (`k8s.io` namespace)
# Needs a running control plane (tools/cluster.sh up, not with OSB_REAL_NODE=0, so the API server
# reaches kubelets by InternalIP). Nothing is pulled: images come from podman; the pod sandbox
# ("pause") image is built locally from the test image.
# Everything lives in .cluster/node/ (containerd root/state/socket, kubelet root, pod logs, CNI IPAM);
# logs in .cluster/logs/{containerd,kubelet}.log. Pods get an address on the bridge osb0
# (10.77.0.0/16, the host is 10.77.0.1 = the node IP) and no default route: they reach the host (the
# API server through 10.96.0.1:443) and each other, nothing else.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
source "$top/tools/common.sh"
node=$state/node
sock=$node/containerd.sock
NODE_NAME=${OSB_NODE_NAME:-osb-real-node}
BRIDGE=osb0
# Not 10.88/16 (podman's default network), 10.89/16 (podman's further networks), 10.96/16 (services)
# nor 10.244/16 (kwok's fake pod IPs).
POD_CIDR=10.77.0.0/16
NODE_IP=10.77.0.1
NODE_LABEL=opensandbox.io/node=real
NODE_TAINT_KEY=opensandbox.io/real-node
CGROUP_ROOT=osb-node  # kubelet's cgroupRoot: every pod cgroup is below /osb-node in each hierarchy
PAUSE_IMAGE=localhost/opensandbox-pause:3.10.1
TEST_IMAGE=localhost/opensandbox-test-base:latest
FWD_CHAIN=OSB-NODE-FORWARD
# containerd's exec/attach/port-forward stream server: a fixed loopback port below the kernel's
# ephemeral range (not "0", a random one in it: a container engine's stale NAT rule for a published
# port there, or a test imitating one, took `kubectl exec` with it).
STREAM_PORT=${OSB_STREAM_PORT:-10010}
API_CHAIN=OSB-NODE-API
API_SERVICE_IP=10.96.0.1  # the `kubernetes` Service's ClusterIP (first address of the service range)
# kubelet sets these on start (protectKernelDefaults=false); `down` puts the host's values back.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

log() { printf '[node] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

kubectl() { "$bin/kubectl" --kubeconfig "$state/kubeconfig" "$@"; }
ctr_() { ctr --address "$sock" -n k8s.io "$@"; }

alive() { [[ -f $state/pids/$1.pid ]] && kill -0 "$(cat "$state/pids/$1.pid")" 2>/dev/null; }

tail_log() { [[ -f $state/logs/$1.log ]] && tail -n "${2:-15}" "$state/logs/$1.log" | sed "s/^/[node]   $1: /" >&2 || true; }

wait_for() {  # wait_for WHAT SECONDS LOGNAME CMD...: retry CMD every 0.5 s; on timeout die with the log's tail
  local what=$1 secs=$2 logname=$3; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      tail_log "$logname" 25
      die "$what not ready after ${secs}s; see $state/logs/$logname.log"
    fi
    alive "$logname" || { tail_log "$logname" 25; die "$logname exited; see $state/logs/$logname.log"; }
    sleep 0.5
  done
}

start() {  # start NAME CMD...: run in its own session, log to .cluster/logs/NAME.log
  local name=$1; shift
  mkdir -p "$state/logs" "$state/pids"
  setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$name.pid"
}

# pids_with_arg ARG: processes with ARG as one exact argument (ARG names a path in our state dir)
pids_with_arg() {
  local f pid
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}; pid=${pid%/cmdline}
    [[ $pid == "$$" ]] && continue
    grep -qzxF -- "$1" "$f" 2>/dev/null && echo "$pid"
  done
  return 0
}

# cgroup_dirs: our cgroup root in every mounted hierarchy (v1 controllers, name=systemd, unified)
cgroup_dirs() {
  local m
  for m in /sys/fs/cgroup/*/; do
    [[ -f $m/cgroup.procs ]] && echo "${m%/}/$CGROUP_ROOT"
  done
  return 0
}

# --- preconditions --------------------------------------------------------------------------------
check_host() {
  [[ $(id -u) == 0 ]] || die "a real node needs root (containerd, kubelet, bridge, cgroups)"
  local b
  for b in containerd containerd-shim-runc-v2 runc ctr podman ip iptables openssl; do
    command -v "$b" >/dev/null || die "$b is missing: apt-get install containerd runc podman iproute2 iptables openssl (tools/setup.sh test)"
  done
  for b in bridge host-local loopback; do
    [[ -x /usr/lib/cni/$b ]] || die "CNI plugin /usr/lib/cni/$b is missing: apt-get install containernetworking-plugins"
  done
  [[ -x $bin/kubelet ]] || die "kubelet is missing in $bin: run tools/build-tools.sh (make tools)"
  for b in cpu cpuacct cpuset memory pids; do
    [[ -f /sys/fs/cgroup/$b/cgroup.procs ]] \
      || die "cgroup v1 controller '$b' is not mounted at /sys/fs/cgroup/$b: this node expects the hybrid cgroup v1 layout"
  done
  [[ -f $state/kubeconfig && -f $pki/ca.key ]] || die "the control plane is not up ($state/kubeconfig, $pki/ca.key): run tools/cluster.sh up"
  kubectl get --raw /readyz >/dev/null 2>&1 || die "the API server does not answer at 127.0.0.1:$API_PORT: run tools/cluster.sh up"
  local apiserver_pid
  apiserver_pid=$(cat "$state/pids/kube-apiserver.pid" 2>/dev/null || true)
  [[ -n $apiserver_pid ]] && grep -qzxF -- --kubelet-preferred-address-types "/proc/$apiserver_pid/cmdline" 2>/dev/null \
    || die "the API server was started with OSB_REAL_NODE=0 (it would dial kubelets by host name, so logs/exec fail): run tools/cluster.sh down && tools/cluster.sh up"
  podman image exists "$TEST_IMAGE" || "$top/tools/test-image.sh" || die "the test image $TEST_IMAGE could not be built (tools/test-image.sh)"
}

# --- network --------------------------------------------------------------------------------------
net_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge || die "ip link add $BRIDGE type bridge"
  fi
  local addrs; addrs=$(ip addr show dev "$BRIDGE")
  grep -q "inet $NODE_IP/" <<<"$addrs" || ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE" \
    || die "could not put $NODE_IP on $BRIDGE"
  ip link set "$BRIDGE" up || die "ip link set $BRIDGE up"
  # Pods only talk to the host and each other: nothing from or to the bridge is forwarded elsewhere
  # (this host forwards IPv4 for podman).
  if ! iptables -w -S "$FWD_CHAIN" >/dev/null 2>&1; then
    iptables -w -N "$FWD_CHAIN" || die "iptables -N $FWD_CHAIN"
    iptables -w -A "$FWD_CHAIN" -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
    iptables -w -A "$FWD_CHAIN" -o "$BRIDGE" ! -i "$BRIDGE" -j DROP
  fi
  iptables -w -C FORWARD -j "$FWD_CHAIN" 2>/dev/null || iptables -w -I FORWARD -j "$FWD_CHAIN" \
    || die "iptables -I FORWARD -j $FWD_CHAIN"
  # In-cluster clients in pods: there is no kube-proxy, and the API server listens on loopback only.
  # Pods have a route to the service range via the host; the `kubernetes` Service address
  # ($API_SERVICE_IP:443) and the advertised endpoint ($NODE_IP:$API_PORT) are DNATed to
  # 127.0.0.1:$API_PORT, which route_localnet allows for packets that come in on this bridge only.
  if ! iptables -w -t nat -S "$API_CHAIN" >/dev/null 2>&1; then
    iptables -w -t nat -N "$API_CHAIN" || die "iptables -t nat -N $API_CHAIN"
    iptables -w -t nat -A "$API_CHAIN" -d "$API_SERVICE_IP/32" -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$API_PORT"
    iptables -w -t nat -A "$API_CHAIN" -d "$NODE_IP/32" -p tcp --dport "$API_PORT" -j DNAT --to-destination "127.0.0.1:$API_PORT"
  fi
  iptables -w -t nat -C PREROUTING -i "$BRIDGE" -j "$API_CHAIN" 2>/dev/null \
    || iptables -w -t nat -I PREROUTING -i "$BRIDGE" -j "$API_CHAIN" || die "iptables -t nat -I PREROUTING -j $API_CHAIN"
  sysctl -q -w "net.ipv4.conf.$BRIDGE.route_localnet=1" || die "sysctl net.ipv4.conf.$BRIDGE.route_localnet=1"
  mkdir -p "$node/cni/net.d" "$node/cni/ipam"
  # bridge with isGateway (the host's address on the bridge), no isDefaultGateway (no default route
  # in pods), no ipMasq (no NAT rules); host-local IPAM keeps its leases in our state dir.
  cat >"$node/cni/net.d/10-osb.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "osb",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$node/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "10.77.1.1", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "${API_SERVICE_IP%.*.*}.0.0/16"}]
      }
    }
  ]
}
JSON
}

net_down() {
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link delete "$BRIDGE" || die "could not delete the bridge $BRIDGE"
  fi
  if iptables -w -S "$FWD_CHAIN" >/dev/null 2>&1; then
    while iptables -w -D FORWARD -j "$FWD_CHAIN" 2>/dev/null; do :; done
    iptables -w -F "$FWD_CHAIN" && iptables -w -X "$FWD_CHAIN" || die "could not remove iptables chain $FWD_CHAIN"
  fi
  if iptables -w -t nat -S "$API_CHAIN" >/dev/null 2>&1; then
    while iptables -w -t nat -D PREROUTING -i "$BRIDGE" -j "$API_CHAIN" 2>/dev/null; do :; done
    iptables -w -t nat -F "$API_CHAIN" && iptables -w -t nat -X "$API_CHAIN" || die "could not remove iptables nat chain $API_CHAIN"
  fi
}

# --- cgroups --------------------------------------------------------------------------------------
cgroups_up() {
  local d parent
  while read -r d; do
    mkdir -p "$d" || die "could not create cgroup $d"
    if [[ $d == /sys/fs/cgroup/cpuset/* ]]; then  # a v1 cpuset cgroup starts empty: inherit the parent's
      parent=$(dirname "$d")
      [[ -s $d/cpuset.cpus && $(cat "$d/cpuset.cpus") != "" ]] || cat "$parent/cpuset.cpus" >"$d/cpuset.cpus"
      [[ $(cat "$d/cpuset.mems") != "" ]] || cat "$parent/cpuset.mems" >"$d/cpuset.mems"
    fi
  done < <(cgroup_dirs)
}

cgroup_pids() {  # every process in our cgroups
  local d
  while read -r d; do
    [[ -d $d ]] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null
  done < <(cgroup_dirs)
  return 0
}

cgroups_down() {
  local d pids i
  for i in $(seq 50); do
    pids=$(cgroup_pids | sort -u)
    [[ -z $pids ]] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  [[ -z $(cgroup_pids) ]] || die "processes are left in the node's cgroups: $(cgroup_pids | tr '\n' ' ')"
  while read -r d; do
    [[ -d $d ]] || continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ ! -d $d ]] || die "could not remove cgroup $d"
  done < <(cgroup_dirs)
}

# --- certificates and kubeconfig ------------------------------------------------------------------
node_cert() {  # node_cert NAME SUBJECT EKU [SANS]
  local name=$1 subj=$2 eku=$3 sans=${4:-} dir=$node/pki
  mkdir -p "$dir"
  [[ -f $dir/$name.crt ]] && return
  openssl genrsa -out "$dir/$name.key" 2048 2>/dev/null
  openssl req -new -key "$dir/$name.key" -subj "$subj" -out "$dir/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n $sans ]] && echo "subjectAltName=$sans"
  } >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null \
    || die "could not sign the $name certificate with $pki/ca.key"
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}

pki_up() {
  # The kubelet's identity for the Node authorizer and NodeRestriction...
  node_cert kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  # ...and its serving certificate: the API server dials https://$NODE_IP:10250 for logs and exec.
  node_cert kubelet-serving "/CN=system:node:$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
  write_kubeconfig "$node/kubelet.kubeconfig" "$NODE_NAME" "$node/pki/kubelet-client.crt" "$node/pki/kubelet-client.key"
  # The kubelet authorizes the API server's client certificate by SubjectAccessReview: let it in, as
  # kubeadm does.
  kubectl apply -f - >/dev/null <<YAML || die "could not create the ClusterRoleBinding for the API server's kubelet client"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "opensandbox:kube-apiserver-kubelet-client"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
YAML
}

# --- containerd -----------------------------------------------------------------------------------
containerd_up() {
  mkdir -p "$node/containerd/root" "$node/containerd/state" "$node/runc" "$node/opt"
  cat >"$node/containerd/config.toml" <<TOML
# Written by tools/node.sh: the test node's own containerd (not the system service).
version = 2
root = "$node/containerd/root"
state = "$node/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$node/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "$STREAM_PORT"
  enable_tls_streaming = false
  disable_tcp_service = true
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (the sandbox asks for -998) and
  # fails with "can't get final child's PID from pipe: EOF". Never go below containerd's own value.
  restrict_oom_score_adj = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$node/runc"
        SystemdCgroup = false

  # Registries (tools/registry.sh) are trusted per host in certs.d/HOST:PORT/hosts.toml (read per pull).
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$node/certs.d"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node/cni/net.d"
    max_conf_num = 1
TOML
  start containerd containerd --config "$node/containerd/config.toml"
  wait_for containerd 30 containerd ctr_ version
}

# load_image IMAGE: podman save | ctr import into the k8s.io namespace (what the CRI plugin serves)
load_image() {
  local image=$1
  [[ -S $sock ]] || die "the node's containerd is not running ($sock): run tools/node.sh up"
  podman image exists "$image" || die "podman has no image $image (build it first; no registry is reachable)"
  podman save --format docker-archive "$image" 2>"$state/logs/load-image.log" | ctr_ images import - >>"$state/logs/load-image.log" 2>&1 \
    || { tail_log load-image; die "could not import $image into containerd; see $state/logs/load-image.log"; }
  local images; images=$(ctr_ images ls -q)
  grep -qxF "$image" <<<"$images" || die "$image is not in containerd after the import; see $state/logs/load-image.log"
  log "loaded $image"
}

# The sandbox ("pause") image: nothing may be pulled, so make one from the test image.
pause_image() {
  if ! podman image exists "$PAUSE_IMAGE"; then
    local ctx; ctx=$(mktemp -d)
    printf 'FROM %s\nENTRYPOINT ["/bin/sleep", "infinity"]\n' "$TEST_IMAGE" >"$ctx/Containerfile"
    podman build --pull=never -q -t "$PAUSE_IMAGE" "$ctx" >"$state/logs/pause-image.log" 2>&1 \
      || { rm -rf "$ctx"; tail_log pause-image; die "could not build $PAUSE_IMAGE; see $state/logs/pause-image.log"; }
    rm -rf "$ctx"
  fi
  load_image "$PAUSE_IMAGE"
}

# --- kubelet --------------------------------------------------------------------------------------
kubelet_up() {
  mkdir -p "$node/kubelet" "$node/pod-logs"
  local s d
  # Fixed paths outside our state dir that the kubelet and the shims create: removed by `down` when empty
  # and made by us.
  for d in /var/log/containers /run/containerd/s /run/containerd; do
    [[ -d $d ]] || echo "$d" >>"$node/created-dirs"
  done
  [[ -f $node/sysctl.saved ]] || for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$node/sysctl.saved"
  cat >"$node/kubelet.yaml" <<YAML
# Written by tools/node.sh.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $node/pki/kubelet-serving.crt
tlsPrivateKeyFile: $node/pki/kubelet-serving.key
rotateCertificates: false
serverTLSBootstrap: false
containerRuntimeEndpoint: unix://$sock
# cgroup v1 (hybrid layout), cgroupfs like containerd's runc (SystemdCgroup=false); pods below /$CGROUP_ROOT.
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: /$CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
oomScoreAdj: 0  # no CAP_SYS_RESOURCE: -999 cannot be set
makeIPTablesUtilChains: false
resolvConf: ""
podLogsDir: $node/pod-logs
registerNode: true
registerWithTaints:
- {key: $NODE_TAINT_KEY, value: "true", effect: NoSchedule}
# Images cannot be pulled again: never garbage-collect them, and no disk-pressure evictions.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%", imagefs.inodesFree: "1%"}
maxPods: 110
# A pod's processes are bounded here, not in the pod spec (Kubernetes has no per-pod field): a fork
# bomb in a sandbox must hit this, not the host's pid_max. Set it on production nodes too.
podPidsLimit: 4096
YAML
  start kubelet "$bin/kubelet" --config "$node/kubelet.yaml" --kubeconfig "$node/kubelet.kubeconfig" \
    --root-dir "$node/kubelet" --cert-dir "$node/kubelet/pki" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --node-labels "$NODE_LABEL" --v 2
  wait_for "kubelet (node $NODE_NAME Ready)" 90 kubelet node_ready
}

node_ready() {
  [[ $(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

status() { alive containerd && alive kubelet && node_ready; }

up() {
  check_host
  if status; then log "already up: node $NODE_NAME"; "$top/tools/registry.sh" up; return; fi
  down
  mkdir -p "$node"
  pki_up
  net_up
  cgroups_up
  containerd_up
  pause_image
  load_image "$TEST_IMAGE"
  kubelet_up
  "$top/tools/registry.sh" up || die "the registry did not start; see $state/logs/registry-registry.log"
  log "ready: node $NODE_NAME ($NODE_IP), label $NODE_LABEL, taint $NODE_TAINT_KEY=true:NoSchedule"
}

# --- down -----------------------------------------------------------------------------------------
stop_pid() {  # stop_pid PID: TERM, wait up to 5 s, KILL
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

stop_named() {  # stop_named NAME MARKER: the pid file's process and any process with MARKER as argument
  local pid
  if [[ -f $state/pids/$1.pid ]]; then
    stop_pid "$(cat "$state/pids/$1.pid")"
    rm -f "$state/pids/$1.pid"
  fi
  for pid in $(pids_with_arg "$2"); do stop_pid "$pid"; done
}

mounts_under() {  # mount points below $node, deepest first
  awk -v p="$node/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r
}

down() {
  # kubelet first, so nothing restarts pods; then every pod process (they are all in our cgroups);
  # then containerd and its shims (identified by our socket path).
  stop_named kubelet "$node/kubelet.yaml"
  cgroups_down
  stop_named containerd "$node/containerd/config.toml"
  local pid f addr
  for pid in $(pids_with_arg "$sock"); do kill -KILL "$pid" 2>/dev/null || true; done
  # shim sockets live in /run/containerd/s/; each bundle records its own
  for f in "$node"/containerd/state/io.containerd.runtime.v2.task/*/*/address; do
    [[ -f $f ]] || continue
    addr=$(cat "$f"); addr=${addr#unix://}
    [[ $addr == /run/containerd/s/* ]] && rm -f "$addr"
  done
  cgroups_down
  local m
  for m in $(mounts_under); do umount "$m" 2>/dev/null || umount -l "$m" || die "could not unmount $m"; done
  [[ -z $(mounts_under) ]] || die "mounts are left below $node: $(mounts_under | tr '\n' ' ')"
  "$top/tools/registry.sh" down-all  # they listen on the bridge's address
  net_down
  if [[ -f $node/sysctl.saved ]]; then
    sysctl -q -w $(cat "$node/sysctl.saved") >/dev/null || log "could not restore sysctls from $node/sysctl.saved"
  fi
  # kubelet's legacy log symlinks (/var/log/containers is fixed) that point into our pod log dir
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$node/*" -delete 2>/dev/null || true
  fi
  if [[ -f $node/created-dirs ]]; then
    local d
    while read -r d; do rmdir "$d" 2>/dev/null || true; done <"$node/created-dirs"
  fi
  if [[ -f $state/kubeconfig ]] && kubectl get node "$NODE_NAME" >/dev/null 2>&1; then
    kubectl delete node "$NODE_NAME" --wait=false >/dev/null 2>&1 || true
  fi
  if [[ -d $node ]]; then rm -rf "$node"; log "down"; fi
  return 0
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  load-image) [[ -n ${2:-} ]] || { echo "usage: $0 load-image IMAGE" >&2; exit 2; }; load_image "$2" ;;
  *) echo "usage: $0 up|down|status|load-image IMAGE" >&2; exit 2 ;;
esac
