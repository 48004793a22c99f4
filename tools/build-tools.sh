#!/usr/bin/env bash
# Builds the local test cluster's programs from the Go module proxy, once per machine:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, kwok, helm, and the
#   container registry (CNCF distribution, tools/registry.sh).
# Binaries land in $OSB_CACHE/bin (default ~/.cache/opensandbox-dev/bin); a stamp per tool records
# the version built, so a warm run returns at once. Go is used only here, for test tooling.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${OSB_CACHE:-$HOME/.cache/opensandbox-dev}
bin=$cache/bin
work=$cache/gobuild
mkdir -p "$bin" "$work"
export GOFLAGS=-buildvcs=false CGO_ENABLED=${CGO_ENABLED:-0}

log() { printf '[build-tools] %s\n' "$*" >&2; }

fresh() {  # fresh NAME VERSION: true when NAME was already built at VERSION
  [[ -f $bin/.$1.version && $(cat "$bin/.$1.version") == "$2" ]]
}
stamp() { echo "$2" >"$bin/.$1.version"; }

# module_dir NAME: a scratch consumer module outside the work tree
module_dir() { local d=$work/$1; mkdir -p "$d"; echo "$d"; }

build_kube() {
  local v=$KUBE_VERSION staging=${KUBE_VERSION/v1./v0.}
  fresh kube "$v" && return
  log "building Kubernetes $v (apiserver, controller-manager, scheduler, kubelet, kubectl); this takes a while"
  local d; d=$(module_dir kube)
  cp "$here/go/kube/tools.go" "$d/"
  local gomod; gomod=$(cd "$d" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module opensandbox.dev/tools/kube"
    echo "go 1.24.0"
    echo "require k8s.io/kubernetes $v"
    # k8s.io/kubernetes replaces its staging modules with local paths; point them at the tags.
    grep -E '=> ./staging/' "$gomod" | awk -v s="$staging" '{print "replace " $1 " => " $1 " " s}'
  } >"$d/go.mod"
  (cd "$d" && go mod tidy)
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(cut -d. -f2 <<<"$v")"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
    log "  $cmd"
    (cd "$d" && go build -trimpath -ldflags "$ld" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  done
  stamp kube "$v"
}

build_simple() {  # build_simple NAME MODULE@VERSION PACKAGE [LDFLAGS]
  local name=$1 modver=$2 pkg=$3 ld=${4:-}
  fresh "$name" "$modver" && return
  log "building $name ($modver)"
  local d; d=$(module_dir "$name")
  printf 'module opensandbox.dev/tools/%s\ngo 1.24.0\n' "$name" >"$d/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" >"$d/tools.go"
  (cd "$d" && go get "$modver" && go mod tidy && go build -trimpath -ldflags "-s -w $ld" -o "$bin/$name" "$pkg")
  stamp "$name" "$modver"
}

build_kube
build_simple etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION" go.etcd.io/etcd/server/v3
build_simple kwok "sigs.k8s.io/kwok@$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
build_simple helm "helm.sh/helm/v3@$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_simple registry "github.com/distribution/distribution/v3@$REGISTRY_VERSION" \
  github.com/distribution/distribution/v3/cmd/registry \
  "-X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION"
log "tools ready in $bin"
