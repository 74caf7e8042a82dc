"""The randomized range finder basis (docs/algorithms.md §2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..distributed import LOCAL, all_finite
from .base import Basis, Projector, _nonnegative_int, orthonormalize, parameter_seed, register


def randomized_svd(
    A: Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    warm: Optional[Tensor] = None,
):
    """Randomized range finder + small SVD (Halko, Martinsson, Tropp 2011), in fp32 (float64 stays
    float64).

    Returns ``(U, Vh)`` with ``U`` (m, r) and ``Vh`` (r, n) approximating the top-r singular vectors
    of ``A``. ``warm`` (m, r), a previous left basis, seeds the sketch with ``Aᵀ warm``: one free
    power iteration towards the subspace already found, so few iterations suffice between refreshes.
    The Gaussian part comes from a generator seeded with ``seed``, so results are reproducible.
    """
    return _range_finder_rows(A, rank, oversample=oversample, power_iters=power_iters, seed=seed, warm=warm)


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _sketch(rows: int, k: int, seed: int, known: Optional[Tensor], like: Tensor) -> Tensor:
    """The (rows x k) test matrix: ``known`` (the warm start's columns) then Gaussian columns drawn
    whole from ``seed``, so every rank draws the same ones."""
    # meta tensors (memory estimates) have no generator of their own: a CPU one draws nothing there
    gen = torch.Generator(device="cpu" if like.device.type == "meta" else like.device).manual_seed(int(seed))
    width = k - (0 if known is None else known.shape[1])
    fresh = torch.randn(rows, width, generator=gen, device=like.device, dtype=like.dtype)
    return fresh if known is None else torch.cat([known, fresh], dim=1)


def _range_finder_rows(A: Tensor, rank: int, *, oversample: int, power_iters: int, seed: int,
                       warm: Optional[Tensor] = None, comm=LOCAL):
    """``randomized_svd`` of an (m x n) ``A`` whose rows ``comm`` shards (``A`` and ``warm`` are this
    rank's rows; ``U`` comes back as this rank's rows, ``Vh`` whole). Communication: n x k sums and
    the TSQR's k x k factors, never ``A`` itself."""
    A = _wide(A)
    m, n = comm.global_rows(A.shape[0]), A.shape[1]
    k = min(rank + oversample, m, n)
    known = None if warm is None else comm.sum_(A.mT @ _wide(warm).to(A.dtype)[:, : min(rank, k)])
    Y = A @ _sketch(n, k, seed, known, A)
    for _ in range(power_iters):
        Y = A @ comm.sum_(A.mT @ comm.orthonormalize(Y))
    Q = comm.orthonormalize(Y)
    Ub, _, Vh = torch.linalg.svd(comm.sum_(Q.mT @ A), full_matrices=False)
    return (Q @ Ub)[:, :rank], Vh[:rank]


def _range_finder_cols(G: Tensor, rank: int, *, oversample: int, power_iters: int, seed: int,
                       warm: Optional[Tensor] = None, comm=LOCAL) -> Tensor:
    """The ``U`` (n x r) of ``randomized_svd(Gᵀ)`` for an (m x n) ``G`` whose rows ``comm`` shards,
    i.e. ``Gᵀ``'s columns; ``U`` (and ``warm``, n x r) whole on every rank. Communication: n x k sums
    and one all-gather of ``G Q`` (m x k), never ``G`` itself."""
    G = _wide(G)
    m, n = comm.global_rows(G.shape[0]), G.shape[1]
    k = min(rank + oversample, m, n)
    known = None if warm is None else G @ _wide(warm).to(G.dtype)[:, : min(rank, k)]  # this rank's rows
    if known is not None:
        known = comm.all_rows(known)
    omega = comm.local_rows(_sketch(m, k, seed, known, G))
    Y = comm.sum_(G.mT @ omega)
    for _ in range(power_iters):
        Y = comm.sum_(G.mT @ (G @ orthonormalize(Y)))
    Q = orthonormalize(Y)
    Ub, _, _ = torch.linalg.svd(comm.all_rows(G @ Q).mT, full_matrices=False)
    return (Q @ Ub)[:, :rank]


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
                previous=None, comm=LOCAL) -> Basis:
    """The range finder's basis of ``G`` (this rank's rows when ``comm`` shards them): the sketch runs
    on G for a left or full basis and on Gᵀ for a right one, warm-started from the previous basis's
    part on that side (its first part)."""
    opts = dict(oversample=oversample, power_iters=power_iters, seed=seed, comm=comm)

    def own(x: Tensor) -> Tensor:
        return x.to(G.dtype, memory_format=torch.contiguous_format, copy=True)

    warm = None if previous is None else Basis.of(previous, side).parts[0]
    if side == "right":
        return Basis("right", None, own(_range_finder_cols(G, rank, warm=warm, **opts)))
    U, Vh = _range_finder_rows(G, rank, warm=warm, **opts)
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

    shards_rows = True

    def compute(self, G, rank, side, group, *, index, step, previous=None, comm=LOCAL):
        if not all_finite(comm, G):
            return None
        try:
            basis = _randomized(G, rank, side, oversample=group["oversample"], power_iters=group["power_iters"],
                                seed=parameter_seed(group["seed"], index, step), previous=previous, comm=comm)
        except torch.linalg.LinAlgError:  # the small SVDs run on data every rank holds alike
            return None
        return basis.legacy() if all_finite(comm, *basis.parts) else None
