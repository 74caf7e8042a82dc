"""AdamSNSM (docs/algorithms.md §4) against a naive float64 implementation, state, checkpoints, errors."""
import functools
import math

import pytest
import torch

from subspace_ops import AdamSNSM, GaLoreAdamW, memory_report, reference
from subspace_ops.projectors import PROJECTORS, SEEDED_PROJECTORS
from _numerics import roundtrip, seeded_grads

B1, B2, EPS, LR, WD = 0.9, 0.99, 1e-6, 0.05, 0.1


class NaiveSNSM:
    """§4 written out for one matrix, in float64, side by side with the formulas."""

    def __init__(self, W, rank, gap, proj_type="std"):
        self.W = W.clone()
        m, n = W.shape
        self.m, self.n, self.r, self.gap = m, n, min(rank, m, n), gap
        self.side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(
            proj_type, proj_type)
        self.v = torch.zeros((m, 1) if m >= n else (1, n), dtype=torch.float64)
        self.mom, self.P, self.t = None, None, 0

    def step(self, G):
        if self.t % self.gap == 0:
            # the optimizer's exact basis call (galore-torch's), so both see identical bases
            U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
            left, right = U[:, : self.r].double(), Vh[: self.r].mT.double()
            self.P = {"left": left, "right": right, "full": (left, right)}[self.side]
            self.mom = None  # m̂ reset to 0 when the basis changes
        if self.side == "left":
            proj, back = lambda X: self.P.mT @ X, lambda R: self.P @ R
        elif self.side == "right":
            proj, back = lambda X: X @ self.P, lambda R: R @ self.P.mT
        else:
            proj, back = lambda X: self.P[0].mT @ X @ self.P[1], lambda R: self.P[0] @ R @ self.P[1].mT
        R = proj(G)
        self.mom = (1 - B1) * R if self.mom is None else B1 * self.mom + (1 - B1) * R
        if self.m >= self.n:
            sq = torch.stack([sum(G[i, j] ** 2 for j in range(self.n)) for i in range(self.m)])[:, None]
        else:
            sq = torch.stack([sum(G[i, j] ** 2 for i in range(self.m)) for j in range(self.n)])[None, :]
        self.v = B2 * self.v + (1 - B2) * sq
        self.t += 1
        c_t = math.sqrt(1 - B2**self.t) / (1 - B1**self.t)
        numerator = back(self.mom) + (G - back(R))
        self.W = self.W - LR * c_t * numerator / (self.v.sqrt() + EPS)
        self.W = self.W - LR * WD * self.W


