#!/usr/bin/env bash
# Removes an opensandbox-controller release, carefully: it shows what is left in the namespace and
# asks before anything beyond `helm uninstall`. The CRDs (whose deletion deletes every Pool and
# BatchSandbox in the cluster) and the namespace are deleted only when asked for.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/uninstall.sh [options]
  -r, --release NAME      release name (default opensandbox-controller)
  -n, --namespace NS      namespace of the release (default opensandbox)
      --delete-resources  also delete the Pools and BatchSandboxes in that namespace
      --delete-namespace  also delete the namespace (everything in it)
      --delete-crds       also delete the CRDs: every Pool and BatchSandbox in the CLUSTER goes
      --dry-run           say what would be done, do nothing
  -y, --yes               do not ask for confirmation
  -h, --help              this text
USAGE
}

release=opensandbox-controller
namespace=opensandbox
delete_resources=false
delete_namespace=false
delete_crds=false
dry_run=false
yes=false
while [[ $# -gt 0 ]]; do
  case $1 in
    -r | --release) release=$2; shift ;;
    -n | --namespace) namespace=$2; shift ;;
    --delete-resources) delete_resources=true ;;
    --delete-namespace) delete_namespace=true ;;
    --delete-crds) delete_crds=true ;;
    --dry-run) dry_run=true ;;
    -y | --yes) yes=true ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

need_tools helm kubectl
check_cluster

run() {
  if [[ $dry_run == true ]]; then
    printf 'would run: %s\n' "$*" >&2
  else
    "$@"
  fi
}

done_() {  # what was done (nothing in a dry run)
  [[ $dry_run == true ]] || ok "$@"
}

sure() {  # question: yes with -y, else ask (no terminal: no)
  [[ $yes == true ]] && return 0
  [[ -t 0 ]] || die "$1 -- refusing without a terminal; pass -y"
  confirm "$1"
}

count() {  # kind namespace-args...
  kubectl get "$@" -o name 2>/dev/null | wc -l | tr -d ' '
}

crds_served=true
kubectl get crd pools.sandbox.opensandbox.io >/dev/null 2>&1 || crds_served=false
if [[ $crds_served == true ]]; then
  info "in namespace $namespace: $(count pools.sandbox.opensandbox.io -n "$namespace") Pool(s)," \
    "$(count batchsandboxes.sandbox.opensandbox.io -n "$namespace") BatchSandbox(es)"
fi

if helm status "$release" -n "$namespace" >/dev/null 2>&1; then
  sure "Uninstall release $release from namespace $namespace?" || die "nothing done"
  run helm uninstall "$release" -n "$namespace" --wait
  done_ "release $release uninstalled (CRDs and namespace kept)"
else
  warn "no release $release in namespace $namespace"
fi

if [[ $delete_resources == true && $crds_served == true ]]; then
  sure "Delete every Pool and BatchSandbox in namespace $namespace?" && {
    run kubectl delete batchsandboxes.sandbox.opensandbox.io,pools.sandbox.opensandbox.io --all -n "$namespace" --wait
    done_ "Pools and BatchSandboxes of $namespace deleted"
  }
fi

if [[ $delete_namespace == true ]]; then
  if kubectl get namespace "$namespace" >/dev/null 2>&1; then
    sure "Delete namespace $namespace and everything in it?" && {
      run kubectl delete namespace "$namespace" --wait
      done_ "namespace $namespace deleted"
    }
  fi
fi

if [[ $delete_crds == true && $crds_served == true ]]; then
  total=$(( $(count pools.sandbox.opensandbox.io -A) + $(count batchsandboxes.sandbox.opensandbox.io -A) ))
  warn "deleting the CRDs deletes all $total Pool(s) and BatchSandbox(es) in the cluster, in every namespace"
  sure "Delete the CRDs pools.sandbox.opensandbox.io and batchsandboxes.sandbox.opensandbox.io?" && {
    run kubectl delete crd batchsandboxes.sandbox.opensandbox.io pools.sandbox.opensandbox.io --wait
    done_ "CRDs deleted"
  }
elif [[ $crds_served == true ]]; then
  info "CRDs kept (scripts/uninstall.sh --delete-crds removes them)"
fi
