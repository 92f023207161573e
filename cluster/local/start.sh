#!/usr/bin/env bash
# Start a local multi-node Ray cluster on this machine: one head node (no GPUs, the dashboard)
# and N worker nodes, each a separate raylet with its own CPUs and custom resources, all on
# loopback. For developing and testing what runs across nodes (Ray Train workers on two nodes,
# Ray Data tasks, `ray job submit`, a Serve application in Serve's throughput mode) without Kubernetes.
#
#   cluster/local/start.sh [--dir DIR] [--workers N] [--head-cpus N] [--worker-cpus N]
#                          [--head-resources JSON] [--worker-resources JSON] [--object-store-mb N]
#   source DIR/cluster.env   # RAY_ADDRESS, RAY_DASHBOARD_ADDRESS, METRICS_PORTS, ...
#   ray job submit --address "$RAY_DASHBOARD_ADDRESS" --working-dir . -- python ray_jobs/train.py ...
#   cluster/local/stop.sh [--dir DIR]
#
# Every port is picked free at start (several clusters can run side by side on one machine, e.g.
# test sessions of different developers), and all nodes share DIR/ray as Ray's temp dir: that
# path is how stop.sh finds this cluster's processes and no other's. `ray stop` would kill every
# Ray process on the machine, whoever started it. Ray replaces a loopback node address by the
# machine's own IP, so the nodes register under that IP; nothing here leaves the machine.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${SALM_LOCAL_CLUSTER_DIR:-/tmp/salm-ray-local}"
WORKERS=1
HEAD_CPUS=1
WORKER_CPUS=2
# Every worker node gets one `worker_node` slot: a job can ask for {"worker_node": 1} per task or
# Ray Train worker to spread across nodes (the default PACK placement would use one node).
WORKER_RESOURCES='{"worker_node": 1}'
HEAD_RESOURCES='{"head_node": 1}'
OBJECT_STORE_MB=256

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --head-cpus) HEAD_CPUS="$2"; shift 2 ;;
    --worker-cpus) WORKER_CPUS="$2"; shift 2 ;;
    --worker-resources) WORKER_RESOURCES="$2"; shift 2 ;;
    --head-resources) HEAD_RESOURCES="$2"; shift 2 ;;
    --object-store-mb) OBJECT_STORE_MB="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

RAY="${RAY:-$(command -v ray || echo "$REPO/.venv/bin/ray")}"
PYTHON="$(dirname "$RAY")/python"
# Job entrypoints (`python ray_jobs/train.py ...`) run with the nodes' PATH: make `python` the
# interpreter Ray itself runs in, as it is in the container image.
export PATH="$(dirname "$RAY"):$PATH"
# Ray 2.60 turns token auth on by default; a loopback-only dev cluster does without it.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# Serve's throughput mode (HAProxy in front of the ingress, gRPC between replicas) for what is served
# on this cluster, as `salm serve` and the KubeRay RayService start theirs. Serve reads it once, when
# each Ray process starts, so it goes into every node's environment here; a value already set is
# kept (RAY_SERVE_ENABLE_HA_PROXY=0 gives the Python proxy). serve/throughput_mode.py says why;
# check_nodes.py reports it per node and a test keeps it equal to THROUGHPUT_MODE_ENV.
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
export RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="${RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP:-1}"

# Ray's unix sockets live under the temp dir and their paths must stay under 107 bytes.
TEMP_DIR="$DIR/ray"
if [ ${#TEMP_DIR} -gt 40 ]; then
  echo "start.sh: --dir $DIR is too long for Ray's socket paths; use a short path such as /tmp/salm-ray-local" >&2
  exit 2
fi
if [ -f "$DIR/cluster.env" ]; then
  echo "start.sh: a cluster is already recorded in $DIR (run cluster/local/stop.sh --dir $DIR first)" >&2
  exit 1
fi
mkdir -p "$TEMP_DIR"

free_ports() {  # N distinct TCP ports free on loopback right now
  "$PYTHON" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Every port of the cluster in one call: ports picked by separate calls can repeat once their
# probe sockets close (a CI run got the GCS port again as a node's dashboard agent port).
PORTS_PER_NODE=6
read -r -a FREE_PORTS <<<"$(free_ports $((3 + PORTS_PER_NODE * (1 + WORKERS))))"
take_ports() {  # TAKEN: the first $1 of FREE_PORTS, which keeps the rest (run it in this shell)
  TAKEN="${FREE_PORTS[*]:0:$1}"
  FREE_PORTS=("${FREE_PORTS[@]:$1}")
}

# Ports every node needs for itself. Worker processes bind random ports (min/max 0) instead of
# Ray's fixed 10002-19999 pool, which two clusters on one machine would hand out twice.
node_port_args() {
  take_ports "$PORTS_PER_NODE"
  read -r nm om metrics agent_http agent_grpc runtime_env <<<"$TAKEN"
  NODE_METRICS_PORT="$metrics"
  NODE_PORT_ARGS=(
    --node-manager-port "$nm" --object-manager-port "$om" --metrics-export-port "$metrics"
    --dashboard-agent-listen-port "$agent_http" --dashboard-agent-grpc-port "$agent_grpc"
    --runtime-env-agent-port "$runtime_env" --min-worker-port 0 --max-worker-port 0
  )
}

COMMON_ARGS=(
  --temp-dir "$TEMP_DIR" --num-gpus 0
  --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024)) --disable-usage-stats
)

take_ports 3
read -r GCS_PORT DASHBOARD_PORT CLIENT_PORT <<<"$TAKEN"
node_port_args
METRICS_PORTS="$NODE_METRICS_PORT"
# Recorded before anything starts, so stop.sh can clean up after a partial start.
write_env() {
  cat >"$DIR/cluster.env" <<ENV
RAY_ADDRESS=127.0.0.1:$GCS_PORT
RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
RAY_AUTH_MODE=$RAY_AUTH_MODE
SALM_CLUSTER_TEMP_DIR=$TEMP_DIR
SALM_CLUSTER_CLIENT_PORT=$CLIENT_PORT
SALM_CLUSTER_METRICS_PORTS="$METRICS_PORTS"
SALM_CLUSTER_WORKERS=$WORKERS
ENV
}
write_env

# The head schedules no training (no GPUs, few CPUs), like the KubeRay head in cluster/kuberay/.
"$RAY" start --head --port "$GCS_PORT" --num-cpus "$HEAD_CPUS" --resources "$HEAD_RESOURCES" \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --ray-client-server-port "$CLIENT_PORT" "${COMMON_ARGS[@]}" "${NODE_PORT_ARGS[@]}" \
  >"$DIR/head.log" 2>&1 || { cat "$DIR/head.log" >&2; exit 1; }


for i in $(seq 1 "$WORKERS"); do
  node_port_args
  METRICS_PORTS="$METRICS_PORTS $NODE_METRICS_PORT"
  "$RAY" start --address "127.0.0.1:$GCS_PORT" --num-cpus "$WORKER_CPUS" --resources "$WORKER_RESOURCES" \
    "${COMMON_ARGS[@]}" "${NODE_PORT_ARGS[@]}" >"$DIR/worker-$i.log" 2>&1 \
    || { cat "$DIR/worker-$i.log" >&2; exit 1; }
  write_env
done

echo "Ray cluster up: head + $WORKERS worker node(s) (state in $DIR/cluster.env)"
cat "$DIR/cluster.env"
