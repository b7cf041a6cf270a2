#!/usr/bin/env bash
# The documented cluster path, verified on one machine: a two-node Ray cluster on loopback started with
# the `ray` CLI (`ray start --head` + `ray start --address`), `grit run --address` against it, `grit
# validate`, then the cluster is stopped again.
#
#   docker/local-cluster.sh [RUN_DIR] [stage.key=value ...]      # default RUN_DIR: a fresh temp folder
#
# It runs the demo config (bundled sample, replayed boxes), so it needs no GPU and no network. On a real
# cluster the same commands run on each machine: `ray start --head --port=6379` on the head, `ray start
# --address=<head>:6379` on every worker (add --num-gpus=N on GPU nodes), then on the head
# `grit run -c configs/default.yaml --address auto --input ... --output ...` and `ray stop` at the end.
#
# Here the two nodes share this host (and possibly other Ray instances on it), so every port is a free one
# picked at start, each node gets its own temp dir, and the script stops exactly the two nodes it started:
# each `ray start --block` process is sent SIGTERM, on which Ray drains its node and ends the processes
# of that node. (`ray stop` would end every Ray process of this user on the host.)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
export RAY_USAGE_STATS_ENABLED=0 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Ray's token authentication: this cluster's own token, given to the nodes, `ray status` and the driver
# through the environment (the default ~/.ray/auth_token is shared with any other local Ray of this user).
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export RAY_AUTH_TOKEN

RUN_DIR="${1:-}"
if [[ -n "$RUN_DIR" && "$RUN_DIR" != *=* ]]; then shift; else RUN_DIR=""; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/grit-cluster.XXXXXX")"
RUN_DIR="${RUN_DIR:-$WORK/run}"

free_ports() {  # N distinct free TCP ports on 127.0.0.1
  "$PY" - "$1" <<'PYEOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PYEOF
}

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    # the node did not drain in time: end its process group (setsid made it ours alone)
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
  done
  echo "cluster stopped; logs in $WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM  # run the EXIT trap on interruption too

start_node() {  # start_node NAME ARGS...: `ray start --block` in its own process group
  # Ray picks free ports for everything but the dashboard agent's HTTP port (52365 by default), which two
  # nodes on one host would share.
  local name="$1"; shift
  setsid "$BIN/ray" start --block --node-ip-address=127.0.0.1 --disable-usage-stats \
    --dashboard-agent-listen-port="$(free_ports 1)" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
}

wait_for_nodes() {  # wait_for_nodes N NAME: until the cluster has N nodes; fail if NAME's process died
  for _ in $(seq 180); do
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
      echo "ray start ($2) exited:" >&2; tail -20 "$WORK/$2.log" >&2; exit 1
    fi
    [[ "$("$BIN/ray" status --address="$ADDRESS" 2>/dev/null | grep -c ' node_')" -ge "$1" ]] && return 0
    sleep 1
  done
  echo "timed out waiting for $1 Ray node(s)" >&2; exit 1
}

read -r GCS_PORT DASH_PORT <<<"$(free_ports 2)"
ADDRESS="127.0.0.1:$GCS_PORT"
echo "starting head at $ADDRESS"
start_node head --head --port="$GCS_PORT" --num-cpus=1 --include-dashboard=false \
  --dashboard-port="$DASH_PORT" --temp-dir="$WORK/ray"
wait_for_nodes 1 head

echo "starting worker"
start_node worker --address="$ADDRESS" --num-cpus=2
wait_for_nodes 2 worker
"$BIN/ray" status --address="$ADDRESS" | sed -n '1,12p'

ASSETS="$REPO/grit_pipeline/assets/demo"
cd "$REPO"
"$BIN/grit" run -c configs/demo.yaml --address "$ADDRESS" --output "$RUN_DIR" --no-progress \
  "run.input=$ASSETS/shards" "detect.replay_path=$ASSETS/detections.parquet" "$@"
"$BIN/grit" validate "$RUN_DIR"
echo "GrIT shards: $RUN_DIR/grit"
