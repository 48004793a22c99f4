# Shared by install.sh, uninstall.sh and e2e-test.sh (sourced, not run).
# shellcheck shell=bash
CHART_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

info() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
ok() { printf '\033[1;32m ok\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33mwarn\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror\033[0m %s\n' "$*" >&2; exit 1; }

need_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH"
  done
}

check_cluster() {
  kubectl version --request-timeout=10s >/dev/null 2>&1 \
    || die "cannot reach the cluster of the current kubeconfig (${KUBECONFIG:-~/.kube/config})"
}

# REPO:TAG -> "REPO TAG" (a registry's :port is not a tag).
split_image() {
  local image=$1 last=${1##*/}
  if [[ $last == *:* ]]; then
    printf '%s %s\n' "${image%:*}" "${image##*:}"
  else
    printf '%s %s\n' "$image" latest
  fi
}

# ask VAR "question" default: reads an answer (the default on an empty line).
ask() {
  local __var=$1 question=$2 default=${3:-} answer
  read -r -p "$question [${default}]: " answer </dev/tty || true
  printf -v "$__var" '%s' "${answer:-$default}"
}

# confirm_yes "question": true unless n/no.
confirm_yes() {
  local answer
  read -r -p "$1 [Y/n]: " answer </dev/tty || true
  [[ $answer != n && $answer != N && $answer != no ]]
}

# confirm "question": true on y/yes.
confirm() {
  local answer
  read -r -p "$1 [y/N]: " answer </dev/tty || true
  [[ $answer == y || $answer == Y || $answer == yes ]]
}

wait_deployments() {  # namespace release timeout
  local ns=$1 release=$2 timeout=$3
  info "waiting for the Deployments of $release in $ns to be Available (up to $timeout)"
  kubectl wait deployment -n "$ns" -l "app.kubernetes.io/instance=$release" \
    --for=condition=Available --timeout="$timeout" >/dev/null \
    || { kubectl get deployment,pods -n "$ns" -l "app.kubernetes.io/instance=$release" >&2; die "not Available"; }
  ok "$(kubectl get deployment -n "$ns" -l "app.kubernetes.io/instance=$release" -o name | tr '\n' ' ')Available"
}
