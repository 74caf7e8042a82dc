"""What runs inside the gloo worker processes of ``tests/test_fsdp.py``, and the single-process
reference it is compared with.

* ``start(world, plan, ...)`` (called by pytest) starts ``world`` processes with
  ``torch.multiprocessing.spawn`` and a ``file://`` rendezvous, as ``tests/test_ddp.py`` does, and
  runs a *plan*, a list of scenarios, in all of them: one spawn per world size amortizes the
  seconds each process needs to start, and the runs of all world sizes go at the same time. Every
  rank saves what each scenario returns to ``<out_dir>/<scenario id>.<rank>.pt``; ``finish`` waits
  and reads them back. A checkpoint passes from the 2-rank run to the others through files
  (``<checkpoint>.done`` once saved).
* A scenario that raises is recorded as ``{"error": ...}`` and the plan goes on with the next one.
  After every scenario the ranks compare their outcome through the rendezvous store (not a
  collective, so a rank stuck in a collective cannot pair with it): when the outcomes differ, the
  ranks stopped at different collectives and the process group is out of step, so the remaining
  scenarios are recorded as not run instead of hanging one gloo timeout each.
* ``reference(name, steps)`` is the single-process run: the same model (same seed), unsharded, the
  same optimizer configuration, stepped on the whole batch.

Scenarios: ``equiv`` (train ``STEPS`` steps with the model under ``fully_shard``, ``DDP`` or as is,
and return full parameters and full optimizer state), ``dcp_save`` / ``dcp_load`` (a checkpoint
through ``torch.distributed.checkpoint`` on one world size, resumed on another), ``comm`` (bytes
moved inside ``opt.step()``), ``placement`` (unsupported DTensor placements) and ``plain_dtensor``
(plain parameters with any placement).
"""
from __future__ import annotations

import os
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from subspace_ops import AdamSNSM, GaLoreAdamW, lowrank_param_groups

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed
    DTensor = Replicate = Shard = None

PROJECTORS = ("svd", "randomized", "online_pca", "gaussian", "srht")
OPTIMIZERS = {"galore": GaLoreAdamW, "snsm": AdamSNSM}
DTYPES = {"float64": torch.float64, "float32": torch.float32}

STEPS = 6
# Divisible by every world size used (1, 2, 3): each rank takes an equal slice, so FSDP's (and DDP's)
# average over ranks of the gradients of per-rank mean losses is the gradient of the whole batch's mean.
BATCH = 12
RANK = 3
LR = 1e-2
WEIGHT_DECAY = 0.1
PG_TIMEOUT_S = 30  # a collective that waits this long for a peer fails instead of hanging the test run


# -- the model ----------------------------------------------------------------------------------------
class Block(nn.Module):
    """Two linear layers (the second one optionally followed by a LayerNorm): one FSDP unit."""

    def __init__(self, d_in, d_mid, d_out, *, bias1=True, norm=False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_mid, bias=bias1)
        self.fc2 = nn.Linear(d_mid, d_out)
        self.norm = nn.LayerNorm(d_out) if norm else nn.Identity()

    def forward(self, x):
        return torch.tanh(self.norm(self.fc2(torch.tanh(self.fc1(x)))))


class TinyNet(nn.Module):
    """Matrices with row counts that no world size used divides evenly (torch.chunk shards: 7 rows
    on 3 ranks are 3/3/1, ``last``'s 4 rows on 3 ranks are 2/2/0, an empty shard), for both sides of
    ``proj_type="std"``: 7x6, 9x7, 9x9 project on the right (rows >= cols), 5x9 and 4x5 on the left.
    Plus plain AdamW parameters: an embedding (10 rows), biases, a LayerNorm. Two blocks and the
    root: three FSDP units (each unit costs collectives in every forward and backward)."""

    VOCAB, CONTEXT, OUT = 10, 3, 4

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, 6)
        self.blocks = nn.ModuleList([Block(6, 7, 9, norm=True), Block(9, 9, 5, bias1=False)])
        self.last = nn.Linear(5, self.OUT)

    def forward(self, tokens):
        x = self.embed(tokens).sum(dim=1)
        for block in self.blocks:
            x = block(x)
        return self.last(x)


