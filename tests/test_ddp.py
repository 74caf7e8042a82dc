"""DDP keeps working: a DistributedDataParallel model over 2 gloo processes on CPU, stepped by the
subspace optimizers, equals one process on the whole batch (float64, so the all-reduce's summation
order moves gradients by ~1e-16 and an exact SVD's subspace cannot jump between the runs)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from subspace_ops import AdamSNSM, GaLoreAdamW, lowrank_param_groups

WORLD = 2
STEPS = 5
CONFIGS = {
    "galore-svd": (GaLoreAdamW, dict(projector="svd")),
    "galore-randomized-full": (GaLoreAdamW, dict(projector="randomized", proj_type="full")),
    "snsm-svd": (AdamSNSM, dict(projector="svd")),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5)
    ).double()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)


def _optimizer(name, model):
    cls, options = CONFIGS[name]
    groups = lowrank_param_groups(model, rank=3, update_proj_gap=2, full_rank_patterns=(), **options)
    return cls(groups, lr=1e-2, weight_decay=0.1, backend="reference")


def _train(name, model, opt, rank=0, world=1, wrapped=None):
    net = wrapped if wrapped is not None else model
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[rank::world], y[rank::world]  # equal shards: DDP's mean of means is the full mean
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, name, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        params = _train(name, model, _optimizer(name, model), rank, WORLD, ddp)
        if rank == 0:
            torch.save(params, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_equals_one_process_on_the_whole_batch(name, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "params.pt"
    mp.spawn(_worker, args=(name, str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    ddp_params = torch.load(out, weights_only=True)
    model = _model()
    single = _train(name, model, _optimizer(name, model))
    for a, b in zip(ddp_params, single):
        assert ((a - b).norm() / b.norm()).item() <= 1e-10
    assert not all(torch.equal(a, p) for a, p in zip(single, _model().parameters()))  # it trained


def _error_worker(rank, init_file, out_file, attempt):
    """Run ``attempt()`` on every rank of a gloo group; rank 0 writes the ValueError it raised (or
    "no error") to ``out_file``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        try:
            attempt()
            message = "no error"
        except ValueError as e:
            message = str(e)
        if rank == 0:
            with open(out_file, "w") as f:
                f.write(message)
    finally:
        dist.destroy_process_group()


def _error_message(tmp_path, attempt) -> str:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "message.txt"
    mp.spawn(_error_worker, args=(str(tmp_path / "init"), str(out), attempt), nprocs=WORLD, join=True)
    return out.read_text()


def _column_sharded_matrix():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    W = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))  # not fully_shard's layout
    b = torch.nn.Parameter(torch.randn(4))
    GaLoreAdamW([{"params": [b]}, {"params": [W], "rank": 2}])


def test_column_sharded_dtensor_parameters_get_a_clear_error(tmp_path):
    """A low-rank DTensor matrix sharded other than over its rows (here Shard(1), as tensor
    parallelism makes) gets a ValueError at construction naming the parameter and its placement and
    pointing at fully_shard, instead of a crash inside torch at the first step."""
    message = _error_message(tmp_path, _column_sharded_matrix)
    assert "parameter 1 (shape (6, 4)) is a DTensor" in message and "Shard(dim=1)" in message
    assert "fully_shard" in message


def _step_in_backward_under_ddp():
    model = torch.nn.parallel.DistributedDataParallel(_model())
    GaLoreAdamW([{"params": list(model.parameters()), "rank": 2}]).step_in_backward()


def test_step_in_backward_under_ddp_is_refused_naming_fsdp2(tmp_path):
    """DDP all-reduces gradients after the hooks step_in_backward steps in: each rank would step on
    its own gradient. It raises, naming FSDP2 (whose hooks see the reduced gradient)."""
    message = _error_message(tmp_path, _step_in_backward_under_ddp)
    assert "DistributedDataParallel" in message and "fully_shard" in message
