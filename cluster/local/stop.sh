#!/usr/bin/env bash
# Stop the local cluster started by cluster/local/start.sh, and only that one.
#
#   cluster/local/stop.sh [--dir DIR]
#
# Ray's daemons (gcs_server, raylets, dashboard, log monitors) carry the cluster's temp dir in
# their command line, the Ray client server its port; workers, actors and job drivers are their
# descendants. Those are stopped (SIGTERM, then SIGKILL after a grace period) and nothing else:
# `ray stop` would kill every Ray process on the machine, including other people's clusters.
set -euo pipefail

DIR="${SALM_LOCAL_CLUSTER_DIR:-/tmp/salm-ray-local}"
GRACE_S=10
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --grace-s) GRACE_S="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "stop.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
TEMP_DIR="$(cd "$DIR" 2>/dev/null && pwd)/ray" || { echo "stop.sh: no cluster directory $DIR" >&2; exit 1; }
SALM_CLUSTER_CLIENT_PORT=""
# shellcheck disable=SC1091  # written by start.sh
[ -f "$DIR/cluster.env" ] && source "$DIR/cluster.env"

cluster_pids() {
  # The temp dir reaches awk through its environment, not its command line, so awk never
  # matches itself; an empty or relative pattern would match every process, so awk refuses it.
  ps -ww -eo pid=,ppid=,args= | CLUSTER_TEMP_DIR="$TEMP_DIR/" CLIENT_PORT="$SALM_CLUSTER_CLIENT_PORT" SELF="$$" awk '
    BEGIN {
      dir = ENVIRON["CLUSTER_TEMP_DIR"]
      if (length(dir) < 8 || substr(dir, 1, 1) != "/") { refused = 1; exit 1 }
      client = ENVIRON["CLIENT_PORT"] == "" ? "" : "--port=" ENVIRON["CLIENT_PORT"] " "
    }
    {
      parent[$1] = $2
      if ($1 == ENVIRON["SELF"] || $1 == 1) next
      if (index($0, dir) > 0) mine[$1] = 1
      if (client != "" && index($0, "ray.util.client.server") > 0 && index($0 " ", client) > 0) mine[$1] = 1
    }
    END {
      if (refused) exit 1
      do { grew = 0; for (p in parent) if (!(p in mine) && (parent[p] in mine)) { mine[p] = 1; grew = 1 } } while (grew)
      for (p in mine) print p
    }'
}

pids="$(cluster_pids)"
if [ -n "$pids" ]; then
  # shellcheck disable=SC2086  # one PID per word
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 $((GRACE_S * 5))); do
    pids="$(cluster_pids)"
    [ -z "$pids" ] && break
    sleep 0.2
  done
  if [ -n "$pids" ]; then
    echo "stop.sh: killing what did not exit in ${GRACE_S}s: $pids" >&2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
fi
rm -f "$DIR/cluster.env"
echo "Ray cluster in $DIR stopped"
