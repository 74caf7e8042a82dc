"""FSDP2 (``fully_shard``): the optimizers on a sharded model equal one process on the whole batch.

Method. ``tests/_fsdp_harness.py`` starts 1, 2 or 3 gloo processes on the CPU (torch.multiprocessing
spawn with a ``file://`` rendezvous, as ``tests/test_ddp.py``), builds the same tiny model in each
(same seed), shards it as a user would (``fully_shard`` on each block, then on the root), builds the
optimizer from ``lowrank_param_groups`` and trains 6 steps, rank i taking its slice of each batch.
FSDP2 averages gradients over the ranks and the loss is a mean over equal slices, so the gradients
are those of one process on the whole batch up to summation order: the reference is that process,
unsharded, in this pytest process. Spawning costs seconds, so every world size runs all its
configurations in one spawn, and the spawns of the three world sizes go at the same time
(``_fsdp_harness.start``; the module fixture ``runs``).

The model's matrices have row counts the world sizes do not divide (torch.chunk shards: 7 rows on 3
ranks are 3/3/1, 4 rows are 2/2/0), for both sides of ``proj_type="std"`` (7x6, 9x7, 9x9 right;
5x9, 4x5 left) and, in the "mixed" configurations, explicit ``left``/``right``/``full`` with
``stagger``; plus an embedding, biases and a LayerNorm (plain AdamW), weight decay 0.1, rank 3 and a
refresh every 2 or 3 steps, so 6 steps refresh two or three times.

Tolerances. Float64 runs: the sharded and the reference gradients differ only by the order of the
reduce-scatter's sums, ~1e-16 relative; the moments are float64 for float64 parameters (fp32
moments would turn such a difference into a float32 rounding flip now and then, ~6e-8 relative in that
element), so an exact subspace cannot jump between the runs and the
weights' change ΔW = W_final − W_init agrees to ≤ 1e-10 relative (per parameter, relative to the
reference's ‖ΔW‖), and so does the optimizer state gathered to full tensors (``full_tensor()``). The
fp32 runs are looser (≤ 1e-5 for ΔW beyond one fp32 rounding per element, ``_numerics.delta_w_close``;
1e-4 for the state): their gradients differ by ~1e-7 relative, and a basis computed at a refresh
moves by that divided by the gap between the r-th and (r+1)-th singular values.

Checkpoints: ``get_state_dict`` / ``dcp.save`` after 3 steps on 2 ranks, then ``get_state_dict``
(which materializes the optimizer state), ``dcp.load``, ``set_state_dict`` and 3 more steps on 3 and
on 1 rank(s); the result equals 6 uninterrupted reference steps.

Communication: a ``TorchDispatchMode`` (``_fsdp_harness.CommCounter``) active only around
``opt.step()`` (not FSDP's forward all-gather or backward reduce-scatter) records every collective
(ops of the ``c10d`` namespace, and the functional collectives ``_c10d_functional`` that DTensor
issues): each op's size is its largest buffer (the tensor of an all-reduce or broadcast, the whole
output of an all-gather, the whole input of a reduce-scatter), in elements and bytes, per rank, per
step. ``pytest -s`` prints the table (side × projector × step kind → bytes per rank).

Harness checks: the same pipeline with the model unsharded on 1 process and under DDP on 2 processes
(``test_harness_*``) must equal the reference; they pass whatever the FSDP support does.
"""
from functools import lru_cache

import pytest
import torch
import torch.distributed as dist

import _fsdp_harness as H
from _numerics import delta_w_close, rel_err

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

# Float64 ΔW and state; fp32 ΔW (beyond one rounding per element) and state.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}
# State every low-rank matrix must have gathered to the reference's shape: the moments, and the
# stored basis when the projector stores one (gaussian and srht keep only the step of the draw).
REQUIRED_STATE = ("exp_avg", "exp_avg_sq", "basis", "basis_right", "basis_step")

WORLDS = (1, 2, 3)
SELF_CHECKS = {  # harness checks: (mode, world) -> configurations
    ("plain", 1): ("galore-svd-std", "snsm-online_pca-mixed"),
    ("ddp", 2): ("galore-randomized-std", "snsm-srht-mixed", "galore-gaussian-std-fp32"),
}
DCP_CONFIGS = ("galore-svd-std", "galore-randomized-std", "snsm-svd-mixed")
DCP_TARGETS = (3, 1)  # world sizes that load the 2-rank checkpoint
DEADLINE_S = 170  # per spawn, from its start: a hang fails the tests instead of blocking the run


