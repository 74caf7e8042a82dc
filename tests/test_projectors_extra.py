"""Projectors online_pca (§3), gaussian and srht (§5), moment transport (§6), checkpoints of each
(sections of docs/algorithms.md)."""
import functools
import math

import pytest
import torch

from subspace_ops import projectors

import subspace_ops.optim.base as base_mod
from subspace_ops import GaLoreAdamW, reference
from subspace_ops.projectors import (
    PROJECTORS,
    SEEDED_PROJECTORS,
    adamw_,
    compute_basis,
    gaussian_basis,
    hadamard_entries,
    hadamard_transform,
    online_pca_grad,
    online_pca_loss,
    online_pca_update,
    orthonormalize,
    seeded_basis,
    side_seeds,
    srht_basis,
    srht_rows,
    svd_basis,
)
from _numerics import assert_states_equal, rel_err, roundtrip, seeded_grads

NEW_PROJECTORS = ("online_pca", "gaussian", "srht")


def sylvester(d):
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < d:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(d)


# -- Gaussian ---------------------------------------------------------------------------------------
def test_gaussian_reproducible_from_seed_and_scaled_unbiased():
    a = gaussian_basis(12, 4, seed=7)
    assert a.shape == (12, 4) and a.dtype == torch.float32
    assert torch.equal(a, gaussian_basis(12, 4, seed=7))
    assert not torch.equal(a, gaussian_basis(12, 4, seed=8))
    # E[P Pᵀ] = I: back_project(project(x)) is unbiased.
    mean = sum(gaussian_basis(6, 3, seed=s).double() @ gaussian_basis(6, 3, seed=s).double().mT for s in range(4000)) / 4000
    assert torch.allclose(mean, torch.eye(6, dtype=torch.float64), atol=0.08)


def test_gaussian_rank_at_least_min_dim_is_capped_random_not_identity():
    G = torch.randn(5, 9)
    P = compute_basis(G, 5, "left", "gaussian", seed=3)  # the optimizer passes the effective rank
    assert P.shape == (5, 5) and torch.isfinite(P).all()
    assert not torch.allclose(P @ P.mT, torch.eye(5), atol=1e-3)  # a random projection, by design


# -- SRHT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 8, 32])
def test_hadamard_entries_and_transform_are_the_normalised_sylvester_matrix(d):
    H = sylvester(d)
    idx = torch.arange(d)
    assert torch.allclose(hadamard_entries(idx, idx, d).double(), H, atol=1e-7)
    x = torch.randn(d, 3, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x, 0).double(), H @ x.float().double(), atol=1e-5)
    assert torch.allclose(hadamard_transform(x.mT, 1).double(), (H @ x).mT, atol=1e-5)


def test_hadamard_transform_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.randn(6, 2), 0)


@pytest.mark.parametrize("rows,rank", [(16, 5), (64, 64), (8, 1)])
def test_srht_power_of_two_rows_are_orthonormal_and_exactly_SHD(rows, rank):
    P = srht_basis(rows, rank, seed=11)
    Q = P.mT  # the rows of S H D
    assert torch.allclose(Q @ Q.mT, torch.eye(rank), atol=1e-6)
    assert torch.equal(P, srht_rows(rows, rank, seed=11))  # no re-orthonormalisation needed


@pytest.mark.parametrize("side", ["left", "right"])
def test_srht_hadamard_is_applied_along_the_projected_axis(side):
    m, n, r, seed = (16, 10, 4, 5) if side == "left" else (10, 16, 4, 5)
    G = torch.randn(m, n, dtype=torch.float64)
    P = seeded_basis("srht", m, n, r, side, seed, dtype=torch.float64)
    d = m if side == "left" else n
    gen = torch.Generator().manual_seed(side_seeds(seed)[0])
    signs = torch.randint(0, 2, (d,), generator=gen).mul(2).sub(1).double()
    chosen = torch.randperm(d, generator=gen)[:r]
    if side == "left":  # project(G) = S H D G: the transform runs down the columns of G
        want = hadamard_transform(signs[:, None] * G, 0)[chosen]
    else:  # project(G) = G (S H D)ᵀ: along the rows of G
        want = hadamard_transform(G * signs[None, :], 1)[:, chosen]
    got = reference.project(G, P, side)
    assert rel_err(got, want.double()) < 1e-6


