"""The reference path (the specification) against float64 naive math, and the projectors."""
import math

import pytest
import torch

from subspace_ops import projectors, reference
from _numerics import rel_err


def orthonormal(rows, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("m,n,r", [(37, 53, 5), (129, 77, 16)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_project_and_back_project_match_float64(m, n, r, side):
    G = torch.randn(m, n, dtype=torch.float64)
    P = orthonormal(m if side == "left" else n, r)
    R = reference.project(G, P, side)
    expected = P.T @ G if side == "left" else G @ P
    assert R.shape == expected.shape and rel_err(R, expected) < 1e-12
    back = reference.back_project(R, P, side)
    assert back.shape == (m, n)
    # back(project(G)) is the orthogonal projection of G: idempotent, and the residual is orthogonal
    assert rel_err(reference.project(back, P, side), R) < 1e-12
    resid = G - back
    assert reference.project(resid, P, side).abs().max() < 1e-10
    # fp32 inputs stay within the docs/design.md tolerance of float64
    assert rel_err(reference.project(G.float(), P.float(), side), expected) <= 1e-5


def test_project_full_is_two_sided():
    G = torch.randn(20, 14, dtype=torch.float64)
    Pl, Pr = orthonormal(20, 4, 1), orthonormal(14, 4, 2)
    R = reference.project_any(G, (Pl, Pr), "full")
    assert rel_err(R, (Pl.T @ G @ Pr).float()) < 1e-6
    assert rel_err(reference.back_project_any(R, (Pl, Pr), "full"), (Pl @ Pl.T @ G @ Pr @ Pr.T).float()) < 1e-6


def test_bad_side_is_rejected():
    with pytest.raises(ValueError, match="side"):
        reference.project(torch.zeros(3, 3), torch.zeros(3, 1), "top")
    with pytest.raises(ValueError, match="side"):
        reference.back_project(torch.zeros(1, 3), torch.zeros(3, 1), "both")


def test_lowrank_adam_and_update_match_formulas():
    gen = torch.Generator().manual_seed(0)
    R = torch.randn(7, 9, generator=gen)
    M, V = torch.randn(7, 9, generator=gen), torch.rand(7, 9, generator=gen)
    M0, V0 = M.double().clone(), V.double().clone()
    N = reference.lowrank_adam_(R, M, V, 0.8, 0.99, 1e-3)
    Me = 0.8 * M0 + 0.2 * R.double()
    Ve = 0.99 * V0 + 0.01 * R.double() ** 2
    assert rel_err(M, Me) < 1e-6 and rel_err(V, Ve) < 1e-6 and rel_err(N, Me / (Ve.sqrt() + 1e-3)) < 1e-6
    W = torch.randn(7, 9, generator=gen)
    W0 = W.double().clone()
    reference.apply_update_(W, N, 0.1, 0.25, 0.01, 0.5)
    assert rel_err(W, (W0 - 0.1 * 0.25 * N.double()) * (1 - 0.01 * 0.5)) < 1e-6


def test_apply_update_rounds_once_for_bf16():
    W = torch.randn(64, dtype=torch.bfloat16)
    D = torch.randn(64)
    expected = ((W.float() - 1e-3 * D) * (1 - 1e-4)).bfloat16()
    reference.apply_update_(W, D, 1e-3, 1.0, 1e-2, 1e-2)
    assert torch.equal(W, expected)


def test_step_size():
    assert reference.adam_step_size(0.1, 0.9, 0.999, 1) == pytest.approx(0.1 * math.sqrt(0.001) / 0.1)
    assert reference.adam_step_size(0.1, 0.9, 0.999, 5, correct_bias=False) == 0.1


# ----------------------------------------------------------------------------------------------
# Projectors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "proj_type,m,n,side",
    [("std", 10, 5, "right"), ("std", 5, 10, "left"), ("std", 6, 6, "right"),
     ("reverse_std", 10, 5, "left"), ("reverse_std", 5, 10, "right"),
     ("left", 10, 5, "left"), ("right", 5, 10, "right"), ("full", 5, 10, "full")],
)
def test_basis_side_follows_galore_rules(proj_type, m, n, side):
    assert projectors.basis_side(proj_type, m, n) == side


def test_basis_side_rejects_unknown():
    with pytest.raises(ValueError, match="proj_type"):
        projectors.basis_side("diag", 3, 3)


def spectrum_matrix(m, n, k, seed=0, decay=0.5):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (U * s) @ V.T


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_svd_basis_is_orthonormal_and_in_input_dtype(side):
    G = spectrum_matrix(30, 20, 20).bfloat16()
    basis = projectors.svd_basis(G, 5, side)
    for P in basis if side == "full" else (basis,):
        assert P.dtype == torch.bfloat16 and P.shape[1] == 5
        assert torch.allclose(P.float().T @ P.float(), torch.eye(5), atol=2e-2)


@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("warm", [False, True])
def test_randomized_basis_finds_the_top_subspace(side, warm):
    G = spectrum_matrix(120, 90, 40, decay=0.7)
    exact = projectors.svd_basis(G, 8, side)
    previous = None
    if warm:  # a nearby basis from an earlier gradient
        previous = projectors.svd_basis(G + 0.01 * spectrum_matrix(120, 90, 40, seed=5), 8, side)
    got = projectors.randomized_basis(G, 8, side, seed=3, power_iters=1, previous=previous)
    for P, E in zip(got if side == "full" else (got,), exact if side == "full" else (exact,)):
        assert torch.allclose(P.T @ P, torch.eye(8), atol=1e-5)
        assert reference.principal_angle_cosines(E, P).min() > 0.99
    again = projectors.randomized_basis(G, 8, side, seed=3, power_iters=1, previous=previous)
    assert all(torch.equal(a, b) for a, b in zip(got if side == "full" else (got,), again if side == "full" else (again,)))


def test_warm_start_needs_no_power_iteration():
    G = spectrum_matrix(200, 150, 60, decay=0.9)
    exact = projectors.svd_basis(G, 10, "left")
    cold = projectors.randomized_basis(G, 10, "left", power_iters=0, seed=1)
    warm = projectors.randomized_basis(G, 10, "left", power_iters=0, seed=1, previous=exact)
    assert reference.principal_angle_cosines(exact, warm).min() > reference.principal_angle_cosines(exact, cold).min()
    assert reference.principal_angle_cosines(exact, warm).min() > 0.99


def test_compute_basis_returns_none_on_non_finite_gradient():
    G = torch.randn(6, 4)
    G[1, 1] = float("inf")
    assert projectors.compute_basis(G, 2, "left") is None
    with pytest.raises(ValueError, match="projector"):
        projectors.compute_basis(torch.randn(6, 4), 2, "left", "magic")


def test_diagnostic_helpers():
    P = orthonormal(10, 3).float()
    assert torch.allclose(reference.principal_angle_cosines(P, P), torch.ones(3), atol=1e-6)
    G = torch.randn(10, 6)
    inside = P @ (P.T @ G)
    assert reference.captured_energy(inside, P, "left") == pytest.approx(1.0, abs=1e-5)
    assert reference.captured_energy(torch.zeros(10, 6), P, "left") == 0.0
