"""DistContext from torchrun's and SLURM's environments, and the autograd gather's gradient."""
import pytest

from .conftest import HANG_GUARD_S
import torch

from dist_dml.infra.distributed import DistContext
from dist_dml.infra.errors import UserError


def test_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"}
    ctx = DistContext.from_env(env, device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (5, 8, 1, 4)
    assert (ctx.master_addr, ctx.master_port, ctx.backend, ctx.node_rank) == ("10.0.0.7", 29400, "gloo", 1)


def test_slurm_environment_one_task_per_process():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234"}
    ctx = DistContext.from_env(env, device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.node_rank) == (3, 4, 1, 2, 1)
    assert ctx.master_addr in ("gpu07",)  # scontrol when present, else the list's first host
    assert ctx.master_port == 20000 + 1234


def test_torchrun_under_srun_wins_over_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "1"}
    assert DistContext.from_env(env, device="cpu").world_size == 2


def test_no_launcher_is_one_process():
    ctx = DistContext.from_env({}, device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)


def test_inconsistent_environment_is_a_clear_error():
    with pytest.raises(ValueError, match="RANK"):
        DistContext.from_env({"RANK": "4", "WORLD_SIZE": "4"}, device="cpu")


def test_single_process_collectives_are_identities():
    ctx = DistContext()
    x = torch.randn(3, 2, requires_grad=True)
    assert ctx.all_gather_with_grad(x) is x and torch.equal(ctx.all_reduce_sum(torch.ones(2)), torch.ones(2))


def test_several_ranks_without_a_process_group_refuse_a_collective():
    """A notebook or a test that forgets to start the group: every collective raises, none returns this rank's
    own value as if it were every rank's."""
    ctx = DistContext(rank=1, world_size=4)
    x = torch.ones(3)
    for collective in (ctx.all_reduce_sum, ctx.all_gather_no_grad, ctx.all_gather_with_grad, ctx.broadcast_,
                       ctx.all_gather_uneven, ctx.broadcast_object, ctx.all_gather_object):
        with pytest.raises(RuntimeError, match="rank 1 of 4 has no process group"):
            collective(x)
    with pytest.raises(RuntimeError, match="no process group"):
        ctx.barrier()


def test_one_process_decides_alone():
    ctx = DistContext()
    assert ctx.decide(lambda: 7) == 7
    with pytest.raises(UserError, match="no"):
        ctx.decide(lambda: (_ for _ in ()).throw(UserError("no")))


def test_gather_backward_is_a_sum_over_ranks_and_rank_zero_decides_for_all(tmp_path, run_torchrun):
    """Each rank's local input receives the gradient of the sum of all ranks' losses. A decision runs on rank 0
    only, and every rank gets its value, or its refusal raised alike."""
    out = tmp_path / "grads.pt"
    run_torchrun(2, "tests.gather_worker", str(out), timeout=HANG_GUARD_S)
    saved = torch.load(out, weights_only=True)
    # rank r: loss_r = (r + 1) * sum(w * gathered); the sum over ranks is 3 * sum(w * gathered).
    w = torch.arange(12, dtype=torch.float32).view(4, 3)
    torch.testing.assert_close(saved["grads"], 3 * w)
    (value0, refusal0, ran0), (value1, refusal1, ran1) = saved["decisions"]
    assert value0 == value1 and value0.startswith("chosen by pid")
    assert refusal0 == refusal1 == "refused by rank 0"
    assert (ran0, ran1) == ([0], [])