@pytest.mark.parametrize("rows,rank", [(9, 3), (9, 8), (9, 9), (100, 17), (33, 33)])
def test_srht_padded_basis_keeps_exact_complement(rows, rank):
    for seed in range(8):  # some seeds give linearly dependent truncated rows: still orthonormal
        P = srht_basis(rows, rank, seed=seed).double()
        assert P.shape == (rows, rank)
        assert torch.allclose(P.mT @ P, torch.eye(rank, dtype=torch.float64), atol=1e-5)
        G = torch.randn(rows, 7, dtype=torch.float64)
        resid = G - reference.back_project(reference.project(G, P, "left"), P, "left")
        assert float((P.mT @ resid).norm()) < 1e-5 * float(G.norm())
        # the subspace contains the truncated SRHT rows (the padded transform's coordinates)
        A = srht_rows(rows, rank, seed=seed).double()
        assert torch.allclose(P @ (P.mT @ A), A, atol=1e-5)
        if rank == rows:  # the whole space: back(project(G)) is G
            assert torch.allclose(P @ P.mT, torch.eye(rows, dtype=torch.float64), atol=1e-5)


def test_srht_reproducible_from_seed():
    assert torch.equal(srht_basis(20, 6, seed=3), srht_basis(20, 6, seed=3))
    assert not torch.equal(srht_basis(20, 6, seed=3), srht_basis(20, 6, seed=4))


@pytest.mark.parametrize("projector", SEEDED_PROJECTORS)
def test_seeded_basis_sides_and_independence_from_gradient_values(projector):
    G = torch.randn(12, 7)
    left = seeded_basis(projector, 12, 7, 3, "left", 9)
    right = seeded_basis(projector, 12, 7, 3, "right", 9)
    full = seeded_basis(projector, 12, 7, 3, "full", 9)
    assert left.shape == (12, 3) and right.shape == (7, 3)
    assert torch.equal(full[0], left) and full[1].shape == (7, 3)
    assert not torch.equal(full[1], right)  # the right basis of "full" has its own seed
    bad = torch.full_like(G, float("nan"))
    assert torch.equal(compute_basis(bad, 3, "left", projector, seed=9), left)
    assert compute_basis(G.double(), 3, "left", projector, seed=9).dtype == torch.float64


def test_seeded_basis_rejects_unknown_projector():
    with pytest.raises(ValueError, match="unknown seeded projector"):
        seeded_basis("svd", 4, 4, 2, "left", 0)


def test_compute_basis_rejects_unknown_projector():
    with pytest.raises(ValueError, match="invalid projector"):
        compute_basis(torch.randn(4, 4), 2, "left", "nope")


# -- Online Subspace Descent -------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("orthonormal", [True, False])
def test_online_pca_closed_form_gradient_matches_autograd(side, orthonormal):
    torch.manual_seed(0)
    G = torch.randn(13, 9, dtype=torch.float64)
    rows = 13 if side == "left" else 9
    P = torch.randn(rows, 4, dtype=torch.float64)
    if orthonormal:
        P = torch.linalg.qr(P)[0]
    P.requires_grad_(True)
    online_pca_loss(G, P, side).backward()
    got = online_pca_grad(G.float(), P.detach().float(), side).double()
    assert rel_err(got, P.grad) < 1e-5
    # float64 all the way: the formula itself is exact
    Gh = (G if side == "left" else G.mT) / G.norm()
    Pd = P.detach()
    A = Pd.mT @ Gh
    eye = torch.eye(4, dtype=torch.float64)
    exact = 2 * (Pd @ (A @ A.mT) + (Gh @ A.mT) @ (Pd.mT @ Pd - 2 * eye))
    assert rel_err(exact, P.grad) < 1e-12
    if orthonormal:  # Oja's subspace rule: -½∇ = (I − P Pᵀ) Ĝ Ĝᵀ P
        oja = (torch.eye(rows, dtype=torch.float64) - Pd @ Pd.mT) @ Gh @ Gh.mT @ Pd
        assert rel_err(-0.5 * exact, oja) < 1e-10


