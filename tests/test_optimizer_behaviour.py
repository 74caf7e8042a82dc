"""torch.optim behaviour of every optimizer configuration in ``_optim_info.OPTIM_INFOS``.

CPU, reference backend, the tiny model of ``_optim_info`` (float32 unless a test says otherwise),
refreshes every 2 steps so that a few steps span one. Each test states one promise of the README
("Behaviour shared by both"): checkpoint resume through ``weights_only=True`` is bit-exact;
``zero_grad`` and parameters without a gradient leave those parameters and their state alone; LR
schedulers drive the step; ``add_param_group`` equals constructing with the group; the state is
tensors only; ``step(closure)`` returns the closure's loss; low-rank moments are fp32 with bf16
parameters.
"""
import pytest
import torch

from _numerics import assert_states_equal, roundtrip, run_steps, seeded_grads
from _optim_info import ADDED, NAMES, OPTIM_INFOS, tiny_params

SEED = 7  # gradients of step s: seeded_grads(params, s, SEED)
LOWRANK_MATRICES = [i for i, name in enumerate(NAMES) if name in ("tall", "wide", "conv")]

pytestmark = pytest.mark.parametrize("info", OPTIM_INFOS, ids=lambda info: info.id)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors this small gain nothing from intra-op threads, and threads that spin-wait for a busy
    core make each case several times slower; restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _snapshot(opt, params):
    """Clones of the parameters and of every state tensor, to compare against later."""
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


def _assert_unchanged(opt, params, snapshot, indices, where):
    for i in indices:
        p, (before, state) = params[i], snapshot[i]
        assert torch.equal(p.detach(), before), f"{where}: parameter {NAMES[i]} moved"
        now = opt.state[p]
        assert now.keys() == state.keys(), f"{where}: state keys of {NAMES[i]}"
        for k in state:
            assert now[k].dtype == state[k].dtype and torch.equal(now[k], state[k]), f"{where}: {NAMES[i]} {k}"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _set_lr(opt, factor):
    """What a scheduler does with factor × initial_lr: assign a float, fill a tensor in place."""
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"])
        value = g["initial_lr"] * factor
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(value.item() if isinstance(value, torch.Tensor) else value)
        else:
            g["lr"] = value


def test_state_dict_round_trip_resumes_bit_exactly(info):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict into a fresh
    optimizer over fresh parameters, after 3 steps; 3 more steps (a refresh at 4 completed steps)
    equal an uninterrupted run: parameters, every state tensor and the recorded diagnostics."""
    pa, oa = info.make()
    run_steps(oa, pa, 6, seed=SEED)
    pb, ob = info.make()
    run_steps(ob, pb, 3, seed=SEED)
    saved_params, saved = roundtrip({"params": [p.detach() for p in pb]}), roundtrip(ob)
    pc, oc = info.make(seed=123)  # a fresh process stand-in: other initial weights, no state
    with torch.no_grad():
        for p, q in zip(pc, saved_params["params"]):
            p.copy_(q)
    oc.load_state_dict(saved)
    run_steps(oc, pc, 3, start=3, seed=SEED)
    assert_states_equal(oa, pa, oc, pc)
    stats_a, stats_c = oa.state_dict().get("subspace_stats", {}), oc.state_dict().get("subspace_stats", {})
    assert stats_a.keys() == stats_c.keys()
    for i in stats_a:
        assert stats_a[i].keys() == stats_c[i].keys(), i
        assert all(torch.equal(stats_a[i][k], stats_c[i][k]) for k in stats_a[i]), i


def test_zero_grad_and_missing_grads_leave_params_and_state_alone(info):
    params, opt = info.make()
    skip_first = {NAMES.index("wide"), NAMES.index("plain_bias")}
    seeded_grads(params, 0, SEED, skip=skip_first)
    opt.step()
    for i in skip_first:  # no gradient yet: no state, as in torch.optim
        assert not opt.state.get(params[i]), NAMES[i]
    run_steps(opt, params, 2, start=1, seed=SEED)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)
    everything = range(len(params))
    snapshot = _snapshot(opt, params)
    opt.step()  # no gradient at all: nothing moves
    _assert_unchanged(opt, params, snapshot, everything, "step after zero_grad")
    skip = {NAMES.index("tall"), NAMES.index("bias"), NAMES.index("plain_matrix")}
    seeded_grads(params, 3, SEED, skip=skip)
    opt.step()  # 3 completed steps: the stepped matrices refresh where stagger says so
    _assert_unchanged(opt, params, snapshot, skip, "step with some gradients None")
    for i in set(everything) - skip:
        assert not torch.equal(params[i].detach(), snapshot[i][0]), f"{NAMES[i]} did not move"
        assert int(opt.state[params[i]]["step"]) == int(snapshot[i][1]["step"]) + 1, NAMES[i]


def test_lr_scheduler_drives_the_step(info):
    """LambdaLR over factors 1, 0, 0.5, 1: at lr 0 nothing moves (weight decay is scaled by lr too);
    the whole run equals one whose groups' lr is set by hand to the same values."""
    factors = [1.0, 0.0, 0.5, 1.0]
    params, opt = info.make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, len(factors) - 1)])
    twin_params, twin = info.make()
    for s, factor in enumerate(factors):
        _set_lr(twin, factor)
        for g, h in zip(opt.param_groups, twin.param_groups):
            assert _same(g["lr"], h["lr"]), (s, g["lr"], h["lr"])
        before = [p.detach().clone() for p in params]
        seeded_grads(params, s, SEED)
        seeded_grads(twin_params, s, SEED)
        opt.step()
        twin.step()
        moved = [not torch.equal(p.detach(), b) for p, b in zip(params, before)]
        if factor == 0.0:
            assert not any(moved), f"step {s} at lr 0 moved {[n for n, m in zip(NAMES, moved) if m]}"
        else:
            assert all(moved), f"step {s} at lr factor {factor} left {[n for n, m in zip(NAMES, moved) if not m]}"
        sched.step()
    assert_states_equal(opt, params, twin, twin_params)


