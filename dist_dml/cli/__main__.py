"""`python -m dist_dml.cli ARGS`: what torchrun, srun and the launch scripts start in every rank."""
import os
import sys

from dist_dml.cli import leave, main
from dist_dml.infra.distributed import die_with_launcher

if __name__ == "__main__":
    die_with_launcher()
    returned = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        leave(returned)
    sys.exit(returned)
