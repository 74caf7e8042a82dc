"""How a matrix's basis is computed and kept: one file per projector kind on a small base class
(``base.Projector``), and a registry (``register``, ``get``, ``names``).

Built in: ``svd`` (``svd.py``, galore-torch's exact SVD), ``randomized`` (``randomized.py``),
``online_pca`` (``online_pca.py``), ``gaussian`` and ``srht`` (``seeded.py``). A new projector is a
``Projector`` subclass with a ``name``, decorated with ``@register`` (docs/design.md, "How to add a
projector"); the optimizers never name a projector.
"""
from __future__ import annotations

from .base import (  # noqa: F401
    PROJ_TYPES,
    STATE_KEYS,
    Basis,
    Projector,
    basis_side,
    effective_rank,
    finite_or_none,
    get,
    lowrank_shape,
    names,
    orthonormalize,
    parameter_seed,
    register,
)
from ..distributed import LOCAL, all_finite
from .svd import SVDProjector, exact_basis, svd_basis  # noqa: F401
from .randomized import RandomizedProjector, _randomized, randomized_basis, randomized_svd  # noqa: F401
from .online_pca import (  # noqa: F401
    ONLINE_PCA_ADAMW,
    OnlinePCAProjector,
    adamw_,
    online_pca_grad,
    online_pca_loss,
    online_pca_update,
)
from .seeded import (  # noqa: F401
    GaussianProjector,
    SeededProjector,
    SRHTProjector,
    gaussian_basis,
    hadamard_entries,
    hadamard_transform,
    seeded_basis,
    side_seeds,
    srht_basis,
    srht_rows,
)

# The built-in projectors' names (``names()`` also lists registered ones).
PROJECTORS = ("svd", "randomized", "online_pca", "gaussian", "srht")
SEEDED_PROJECTORS = ("gaussian", "srht")


def compute_basis(G, rank: int, side: str, projector: str = "svd", *, previous=None, seed: int = 0,
                  oversample: int = 8, power_iters: int = 1):
    """A new basis for ``G`` from the named projector with a raw ``seed``, or None when no finite
    one can be computed (a function form of ``get(projector).compute``, for benchmarks and tests).
    Returns a Tensor for ``"left"`` / ``"right"``, ``(left, right)`` for ``"full"``."""
    proj = get(projector)
    if isinstance(proj, SeededProjector):
        m, n = G.shape
        return seeded_basis(projector, m, n, rank, side, seed, dtype=G.dtype, device=G.device)
    if isinstance(proj, RandomizedProjector):
        import torch

        if not all_finite(LOCAL, G):
            return None
        try:
            basis = finite_or_none(_randomized(G, rank, side, oversample=oversample, power_iters=power_iters,
                                               seed=seed, previous=previous))
        except torch.linalg.LinAlgError:
            return None
    else:
        group = {"seed": seed, "oversample": oversample, "power_iters": power_iters}
        previous = None if previous is None else Basis.of(previous, side)
        basis = proj.compute(G, rank, side, group, index=0, step=0, previous=previous)
    return None if basis is None else Basis.of(basis, side).legacy()
