"""GradFilter (Grokfast, docs/algorithms.md §7): formulas, state, checkpoints, errors."""
from collections import deque

import pytest
import torch
from torch import nn

from subspace_ops import GaLoreAdamW, GradFilter
from _numerics import roundtrip


def _grads(n, shape=(4, 3), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(n)]


def test_ema_formula():
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    f = GradFilter([p], mode="ema", alpha=0.9, lamb=2.0)
    mu = None
    for g in _grads(6):
        p.grad = g.clone()
        f.apply()
        mu = g.clone() if mu is None else 0.9 * mu + 0.1 * g  # μ₀ = g₀
        assert torch.allclose(p.grad, g + 2.0 * mu.float().double(), atol=1e-6)
        assert torch.allclose(f.state[0]["ema"].double(), mu, atol=1e-6)
        assert f.state[0]["ema"].dtype == torch.float32


def test_ema_matches_official_dict_implementation():
    """The official Grokfast EMA: grads[n] starts at the first gradient, then α·μ + (1−α)·g."""
    model = nn.Linear(3, 2)
    f = GradFilter(model, alpha=0.98, lamb=2.0)
    official = None
    for g in _grads(5, (2, 3)):
        model.weight.grad = g.float().clone()
        model.bias.grad = g[:, 0].float().clone()
        raw = {"weight": model.weight.grad.clone(), "bias": model.bias.grad.clone()}
        f()
        if official is None:
            official = {k: v.clone() for k, v in raw.items()}
        for k in raw:
            official[k] = official[k] * 0.98 + raw[k] * 0.02
        assert torch.allclose(model.weight.grad, raw["weight"] + official["weight"] * 2.0, atol=1e-6)
        assert torch.allclose(model.bias.grad, raw["bias"] + official["bias"] * 2.0, atol=1e-6)


@pytest.mark.parametrize("warmup", [True, False])
def test_ma_formula_with_ring_buffer(warmup):
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    f = GradFilter([p], mode="ma", window=3, lamb=5.0, warmup=warmup)
    window = deque(maxlen=3)  # the official implementation
    for i, g in enumerate(_grads(8)):
        p.grad = g.clone()
        f.apply()
        window.append(g)
        if warmup and len(window) < 3:
            assert torch.equal(p.grad, g)  # untouched until the window is full
        else:
            avg = sum(window) / len(window)
            assert torch.allclose(p.grad, g + 5.0 * avg, atol=1e-5)
        assert int(f.state[0]["count"]) == i + 1
    assert f.state[0]["buffer"].shape == (3, 4, 3) and f.state[0]["buffer"].dtype == torch.float32
    assert f.state[0]["count"].dtype == torch.int64


def test_default_lambda_per_mode():
    p = nn.Parameter(torch.zeros(2))
    assert GradFilter([p]).lamb == 2.0
    assert GradFilter([p], mode="ma").lamb == 5.0
    assert GradFilter([p], mode="ma", lamb=0.5).lamb == 0.5
    assert GradFilter([p], mode="ma").window == 100


def test_bf16_gradients_keep_fp32_state_and_are_rounded_once():
    p = nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    f = GradFilter([p], alpha=0.5, lamb=1.0)
    g = torch.randn(8).to(torch.bfloat16)
    p.grad = g.clone()
    f.apply()
    assert p.grad.dtype == torch.bfloat16 and f.state[0]["ema"].dtype == torch.float32
    assert torch.equal(p.grad, (2 * g.float()).to(torch.bfloat16))


def test_skips_missing_grads_dedups_shared_and_takes_trainable_params_of_a_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    f = GradFilter(model)
    assert len(f.params) == 3
    shared = nn.Parameter(torch.zeros(2))
    assert len(GradFilter([shared, shared]).params) == 1
    model[1].weight.grad = torch.ones(2, 3)
    f.apply()
    assert set(f.state) == {1}  # model[0].weight (index 0) and model[1].bias (2) have no grad


def test_complex_gradients_are_filtered_as_real_pairs():
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    f = GradFilter([p], lamb=1.0)
    g = torch.randn(3, dtype=torch.complex64)
    p.grad = g.clone()
    f.apply()
    assert torch.allclose(p.grad, 2 * g)


