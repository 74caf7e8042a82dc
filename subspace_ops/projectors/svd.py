"""The exact SVD basis: galore-torch's (docs/algorithms.md §1, §2)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Basis, Projector, finite_or_none, register


def svd_basis(G: Tensor, rank: int, side: str) -> Basis:
    """Exactly galore-torch's basis: ``torch.linalg.svd(G.float(), full_matrices=False)``."""
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    # Contiguous copies: a slice would keep the whole U / Vh alive in optimizer state (and in
    # every checkpoint, since torch.save stores a view's full storage).
    left = U[:, :rank].to(G.dtype, memory_format=torch.contiguous_format, copy=True)
    right = Vh[:rank].mT.to(G.dtype, memory_format=torch.contiguous_format, copy=True)
    return {"left": left, "right": right, "full": (left, right)}[side]


def exact_basis(G: Tensor, rank: int, side: str):
    """``svd_basis`` of a finite ``G``, or None (non-finite gradient, SVD not converging)."""
    if not bool(torch.isfinite(G).all()):
        return None
    try:
        return finite_or_none(svd_basis(G, rank, side))
    except torch.linalg.LinAlgError:
        return None


@register
class SVDProjector(Projector):
    """``projector="svd"``: the top-r singular vectors of the gradient at each refresh."""

    name = "svd"

    def compute(self, G, rank, side, group, *, index, step, previous=None):
        return exact_basis(G, rank, side)
