#!/usr/bin/env bash
# Two torchrun agents on 127.0.0.1 acting as two nodes, joined by a c10d rendezvous: the multi-node
# path on one machine.
#   launch/multinode_local.sh train CONFIG [section.key=value ...]
# NNODES (2) agents of NPROC_PER_NODE (1) processes; PYTHON picks the interpreter.
set -euo pipefail
NNODES=${NNODES:-2}
NPROC=${NPROC_PER_NODE:-1}
PORT=${MASTER_PORT:-$((29400 + RANDOM % 1000))}
PY=${PYTHON:-python}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
pids=()
for node in $(seq 0 $((NNODES - 1))); do
    "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
        --rdzv_endpoint "127.0.0.1:$PORT" --rdzv_id "local-$$" --local_addr 127.0.0.1 \
        -m dist_dml.cli "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