def _plan(world: int, checkpoints) -> list:
    """The scenarios of the ``world``-process run. The 2-rank run saves the checkpoints early; the
    others load them last (waiting for them if needed), since all runs go at the same time."""
    plan = []
    for (mode, w), names in SELF_CHECKS.items():
        if w == world:
            plan += [(f"{mode}-{name}", "equiv", (mode, name)) for name in names]
    if world == 2:
        plan.append(("placement", "placement", ()))
        plan += [(f"dcp-save-{name}", "dcp_save", (name, str(checkpoints / name))) for name in DCP_CONFIGS]
    plan += [(f"fsdp-{name}", "equiv", ("fsdp", name)) for name in H.CONFIGS]
    if world == 2:
        plan += [(f"comm-{p}", "comm", (p,)) for p in H.PROJECTORS]
        plan.append(("plain_dtensor", "plain_dtensor", ()))
    if world in DCP_TARGETS:
        plan += [(f"dcp-load-{name}", "dcp_load", (name, str(checkpoints / name))) for name in DCP_CONFIGS]
    return plan


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(world)``: the finished run of ``world`` processes. All world sizes start together on
    first use (see ``_fsdp_harness.start``)."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "checkpoints").mkdir()
    started, finished = {}, {}

    def get(world):
        if not started:
            for w in WORLDS:
                started[w] = H.start(w, _plan(w, root / "checkpoints"), root / f"world{w}")
        if world not in finished:
            finished[world] = H.finish(started[world], DEADLINE_S)
        return finished[world]

    yield get
    for run in started.values():  # runs no selected test waited for
        H.stop(run)


def _result(run, sid, rank=0) -> dict:
    """Rank ``rank``'s result of scenario ``sid``; fails the test with every rank's error, if any."""
    per_rank = run["results"][sid]
    errors = [r["error"] for r in per_rank if r is not None and "error" in r]
    if errors or per_rank[rank] is None:
        crash = f" ({run['crash']})" if run["crash"] else ""
        detail = "; ".join(errors) if errors else "no result saved"
        tb = next((r.get("traceback", "") for r in per_rank if r is not None and "traceback" in r), "")
        pytest.fail(f"{sid}: {detail}{crash}\n{tb}", pytrace=False)
    return per_rank[rank]


@lru_cache(maxsize=None)
def _reference(name, steps=H.STEPS):
    return H.reference(name, steps)


def _compare(result, ref, dtype, where) -> None:
    """ΔW per parameter and the gathered optimizer state against the reference's."""
    dw_tol, state_tol = TOL[dtype]
    problems = list(result.get("problems", []))
    for name, W in result["params"].items():
        W0, W_ref = ref["init"][name], ref["params"][name]
        if dtype == torch.float64:
            err = rel_err(W - W0, W_ref - W0)
            if not err <= dw_tol:
                problems.append(f"{name} {tuple(W.shape)}: ‖ΔW − ΔW_ref‖/‖ΔW_ref‖ = {err:.3e} > {dw_tol:g}")
        else:
            msg = delta_w_close(W, W0, W_ref, dtype=torch.float32, rtol=dw_tol)
            if msg:
                problems.append(f"{name} {tuple(W.shape)}: {msg}")
    for name, ref_state in ref["state"].items():
        got = result["state"].get(name, {})
        for key, ref_v in ref_state.items():
            v = got.get(key)
            if not isinstance(v, torch.Tensor) or v.shape != ref_v.shape:
                if key in REQUIRED_STATE:
                    layout = result["layout"].get(name, {}).get(key, "missing")
                    problems.append(f"state {name}.{key}: the reference has {tuple(ref_v.shape)}, the sharded "
                                    f"run {layout} (gathered: {None if v is None else tuple(v.shape)})")
                continue
            err = rel_err(v, ref_v)
            if not err <= state_tol:
                problems.append(f"state {name}.{key} {tuple(ref_v.shape)}: rel. error {err:.3e} > {state_tol:g}")
    assert not problems, f"{where}:\n  " + "\n  ".join(problems)


# -- the harness itself -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode, world, name", [(m, w, n) for (m, w), names in SELF_CHECKS.items() for n in names])
def test_harness_matches_the_reference_without_fsdp(runs, mode, world, name):
    """The same worker pipeline (seeds, batch slices, gathering, state snapshot) with the model
    unsharded on 1 process, or under DDP on 2, equals the reference: the harness is sound."""
    result = _result(runs(world), f"{mode}-{name}")
    ref = _reference(name)
    assert all(torch.equal(result["init"][n], ref["init"][n]) for n in ref["init"])
    _compare(result, ref, H.DTYPES[H.CONFIGS[name]["dtype"]], f"{mode} on {world} process(es), {name}")