@pytest.mark.parametrize("mode", ["ema", "ma"])
def test_state_dict_roundtrip_continues_bit_exactly(mode):
    grads = _grads(9, seed=3, dtype=torch.float32)
    pa, pb = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4, 3))
    fa = GradFilter([pa], mode=mode, window=4, alpha=0.9)
    fb = GradFilter([pb], mode=mode, window=4, alpha=0.9)
    outa, outb = [], []
    for g in grads:
        pa.grad = g.clone()
        fa()
        outa.append(pa.grad.clone())
    for g in grads[:5]:
        pb.grad = g.clone()
        fb()
        outb.append(pb.grad.clone())
    saved = roundtrip(fb.state_dict())
    fc = GradFilter([pb], mode=mode, window=4, alpha=0.5, lamb=1.0)  # hyperparameters come from the file
    fc.load_state_dict(saved)
    assert fc.alpha == 0.9
    for g in grads[5:]:
        pb.grad = g.clone()
        fc()
        outb.append(pb.grad.clone())
    for x, y in zip(outa, outb):
        assert torch.equal(x, y)
    for k, v in fc.state[0].items():
        assert v.dtype == (torch.int64 if k == "count" else torch.float32)


def test_usable_with_any_optimizer():
    torch.manual_seed(0)
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.05),
                 lambda ps: GaLoreAdamW([{"params": [ps[0]], "rank": 2}, {"params": ps[1:]}], lr=0.01)):
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = make(list(model.parameters()))
        f = GradFilter(model, alpha=0.8, lamb=1.0)
        X, y = torch.randn(32, 6), torch.randn(32, 1)
        losses = []
        for _ in range(30):
            loss = (model(X) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            f.apply()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "median"}, "invalid mode"),
        ({"alpha": 1.0}, "invalid alpha"),
        ({"alpha": -0.1}, "invalid alpha"),
        ({"alpha": True}, "invalid alpha"),
        ({"lamb": float("nan")}, "invalid lamb"),
        ({"lamb": float("inf")}, "invalid lamb"),
        ({"lamb": "2"}, "invalid lamb"),
        ({"mode": "ma", "window": 0}, "invalid window"),
        ({"mode": "ma", "window": 2.5}, "invalid window"),
        ({"mode": "ma", "window": True}, "invalid window"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradFilter([nn.Parameter(torch.zeros(2))], **kwargs)


def test_no_parameters_is_an_error():
    with pytest.raises(ValueError, match="no parameters"):
        GradFilter([])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        GradFilter(frozen)


def test_non_tensor_parameters_are_a_type_error():
    with pytest.raises(TypeError, match="expected tensors"):
        GradFilter([1.0, 2.0])


def test_sparse_gradient_is_an_error():
    emb = nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        GradFilter(emb).apply()


def test_load_state_dict_errors():
    p = nn.Parameter(torch.zeros(3, 2))
    f = GradFilter([p], mode="ma", window=2)
    p.grad = torch.ones(3, 2)
    f.apply()
    sd = f.state_dict()
    with pytest.raises(ValueError, match="state_dict is for mode='ma'"):
        GradFilter([p], mode="ema").load_state_dict(sd)
    with pytest.raises(ValueError, match="window=2"):
        GradFilter([p], mode="ma", window=3).load_state_dict(sd)
    with pytest.raises(ValueError, match="has shape"):
        GradFilter([nn.Parameter(torch.zeros(2, 3))], mode="ma", window=2).load_state_dict(sd)
    bad_index = {"state": {5: sd["state"][0]}, "config": sd["config"]}
    with pytest.raises(ValueError, match="state for parameter 5"):
        GradFilter([p], mode="ma", window=2).load_state_dict(bad_index)
    bad_alpha = {"state": {}, "config": {**sd["config"], "alpha": 2.0}}
    with pytest.raises(ValueError, match="invalid alpha"):
        GradFilter([p], mode="ma", window=2).load_state_dict(bad_alpha)


def test_reset_forgets_state():
    p = nn.Parameter(torch.zeros(2))
    f = GradFilter([p])
    p.grad = torch.ones(2)
    f.apply()
    f.reset()
    assert f.state == {}
