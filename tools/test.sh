#!/usr/bin/env bash
# The test suite as two pytest processes at once (`make test`): the tests that use the test cluster
# (`--part cluster`: mostly waiting on the API server, the kubelet and pods) beside all the others
# (`--part host`: sandboxes of the local and docker runtimes, unit tests). The split is
# tests/conftest.py's; arguments go to both (e.g. -k, -x).
#   tools/test.sh [PYTEST ARGS...]
# The host part prints as it goes; the cluster part's output is in .test-logs/cluster.log, printed
# when both are done. The exit status is non-zero when either part failed.
# OSB_TEST_PARALLEL=0 runs one pytest with every test instead.
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
uv=${UV:-uv}
log() { printf '[test] %s\n' "$*" >&2; }

if [[ ${OSB_TEST_PARALLEL:-1} == 0 ]]; then
  exec "$uv" run pytest "$@"
fi

# podman's Docker API is started here, once: a part that started it would stop it under the other.
podman_started=0
if ! tools/podman.sh status >/dev/null 2>&1; then
  tools/podman.sh up || { log "tools/podman.sh up failed"; exit 1; }
  podman_started=1
fi
cluster_pid=
stop() {
  [[ -n $cluster_pid ]] && kill -INT "$cluster_pid" 2>/dev/null && wait "$cluster_pid"
  [[ $podman_started == 1 ]] && tools/podman.sh down
}
trap stop EXIT

logs=$top/.test-logs
mkdir -p "$logs"
log "the cluster part runs beside this one; its output: $logs/cluster.log"
"$uv" run pytest --part cluster "$@" </dev/null >"$logs/cluster.log" 2>&1 &
cluster_pid=$!
"$uv" run pytest --part host "$@" 2>&1 | tee "$logs/host.log"
host_status=${PIPESTATUS[0]}
log "the host part is done (exit $host_status); waiting for the cluster part"
wait "$cluster_pid"
cluster_status=$?
cluster_pid=
printf '\n========== the cluster part (%s) ==========\n' "$logs/cluster.log"
cat "$logs/cluster.log"
log "host part: exit $host_status; cluster part: exit $cluster_status"
# pytest's 5 is "no tests collected": a part that -k left empty is not a failure, unless both are.
[[ $host_status == 5 && $cluster_status == 5 ]] && exit 5
for status in "$host_status" "$cluster_status"; do
  [[ $status == 0 || $status == 5 ]] || exit "$status"
done
exit 0
