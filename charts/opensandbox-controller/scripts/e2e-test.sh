#!/usr/bin/env bash
# End-to-end check of the chart in the current cluster: installs a release into a new namespace,
# checks the Deployments, CRDs, RBAC and the server's /health, then creates a Pool, a BatchSandbox
# built from a template and one claimed from the Pool, waits until the controller has made them
# Ready, deletes them and checks their pods go, and cleans up (release and namespace; the CRDs stay).
# The controller (and server) must really run: on a cluster with fake nodes (kwok) place them on a
# real node with --node-selector/--toleration; the sandboxes' pods may stay on fake nodes.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/e2e-test.sh [options] [-- install.sh options]
  -r, --release NAME        release name (default osb-e2e)
  -n, --namespace NS        namespace to create and remove (default osb-e2e-<random>)
      --sandbox-image IMG   image of the test sandboxes (default ubuntu:latest)
      --node-selector K=V   place the controller and the server on nodes with this label
      --toleration K=V:EFFECT  ... tolerating this taint (e.g. dedicated=infra:NoSchedule)
      --no-server           install and check without the server
      --timeout SECONDS     per step (default 180)
      --keep                leave the release and namespace for inspection
  -h, --help                this text
Options after -- go to scripts/install.sh (images, --set ...).
USAGE
}

release=osb-e2e
namespace=osb-e2e-$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
sandbox_image=ubuntu:latest
node_selector=""
toleration=""
server=true
timeout=180
keep=false
install_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -r | --release) release=$2; shift ;;
    -n | --namespace) namespace=$2; shift ;;
    --sandbox-image) sandbox_image=$2; shift ;;
    --node-selector) node_selector=$2; shift ;;
    --toleration) toleration=$2; shift ;;
    --no-server) server=false ;;
    --timeout) timeout=$2; shift ;;
    --keep) keep=true ;;
    -h | --help) usage; exit 0 ;;
    --) shift; install_args=("$@"); break ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

need_tools helm kubectl
check_cluster
scripts=$(dirname "$0")
failed=true

cleanup() {
  if [[ $keep == true ]]; then
    warn "kept: release $release and namespace $namespace"
    return
  fi
  info "cleaning up"
  kubectl delete batchsandboxes.sandbox.opensandbox.io,pools.sandbox.opensandbox.io --all -n "$namespace" \
    --wait=false >/dev/null 2>&1 || true
  "$scripts/uninstall.sh" -y -r "$release" -n "$namespace" --delete-namespace >/dev/null 2>&1 || true
  [[ $failed == false ]] && ok "e2e passed" || printf '\033[1;31mFAILED\033[0m\n' >&2
}
trap cleanup EXIT

# wait_for "what" command...: runs the command until it succeeds, or fails after $timeout seconds.
wait_for() {
  local what=$1 deadline=$((SECONDS + timeout))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for: $what"
    sleep 1
  done
  ok "$what"
}

jsonpath() {  # resource jsonpath
  kubectl get -n "$namespace" "$1" -o "jsonpath=$2"
}

at_least() {  # resource jsonpath minimum
  local value
  value=$(jsonpath "$1" "$2")
  [[ -n $value && $value -ge $3 ]]
}

# --- install -------------------------------------------------------------------------------------
args=(-y -r "$release" -n "$namespace" --timeout "${timeout}s")
[[ $server == true ]] || args+=(--no-server)
"$scripts/install.sh" "${args[@]}" "${install_args[@]}" >/dev/null

