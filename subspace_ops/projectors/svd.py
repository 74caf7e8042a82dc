"""The exact SVD basis: galore-torch's (docs/algorithms.md §1, §2)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import LOCAL, all_finite
from .base import Basis, Projector, finite_or_none, register


def svd_basis(G: Tensor, rank: int, side: str):
    """Exactly galore-torch's basis: ``torch.linalg.svd(G.float(), full_matrices=False)``; a Tensor
    for side ``"left"`` / ``"right"``, ``(left, right)`` for ``"full"`` (``_svd`` gives the ``Basis``)."""
    return _svd(G, rank, side).legacy()


def _svd(G: Tensor, rank: int, side: str) -> Basis:
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    # Contiguous copies: a slice would keep the whole U / Vh alive in optimizer state (and in
    # every checkpoint, since torch.save stores a view's full storage).
    left = U[:, :rank].to(G.dtype, memory_format=torch.contiguous_format, copy=True)
    right = Vh[:rank].mT.to(G.dtype, memory_format=torch.contiguous_format, copy=True)
    return Basis.pick(side, left, right)


def exact_basis(G: Tensor, rank: int, side: str):
    """``svd_basis`` of a finite ``G``, or None (non-finite gradient, SVD not converging)."""
    if not all_finite(LOCAL, G):  # meta tensors: no values to check
        return None
    try:
        basis = finite_or_none(_svd(G, rank, side))
    except torch.linalg.LinAlgError:
        return None
    return None if basis is None else basis.legacy()


@register
class SVDProjector(Projector):
    """``projector="svd"``: the top-r singular vectors of the gradient at each refresh."""

    name = "svd"

    def compute(self, G, rank, side, group, *, index, step, previous=None):
        return exact_basis(G, rank, side)