# proj_type of each matrix in the "mixed" layout: every explicit proj_type, on matrices of both shapes.
MIXED = {
    "blocks.0.fc1.weight": "left",   # 7x6: the left side of a tall matrix (its basis is sharded with the rows)
    "blocks.0.fc2.weight": "full",   # 9x7
    "blocks.1.fc1.weight": "left",   # 9x9
    "blocks.1.fc2.weight": "right",  # 5x9: the right side of a wide matrix (its moments are sharded with the rows)
    "last.weight": "full",           # 4x5: an empty shard on 3 ranks
}


def _configs() -> dict:
    """name -> configuration. ``std``: ``lowrank_param_groups`` as a user calls it (proj_type "std",
    refresh every 3 steps: at steps 0 and 3). ``mixed``: the low-rank group split by ``MIXED`` into
    one group per proj_type, ``stagger=True``, refresh every 2 steps."""
    configs = {}
    for opt in OPTIMIZERS:
        for projector in PROJECTORS:
            for layout in ("std", "mixed"):
                configs[f"{opt}-{projector}-{layout}"] = dict(optimizer=opt, projector=projector, layout=layout,
                                                               dtype="float64")
    for projector in ("randomized", "online_pca", "gaussian"):
        configs[f"galore-{projector}-std-fp32"] = dict(optimizer="galore", projector=projector, layout="std",
                                                        dtype="float32")
    return configs


CONFIGS = _configs()


def make_model(dtype, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def batch(step: int, dtype):
    """The whole batch of ``step``: (tokens, target)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, TinyNet.VOCAB, (BATCH, TinyNet.CONTEXT), generator=g)
    target = torch.randn(BATCH, TinyNet.OUT, generator=g, dtype=dtype)
    return tokens, target


def build_optimizer(name: str, model: nn.Module):
    config = CONFIGS[name]
    layout = config["layout"]
    options = dict(projector=config["projector"], update_proj_gap=3 if layout == "std" else 2)
    if layout == "mixed":
        options["stagger"] = True
    groups = lowrank_param_groups(model, rank=RANK, **options)
    assert "rank" in groups[0] and len(groups[0]["params"]) == len(MIXED), groups
    if layout == "mixed":
        names = {id(p): n for n, p in model.named_parameters()}
        by_type: dict = {}
        for p in groups[0]["params"]:
            by_type.setdefault(MIXED[names[id(p)]], []).append(p)
        groups = [{**groups[0], "params": ps, "proj_type": t} for t, ps in by_type.items()] + groups[1:]
    cls = OPTIMIZERS[config["optimizer"]]
    return cls(groups, lr=LR, weight_decay=WEIGHT_DECAY, backend="reference")


def train(net, opt, steps: int, *, dtype, start: int = 0, rank: int = 0, world: int = 1) -> None:
    """Steps ``start .. start + steps - 1``; rank ``rank`` of ``world`` takes its slice of each batch."""
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    for step in range(start, start + steps):
        tokens, target = batch(step, dtype)
        nn.functional.mse_loss(net(tokens[lo:hi]), target[lo:hi]).backward()
        opt.step()
        opt.zero_grad()


def shard(model: TinyNet) -> None:
    """FSDP2 as a user applies it: each block, then the root (embedding, ``last``)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: call it on every rank)."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().clone()


def _describe(v) -> tuple:
    if _is_dtensor(v):
        return ("DTensor", tuple(v.shape), str(tuple(v.placements)), str(v.dtype))
    if isinstance(v, torch.Tensor):
        return ("Tensor", tuple(v.shape), None, str(v.dtype))
    return (type(v).__name__, None, None, None)


