#!/bin/sh
# The sandbox container's entrypoint: /opt/opensandbox/bootstrap.sh <user entrypoint...>
#
# Starts execd in the background, then runs the user's entrypoint:
# - not PID 1: exec's it (it takes over this process; signals reach it directly);
# - PID 1: runs it as a child, forwards SIGTERM/INT/HUP/QUIT/USR1/USR2 to it, reaps every zombie
#   re-parented to PID 1, and exits with the entrypoint's status when it ends.
# With no entrypoint (a pooled pod before it is claimed: POST /bootstrap on execd starts the real
# one later), execd itself is the main process, so the pod is only alive while execd is.
#
# execd is configured by its environment (EXECD_PORT, EXECD_ACCESS_TOKEN, EXECD_LOG_LEVEL, ...).
# POSIX sh only: the sandbox image may have no bash.

EXECD=${EXECD:-/opt/opensandbox/execd}

if [ ! -x "$EXECD" ]; then
  echo "bootstrap: execd not found at $EXECD" >&2
  [ $# -gt 0 ] && exec "$@"
  exit 127
fi

# A start gate (a network policy on docker, lifecycle hooks on docker and kubernetes): the FIFO is made
# before execd starts; the server opens it once the egress sidecar enforces the policy, or execd does
# once the preStart hook succeeded (POST /lifecycle), and only then does the entrypoint start.
gate=${OPENSANDBOX_START_GATE:-}
unset OPENSANDBOX_START_GATE
if [ -n "$gate" ]; then
  rm -f "$gate"
  mkfifo -m 0600 "$gate" || { echo "bootstrap: cannot make $gate" >&2; exit 1; }
fi

EXECD_START_GATE="$gate" "$EXECD" &
execd_pid=$!

if [ -n "$gate" ]; then
  read -r _ <"$gate"
  rm -f "$gate"
fi

if [ $# -eq 0 ]; then
  main_pid=$execd_pid
elif [ "$$" -ne 1 ]; then
  exec "$@"
else
  "$@" &
  main_pid=$!
fi

forward() {
  kill -s "$1" "$main_pid" 2>/dev/null
}
for sig in TERM INT HUP QUIT USR1 USR2; do
  # shellcheck disable=SC2064 # the signal name is meant to be expanded now
  trap "forward $sig" "$sig"
done

# `wait` returns early when a trapped signal arrives, so loop until the main process is gone.
# While waiting, the shell reaps any child that ends, including orphans re-parented to PID 1.
status=0
while kill -0 "$main_pid" 2>/dev/null; do
  wait "$main_pid"
  status=$?
done
if [ "$main_pid" != "$execd_pid" ]; then
  kill -s TERM "$execd_pid" 2>/dev/null
  wait "$execd_pid" 2>/dev/null  # let execd stop its commands before the container goes away
fi
exit "$status"
