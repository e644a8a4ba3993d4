#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh N train CONFIG [section.key=value ...]
# Without GPUs it picks gloo and DeepSpeed's CPU accelerator by itself. PYTHON picks the interpreter.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC train CONFIG [section.key=value ...]}; shift
PY=${PYTHON:-python}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    ${MAX_RESTARTS:+--max_restarts "$MAX_RESTARTS"} -m dist_dml.cli "$@"
