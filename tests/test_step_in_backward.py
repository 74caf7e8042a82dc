"""``opt.step_in_backward()``: layer-wise steps inside ``backward()`` equal the ordinary loop.

The ordinary loop is ``(loss / k).backward()`` k times, ``clip_grad_norm_`` when clipping, then
``opt.step()``, ``opt.zero_grad()`` and ``scheduler.step()``. Both run in float64 on a small MLP with
matrices on both sides, a warm-up scheduler, weight decay and refreshes every 3 steps; the clip norm
is small enough that the coefficient is below 1 on every step (checked). The comparison is on the
weights' change ΔW (a missing update cannot hide in W).
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch

from subspace_ops import AdamSNSM, GaLoreAdamW

PROJECTORS = ("svd", "randomized", "online_pca", "gaussian", "srht")
OPTIMIZERS = {"galore": GaLoreAdamW, "snsm": AdamSNSM}
CLIP = 0.05
STEPS = 12


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
        torch.nn.Linear(5, 9, bias=False), torch.nn.Tanh(), torch.nn.Linear(9, 4),
    ).double()


def _optimizer(name, model, projector, stagger, gap=3):
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": rest}, {"params": mats, "rank": 2, "update_proj_gap": gap, "projector": projector,
                                 "stagger": stagger}]
    opt = OPTIMIZERS[name](groups, lr=3e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))  # warm-up
    return opt, sched


def _data(k, steps=STEPS):
    torch.manual_seed(1)
    return (torch.randn(steps * k, 8, 6, dtype=torch.float64), torch.randn(steps * k, 8, 4, dtype=torch.float64))


def _loss(model, X, Y, i, k):
    return ((model(X[i]) - Y[i]) ** 2).mean() / k


def ordinary(name, projector, stagger, k, clip, steps=STEPS):
    model = _model()
    init = [p.detach().clone() for p in model.parameters()]
    opt, sched = _optimizer(name, model, projector, stagger)
    X, Y = _data(k, steps)
    coefs = []
    for i in range(steps * k):
        _loss(model, X, Y, i, k).backward()
        if (i + 1) % k == 0:
            if clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                coefs.append(float(clip / (norm + 1e-6)))
            opt.step()
            opt.zero_grad()
            sched.step()
    return [p.detach() - p0 for p, p0 in zip(model.parameters(), init)], coefs


def in_backward(name, projector, stagger, k, clip, steps=STEPS, check=None):
    model = _model()
    init = [p.detach().clone() for p in model.parameters()]
    opt, sched = _optimizer(name, model, projector, stagger)
    X, Y = _data(k, steps)
    handle = opt.step_in_backward(accumulation_steps=k, max_grad_norm=clip)
    for i in range(steps * k):
        _loss(model, X, Y, i, k).backward()
        if check is not None:
            check(model, opt, i)
        if (i + 1) % k == 0:
            sched.step()
    handle.remove()
    return [p.detach() - p0 for p, p0 in zip(model.parameters(), init)]


def _rel(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("stagger", [False, True])
@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulation_and_clipping_equal_the_ordinary_loop(name, projector, stagger):
    want, coefs = ordinary(name, projector, stagger, k=3, clip=CLIP)
    assert sum(c < 1.0 for c in coefs) >= len(coefs) - 1  # the clip is active on (almost) every step
    got = in_backward(name, projector, stagger, k=3, clip=CLIP)
    assert _rel(got, want) <= 1e-10
    assert all(d.norm() > 0 for d in want)  # every parameter trained


@pytest.mark.parametrize("k,clip", [(1, None), (1, CLIP), (3, None)])
@pytest.mark.parametrize("name,projector", [("galore", "svd"), ("galore", "gaussian"), ("galore", "online_pca"),
                                            ("snsm", "randomized")])
def test_every_mode_equals_the_ordinary_loop(name, projector, k, clip):
    want, _ = ordinary(name, projector, True, k=k, clip=clip)
    got = in_backward(name, projector, True, k=k, clip=clip)
    assert _rel(got, want) <= 1e-10


def _lowrank(model):
    return [p for p in model.parameters() if p.dim() == 2]


def test_projected_accumulation_frees_lowrank_gradients_outside_refresh_windows():
    """k = 3, no clipping: after every backward, a GaLore low-rank matrix holds no .grad unless its
    basis refreshes at this optimizer step (staggered: about one matrix in three per step)."""
    seen = {"kept": 0, "freed": 0}

    def check(model, opt, i):
        for j, p in enumerate(_lowrank(model)):
            state = opt.state[p]
            refreshing = not state or (int(state["step"]) + int(state["refresh_offset"])) % 3 == 0
            if refreshing and (i + 1) % 3 != 0:
                assert p.grad is not None  # the refresh needs the whole sum
                seen["kept"] += 1
            else:
                assert p.grad is None, (i, j)
                seen["freed"] += 1

    in_backward("galore", "svd", True, k=3, clip=None, steps=6, check=check)
    assert seen["kept"] > 0 and seen["freed"] > 2 * seen["kept"]


def test_clipping_with_accumulation_one_frees_every_gradient_after_backward():
    def check(model, opt, i):
        assert all(p.grad is None for p in model.parameters())
        assert not any("grad_acc" in opt.state[p] for p in model.parameters())

    in_backward("galore", "randomized", False, k=1, clip=CLIP, steps=5, check=check)


def test_snsm_and_online_pca_keep_full_gradients_while_accumulating():
    def check(model, opt, i):
        if (i + 1) % 3 != 0:
            assert all(p.grad is not None for p in _lowrank(model))

    in_backward("snsm", "svd", True, k=3, clip=None, steps=3, check=check)
    in_backward("galore", "online_pca", True, k=3, clip=None, steps=3, check=check)


def test_step_while_active_raises_and_remove_restores_step():
    model = _model()
    opt, _ = _optimizer("galore", model, "svd", False)
    X, Y = _data(3, 2)
    handle = opt.step_in_backward(accumulation_steps=3)
    _loss(model, X, Y, 0, 3).backward()
    with pytest.raises(RuntimeError, match="step_in_backward"):
        opt.step()
    with pytest.raises(RuntimeError, match="finish the window"):
        handle.remove()  # 1 of 3 micro-batches: its projected gradients would be lost
    with pytest.raises(RuntimeError, match="already active"):
        opt.step_in_backward()
    _loss(model, X, Y, 1, 3).backward()
    _loss(model, X, Y, 2, 3).backward()  # the window's last micro-batch: everything steps
    handle.remove()
    _loss(model, X, Y, 3, 1).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # ordinary steps again
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs,match", [
    ({"accumulation_steps": 0}, "accumulation_steps"),
    ({"accumulation_steps": 2.0}, "accumulation_steps"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    model = _model()
    opt, _ = _optimizer("galore", model, "svd", False)
    with pytest.raises(ValueError, match=match):
        opt.step_in_backward(**kwargs)


def test_state_dict_mid_window_resumes_exactly():
    """A checkpoint taken between micro-batches (accumulators and the micro-batch count included),
    loaded with weights_only into a fresh model and optimizer, continues as if uninterrupted."""
    k, steps = 3, 4
    want = in_backward("galore", "svd", True, k=k, clip=None, steps=steps)
    X, Y = _data(k, steps)
    model = _model()
    init = [p.detach().clone() for p in model.parameters()]
    opt, sched = _optimizer("galore", model, "svd", True)
    handle = opt.step_in_backward(accumulation_steps=k)
    stop = 2 * k + 1  # one micro-batch into the third window
    for i in range(stop):
        _loss(model, X, Y, i, k).backward()
        if (i + 1) % k == 0:
            sched.step()
    assert any("grad_acc" in opt.state[p] for p in _lowrank(model))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model2 = _model()
    opt2, sched2 = _optimizer("galore", model2, "svd", True)
    handle2 = opt2.step_in_backward(accumulation_steps=k)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for name, p in model2.named_parameters():  # the full gradients still accumulating (as a user's
        if name in grads:                       # checkpoint of .grad would carry them)
            p.grad = grads[name]
    for i in range(stop, steps * k):
        _loss(model2, X, Y, i, k).backward()
        if (i + 1) % k == 0:
            sched2.step()
    handle2.remove()
    got = [p.detach() - p0 for p, p0 in zip(model2.parameters(), init)]
    assert _rel(got, want) <= 1e-12


def test_no_scheduler_order_warning():
    model = _model()
    opt, sched = _optimizer("galore", model, "svd", False)
    X, Y = _data(1, 2)
    opt.step_in_backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss(model, X, Y, 0, 1).backward()
        sched.step()


def test_fused_kernels_in_backward_match_the_reference():
    """The Triton path (interpreter here) of every mode: projected accumulation (low-rank Adam, then
    the back-projection with the weight update), clipping, direct steps; fp32, against the reference."""
    pytest.importorskip("triton")
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16))
        init = [p.detach().clone() for p in model.parameters()]
        mats = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": 4, "update_proj_gap": 2}], lr=1e-2,
                          weight_decay=0.1, backend=backend)
        handle = opt.step_in_backward(accumulation_steps=2, max_grad_norm=None)
        torch.manual_seed(1)
        for _ in range(8):
            x = torch.randn(8, 24)
            (model(x).pow(2).mean() / 2).backward()
        handle.remove()
        results[backend] = [p.detach() - p0 for p, p0 in zip(model.parameters(), init)]
    assert _rel(results["triton"], results["reference"]) <= 1e-5


# -- FSDP2 ------------------------------------------------------------------------------------------
WORLD = 2
FSDP_CONFIGS = [("galore", "svd", 3, CLIP), ("galore", "randomized", 3, None), ("galore", "gaussian", 1, CLIP),
                ("snsm", "svd", 3, CLIP)]


def _fsdp_worker(rank, init_file, out_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = []
        for name, projector, k, clip in FSDP_CONFIGS:
            model = _model()
            for i in (0, 2, 4, 6):
                fully_shard(model[i])
            fully_shard(model)
            opt, sched = _optimizer(name, model, projector, True)
            X, Y = _data(k, 6)
            handle = opt.step_in_backward(accumulation_steps=k, max_grad_norm=clip)
            for i in range(6 * k):
                x, y = X[i].chunk(WORLD)[rank], Y[i].chunk(WORLD)[rank]
                (((model(x) - y) ** 2).mean() / k).backward()
                if (i + 1) % k == 0:
                    sched.step()
            handle.remove()
            results.append([p.full_tensor() for p in model.parameters()])
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_fsdp2_step_in_backward_equals_one_process_on_the_whole_batch(tmp_path):
    """Under FSDP2 the hooks fire on the reduced, sharded gradient: 2 gloo ranks stepping inside
    backward (accumulation, clipping over the shards' global norm) equal one process's ordinary loop
    on the whole batch (float64)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "params.pt"
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    sharded = torch.load(out, weights_only=True)
    init = [p.detach().clone() for p in _model().parameters()]
    for (name, projector, k, clip), got in zip(FSDP_CONFIGS, sharded):
        want, _ = ordinary(name, projector, True, k=k, clip=clip, steps=6)
        assert _rel([g - p0 for g, p0 in zip(got, init)], want) <= 1e-10, (name, projector, k, clip)
