#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh N train CONFIG [section.key=value ...]
# Uses the project's environment (see launch/common.sh; no activation needed), gloo and DeepSpeed's
# CPU accelerator without GPUs, and a free rendezvous port unless MASTER_PORT is set. A crash or a killed
# rank restarts the ranks from the last checkpoint up to MAX_RESTARTS times (launch/common.sh: 3).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/launch/common.sh"
NPROC=${1:?usage: launch/torchrun.sh NPROC train CONFIG [section.key=value ...]}; shift
if [ "${1:-}" = train ]; then preflight "$NPROC" "$NPROC" "${@:2}" || exit 2; fi
PORT=${MASTER_PORT:-$(free_port)}
echo "[launch] $NPROC processes on this node, rendezvous at 127.0.0.1:$PORT, python $PYTHON, up to $MAX_RESTARTS restarts after a crash"
exec "$PYTHON" -m dist_dml.launch --nproc_per_node "$NPROC" --master_port "$PORT" \
    --max_restarts "$MAX_RESTARTS" -m dist_dml.cli "$@"
