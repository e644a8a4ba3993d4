#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh N dist-dml-ARGS...
# Without GPUs it picks gloo and DeepSpeed's CPU accelerator by itself.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC ARGS...}; shift
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}" -m dist_dml.cli "$@"
