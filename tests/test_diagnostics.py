"""optimizer.subspace_stats(): captured gradient energy and principal angles at refreshes."""
import pytest
import torch

from subspace_ops import projectors

from subspace_ops import AdamSNSM, GaLoreAdamW, reference
from subspace_ops.projectors import orthonormalize, svd_basis
from _numerics import roundtrip


def _opt(cls=GaLoreAdamW, **group):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(12, 7))
    b = torch.nn.Parameter(torch.randn(7))
    opt = cls([{"params": [W], "rank": 3, "update_proj_gap": 2, **group}, {"params": [b]}], lr=1e-2)
    return W, b, opt


def test_first_and_second_refresh_stats():
    W, b, opt = _opt()
    assert opt.subspace_stats() == {}
    G0 = torch.randn(12, 7)
    W.grad, b.grad = G0.clone(), torch.randn(7)
    opt.step()
    st = opt.subspace_stats()
    assert set(st) == {0}  # only the low-rank matrix
    P0 = svd_basis(G0, 3, "right")
    assert st[0]["refresh_step"] == 0
    assert st[0]["energy_at_refresh"] == pytest.approx(reference.captured_energy(G0, P0, "right"), rel=1e-6)
    assert st[0]["cosines"] is None and st[0]["energy_old_basis"] is None
    assert st[0]["energy_now"] == pytest.approx(st[0]["energy_at_refresh"], rel=1e-6)

    W.grad = torch.randn(12, 7)
    opt.step()  # step 1: no refresh
    assert opt.subspace_stats()[0]["refresh_step"] == 0
    G2 = torch.randn(12, 7)
    W.grad = G2.clone()
    opt.step()  # step 2: refresh
    st = opt.subspace_stats()[0]
    P2 = svd_basis(G2, 3, "right")
    assert st["refresh_step"] == 2
    assert torch.allclose(st["cosines"], reference.principal_angle_cosines(P0, P2))
    assert st["cosines"].shape == (3,) and bool((st["cosines"][:-1] >= st["cosines"][1:]).all())
    assert st["energy_old_basis"] == pytest.approx(reference.captured_energy(G2, P0, "right"), rel=1e-6)
    assert st["energy_at_refresh"] >= st["energy_old_basis"]  # the SVD basis is optimal for G2
    # on request: energy of the gradient present now
    G3 = torch.randn(12, 7)
    W.grad = G3
    assert opt.subspace_stats()[0]["energy_now"] == pytest.approx(
        reference.captured_energy(G3, P2, "right"), rel=1e-6)
    W.grad = None
    assert "energy_now" not in opt.subspace_stats()[0]


def test_same_gradient_gives_unit_cosines_and_full_rank_gives_unit_energy():
    W = torch.nn.Parameter(torch.randn(9, 5))
    opt = GaLoreAdamW([{"params": [W], "rank": 5, "update_proj_gap": 1}])
    G = torch.randn(9, 5)
    for _ in range(2):
        W.grad = G.clone()
        opt.step()
    st = opt.subspace_stats()[0]
    assert torch.allclose(st["cosines"], torch.ones(5), atol=1e-5)
    assert st["energy_at_refresh"] == pytest.approx(1.0, abs=1e-5)


def test_full_projection_reports_both_sides_and_names():
    W = torch.nn.Parameter(torch.randn(10, 8))
    opt = GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 1, "proj_type": "full", "names": ["layer.w"]}])
    for _ in range(2):
        W.grad = torch.randn(10, 8)
        opt.step()
    st = opt.subspace_stats()[0]
    assert st["name"] == "layer.w"
    assert st["cosines"].shape == (2,) and st["cosines_right"].shape == (2,)
    assert 0.0 <= st["energy_at_refresh"] <= 1.0


def test_gaussian_stats_use_the_orthonormalised_basis():
    W, b, opt = _opt(projector="gaussian")
    for _ in range(3):
        W.grad = torch.randn(12, 7)
        opt.step()
    st = opt.subspace_stats()[0]
    P = opt._basis(projectors.get("gaussian"), opt.state[W], opt.param_groups[0], "right", W.grad, 0).right
    want = reference.captured_energy(W.grad, orthonormalize(P), "right")
    assert st["energy_now"] == pytest.approx(want, rel=1e-5)
    assert 0.0 <= st["energy_at_refresh"] <= 1.0 and st["cosines"].max() <= 1.0


def test_online_pca_records_on_the_gap_schedule():
    W, b, opt = _opt(projector="online_pca")
    steps = []
    for _ in range(5):
        W.grad = torch.randn(12, 7)
        before = opt.state[W]["basis"].clone() if opt.state[W] else None
        opt.step()
        steps.append(opt.subspace_stats()[0]["refresh_step"])
        if steps[-1] == 4:
            cos = opt.subspace_stats()[0]["cosines"]
            assert torch.allclose(cos, reference.principal_angle_cosines(before, opt.state[W]["basis"]))
    assert steps == [0, 0, 2, 2, 4]


def test_adam_snsm_exposes_the_same_stats():
    W, b, opt = _opt(AdamSNSM)
    for _ in range(3):
        W.grad = torch.randn(12, 7)
        opt.step()
    st = opt.subspace_stats()[0]
    assert st["refresh_step"] == 2 and st["cosines"].shape == (3,)


def test_stats_survive_a_weights_only_checkpoint():
    W, b, opt = _opt()
    for _ in range(3):
        W.grad, b.grad = torch.randn(12, 7), torch.randn(7)
        opt.step()
    saved = roundtrip(opt)
    W2, b2, opt2 = _opt()
    opt2.load_state_dict(saved)
    W.grad = W2.grad = None
    a, c = opt.subspace_stats()[0], opt2.subspace_stats()[0]
    assert a.keys() == c.keys()
    assert a["refresh_step"] == c["refresh_step"] and a["energy_at_refresh"] == c["energy_at_refresh"]
    assert torch.equal(a["cosines"], c["cosines"])
    # a checkpoint from before the diagnostics existed (no key) still loads
    del saved["subspace_stats"]
    _, _, opt3 = _opt()
    opt3.load_state_dict(saved)
    assert opt3.subspace_stats() == {}