def test_reference_trains():
    """6 steps move every parameter (a comparison of ΔW means something)."""
    ref = _reference("galore-svd-mixed")
    for name, W in ref["params"].items():
        assert (W - ref["init"][name]).norm() > 1e-3 * ref["init"][name].norm(), name


# -- equivalence ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(H.CONFIGS))
@pytest.mark.parametrize("world", WORLDS)
def test_fully_shard_equals_one_process_on_the_whole_batch(runs, world, name):
    """ΔW of every parameter and the optimizer state gathered to full tensors equal the unsharded
    reference's (float64: ≤ 1e-10; fp32 configurations: ≤ 1e-5 / 1e-4); the initial weights are
    bit-identical (same seed), so only the optimizer can make them differ."""
    result = _result(runs(world), f"fsdp-{name}")
    ref = _reference(name)
    for n, W0 in ref["init"].items():
        assert torch.equal(result["init"][n], W0), f"initial {n} differs: the harness, not the optimizer"
    _compare(result, ref, H.DTYPES[H.CONFIGS[name]["dtype"]], f"fully_shard on {world} process(es), {name}")


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DCP_CONFIGS)
@pytest.mark.parametrize("world", DCP_TARGETS)
def test_dcp_checkpoint_from_2_ranks_resumes_on_other_world_sizes(runs, world, name):
    """3 steps on 2 ranks, ``dcp.save(get_state_dict(model, opt))``; a fresh model (another seed)
    and optimizer on ``world`` ranks load it (``get_state_dict``, ``dcp.load``, ``set_state_dict``)
    and take 3 more steps: equal to 6 uninterrupted reference steps (float64, ≤ 1e-10)."""
    _result(runs(2), f"dcp-save-{name}")
    result = _result(runs(world), f"dcp-load-{name}")
    _compare(result, _reference(name), torch.float64, f"saved on 2 ranks, resumed on {world}, {name}")


# -- communication --------------------------------------------------------------------------------
# Bound on what one rank moves in one opt.step() for one m x n matrix at rank r, in elements:
# C_COMM·r·(m + n). A left-side step is one all-reduce of Pᵀ G (r x n); a right-side step moves
# nothing (each rank projects its own rows with the replicated n x r basis). A range-finder refresh
# with sketch width k = r + oversample = 2r (COMM_OVERSAMPLE) all-reduces the warm start (n x r), the
# power iteration (n x k) and Qᵀ G (k x n), and orthonormalizes a row-sharded m x k sketch twice
# (a gather of m x k each time at most): r·n + 2·k·n + 2·k·m ≤ 5·r·(m + n) (plus the step's r·n). An
# online-PCA step all-reduces Pᵀ G, PᵀP and the norm of G and gathers the m x r basis for its QR
# (≤ 3·r·(m + n)); gaussian and srht bases are regenerated from a seed on every rank (nothing).
# C_COMM = 8 leaves room for another sequence of the same operations, and stays well below the
# whole gradient, m·n = 12288 elements (C_COMM·r·(m + n) = 7168 at rank 4).
C_COMM = 8


def _step_kind(step):
    return "first" if step == 0 else ("refresh" if step % H.COMM_GAP == 0 else "plain")


def _comm_table(runs2):
    """{(side, projector, kind): (max bytes over ranks and steps, max elements, ops)}."""
    table = {}
    for projector in H.PROJECTORS:
        per_rank = [_result(runs2, f"comm-{projector}", rank)["records"] for rank in range(2)]
        for side in ("right", "left", "plain"):
            for step in range(H.COMM_STEPS):
                key = (side, projector, _step_kind(step))
                for records in per_rank:
                    ops = records[side][step]
                    nbytes, elements = sum(o[2] for o in ops), sum(o[1] for o in ops)
                    old = table.get(key, (0, 0, set()))
                    table[key] = (max(old[0], nbytes), max(old[1], elements),
                                  old[2] | {o[0].replace(".default", "") for o in ops})
    return table


