# Sourced by tools/cluster.sh and tools/node.sh (which set `top`): where the local cluster lives,
# and a kubeconfig writer.
state=${OSB_CLUSTER_DIR:-$top/.cluster}
cache=${OSB_CACHE:-$HOME/.cache/opensandbox-dev}
bin=$cache/bin
pki=$state/pki
API_PORT=${OSB_API_PORT:-6443}

# write_kubeconfig FILE USER CERT KEY: a kubeconfig for a client certificate
write_kubeconfig() {
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: opensandbox-dev
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $3
    client-key: $4
contexts:
- name: opensandbox-dev
  context: {cluster: opensandbox-dev, user: $2}
current-context: opensandbox-dev
KC
}