def test_online_pca_gradient_vanishes_at_the_top_subspace():
    G = torch.randn(20, 8, dtype=torch.float64)
    P = torch.linalg.svd(G)[0][:, :3]
    assert float(online_pca_grad(G, P, "left").norm()) < 1e-5


def test_adamw_matches_torch_adamw():
    torch.manual_seed(1)
    P = torch.randn(10, 3)
    ref = P.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=0.03, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    M, V = torch.zeros_like(P), torch.zeros_like(P)
    for t in range(1, 6):
        g = torch.randn_like(P)
        ref.grad = g.clone()
        opt.step()
        adamw_(P, g, M, V, t, 0.03)
        assert torch.allclose(P, ref.detach(), rtol=1e-6, atol=1e-7)


def test_online_pca_update_orthonormal_and_descends():
    torch.manual_seed(2)
    U = torch.linalg.qr(torch.randn(24, 2))[0]
    A = U @ torch.diag(torch.tensor([5.0, 3.0])) @ torch.randn(2, 15)
    P = torch.linalg.qr(torch.randn(24, 2))[0]
    M, V = torch.zeros_like(P), torch.zeros_like(P)
    start = float(online_pca_loss(A, P, "left"))
    for t in range(1, 41):
        P = online_pca_update(P, A + 0.01 * torch.randn_like(A), M, V, t, 0.05, "left")
        assert torch.allclose(P.mT @ P, torch.eye(2), atol=1e-5)
    assert float(online_pca_loss(A, P, "left")) < 0.05 * start
    assert reference.captured_energy(A, P, "left") > 0.95


def test_online_pca_update_skips_zero_or_nonfinite_gradient():
    P = torch.linalg.qr(torch.randn(6, 2))[0]
    M, V = torch.ones_like(P), torch.ones_like(P)
    for G in (torch.zeros(6, 4), torch.full((6, 4), float("inf"))):
        assert online_pca_update(P, G, M, V, 1, 0.1, "left") is None
    assert torch.equal(M, torch.ones_like(P)) and torch.equal(V, torch.ones_like(P))


def test_online_pca_rank_at_least_min_dim_is_a_fixed_point():
    G = torch.randn(5, 9)
    P = compute_basis(G, 5, "left", "online_pca")
    assert torch.allclose(online_pca_grad(torch.randn(5, 9), P, "left"), torch.zeros(5, 5), atol=1e-5)
    new = online_pca_update(P, torch.randn(5, 9), torch.zeros(5, 5), torch.zeros(5, 5), 1, 1e-3, "left")
    assert torch.allclose(new @ new.mT, torch.eye(5), atol=1e-5)


def test_orthonormalize_keeps_a_nearly_orthonormal_basis_in_place():
    P = torch.linalg.qr(torch.randn(12, 4))[0]
    noisy = P + 1e-4 * torch.randn_like(P)
    assert torch.allclose(orthonormalize(noisy), P, atol=1e-3)


# -- the projectors inside GaLoreAdamW ---------------------------------------------------------------
def _make(projector, proj_type="std", transport=False, dtype=torch.float32, gap=3, seed=0, cls=GaLoreAdamW, lr=1e-2):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(18, 11).to(dtype))
    C = torch.nn.Parameter(torch.randn(6, 3, 2, 2).to(dtype))
    b = torch.nn.Parameter(torch.randn(11).to(dtype))
    group = {"params": [W, C], "rank": 3, "update_proj_gap": gap, "projector": projector,
             "proj_type": proj_type, "transport_moments": transport, "seed": seed}
    opt = cls([group, {"params": [b]}], lr=lr, weight_decay=0.05)
    return [W, C, b], opt