def _print_comm_table(table):
    bound = C_COMM * H.COMM_RANK * sum(H.COMM_SHAPES["left"])
    print(f"\nbytes moved inside opt.step() per rank (max over ranks and steps of the kind), GaLoreAdamW, "
          f"rank {H.COMM_RANK}, 2 ranks, fp32; right: {H.COMM_SHAPES['right']}, left: {H.COMM_SHAPES['left']}; "
          f"bound C·r·(m+n) = {bound} elements ({4 * bound} bytes) per matrix, whole gradient m·n = "
          f"{H.COMM_SHAPES['left'][0] * H.COMM_SHAPES['left'][1]} elements")
    print(f"{'side':<6} {'projector':<11} {'first':>10} {'plain':>10} {'refresh':>10}  ops")
    for side in ("right", "left", "plain"):
        for projector in H.PROJECTORS:
            cells = [table[(side, projector, k)] for k in ("first", "plain", "refresh")]
            ops = sorted(set().union(*(c[2] for c in cells)))
            print(f"{side:<6} {projector:<11} " + " ".join(f"{c[0]:>10}" for c in cells) + f"  {', '.join(ops)}")


def test_optimizer_step_communication_is_low_rank(runs):
    """Per rank and per step, inside ``opt.step()`` only: no refresh, and refreshes of randomized /
    online_pca / gaussian / srht, stay under C_COMM·r·(m+n) elements per matrix; the right side moves
    nothing between refreshes (svd, randomized, gaussian, srht; online_pca moves its basis every
    step); the plain AdamW step of the biases moves nothing; exact-SVD refreshes (the first basis of
    svd and every svd refresh) show the gather of the whole gradient (≥ m·n/world elements on every
    rank), which also shows that the counter sees the collectives."""
    run = runs(2)
    table = _comm_table(run)
    _print_comm_table(table)
    problems = []
    for (side, projector, kind), (nbytes, elements, ops) in sorted(table.items()):
        where = f"{side} side, {projector}, {kind} step: {elements} elements ({nbytes} bytes; {sorted(ops)})"
        if side == "plain":
            if elements:
                problems.append(f"{where}; plain AdamW on shards needs no communication")
            continue
        m, n = H.COMM_SHAPES[side]
        exact_svd = (projector == "svd" and kind != "plain") or (projector == "online_pca" and kind == "first")
        if exact_svd:
            if projector == "svd" and elements < m * n // 2:
                problems.append(f"{where} < m·n/world = {m * n // 2}: the exact SVD's gather was not seen")
            continue
        bound = C_COMM * H.COMM_RANK * (m + n)
        if elements > bound:
            problems.append(f"{where} > {C_COMM}·r·(m+n) = {bound}")
        if side == "right" and kind == "plain" and projector != "online_pca" and elements:
            problems.append(f"{where}; a right-side step between refreshes needs no communication")
    # every rank, not only the busiest one, sends its shard for an exact SVD
    for rank in range(2):
        records = _result(run, "comm-svd", rank)["records"]
        for side, (m, n) in H.COMM_SHAPES.items():
            moved = sum(o[1] for o in records[side][0])
            if moved < m * n // 2:
                problems.append(f"rank {rank}, {side} side, svd, first step: {moved} elements < m·n/world")
    assert not problems, "\n".join(problems)


# -- placements -----------------------------------------------------------------------------------
def test_unsupported_placements_raise_at_construction(runs):
    """A low-rank DTensor parameter sharded on dim 1 (both optimizers), or on a 2-D mesh, is a
    ValueError at construction naming the parameter (index 1: a supported row-sharded plain
    parameter comes first) and its placement."""
    messages = _result(runs(2), "placement")["messages"]
    problems = []
    for key in ("galore-shard1", "snsm-shard1"):
        msg = messages[key]
        if not (msg.startswith("ValueError") and "parameter 1" in msg and "Shard(dim=1)" in msg):
            problems.append(f"{key}: expected a ValueError naming parameter 1 and Shard(dim=1), got {msg!r}")
    msg = messages["galore-2d-mesh"]
    if not (msg.startswith("ValueError") and "parameter 1" in msg and "Replicate(), Shard(dim=0)" in msg):
        problems.append(f"2-D mesh: expected a ValueError naming parameter 1 and (Replicate(), Shard(dim=0)), "
                        f"got {msg!r}")
    assert not problems, "\n".join(problems)


def test_plain_dtensor_parameters_step_with_any_placement(runs):
    """Plain parameters that are DTensors with Shard(1), Replicate() or 2-D-mesh placements (and a
    row-sharded low-rank matrix beside them) step as their unsharded copies do (float64, ≤ 1e-10)."""
    errors = _result(runs(2), "plain_dtensor")["errors"]
    bad = {k: e for k, (e, unchanged) in errors.items() if not e <= 1e-10 or unchanged}
    assert not bad, f"relative error of ΔW (or unchanged) per parameter: {bad}"