def test_add_param_group_equals_constructing_with_it(info):
    _, opt = info.make()
    added_params = tiny_params()
    groups = info.param_groups(added_params)
    assert [NAMES[i] for i, p in enumerate(added_params) if any(p is q for q in groups[-1]["params"])] == list(ADDED)
    added = info.cls(groups[:-1], **info.constructor_kwargs())
    added.add_param_group(groups[-1])
    assert len(added.param_groups) == len(opt.param_groups)
    for g, h in zip(opt.param_groups, added.param_groups):
        assert g.keys() == h.keys()
        assert all(_same(g[k], h[k]) for k in g if k != "params"), {k: (g[k], h[k]) for k in g if k != "params"}
    assert ("scale" in added.param_groups[-1]) == info.has_scale
    # same parameter order (stagger offsets, seeds): the same trajectory over a refresh
    order = [p for g in added.param_groups for p in g["params"]]
    reference_order = [p for g in opt.param_groups for p in g["params"]]
    run_steps(opt, reference_order, 4, seed=SEED)
    run_steps(added, order, 4, seed=SEED)
    assert_states_equal(opt, reference_order, added, order)


def test_state_holds_tensors_only(info):
    params, opt = info.make()
    run_steps(opt, params, 3, seed=SEED)  # past a refresh
    assert len(opt.state) == len(params)
    for p, st in opt.state.items():
        for key, value in st.items():
            assert isinstance(value, torch.Tensor), (key, type(value))
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        assert all(isinstance(v, torch.Tensor) for v in st.values()), (pid, {k: type(v) for k, v in st.items()})
    for i in LOWRANK_MATRICES:
        st = opt.state[params[i]]
        assert {"step", "exp_avg", "exp_avg_sq", "refresh_offset"} <= st.keys(), (NAMES[i], sorted(st))
        assert ("basis" in st) == info.stores_basis, (NAMES[i], sorted(st))
        assert ("basis_right" in st) == (info.stores_basis and info.proj_type == "full"), (NAMES[i], sorted(st))


def test_step_with_closure_returns_its_loss(info):
    """``step(closure)`` calls the closure once, with gradients enabled, returns what it returned,
    and steps with the gradients it computed (the same step as computing them before ``step()``)."""
    targets = tiny_params(seed=99)

    def loss_of(params):
        return sum(((p - t.detach()) ** 2).sum() * (i + 1) for i, (p, t) in enumerate(zip(params, targets)))

    for s in range(3):  # past a refresh
        params, opt = info.make()
        twin_params, twin = info.make()
        run_steps(opt, params, s, seed=SEED)
        run_steps(twin, twin_params, s, seed=SEED)
        calls, returned = [], []

        def closure():
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = loss_of(params)
            loss.backward()
            returned.append(loss)
            return loss

        loss = opt.step(closure)
        assert calls == [True]
        assert loss is returned[0]
        twin.zero_grad()
        twin_loss = loss_of(twin_params)
        twin_loss.backward()
        assert twin.step() is None
        assert torch.equal(loss.detach(), twin_loss.detach())
        assert_states_equal(opt, params, twin, twin_params)


def test_lowrank_moments_are_fp32_with_bf16_params(info):
    params, opt = info.make(dtype=torch.bfloat16)
    run_steps(opt, params, 3, seed=SEED)  # past a refresh
    assert all(p.dtype == torch.bfloat16 for p in params)
    fp32 = info.fp32_state
    for i in LOWRANK_MATRICES:
        st = opt.state[params[i]]
        assert {"exp_avg", "exp_avg_sq"} <= st.keys()
        for key in fp32:
            if key in st:
                assert st[key].dtype == torch.float32, (NAMES[i], key, st[key].dtype)
    # ... and through a weights_only checkpoint into a fresh bf16 optimizer: not rounded to bf16
    fresh_params, fresh = info.make(dtype=torch.bfloat16)
    fresh.load_state_dict(roundtrip(opt))
    for p, q in zip(params, fresh_params):
        for key in fp32:
            if key in opt.state[p]:
                assert fresh.state[q][key].dtype == torch.float32, key
                assert torch.equal(fresh.state[q][key], opt.state[p][key]), key
