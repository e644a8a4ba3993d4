#!/usr/bin/env bash
# Two torchrun agents on 127.0.0.1 acting as two nodes, joined by a c10d rendezvous: the multi-node
# path on one machine.
#   launch/multinode_local.sh train CONFIG [section.key=value ...]
# NNODES (2) agents of NPROC_PER_NODE (1) processes; the project's environment (launch/common.sh).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/launch/common.sh"
NNODES=${NNODES:-2}
NPROC=${NPROC_PER_NODE:-1}
if [ "${1:-}" = train ]; then preflight $((NNODES * NPROC)) $((NNODES * NPROC)) "${@:2}" || exit 2; fi
PORT=${MASTER_PORT:-$(free_port)}
echo "[launch] $NNODES local nodes x $NPROC processes, rendezvous at 127.0.0.1:$PORT"
pids=()
for node in $(seq 0 $((NNODES - 1))); do
    "$PYTHON" -m dist_dml.launch --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
        --rdzv_endpoint "127.0.0.1:$PORT" --rdzv_id "local-$$" --local_addr 127.0.0.1 --max_restarts "$MAX_RESTARTS" \
        -m dist_dml.cli "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
