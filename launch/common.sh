# Sourced by the launch scripts: the project's Python, the device, a rendezvous port, and a check of
# the run before any process starts. Expects REPO (the repository) to be set.
#
# Python: $PYTHON, else the environment ./dml made ($DIST_DML_VENV or REPO/.venv), else python3 on
# PATH; nothing needs activating.
if [ -z "${PYTHON:-}" ]; then
    venv=${DIST_DML_VENV:-$REPO/.venv}
    if [ -x "$venv/bin/python" ]; then
        PYTHON="$venv/bin/python"
    else
        PYTHON=$(command -v python3 || command -v python || true)
    fi
fi
if ! "$PYTHON" -c 'import dist_dml, torch' 2>/dev/null; then
    echo "[launch] $PYTHON cannot import dist_dml and torch: run ./dml setup in $REPO first (or set PYTHON)" >&2
    exit 2
fi
export PYTHON
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# A crash or a killed rank: the ranks start again from the last checkpoint, this many times (a rank that exits 2,
# a mistake or a designed stop, is never restarted: dist_dml.launch).
MAX_RESTARTS=${MAX_RESTARTS:-3}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PYTHON" -c 'import sys; print(sys.prefix)')/torch_extensions}

# A TCP port free on this host now (MASTER_PORT wins).
free_port() {
    "$PYTHON" -c 'from dist_dml.infra.distributed import free_port; print(free_port())'
}

# `preflight WORLD PER_NODE ARGS...` (dist-dml check): the config, the data, the resume at this world size and
# the shared memory of PER_NODE processes here, in one process, before torchrun starts any.
preflight() {
    local world=$1 per_node=$2; shift 2
    "$PYTHON" -m dist_dml.cli check --world-size "$world" --ranks-per-node "$per_node" "$@"
}