@pytest.mark.parametrize(
    "shape,proj_type",
    [((13, 7), "std"), ((6, 11), "std"), ((9, 8), "reverse_std"), ((10, 6), "full"), ((5, 2, 2, 2), "std")],
)
def test_snsm_matches_naive_reference_step_by_step(shape, proj_type):
    gen = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    m = shape[0]
    naive = NaiveSNSM(W.detach().reshape(m, -1), rank=3, gap=3, proj_type=proj_type)
    opt = AdamSNSM([{"params": [W], "rank": 3, "update_proj_gap": 3, "proj_type": proj_type}],
                   lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for _ in range(8):
        G = torch.randn(shape, dtype=torch.float64, generator=gen)
        W.grad = G.clone()
        opt.step()
        naive.step(G.reshape(m, -1))
        st = opt.state[W]
        # fp32 moments against float64 math: ≤ 1e-5 relative (docs/design.md, Testing)
        assert float((W.detach().reshape(m, -1) - naive.W).norm() / naive.W.norm()) < 1e-5
        assert torch.allclose(st["exp_avg"].double(), naive.mom, rtol=1e-5, atol=1e-6)
        assert torch.allclose(st["exp_avg_sq"].double(), naive.v, rtol=1e-5, atol=1e-7)
        W.data.copy_(naive.W.reshape(shape))  # re-sync so drift cannot hide a state bug


def test_subset_norm_state_is_one_accumulator_per_row_or_column_of_the_larger_dim():
    tall = torch.nn.Parameter(torch.randn(40, 8))
    wide = torch.nn.Parameter(torch.randn(8, 40))
    bias = torch.nn.Parameter(torch.randn(8))
    opt = AdamSNSM([{"params": [tall, wide], "rank": 2}, {"params": [bias]}])
    for p in (tall, wide, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[tall]["exp_avg_sq"].shape == (40, 1) and opt.state[tall]["exp_avg"].shape == (40, 2)
    assert opt.state[wide]["exp_avg_sq"].shape == (1, 40) and opt.state[wide]["exp_avg"].shape == (2, 40)
    assert opt.state[tall]["basis"].shape == (8, 2) and opt.state[wide]["basis"].shape == (8, 2)
    per_matrix = 4 * (40 * 2) + 4 * 40 + 4 * (8 * 2) + 4 + 8  # m̂, v, basis, step, refresh_offset
    plain = 4 + 2 * 4 * 8
    report = memory_report(opt)
    assert report["state_bytes"] == 2 * per_matrix + plain
    assert report["state_bytes"] < 0.3 * report["adamw_bytes"]


def test_full_rank_snsm_is_momentum_with_subset_norm():
    """r = min(m, n) and no refresh after the first: the complement is empty and m̂ rotates back
    to the plain EMA of G."""
    gen = torch.Generator().manual_seed(1)
    W = torch.nn.Parameter(torch.randn(9, 5, dtype=torch.float64, generator=gen))
    opt = AdamSNSM([{"params": [W], "rank": 5, "update_proj_gap": 1000}], lr=LR, betas=(B1, B2), eps=EPS)
    ref_W, mom, v = W.detach().clone(), torch.zeros(9, 5, dtype=torch.float64), torch.zeros(9, 1, dtype=torch.float64)
    for t in range(1, 6):
        G = torch.randn(9, 5, dtype=torch.float64, generator=gen)
        W.grad = G
        opt.step()
        mom = B1 * mom + (1 - B1) * G
        v = B2 * v + (1 - B2) * G.pow(2).sum(1, keepdim=True)
        ref_W = ref_W - LR * math.sqrt(1 - B2**t) / (1 - B1**t) * mom / (v.sqrt() + EPS)
        assert float((W.detach() - ref_W).norm() / ref_W.norm()) < 1e-6


def _snsm_opt(W, **group):
    return AdamSNSM([{"params": [W], "rank": 2, "update_proj_gap": 2, **group}], lr=LR, betas=(B1, B2), eps=EPS)


def test_momentum_is_reset_at_a_refresh_and_transported_when_asked():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(8, 5, generator=gen) for _ in range(3)]
    reset_W = torch.nn.Parameter(torch.randn(8, 5, generator=gen))
    moved_W = torch.nn.Parameter(reset_W.detach().clone())
    reset, moved = _snsm_opt(reset_W), _snsm_opt(moved_W, transport_moments=True)
    for G in grads[:2]:
        reset_W.grad, moved_W.grad = G.clone(), G.clone()
        reset.step()
        moved.step()
    old_P, old_M = moved.state[moved_W]["basis"].clone(), moved.state[moved_W]["exp_avg"].clone()
    reset_W.grad, moved_W.grad = grads[2].clone(), grads[2].clone()
    reset.step()  # step 2: refresh
    moved.step()
    new_P = reset.state[reset_W]["basis"]
    R = reference.project(grads[2], new_P, "right")
    assert torch.allclose(reset.state[reset_W]["exp_avg"], (1 - B1) * R, atol=1e-7)
    transported = old_M @ (new_P.mT @ old_P).mT
    assert torch.allclose(moved.state[moved_W]["exp_avg"], B1 * transported + (1 - B1) * R, atol=1e-6)


def test_momentum_is_kept_while_online_pca_drifts():
    W = torch.nn.Parameter(torch.randn(8, 5))
    opt = _snsm_opt(W, projector="online_pca")
    W.grad = torch.randn(8, 5)
    opt.step()
    M1 = opt.state[W]["exp_avg"].clone()
    W.grad = torch.randn(8, 5)
    opt.step()
    R = reference.project(W.grad, opt.state[W]["basis"], "right")
    assert not torch.allclose(opt.state[W]["exp_avg"], (1 - B1) * R)  # not reset by the drift
    assert torch.linalg.norm(opt.state[W]["exp_avg"] - B1 * M1) > 0


def test_plain_parameters_take_galore_adamw_plain_step():
    b1 = torch.nn.Parameter(torch.randn(7))
    b2 = torch.nn.Parameter(b1.detach().clone())
    W = torch.nn.Parameter(torch.randn(7, 3))  # in a group without rank: plain too
    W2 = torch.nn.Parameter(W.detach().clone())
    o1 = AdamSNSM([{"params": [b1, W]}], lr=0.01, weight_decay=0.1)
    o2 = GaLoreAdamW([{"params": [b2, W2]}], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        g, gw = torch.randn(7), torch.randn(7, 3)
        b1.grad, b2.grad, W.grad, W2.grad = g, g.clone(), gw, gw.clone()
        o1.step()
        o2.step()
    assert torch.equal(b1, b2) and torch.equal(W, W2)


def test_defaults():
    W = torch.nn.Parameter(torch.randn(4, 4))
    opt = AdamSNSM([{"params": [W], "rank": 2}])
    g = opt.param_groups[0]
    assert g["lr"] == 1e-2 and g["eps"] == 1e-6 and g["betas"] == (0.9, 0.999)
    assert g["update_proj_gap"] == 200 and g["projector"] == "svd" and g["transport_moments"] is False
    assert "scale" not in g


def _make(projector, transport, dtype):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(12, 7).to(dtype))
    b = torch.nn.Parameter(torch.randn(7).to(dtype))
    opt = AdamSNSM([{"params": [W], "rank": 3, "update_proj_gap": 3, "projector": projector,
                     "transport_moments": transport}, {"params": [b]}], lr=0.01, weight_decay=0.05)
    return [W, b], opt


_grads = functools.partial(seeded_grads, seed=50)


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("transport", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_roundtrip_mid_run_is_bit_exact(projector, transport, dtype):
    pa, oa = _make(projector, transport, dtype)
    for s in range(8):
        _grads(pa, s)
        oa.step()
    pb, ob = _make(projector, transport, dtype)
    for s in range(4):
        _grads(pb, s)
        ob.step()
    saved = roundtrip(ob)
    pc, oc = _make(projector, transport, dtype)
    with torch.no_grad():
        for x, y in zip(pc, pb):
            x.copy_(y)
    oc.load_state_dict(saved)
    for s in range(4, 8):
        _grads(pc, s)
        oc.step()
    for x, y in zip(pa, pc):
        assert torch.equal(x, y)
        assert oa.state[x].keys() == oc.state[y].keys()
        for k in oa.state[x]:
            assert oa.state[x][k].dtype == oc.state[y][k].dtype and torch.equal(oa.state[x][k], oc.state[y][k]), k
    assert oc.state[pc[0]]["exp_avg"].dtype == torch.float32
    assert oc.state[pc[0]]["exp_avg_sq"].dtype == torch.float32
    if projector in SEEDED_PROJECTORS:
        assert "basis" not in oc.state[pc[0]]


@pytest.mark.parametrize("projector", PROJECTORS)
def test_every_projector_trains_a_least_squares_problem(projector):
    torch.manual_seed(4)
    X = torch.randn(64, 16)
    target = torch.randn(16, 4) @ torch.randn(4, 12) / 2
    W = torch.nn.Parameter(torch.zeros(16, 12))
    opt = AdamSNSM([{"params": [W], "rank": 4, "update_proj_gap": 5, "projector": projector}], lr=0.3)
    first = None
    for _ in range(40):
        loss = (X @ W - X @ target).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first


@pytest.mark.parametrize(
    "kwargs,group,match",
    [
        ({"lr": -1.0}, {}, "invalid lr"),
        ({"betas": (0.9, 1.0)}, {}, "invalid betas"),
        ({"eps": -1e-8}, {}, "invalid eps"),
        ({"weight_decay": -0.1}, {}, "invalid weight_decay"),
        ({}, {"rank": 0}, "invalid rank"),
        ({}, {"rank": 2, "update_proj_gap": 0}, "invalid update_proj_gap"),
        ({}, {"rank": 2, "projector": "qr"}, "invalid projector"),
        ({}, {"rank": 2, "proj_type": "diag"}, "invalid proj_type"),
        ({}, {"rank": 2, "transport_moments": "no"}, "invalid transport_moments"),
        ({"backend": "cuda"}, {}, "backend must be"),
    ],
)
def test_construction_errors(kwargs, group, match):
    W = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=match):
        AdamSNSM([{"params": [W], **group}], **kwargs)


def test_step_errors_name_the_optimizer():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = AdamSNSM([{"params": emb.parameters(), "rank": 2}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="AdamSNSM: parameter 0 .* sparse gradient"):
        opt.step()
    Z = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = AdamSNSM([{"params": [Z], "rank": 2}])
    Z.grad = torch.randn_like(Z)
    with pytest.raises(ValueError, match="AdamSNSM: parameter 0 .* complex"):
        opt.step()
