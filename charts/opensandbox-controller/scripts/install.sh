#!/usr/bin/env bash
# Installs (or upgrades) the opensandbox-controller chart: asks for the settings, or takes them as
# flags (-y: no questions). Everything goes into one namespace (release, controller, server,
# Pools, BatchSandboxes). See scripts/README.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/install.sh [options]
  -r, --release NAME             release name (default opensandbox-controller)
  -n, --namespace NS             namespace of everything (default opensandbox; created if missing)
      --controller-image IMG     controller image REPO:TAG (default opensandbox/controller:dev)
      --server-image IMG         server image REPO:TAG (default opensandbox/server:v0.1.0)
      --task-executor-image IMG  task-executor image REPO:TAG (default opensandbox/task-executor:dev)
      --execd-image IMG          execd image injected into sandboxes (default opensandbox/execd:v1.0.5)
      --pull-policy POLICY       Always, IfNotPresent or Never, for the images above (default Never)
      --no-server                without the server (kubectl only)
      --service-type TYPE        ClusterIP, NodePort or LoadBalancer (default ClusterIP)
      --node-port PORT           the server's node port (NodePort/LoadBalancer)
      --api-key KEY              require this API key from SDK clients
      --replicas N               controller replicas (default 1)
      --service-monitor          create a ServiceMonitor (Prometheus Operator)
      --skip-crds                do not install or upgrade the CRDs (crds.install=false)
      --set KEY=VALUE            any other chart value (repeatable)
  -f, --values FILE              a values file (repeatable)
      --timeout DURATION         how long to wait for Available (default 5m)
      --dry-run                  print the manifests instead of installing
  -y, --yes                      no questions: use the flags and defaults
  -h, --help                     this text
USAGE
}

release=opensandbox-controller
namespace=opensandbox
controller_image=opensandbox/controller:dev
server_image=opensandbox/server:v0.1.0
task_executor_image=opensandbox/task-executor:dev
execd_image=opensandbox/execd:v1.0.5
pull_policy=Never
server=true
service_type=ClusterIP
node_port=""
api_key=""
replicas=1
service_monitor=false
crds=true
timeout=5m
dry_run=false
yes=false
[[ -t 0 ]] || yes=true
extra=()

while [[ $# -gt 0 ]]; do
  case $1 in
    -r | --release) release=$2; shift ;;
    -n | --namespace) namespace=$2; shift ;;
    --controller-image) controller_image=$2; shift ;;
    --server-image) server_image=$2; shift ;;
    --task-executor-image) task_executor_image=$2; shift ;;
    --execd-image) execd_image=$2; shift ;;
    --pull-policy) pull_policy=$2; shift ;;
    --no-server) server=false ;;
    --service-type) service_type=$2; shift ;;
    --node-port) node_port=$2; shift ;;
    --api-key) api_key=$2; shift ;;
    --replicas) replicas=$2; shift ;;
    --service-monitor) service_monitor=true ;;
    --skip-crds) crds=false ;;
    --set) extra+=(--set "$2"); shift ;;
    -f | --values) extra+=(-f "$2"); shift ;;
    --timeout) timeout=$2; shift ;;
    --dry-run) dry_run=true ;;
    -y | --yes) yes=true ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

need_tools helm kubectl

if [[ $yes == false ]]; then
  info "OpenSandbox installer (Enter keeps the value in brackets)"
  ask release "Release name" "$release"
  ask namespace "Namespace (controller, server, Pools, BatchSandboxes)" "$namespace"
  ask controller_image "Controller image" "$controller_image"
  ask task_executor_image "Task-executor image" "$task_executor_image"
  ask execd_image "execd image (injected into every sandbox)" "$execd_image"
  ask pull_policy "Image pull policy (Always, IfNotPresent, Never)" "$pull_policy"
  if confirm_yes "Deploy the server (needed by the SDK)?"; then server=true; else server=false; fi
  if [[ $server == true ]]; then
    ask server_image "Server image" "$server_image"
    ask service_type "Server Service type (ClusterIP, NodePort, LoadBalancer)" "$service_type"
    [[ $service_type == ClusterIP ]] || ask node_port "Node port (empty: any)" "$node_port"
    ask api_key "API key for SDK clients (empty: none)" "$api_key"
  fi
  ask replicas "Controller replicas" "$replicas"
  if confirm "Create a ServiceMonitor (needs the Prometheus Operator)?"; then service_monitor=true; fi
  if ! confirm_yes "Install or upgrade the CRDs (recommended)?"; then crds=false; fi
fi

case $pull_policy in Always | IfNotPresent | Never) ;; *) die "pull policy: Always, IfNotPresent or Never" ;; esac
case $service_type in ClusterIP | NodePort | LoadBalancer) ;; *) die "service type: ClusterIP, NodePort or LoadBalancer" ;; esac
[[ $replicas =~ ^[0-9]+$ ]] || die "replicas: a number"

read -r c_repo c_tag < <(split_image "$controller_image")
read -r s_repo s_tag < <(split_image "$server_image")
read -r t_repo t_tag < <(split_image "$task_executor_image")
args=(
  --namespace "$namespace" --create-namespace
  --set namespaceOverride="$namespace"
  --set controllerManager.image.repository="$c_repo" --set controllerManager.image.tag="$c_tag"
  --set controllerManager.image.pullPolicy="$pull_policy"
  --set controllerManager.replicas="$replicas"
  --set taskExecutor.image.repository="$t_repo" --set taskExecutor.image.tag="$t_tag"
  --set taskExecutor.image.pullPolicy="$pull_policy"
  --set server.enabled="$server"
  --set server.image.repository="$s_repo" --set server.image.tag="$s_tag"
  --set server.image.pullPolicy="$pull_policy"
  --set server.config.runtime.execdImage="$execd_image"
  --set server.service.type="$service_type"
  --set metrics.serviceMonitor.enabled="$service_monitor"
  --set crds.install="$crds"
)
[[ -z $node_port ]] || args+=(--set server.service.nodePort="$node_port")
[[ -z $api_key ]] || args+=(--set-string server.config.server.apiKey="$api_key")
args+=("${extra[@]}")

if [[ $dry_run == true ]]; then
  exec helm template "$release" "$CHART_DIR" "${args[@]}"
fi

check_cluster
info "helm upgrade --install $release into namespace $namespace"
helm upgrade --install "$release" "$CHART_DIR" "${args[@]}" >/dev/null
ok "release $release: $(helm status "$release" -n "$namespace" -o json | sed -n 's/.*"status":"\([a-z-]*\)".*/\1/p')"
wait_deployments "$namespace" "$release" "$timeout"
for crd in pools batchsandboxes; do
  kubectl wait --for=condition=Established "crd/$crd.sandbox.opensandbox.io" --timeout=60s >/dev/null \
    || die "CRD $crd.sandbox.opensandbox.io is not served (crds.install=false on a new cluster?)"
done
ok "CRDs served: pools, batchsandboxes"
helm get notes "$release" -n "$namespace"