def _all_gather_object(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# How _describe writes the placements of a row-sharded and of a replicated DTensor on a 1-D mesh.
_ROWS = str((Shard(0),)) if DTensor is not None else None
_REPLICATED = str((Replicate(),)) if DTensor is not None else None


def _key_name(key) -> str:
    if isinstance(key, tuple):  # snapshot's ("param", name, "") / ("state", name, state key)
        return key[1] if key[0] == "param" else f"state {key[1]}.{key[2]}"
    return str(key)


def _pack(v) -> tuple:
    """(description, mesh coordinate, what this rank holds: its local shard, a tensor or a value)."""
    if _is_dtensor(v):
        return _describe(v), tuple(v.device_mesh.get_coordinate()), v.to_local().detach().cpu().clone()
    if isinstance(v, torch.Tensor):
        return _describe(v), None, v.detach().cpu().clone()
    return _describe(v), None, v


def gather_full(named: dict, world: int) -> tuple:
    """The whole values of ``named`` (key -> DTensor, tensor or other value) on every rank, from one
    ``all_gather_object`` instead of a collective per DTensor: row shards (Shard(0) on a 1-D mesh) are
    concatenated in mesh order (torch.chunk's layout), replicated DTensors and plain tensors taken
    from rank 0, other placements gathered by ``full_tensor()``. Returns ``(values, descriptions,
    problems)``; ``problems``: a key or description that differs across ranks (its value is left
    out), or a plain tensor or replicated DTensor with different values on different ranks (a
    rank-local value, which dcp would save from one rank only). Collective: call on every rank."""
    mine = {key: _pack(v) for key, v in named.items()}
    ranks = _all_gather_object(mine, world)
    values, descriptions, problems = {}, {}, []
    for key in sorted(set().union(*ranks), key=str):
        held = [r.get(key) for r in ranks]
        kinds = [None if h is None else h[0] for h in held]
        if any(k != kinds[0] for k in kinds):
            problems.append(f"{_key_name(key)}: differs across ranks (per rank: {kinds})")
            continue
        description = descriptions[key] = kinds[0]
        local = named[key]
        if description[0] == "DTensor" and description[2] == _ROWS:
            values[key] = torch.cat([h[2] for h in sorted(held, key=lambda h: h[1])])
        elif description[0] == "DTensor" and description[2] != _REPLICATED:
            values[key] = full(local)  # same keys and descriptions on every rank: the same collectives
        else:
            values[key] = held[0][2]
            if isinstance(values[key], torch.Tensor):
                for r, h in enumerate(held):
                    if not torch.equal(h[2], values[key]):
                        problems.append(f"{_key_name(key)} {description}: rank {r}'s value differs from rank 0's, "
                                        "a rank-local value (dcp saves plain and replicated tensors from one rank "
                                        "only)")
    return values, descriptions, problems


def snapshot(model: nn.Module, opt, world: int) -> dict:
    """Full parameters and full optimizer state, keyed by parameter name (collective; see ``gather_full``).
    ``layout``: what each state value is (DTensor and its placements, or Tensor), its shape and dtype;
    ``placements``: the same for the parameters."""
    params = dict(model.named_parameters())
    named = {("param", n, ""): p for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            named[("state", n, k)] = v
    values, descriptions, problems = gather_full(named, world)
    weights, placements = {}, {}
    state, layout = {n: {} for n in params}, {n: {} for n in params}
    for (kind, n, k), description in descriptions.items():
        if kind == "param":
            placements[n] = description
            if (kind, n, k) in values:
                weights[n] = values[(kind, n, k)]
        else:
            layout[n][k] = description
            if (kind, n, k) in values:
                state[n][k] = values[(kind, n, k)]
    return dict(params=weights, state=state, layout=layout, placements=placements, problems=problems)


# -- scenarios -----------------------------------------------------------------------------------------
def run_equiv(rank: int, world: int, mode: str, name: str) -> dict:
    """Train ``STEPS`` steps of configuration ``name`` with the model under ``fully_shard``
    (``mode="fsdp"``), ``DistributedDataParallel`` (``"ddp"``) or as is (``"plain"``, world 1)."""
    dtype = DTYPES[CONFIGS[name]["dtype"]]
    model = make_model(dtype)
    net = model
    if mode == "fsdp":
        shard(model)
    elif mode == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
    elif mode != "plain":
        raise ValueError(mode)
    init = gather_full(dict(model.named_parameters()), world)[0]
    opt = build_optimizer(name, model)
    train(net, opt, STEPS, dtype=dtype, rank=rank, world=world)
    snap = snapshot(model, opt, world)
    return dict(init=init, **snap) if rank == 0 else {}


DCP_SPLIT = 3  # steps before the checkpoint; STEPS - DCP_SPLIT after it


def _dcp_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def run_dcp_save(rank: int, world: int, name: str, checkpoint: str) -> dict:
    """``DCP_SPLIT`` steps under ``fully_shard``, then ``dcp.save`` of ``get_state_dict(model, opt)``.
    Rank 0 then writes ``<checkpoint>.done`` (any rank that fails writes ``<checkpoint>.failed``
    with its error) for the runs that load it, which may be going at the same time."""
    import torch.distributed.checkpoint as dcp

    try:
        dtype = DTYPES[CONFIGS[name]["dtype"]]
        model = make_model(dtype)
        shard(model)
        opt = build_optimizer(name, model)
        train(model, opt, DCP_SPLIT, dtype=dtype, rank=rank, world=world)
        dcp.save(_dcp_state(model, opt), checkpoint_id=checkpoint)
    except Exception as e:
        Path(f"{checkpoint}.failed").write_text(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    if rank == 0:
        Path(f"{checkpoint}.done").write_text("")
    return {"saved": checkpoint}


DCP_WAIT_S = 120


def _wait_for_checkpoint(checkpoint: str) -> None:
    deadline = time.monotonic() + DCP_WAIT_S
    while not os.path.exists(f"{checkpoint}.done"):
        if os.path.exists(f"{checkpoint}.failed"):
            raise RuntimeError(f"the checkpoint was not saved: {Path(f'{checkpoint}.failed').read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint at {checkpoint} after {DCP_WAIT_S} s")
        time.sleep(0.2)


def run_dcp_load(rank: int, world: int, name: str, checkpoint: str) -> dict:
    """A fresh model (another seed: the weights must come from the checkpoint) and optimizer under
    ``fully_shard``; ``get_state_dict`` (which materializes the optimizer state), ``dcp.load``,
    ``set_state_dict``, then steps ``DCP_SPLIT .. STEPS - 1``. Waits for the saving run first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    _wait_for_checkpoint(checkpoint)
    dtype = DTYPES[CONFIGS[name]["dtype"]]
    model = make_model(dtype, seed=1)
    shard(model)
    opt = build_optimizer(name, model)
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, STEPS - DCP_SPLIT, dtype=dtype, start=DCP_SPLIT, rank=rank, world=world)
    snap = snapshot(model, opt, world)
    return snap if rank == 0 else {}


# -- communication inside opt.step() -------------------------------------------------------------------
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
# Bookkeeping ops of the functional collectives: no data moves.
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


def _payload(obj) -> tuple:
    leaves = [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]
    return sum(t.numel() for t in leaves), sum(t.numel() * t.element_size() for t in leaves)


class CommCounter(TorchDispatchMode):
    """Records every collective dispatched while active: ``ops`` is a list of (op, elements, bytes).

    The size of a collective is its largest buffer: for each top-level argument and for the result,
    the tensors in it are summed (a list of tensors counts whole), and the largest sum is taken. That
    is the tensor of an all-reduce or a broadcast, the whole gathered tensor of an all-gather (its
    output), the whole input of a reduce-scatter, for c10d's in-place ops (``c10d.allreduce_``,
    whose outputs are arguments) and the functional collectives DTensor issues
    (``_c10d_functional.all_gather_into_tensor``, whose output is the result) alike.

    DTensor operations return NotImplemented here first (as torch's CommDebugMode does), so DTensor
    runs and its redistributions come back through this mode as collectives on plain tensors.
    """

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if DTensor is not None and any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **kwargs)
        op = str(func)
        if func.namespace in _COLLECTIVE_NAMESPACES and op.split(".")[1] not in _NOT_COLLECTIVES:
            roles = [*args, *kwargs.values(), out]
            elements, nbytes = max((_payload(role) for role in roles), default=(0, 0))
            self.ops.append((op, elements, nbytes))
        return out


class CommNet(nn.Module):
    """Matrices big enough that a gather of the whole gradient (m·n = 12288 elements) dwarfs the
    low-rank traffic (r·(m+n) = 896 at rank 4)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(96, 128)    # weight 128x96: rows >= cols, side "right"
        self.down = nn.Linear(128, 96)  # weight 96x128: rows < cols, side "left"

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


COMM_RANK, COMM_GAP, COMM_STEPS, COMM_BATCH = 4, 2, 4, 8
COMM_SHAPES = {"right": (128, 96), "left": (96, 128)}
# The range finder's sketch width r + oversample: 2r (the default oversample, 8, would make it 3r).
COMM_OVERSAMPLE = 4


def run_comm(rank: int, world: int, projector: str) -> dict:
    """Collectives inside each ``opt.step()``: one GaLoreAdamW per matrix (so each side is measured
    by itself) and one for the biases, all stepped after the same backward. Steps 0 (the first
    basis), 1, 2 (a refresh: ``COMM_GAP``) and 3."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = CommNet()
    fully_shard(model.up)
    fully_shard(model.down)
    fully_shard(model)
    extra = {"oversample": COMM_OVERSAMPLE} if projector == "randomized" else {}

    def lowrank(p):
        return GaLoreAdamW([{"params": [p], "rank": COMM_RANK, "update_proj_gap": COMM_GAP, "projector": projector,
                             **extra}], lr=1e-3, backend="reference")

    opts = {
        "right": lowrank(model.up.weight),
        "left": lowrank(model.down.weight),
        "plain": GaLoreAdamW([{"params": [model.up.bias, model.down.bias]}], lr=1e-3, backend="reference"),
    }
    records = {side: [] for side in opts}
    lo, hi = rank * COMM_BATCH // world, (rank + 1) * COMM_BATCH // world
    for step in range(COMM_STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(COMM_BATCH, 96, generator=g), torch.randn(COMM_BATCH, 96, generator=g)
        nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi]).backward()
        for side, opt in opts.items():
            with CommCounter() as counter:
                opt.step()
            records[side].append(counter.ops)
        for opt in opts.values():
            opt.zero_grad()
    return {"records": records}


# -- placements ----------------------------------------------------------------------------------------
def _construction_error(make) -> str:
    """"" when ``make()`` builds an optimizer; the message of a ValueError; another exception by name."""
    try:
        make()
    except ValueError as e:
        return f"ValueError: {e}"
    except Exception as e:  # noqa: BLE001 (reported to the test as is)
        return f"{type(e).__name__} (not a ValueError): {e}"
    return ""


def _meshes(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))


def run_placement(rank: int, world: int) -> dict:
    """Construction with a low-rank DTensor parameter sharded on dim 1 (both optimizers), and with one
    on a 2-D mesh; the plain parameter before it (index 0) is a row-sharded DTensor, supported."""
    from torch.distributed.tensor import distribute_tensor

    mesh, mesh2 = _meshes(world)
    torch.manual_seed(0)
    bias = nn.Parameter(distribute_tensor(torch.randn(4), mesh, [Shard(0)]))
    cols = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))
    two_d = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh2, [Replicate(), Shard(0)]))
    messages = {}
    for opt_name, cls in OPTIMIZERS.items():
        messages[f"{opt_name}-shard1"] = _construction_error(
            lambda: cls([{"params": [bias]}, {"params": [cols], "rank": 2}]))
    messages["galore-2d-mesh"] = _construction_error(
        lambda: GaLoreAdamW([{"params": [bias]}, {"params": [two_d], "rank": 2}]))
    return {"messages": messages} if rank == 0 else {}


def run_plain_dtensor(rank: int, world: int) -> dict:
    """Plain (non-low-rank) DTensor parameters with placements FSDP never makes (Shard(1), Replicate(),
    2-D meshes) next to a row-sharded low-rank one, stepped 3 times with seeded gradients; the same
    optimizers on plain tensors in this process are the reference."""
    from torch.distributed.tensor import distribute_tensor

    mesh, mesh2 = _meshes(world)
    specs = [  # (shape, mesh, placements, low-rank)
        ((7, 6), mesh, [Shard(0)], True),
        ((5, 4), mesh, [Shard(1)], False),
        ((5, 3), mesh, [Replicate()], False),
        ((5,), mesh, [Shard(0)], False),
        ((4, 6), mesh2, [Replicate(), Shard(0)], False),
        ((3, 5), mesh2, [Replicate(), Shard(1)], False),
    ]
    g = torch.Generator().manual_seed(0)
    full_values = [torch.randn(shape, generator=g, dtype=torch.float64) for shape, *_ in specs]
    dtensors = [nn.Parameter(distribute_tensor(v.clone(), m, pl)) for v, (_, m, pl, _) in zip(full_values, specs)]
    plain = [nn.Parameter(v.clone()) for v in full_values]

    def optimizers(params):
        # one optimizer per mesh: the 1-D one with a low-rank group, the 2-D one plain only
        one = [{"params": [params[0]], "rank": 2, "update_proj_gap": 2}, {"params": params[1:4]}]
        return [GaLoreAdamW(one, lr=LR, weight_decay=WEIGHT_DECAY, backend="reference"),
                GaLoreAdamW([{"params": params[4:]}], lr=LR, weight_decay=WEIGHT_DECAY, backend="reference")]

    sharded, reference = optimizers(dtensors), optimizers(plain)
    for step in range(3):
        gen = torch.Generator().manual_seed(10 + step)
        for p, q, (shape, m, pl, _) in zip(dtensors, plain, specs):
            grad = torch.randn(shape, generator=gen, dtype=torch.float64)
            p.grad = distribute_tensor(grad.clone(), m, pl)
            q.grad = grad
        for opt in sharded + reference:
            opt.step()
    errors = {}
    for (shape, _, pl, low), p, q, v in zip(specs, dtensors, plain, full_values):
        got = full(p)
        key = f"{tuple(shape)} {pl}{' low-rank' if low else ''}"
        errors[key] = (((got - q.detach()).norm() / (q.detach() - v).norm()).item(), torch.equal(got, v))
    return {"errors": errors} if rank == 0 else {}


SCENARIOS = {
    "equiv": run_equiv,
    "dcp_save": run_dcp_save,
    "dcp_load": run_dcp_load,
    "comm": run_comm,
    "placement": run_placement,
    "plain_dtensor": run_plain_dtensor,
}


# -- the worker processes ------------------------------------------------------------------------------
def _agree(store, key: str, rank: int, world: int, status: str) -> list:
    """Every rank's outcome of a scenario, exchanged through the rendezvous store."""
    store.set(f"{key}/{rank}", status)
    keys = [f"{key}/{r}" for r in range(world)]
    store.wait(keys, timedelta(seconds=PG_TIMEOUT_S + 15))
    return [store.get(k).decode() for k in keys]


def worker(rank: int, world: int, init_file: str, out_dir: str, plan: list) -> None:
    torch.set_num_threads(1)  # world processes share 2 cores
    warnings.simplefilter("ignore")  # the optimizers' UserWarnings (a plain-only optimizer) are expected
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        store = dist.distributed_c10d._get_default_store()
        stopped = None
        for index, (sid, kind, args) in enumerate(plan):
            start = time.perf_counter()
            if stopped:
                result = {"error": f"not run: {stopped}"}
            else:
                try:
                    result = SCENARIOS[kind](rank, world, *args)
                    status = "ok"
                except Exception as e:  # noqa: BLE001 (the test reports it)
                    result = {"error": f"rank {rank}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                    status = f"{type(e).__name__}"
                try:
                    statuses = _agree(store, f"scenario{index}", rank, world, status)
                except Exception as e:  # noqa: BLE001
                    statuses = [status, f"no answer ({type(e).__name__})"]
                if len(set(statuses)) > 1:
                    stopped = (f"scenario {sid!r} ended differently on the ranks ({statuses}), so they left it at "
                               "different collectives and the process group is out of step")
            result["seconds"] = time.perf_counter() - start
            torch.save(result, os.path.join(out_dir, f"{sid}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def start(world: int, plan: list, out_dir: Path) -> dict:
    """Start ``plan`` (a list of ``(scenario id, kind, args)``) in ``world`` gloo processes and return
    at once; ``finish`` collects the results. Several runs may go at the same time (each has its
    own rendezvous file): they overlap their start-up and their waits for each other's messages."""
    out_dir.mkdir(parents=True, exist_ok=False)
    context = mp.spawn(worker, args=(world, str(out_dir / "init"), str(out_dir), plan), nprocs=world, join=False)
    return dict(world=world, plan=plan, out_dir=out_dir, context=context, start=time.monotonic())


def stop(run: dict) -> None:
    """Terminate the processes of a started run that are still alive (only those this run started)."""
    for process in run["context"].processes:
        if process.is_alive():
            process.terminate()
            process.join(5)


def finish(run: dict, deadline_s: float) -> dict:
    """Wait for a started run (terminated ``deadline_s`` after its start if still going) and return
    ``{"results": {sid: [result of rank 0, rank 1, ...] (None: none saved)}, "crash": str | None,
    "seconds": wall time}``."""
    world, context = run["world"], run["context"]
    crash = None
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() - run["start"] > deadline_s:
                crash = f"the {world}-process run was still going after {deadline_s:.0f} s and was terminated"
                break
    except Exception as e:  # noqa: BLE001 (a worker died: ProcessRaisedException / ProcessExitedException)
        crash = f"a worker of the {world}-process run died: {e}"
    finally:
        stop(run)
    results = {}
    for sid, _, _ in run["plan"]:
        files = [run["out_dir"] / f"{sid}.{r}.pt" for r in range(world)]
        results[sid] = [torch.load(f, weights_only=False) if f.exists() else None for f in files]
    return {"results": results, "crash": crash, "seconds": time.monotonic() - run["start"]}


# -- the single-process reference ----------------------------------------------------------------------
def reference(name: str, steps: int = STEPS) -> dict:
    """``steps`` steps of configuration ``name`` in this process, unsharded, on the whole batch:
    the initial and final weights and the final optimizer state, keyed by parameter name. One
    thread, as the workers (which may be running beside it on the same cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dtype = DTYPES[CONFIGS[name]["dtype"]]
        model = make_model(dtype)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(name, model)
        train(model, opt, steps, dtype=dtype)
    finally:
        torch.set_num_threads(threads)
    params = dict(model.named_parameters())
    state = {n: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()}
             for n, p in params.items()}
    return dict(init=init, params={n: p.detach().clone() for n, p in params.items()}, state=state)