_grads = functools.partial(seeded_grads, seed=100)


@pytest.mark.parametrize("projector", NEW_PROJECTORS)
@pytest.mark.parametrize("transport", [False, True])
@pytest.mark.parametrize("proj_type,dtype", [("std", torch.float32), ("full", torch.float32), ("std", torch.bfloat16)])
def test_state_dict_roundtrip_mid_run_is_bit_exact(projector, transport, proj_type, dtype):
    params_a, opt_a = _make(projector, proj_type, transport, dtype)
    for s in range(8):
        _grads(params_a, s)
        opt_a.step()
    params_b, opt_b = _make(projector, proj_type, transport, dtype)
    for s in range(4):
        _grads(params_b, s)
        opt_b.step()
    saved = roundtrip(opt_b)
    params_c, opt_c = _make(projector, proj_type, transport, dtype)  # fresh process stand-in
    with torch.no_grad():
        for x, y in zip(params_c, params_b):
            x.copy_(y)
    opt_c.load_state_dict(saved)
    for s in range(4, 8):
        _grads(params_c, s)
        opt_c.step()
    assert_states_equal(opt_a, params_a, opt_c, params_c)
    for p in params_c:  # fp32 moments stay fp32 after a load with 16-bit params
        for k in base_mod.FP32_STATE + projectors.get("online_pca").fp32_state:
            if k in opt_c.state[p]:
                assert opt_c.state[p][k].dtype == torch.float32


@pytest.mark.parametrize("projector", SEEDED_PROJECTORS)
def test_seeded_projection_is_not_stored_and_resampled_every_gap(projector):
    params, opt = _make(projector, gap=3)
    W = params[0]
    seen = []
    for s in range(7):
        _grads(params, s)
        opt.step()
        st = opt.state[W]
        assert "basis" not in st and "basis_right" not in st
        seen.append(int(st["basis_step"]))
    assert seen == [0, 0, 0, 3, 3, 3, 6]
    # Regenerated from (group seed, parameter index, refresh step): another group seed, other bases.
    b0 = opt._basis(projectors.get(projector), opt.state[W], opt.param_groups[0], "right", W.grad, 0).right
    params2, opt2 = _make(projector, gap=3, seed=1)
    for s in range(7):
        _grads(params2, s)
        opt2.step()
    b1 = opt2._basis(projectors.get(projector), opt2.state[params2[0]], opt2.param_groups[0], "right",
                     params2[0].grad, 0).right
    assert b0.shape == b1.shape == (11, 3) and not torch.equal(b0, b1)


def test_online_pca_starts_from_svd_then_moves_every_step_and_stays_orthonormal():
    params, opt = _make("online_pca", gap=5)
    W = params[0]
    _grads(params, 0)
    G0 = W.grad.clone()
    opt.step()
    assert torch.equal(opt.state[W]["basis"], svd_basis(G0, 3, "right"))  # no OSD step at the start
    prev = opt.state[W]["basis"].clone()
    for s in range(1, 30):
        _grads(params, s)
        opt.step()
        P = opt.state[W]["basis"]
        assert not torch.equal(P, prev)
        assert torch.allclose(P.mT @ P, torch.eye(3), atol=1e-5)
        prev = P.clone()
    assert int(opt.state[W]["proj_step"]) == 29


def test_online_pca_basis_lr_follows_the_weight_schedule():
    params, opt = _make("online_pca", gap=5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < 2 else 0.0)
    W = params[0]
    for s in range(4):
        _grads(params, s)
        before = opt.state[W]["basis"].clone() if opt.state[W] else None
        opt.step()
        sched.step()
        if s >= 2:  # lr_t = 0: the basis step is 0 too (only QR round-off may move it)
            assert torch.allclose(opt.state[W]["basis"], before, atol=1e-6)
        elif s == 1:
            assert not torch.allclose(opt.state[W]["basis"], before, atol=1e-4)