if [[ -n $node_selector || -n $toleration ]]; then
  patch='{"spec":{"template":{"spec":{'
  if [[ -n $node_selector ]]; then
    patch+="\"nodeSelector\":{\"${node_selector%%=*}\":\"${node_selector#*=}\"}"
  fi
  if [[ -n $toleration ]]; then
    key=${toleration%%=*} rest=${toleration#*=}
    [[ -n $node_selector ]] && patch+=","
    patch+="\"tolerations\":[{\"key\":\"$key\",\"operator\":\"Equal\",\"value\":\"${rest%%:*}\",\"effect\":\"${rest#*:}\"}]"
  fi
  patch+='}}}}'
  for deploy in $(kubectl get deployment -n "$namespace" -l "app.kubernetes.io/instance=$release" -o name); do
    kubectl patch -n "$namespace" "$deploy" -p "$patch" >/dev/null
    kubectl rollout status -n "$namespace" "$deploy" --timeout="${timeout}s" >/dev/null
  done
  ok "placed on nodes ${node_selector:-(any)} tolerating ${toleration:-(nothing)}"
fi
wait_deployments "$namespace" "$release" "${timeout}s"

# --- what the chart installed ---------------------------------------------------------------------
for crd in pools batchsandboxes; do
  wait_for "CRD $crd.sandbox.opensandbox.io served" \
    kubectl wait --for=condition=Established "crd/$crd.sandbox.opensandbox.io" --timeout=5s
done
sa=system:serviceaccount:$namespace:$release-controller-manager
[[ $(kubectl auth can-i create pods -n "$namespace" --as="$sa") == yes ]] || die "the controller may not create pods"
[[ $(kubectl auth can-i get secrets -n "$namespace" --as="$sa" || true) == no ]] || die "the controller may read secrets"
ok "controller RBAC: may create pods, may not read secrets"
kubectl get clusterrole -o name | grep "sandbox-k8s-$release-manager-role" >/dev/null || die "no manager ClusterRole"
ok "ClusterRoles sandbox-k8s-$release-*"

if [[ $server == true ]]; then
  port=$(kubectl get svc -n "$namespace" "$release-server" -o 'jsonpath={.spec.ports[0].port}')
  health() { kubectl get --raw "/api/v1/namespaces/$namespace/services/http:$release-server:$port/proxy/health" | grep healthy >/dev/null; }
  wait_for "server /health answers through Service $release-server" health
fi

# --- a Pool, a BatchSandbox from a template, one claimed from the Pool ----------------------------
kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: Pool
metadata:
  name: example-pool
spec:
  minBufferSize: 2
  maxBufferSize: 5
  capacity: 10
  sandboxTemplate:
    spec:
      image: $sandbox_image
      command: ["sleep", "infinity"]
---
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: example-batchsandbox
spec:
  replicas: 3
  ttlSecondsAfterFinished: 3600
  sandboxTemplate:
    spec:
      image: $sandbox_image
      command: ["sleep", "infinity"]
YAML
ok "created Pool example-pool and BatchSandbox example-batchsandbox"
wait_for "Pool example-pool has 2 available pods" at_least pool.sandbox.opensandbox.io/example-pool '{.status.available}' 2
wait_for "BatchSandbox example-batchsandbox has 3 ready sandboxes" \
  at_least batchsandbox.sandbox.opensandbox.io/example-batchsandbox '{.status.ready}' 3

kubectl apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: pooled-batchsandbox
spec:
  replicas: 1
  poolRef: example-pool
YAML
wait_for "BatchSandbox pooled-batchsandbox claimed 1 ready sandbox from the Pool" \
  at_least batchsandbox.sandbox.opensandbox.io/pooled-batchsandbox '{.status.ready}' 1
some_pods() {  # label selector
  [[ -n $(kubectl get pods -n "$namespace" -l "$1" -o name) ]]
}
# The claim label follows the allocation (recorded in the BatchSandbox first), a moment later.
wait_for "the claimed pod carries its claim label" some_pods sandbox.opensandbox.io/batchsandbox=pooled-batchsandbox
claimed=$(kubectl get pods -n "$namespace" -l sandbox.opensandbox.io/batchsandbox=pooled-batchsandbox -o name)
[[ $(wc -w <<<"$claimed") -eq 1 ]] || die "expected one claimed pod, found: $claimed"
[[ $(kubectl get -n "$namespace" "$claimed" -o 'jsonpath={.metadata.labels.sandbox\.opensandbox\.io/pool}') == example-pool ]] \
  || die "the claimed pod is not from the Pool"
ok "claimed pod ${claimed#pod/} came from the Pool"
wait_for "Pool example-pool refilled to 2 available" at_least pool.sandbox.opensandbox.io/example-pool '{.status.available}' 2

no_pods() {  # label selector
  [[ -z $(kubectl get pods -n "$namespace" -l "$1" -o name) ]]
}
kubectl delete -n "$namespace" batchsandbox.sandbox.opensandbox.io/example-batchsandbox \
  batchsandbox.sandbox.opensandbox.io/pooled-batchsandbox --wait=false >/dev/null
wait_for "the BatchSandboxes' pods are gone" no_pods sandbox.opensandbox.io/batchsandbox
kubectl delete -n "$namespace" pool.sandbox.opensandbox.io/example-pool --wait=false >/dev/null
wait_for "the Pool's pods are gone" no_pods sandbox.opensandbox.io/pool
failed=false
