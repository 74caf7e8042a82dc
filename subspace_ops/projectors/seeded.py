"""Seeded random projections, regenerated from a seed and the shape, never stored (docs/algorithms.md §5).

``gaussian`` (Flora: N(0, 1/r) entries, NOT orthonormal, scaled so that ``E[P Pᵀ] = I``) and ``srht``
(subsampled randomized Hadamard, orthonormal). The state keeps only the step the basis was drawn at.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import LOCAL
from .base import Basis, Projector, effective_rank, orthonormalize, parameter_seed, register


def _generator(seed: int, device) -> torch.Generator:
    # meta tensors (memory estimates) have no generator of their own: a CPU one draws nothing there
    if torch.device(device).type == "meta":
        device = "cpu"
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
):
    """The ``"gaussian"`` or ``"srht"`` basis of an (m x n) matrix for ``side``, from ``seed`` alone: a
    Tensor for ``"left"`` / ``"right"``, ``(left, right)`` for ``"full"`` (``_seeded`` gives the ``Basis``)."""
    return _seeded(projector, m, n, rank, side, seed, dtype=dtype, device=device).legacy()


def _seeded(projector: str, m: int, n: int, rank: int, side: str, seed: int, *, dtype, device) -> Basis:
    make = {"gaussian": gaussian_basis, "srht": srht_basis}.get(projector)
    if make is None:
        raise ValueError(f"unknown seeded projector {projector!r}; expected one of ('gaussian', 'srht')")
    # The first part (the only one of a one-sided basis) takes the parameter seed, the right part of
    # "full" the second of ``side_seeds``.
    seeds = side_seeds(seed)
    return Basis.from_parts(side, [make(rows, rank, s, dtype=dtype, device=device)
                                   for rows, s in zip(Basis.part_rows(side, m, n), seeds)])


class SeededProjector(Projector):
    """A basis that is a function of (seed, shape): ``state["basis_step"]`` records the draw."""

    make = None  # (rows, rank, seed, dtype=, device=) -> Tensor

    def has_basis(self, state):
        return "basis_step" in state

    shards_rows = True

    def current(self, state, group, side, G, index, comm=LOCAL):
        if "basis_step" not in state:
            return None
        m, n = comm.global_rows(G.shape[0]), G.shape[1]
        seed = parameter_seed(group["seed"], index, int(state["basis_step"]))
        return self._draw(m, n, effective_rank(group["rank"], m, n), side, seed, G, comm)

    def compute(self, G, rank, side, group, *, index, step, previous=None, comm=LOCAL):
        m, n = comm.global_rows(G.shape[0]), G.shape[1]
        seed = parameter_seed(group["seed"], index, step)
        return self._draw(m, n, rank, side, seed, G, comm).legacy()

    def _draw(self, m, n, rank, side, seed, G, comm) -> Basis:
        """The whole basis from the seed (every rank draws the same), a left part cut to this rank's
        rows when ``comm`` shards them: no communication."""
        basis = _seeded(self.name, m, n, rank, side, seed, dtype=G.dtype, device=G.device)
        if not comm.sharded or side == "right":
            return basis
        return Basis.from_parts(side, [comm.local_rows(P).clone() if s == "left" else P
                                       for s, P in zip(Basis.part_sides(side), basis.parts)])

    def store(self, state, basis, side, step):
        state["basis_step"] = torch.tensor(step, dtype=torch.int64)

    def state_shapes(self, side, m, n, rank):
        return {"basis_step": ()}


@register
class GaussianProjector(SeededProjector):
    """``projector="gaussian"``: Flora's N(0, 1/r) projection, resampled every ``update_proj_gap``."""

    name = "gaussian"
    orthonormal = False


@register
class SRHTProjector(SeededProjector):
    """``projector="srht"``: a subsampled randomized Hadamard transform, resampled every
    ``update_proj_gap`` steps."""

    name = "srht"