def test_online_pca_tracks_a_drifting_subspace():
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.zeros(30, 12))
    opt = GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 10, "projector": "online_pca"}], lr=1e-8)
    U = torch.linalg.qr(torch.randn(12, 2))[0]
    signal = lambda: torch.randn(30, 2) @ U.mT  # noqa: E731 (gradients in a fixed 2-D row space)
    W.grad = torch.randn(30, 12)  # the SVD start sees noise only
    opt.step()
    start = reference.captured_energy(signal(), opt.state[W]["basis"], "right")
    for _ in range(40):
        W.grad = signal() + 0.05 * torch.randn(30, 12)
        opt.step()
    end = reference.captured_energy(signal(), opt.state[W]["basis"], "right")
    assert end > 0.95 and end > start + 0.3


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_every_projector_runs_with_rank_at_least_min_dim(projector, proj_type):
    W = torch.nn.Parameter(torch.randn(7, 5))
    opt = GaLoreAdamW([{"params": [W], "rank": 50, "update_proj_gap": 2, "projector": projector,
                        "proj_type": proj_type}], lr=1e-2)
    for s in range(4):
        W.grad = torch.randn(7, 5)
        opt.step()
    assert torch.isfinite(W).all()
    shapes = {"std": (7, 5), "reverse_std": (5, 5), "full": (5, 5)}
    assert opt.state[W]["exp_avg"].shape == shapes[proj_type]


def test_new_group_keys_are_validated():
    W = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="invalid projector"):
        GaLoreAdamW([{"params": [W], "rank": 2, "projector": "hadamard"}])
    with pytest.raises(ValueError, match="invalid transport_moments"):
        GaLoreAdamW([{"params": [W], "rank": 2, "transport_moments": "yes"}])
    with pytest.raises(ValueError, match="invalid transport_moments"):
        GaLoreAdamW([{"params": [W], "rank": 2, "transport_moments": 1}])


# -- moment transport (§6) -----------------------------------------------------------------------------
def _signed_permutation(r, gen):
    perm = torch.randperm(r, generator=gen)
    signs = torch.randint(0, 2, (r,), generator=gen).double() * 2 - 1
    return torch.eye(r, dtype=torch.float64)[:, perm] * signs


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_transport_to_the_same_subspace_leaves_the_update_unchanged(side):
    gen = torch.Generator().manual_seed(4)
    m, n, r = 9, 7, 3
    G0 = torch.randn(m, n, dtype=torch.float64, generator=gen)
    U, _, Vh = torch.linalg.svd(G0, full_matrices=False)  # float64: exactly orthonormal
    P = {"left": U[:, :r], "right": Vh[:r].mT, "full": (U[:, :r], Vh[:r].mT)}[side]
    if side == "full":
        Q = (P[0] @ _signed_permutation(r, gen), P[1] @ _signed_permutation(r, gen))
    else:
        Q = P @ _signed_permutation(r, gen)
    shape = {"left": (r, n), "right": (m, r), "full": (r, r)}[side]
    hyper = dict(side=side, step_size=0.01, scale=0.5, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    Wa = torch.randn(m, n, dtype=torch.float64, generator=gen)
    Wb = Wa.clone()
    Ma, Va = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):  # build up moments in P
        reference.galore_matrix_step_(Wa, torch.randn(m, n, dtype=torch.float64, generator=gen), P, Ma, Va, **hyper)
    Wb.copy_(Wa)
    Mb, Vb = Ma.clone(), Va.clone()
    reference.transport_moments_(Mb, Vb, P, Q, side)
    assert torch.allclose(reference.back_project_any(Mb, Q, side), reference.back_project_any(Ma, P, side))
    for _ in range(3):  # the same gradients from here on: P's and Q's trajectories coincide
        G = torch.randn(m, n, dtype=torch.float64, generator=gen)
        reference.galore_matrix_step_(Wa, G, P, Ma, Va, **hyper)
        reference.galore_matrix_step_(Wb, G, Q, Mb, Vb, **hyper)
        assert rel_err(Wa, Wb) < 1e-6  # galore_matrix_step_ projects in fp32


