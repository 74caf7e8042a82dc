"""How a basis is computed and refreshed (docs/algorithms.md §1, §2, §3, §5).

A projector turns the current gradient ``G`` (m x n) into an orthonormal basis for one side:
``(m, r)`` for ``"left"``, ``(n, r)`` for ``"right"``, a pair of both for ``"full"``. Bases are
returned in ``G``'s dtype, as galore-torch does. A projector returns ``None`` when it cannot produce a
finite basis (non-finite gradient, SVD that does not converge); the optimizer then keeps the
previous basis.

Projectors: ``svd`` (galore-torch), ``randomized`` (§2), ``online_pca`` (SVD start, then
``online_pca_update`` every step, §3), ``gaussian`` and ``srht`` (§5: functions of a seed and the
shape only, regenerated rather than stored; ``gaussian`` is the one basis that is NOT orthonormal,
scaled so that ``E[P Pᵀ] = I`` as in Flora).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import Basis

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("svd", "randomized", "online_pca", "gaussian", "srht")
# Projectors whose basis is a function of (seed, shape) only: regenerated when needed, never stored.
SEEDED_PROJECTORS = ("gaussian", "srht")


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
    """A new basis for ``G``, or ``None`` when no finite one can be computed from it.

    ``"online_pca"`` starts from the SVD basis (its later updates are ``online_pca_update``);
    ``"gaussian"`` and ``"srht"`` depend only on ``seed`` and ``G``'s shape (``seeded_basis``).
    """
    if projector in SEEDED_PROJECTORS:
        m, n = G.shape
        return seeded_basis(projector, m, n, rank, side, seed, dtype=G.dtype, device=G.device)
    if not bool(torch.isfinite(G).all()):
        return None
    try:
        if projector in ("svd", "online_pca"):
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


# -- seeded projections (docs/algorithms.md §5) ------------------------------------------------------
def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def side_seeds(seed: int) -> tuple:
    """Seeds of the left and right bases of a ``"full"`` projection drawn from one parameter seed.

    The right one is a splitmix64 hash of the seed: torch's CPU generator keeps only the low 32 bits
    of a seed, so a flip of a high bit would give the same stream.
    """
    return int(seed), _splitmix64(int(seed)) & 0x7FFFFFFFFFFFFFFF


def gaussian_basis(rows: int, rank: int, seed: int, *, dtype=torch.float32, device=None) -> Tensor:
    """Flora's projection: ``(rows, rank)`` with i.i.d. N(0, 1/rank) entries, drawn in fp32 from ``seed``.

    Not orthonormal: scaled so that ``E[P Pᵀ] = I``, i.e. ``back_project(project(x))`` is an unbiased
    estimate of ``x``. ``rank >= rows`` still gives a random (not an identity) projection.
    """
    gen = _generator(seed, device if device is not None else "cpu")
    P = torch.randn(rows, rank, generator=gen, device=device, dtype=torch.float32)
    return P.div_(rank**0.5).to(dtype)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _parity(x: Tensor) -> Tensor:
    """Parity of the set bits of non-negative int64 ``x`` (popcount mod 2)."""
    for shift in (32, 16, 8, 4, 2, 1):
        x = x ^ (x >> shift)
    return x & 1


def hadamard_entries(rows: Tensor, cols: Tensor, d: int) -> Tensor:
    """Entries ``H[rows[:, None], cols[None, :]]`` of the normalised d x d Walsh-Hadamard matrix
    (Sylvester order, ``H_ij = (-1)^popcount(i & j) / sqrt(d)``), in fp32, without forming ``H``."""
    signs = 1.0 - 2.0 * _parity(rows[:, None].long() & cols[None, :].long()).float()
    return signs / d**0.5


def hadamard_transform(x: Tensor, dim: int = 0) -> Tensor:
    """Normalised fast Walsh-Hadamard transform of ``x`` along ``dim`` (length a power of two).

    ``O(d log d)`` per column; equals ``H @ x`` along ``dim`` with ``H`` from ``hadamard_entries``.
    """
    d = x.shape[dim]
    if d & (d - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two length along dim {dim}, got {d}")
    y = x.movedim(dim, 0).float()
    rest = y.shape[1:]
    y = y.reshape(d, -1)
    h = 1
    while h < d:
        y = y.reshape(d // (2 * h), 2, h, -1)
        a, b = y[:, 0], y[:, 1]
        y = torch.stack((a + b, a - b), dim=1)
        h *= 2
    y = y.reshape(d, *rest) / d**0.5
    return y.movedim(0, dim)


def srht_rows(rows: int, rank: int, seed: int, *, device=None) -> Tensor:
    """``(S H D)[:, :rows]ᵀ`` as a ``(rows, rank)`` fp32 matrix, from ``seed``.

    ``d`` is the next power of two >= ``rows``; ``D = diag(±1)`` (d signs), ``H`` the normalised d x d
    Walsh-Hadamard matrix, ``S`` picks ``rank`` of its d rows without replacement. Column j is
    ``D[:rows] * H[:rows, S_j]``: the Hadamard acts along the projected axis (the rows of the basis).
    """
    d = _next_pow2(rows)
    gen = _generator(seed, device if device is not None else "cpu")
    signs = torch.randint(0, 2, (d,), generator=gen, device=device).mul_(2).sub_(1).float()
    chosen = torch.randperm(d, generator=gen, device=device)[:rank]
    H = hadamard_entries(torch.arange(rows, device=device), chosen, d)
    return signs[:rows, None] * H


def orthonormalize(P: Tensor) -> Tensor:
    """Q of a Householder QR of ``P`` (fp32), columns signed so that ``diag(R) >= 0``.

    The sign choice makes ``Q ≈ P`` when ``P`` is already nearly orthonormal. Householder QR returns
    orthonormal columns whose span contains ``span(P)`` even when ``P`` is rank-deficient.
    """
    Q, R = torch.linalg.qr(P.float())
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign


def srht_basis(rows: int, rank: int, seed: int, *, dtype=torch.float32, device=None) -> Tensor:
    """Orthonormal ``(rows, rank)`` SRHT basis (docs/algorithms.md §5) from ``seed``.

    When ``rows`` is a power of two this is exactly ``(S H D)ᵀ``: its rows of ``S H D`` are
    orthonormal, no rescaling by ``sqrt(d/k)`` (that factor makes ``E[QᵀQ] = I`` but breaks
    orthonormality; GaLore's ``scale`` plays its role here).

    Padding: for other ``rows`` the transform runs on the zero-padded dimension ``d = 2^⌈log2 rows⌉``
    and only the first ``rows`` coordinates of each selected row exist; those truncated rows are no
    longer orthonormal (and can even be linearly dependent when ``rank`` is close to ``rows``). We keep
    the exact-complement property instead of the raw rows: the basis is the Householder QR of the
    truncated rows (``orthonormalize``), which spans them (or a superset when they are dependent) with
    orthonormal columns, so ``G − back_project(project(G))`` is exactly orthogonal to the subspace and
    ``rank == rows`` gives the whole space. Cost ``O(rows·rank²)`` per regeneration.
    """
    A = srht_rows(rows, rank, seed, device=device)
    if rows != _next_pow2(rows):
        A = orthonormalize(A)
    return A.to(dtype)


def seeded_basis(
    projector: str, m: int, n: int, rank: int, side: str, seed: int, *, dtype=torch.float32, device=None
) -> Basis:
    """The ``"gaussian"`` or ``"srht"`` basis of an (m x n) matrix for ``side``, from ``seed`` alone."""
    make = {"gaussian": gaussian_basis, "srht": srht_basis}.get(projector)
    if make is None:
        raise ValueError(f"unknown seeded projector {projector!r}; expected one of {SEEDED_PROJECTORS}")
    left_seed, right_seed = side_seeds(seed)
    if side == "left":
        return make(m, rank, left_seed, dtype=dtype, device=device)
    if side == "right":
        return make(n, rank, left_seed, dtype=dtype, device=device)
    return make(m, rank, left_seed, dtype=dtype, device=device), make(n, rank, right_seed, dtype=dtype, device=device)


# -- Online Subspace Descent (docs/algorithms.md §3) ----------------------------------------------
# The official implementation's optimizer on P: torch.optim.AdamW with its defaults.
ONLINE_PCA_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def _wide(x: Tensor) -> Tensor:
    """fp32 for 16-bit inputs; float64 stays float64 (for checks against float64 math)."""
    return x if x.dtype == torch.float64 else x.float()


def _left_view(G: Tensor, side: str) -> Tensor:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    G = _wide(G)
    return G if side == "left" else G.mT


def online_pca_loss(G: Tensor, P: Tensor, side: str) -> Tensor:
    """``‖P Pᵀ Ĝ − Ĝ‖²`` (left) or ``‖Ĝ P Pᵀ − Ĝ‖²`` (right), ``Ĝ = G/‖G‖_F``; differentiable in P."""
    Gh = _left_view(G, side)
    Gh = Gh / Gh.norm()
    return (P @ (P.mT @ Gh) - Gh).pow(2).sum()


def online_pca_grad(G: Tensor, P: Tensor, side: str) -> Tensor:
    """Closed-form ``∇_P`` of ``online_pca_loss`` in fp32 (float64 for float64 inputs), no autograd.

    Left, with ``A = Pᵀ Ĝ`` (r x n): ``2 [R Ĝᵀ P + Ĝ Rᵀ P] = 2 [P (A Aᵀ) + (Ĝ Aᵀ)(PᵀP − 2I)]``,
    ``R = (P Pᵀ − I) Ĝ``, never forming the m x n residual: ≈ 4·m·n·r flops. The right side is the
    left side of ``Gᵀ`` (the loss is invariant under transposition).
    """
    Gh = _left_view(G, side)
    Gh = Gh / Gh.norm()
    P = _wide(P).to(Gh.dtype)
    A = P.mT @ Gh
    GA = Gh @ A.mT
    eye = torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
    return 2.0 * (P @ (A @ A.mT) + GA @ (P.mT @ P - 2.0 * eye))


def adamw_(P: Tensor, grad: Tensor, M: Tensor, V: Tensor, step: int, lr: float,
           betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
    """torch.optim.AdamW's single-tensor update of fp32 ``P`` in place (decay first, bias-corrected)."""
    beta1, beta2 = betas
    P.mul_(1.0 - lr * weight_decay)
    M.lerp_(grad, 1.0 - beta1)
    V.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (V.sqrt() / (1.0 - beta2**step) ** 0.5).add_(eps)
    P.addcdiv_(M, denom, value=-lr / (1.0 - beta1**step))


def online_pca_update(P: Tensor, G: Tensor, M: Tensor, V: Tensor, step: int, lr: float, side: str,
                      **adamw) -> Optional[Tensor]:
    """One Online Subspace Descent step on the basis ``P`` for gradient ``G``; returns the new basis.

    Variant (official code): one AdamW step (``ONLINE_PCA_ADAMW``, fp32 moments ``M``/``V`` updated in
    place, ``step`` counting these updates) on the online-PCA loss at the current ``P``, then a
    re-orthonormalisation by QR (``orthonormalize``; the official code never re-orthonormalises, we do
    it every step so that ``P`` always has orthonormal columns, for ≈ 2·rows·r² flops). Returns
    ``None`` and leaves ``M``/``V`` untouched when ``G`` is zero or not finite.
    """
    norm = G.float().norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return None
    opts = {**ONLINE_PCA_ADAMW, **adamw}
    P32 = P.float().clone()
    adamw_(P32, online_pca_grad(G, P32, side), M, V, step, lr, **opts)
    Q = orthonormalize(P32)
    if not bool(torch.isfinite(Q).all()):
        return None
    return Q.to(P.dtype)
