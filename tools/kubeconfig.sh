# Sourced by tools/cluster.sh and tools/node.sh: writes a kubeconfig for a client certificate.
# write_kubeconfig FILE USER CERT KEY  (API_PORT and pki must be set)
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