@pytest.mark.parametrize("side", ["left", "right"])
def test_transport_first_moment_identities(side):
    torch.manual_seed(5)
    m, n, r = 10, 8, 3
    rows = m if side == "left" else n
    old = torch.linalg.qr(torch.randn(rows, r, dtype=torch.float64))[0]
    new = torch.linalg.qr(torch.randn(rows, r, dtype=torch.float64))[0]
    M = torch.randn((r, n) if side == "left" else (m, r), dtype=torch.float64)
    V = torch.rand_like(M)
    M2, V2 = M.clone(), V.clone()
    reference.transport_moments_(M2, V2, old, new, side)
    # M ← project_new(back_old(M)): Flora's rule, also for non-orthonormal bases
    want = reference.project(reference.back_project(M, old, side), new, side)
    assert torch.allclose(M2, want)
    C = new.mT @ old
    assert torch.allclose(V2, (C * C) @ V if side == "left" else V @ (C * C).mT)
    assert bool((V2 >= 0).all())
    # a rotation within the same subspace keeps back_project(M) exactly
    R = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))[0]
    M3 = M.clone()
    reference.transport_moments_(M3, None, old, old @ R, side)
    assert torch.allclose(reference.back_project(M3, old @ R, side), reference.back_project(M, old, side))


def test_transport_moments_clamps_v_and_rejects_bad_side():
    M, V = torch.zeros(2, 3), torch.full((2, 3), -1.0)
    reference.transport_moments_(M, V, torch.eye(2), torch.eye(2), "left")
    assert bool((V >= 0).all())
    with pytest.raises(ValueError, match="side must be"):
        reference.transport_moments_(M, V, torch.eye(2), torch.eye(2), "top")


def _flipping_compute(seed):
    """SVDProjector.compute whose bases are the true ones times a random signed permutation: same
    subspaces, other coordinates, as an SVD with another sign convention would give."""
    gen = torch.Generator().manual_seed(seed)
    original = projectors.SVDProjector.compute

    def patched(self, G, rank, side, group, **kw):
        basis = original(self, G, rank, side, group, **kw)
        flip = lambda P: (P.double() @ _signed_permutation(P.shape[1], gen)).to(P.dtype)  # noqa: E731
        return tuple(flip(p) for p in basis) if isinstance(basis, tuple) else flip(basis)

    return patched


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_optimizer_transport_makes_the_trajectory_independent_of_basis_coordinates(monkeypatch, proj_type):
    def run(transport, flip):
        if flip:
            monkeypatch.setattr(projectors.SVDProjector, "compute", _flipping_compute(9))
        else:
            monkeypatch.undo()
        params, opt = _make("svd", proj_type, transport, torch.float64, gap=2)
        for s in range(9):
            _grads(params, s)
            opt.step()
        return [p.detach().clone() for p in params]

    plain, flipped = run(True, False), run(True, True)
    for a, b in zip(plain, flipped):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # fp32 moments: rounding differs
    # galore-torch's stale coordinates (transport off) do depend on them
    stale_plain, stale_flipped = run(False, False), run(False, True)
    assert not torch.allclose(stale_plain[0], stale_flipped[0], rtol=1e-3, atol=1e-4)


def test_transport_default_off_keeps_galore_parity():
    pa, oa = _make("svd", transport=False)
    torch.manual_seed(0)
    W = torch.nn.Parameter(pa[0].detach().clone())
    ob = GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 3}], lr=1e-2, weight_decay=0.05)
    for s in range(7):
        _grads(pa, s)
        W.grad = pa[0].grad.clone()
        oa.step()
        ob.step()
    assert torch.equal(W, pa[0])
    assert oa.param_groups[0]["transport_moments"] is False


def test_online_pca_rejects_full_side():
    with pytest.raises(ValueError, match="side must be"):
        online_pca_grad(torch.randn(4, 3), torch.randn(4, 2), "full")
