"""How a basis is computed and refreshed (ALGORITHMS.md §1, §2).

A projector turns the current gradient ``G`` (m x n) into an orthonormal basis for one side:
``(m, r)`` for ``"left"``, ``(n, r)`` for ``"right"``, a pair of both for ``"full"``. Bases are
returned in ``G``'s dtype, as galore-torch does. A projector returns ``None`` when it cannot produce a
finite basis (non-finite gradient, SVD that does not converge); the optimizer then keeps the
previous basis.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import Basis

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("svd", "randomized")


def basis_side(proj_type: str, m: int, n: int) -> str:
    """Which side a (m x n) matrix projects on, by galore-torch's ``proj_type`` rules."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {PROJ_TYPES}")


def lowrank_shape(side: str, m: int, n: int, rank: int) -> tuple:
    """Shape of the projected gradient (and of the low-rank moments)."""
    r = effective_rank(rank, m, n)
    return {"left": (r, n), "right": (m, r), "full": (r, r)}[side]


def effective_rank(rank: int, m: int, n: int) -> int:
    """A rank at or above min(m, n) runs as full rank."""
    return min(rank, m, n)


def _finite(basis: Basis) -> bool:
    parts = basis if isinstance(basis, tuple) else (basis,)
    return all(bool(torch.isfinite(b).all()) for b in parts)


def svd_basis(G: Tensor, rank: int, side: str) -> Basis:
    """Exactly galore-torch's basis: ``torch.linalg.svd(G.float(), full_matrices=False)``."""
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    # Contiguous copies: a slice would keep the whole U / Vh alive in optimizer state (and in
    # every checkpoint, since torch.save stores a view's full storage).
    left = U[:, :rank].to(G.dtype, memory_format=torch.contiguous_format, copy=True)
    right = Vh[:rank].mT.to(G.dtype, memory_format=torch.contiguous_format, copy=True)
    return {"left": left, "right": right, "full": (left, right)}[side]


def randomized_svd(
    A: Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    warm: Optional[Tensor] = None,
):
    """Randomized range finder + small SVD (Halko, Martinsson, Tropp 2011), in fp32.

    Returns ``(U, Vh)`` with ``U`` (m, r) and ``Vh`` (r, n) approximating the top-r singular vectors
    of ``A``. ``warm`` (m, r), a previous left basis, seeds the sketch with ``Aᵀ warm``: one free
    power iteration towards the subspace already found, so few iterations suffice between refreshes.
    The Gaussian part comes from a generator seeded with ``seed``, so results are reproducible.
    """
    A = A.float()
    m, n = A.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=A.device).manual_seed(int(seed))
    if warm is not None:
        known = A.mT @ warm.float()[:, : min(rank, k)]
        fresh = torch.randn(n, k - known.shape[1], generator=gen, device=A.device, dtype=A.dtype)
        omega = torch.cat([known, fresh], dim=1)
    else:
        omega = torch.randn(n, k, generator=gen, device=A.device, dtype=A.dtype)
    Y = A @ omega
    for _ in range(power_iters):
        Q, _ = torch.linalg.qr(Y)
        Y = A @ (A.mT @ Q)
    Q, _ = torch.linalg.qr(Y)
    Ub, _, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    return (Q @ Ub)[:, :rank], Vh[:rank]


def randomized_basis(
    G: Tensor,
    rank: int,
    side: str,
    *,
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    previous: Optional[Basis] = None,
) -> Basis:
    """Basis from the randomized range finder, warm-started from ``previous`` when given."""
    opts = dict(oversample=oversample, power_iters=power_iters, seed=seed)
    def own(x: Tensor) -> Tensor:
        return x.to(G.dtype, memory_format=torch.contiguous_format, copy=True)

    if side == "right":
        U, _ = randomized_svd(G.mT, rank, warm=previous, **opts)
        return own(U)
    warm = previous[0] if isinstance(previous, tuple) else previous
    U, Vh = randomized_svd(G, rank, warm=warm, **opts)
    if side == "left":
        return own(U)
    return own(U), own(Vh.mT)


def compute_basis(
    G: Tensor,
    rank: int,
    side: str,
    projector: str = "svd",
    *,
    previous: Optional[Basis] = None,
    seed: int = 0,
    oversample: int = 8,
    power_iters: int = 1,
) -> Optional[Basis]:
    """A new basis for ``G``, or ``None`` when no finite one can be computed from it."""
    if not bool(torch.isfinite(G).all()):
        return None
    try:
        if projector == "svd":
            basis = svd_basis(G, rank, side)
        elif projector == "randomized":
            basis = randomized_basis(
                G, rank, side, oversample=oversample, power_iters=power_iters, seed=seed, previous=previous
            )
        else:
            raise ValueError(f"unknown projector {projector!r}; expected one of {PROJECTORS}")
    except torch.linalg.LinAlgError:
        return None
    return basis if _finite(basis) else None
