"""The randomized range finder basis (docs/algorithms.md §2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Basis, Projector, _nonnegative_int, finite_or_none, parameter_seed, register


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
    previous=None,
):
    """Basis from the randomized range finder, warm-started from ``previous`` (a ``Basis``, or a
    Tensor / pair as returned) when given; a Tensor for ``"left"`` / ``"right"``, ``(left, right)``
    for ``"full"`` (``_randomized`` gives the ``Basis``)."""
    return _randomized(G, rank, side, oversample=oversample, power_iters=power_iters, seed=seed,
                       previous=previous).legacy()


def _randomized(G: Tensor, rank: int, side: str, *, oversample: int, power_iters: int, seed: int,
                previous=None) -> Basis:
    opts = dict(oversample=oversample, power_iters=power_iters, seed=seed)
    def own(x: Tensor) -> Tensor:
        return x.to(G.dtype, memory_format=torch.contiguous_format, copy=True)

    # The sketch runs on G for a left or full basis and on Gᵀ for a right one, warm-started from the
    # previous basis's part on that side (its first part).
    warm = None if previous is None else Basis.of(previous, side).parts[0]
    if side == "right":
        U, _ = randomized_svd(G.mT, rank, warm=warm, **opts)
        return Basis("right", None, own(U))
    U, Vh = randomized_svd(G, rank, warm=warm, **opts)
    return Basis.pick(side, U, Vh.mT).map(own)


@register
class RandomizedProjector(Projector):
    """``projector="randomized"``: a range finder with ``oversample`` extra columns and
    ``power_iters`` power iterations, warm-started from the previous basis, seeded per parameter and
    step (reproducible, resumable)."""

    name = "randomized"
    keys = {"oversample": 8, "power_iters": 1}

    def validate(self, group):
        super().validate(group)
        _nonnegative_int(group, "oversample")
        _nonnegative_int(group, "power_iters")

    def compute(self, G, rank, side, group, *, index, step, previous=None):
        if not bool(torch.isfinite(G).all()):
            return None
        try:
            basis = _randomized(G, rank, side, oversample=group["oversample"], power_iters=group["power_iters"],
                                seed=parameter_seed(group["seed"], index, step), previous=previous)
        except torch.linalg.LinAlgError:
            return None
        basis = finite_or_none(basis)
        return None if basis is None else basis.legacy()
