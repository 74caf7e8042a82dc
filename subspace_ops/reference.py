"""Pure-PyTorch reference of every op: the specification the Triton kernels are tested against.

Conventions (docs/design.md): a basis ``P`` has orthonormal columns.

* side ``"left"``:  ``P`` is (m, r), ``project(G) = Pᵀ G`` (r, n), ``back_project(R) = P R`` (m, n)
* side ``"right"``: ``P`` is (n, r), ``project(G) = G P`` (m, r), ``back_project(R) = R Pᵀ`` (m, n)
* side ``"full"``:  ``P = (Pl, Pr)``, ``project(G) = Plᵀ G Pr`` (r, r), ``back_project(N) = Pl N Prᵀ``

The functions that take a basis for every side take a ``subspace_ops.basis.Basis`` or the old
conventions above (``Basis.of``); the side logic lives in ``Basis``.

Everything here runs on any device and in float64, needs no Triton, and computes in the dtype of its
inputs except where noted: 16-bit inputs are upcast to fp32 for the math and rounded once on store,
which is also what the fused kernels do.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .basis import Basis
from .distributed import LOCAL

BasisLike = Union[Basis, Tensor, Tuple[Tensor, Tensor]]
SIDES = ("left", "right")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def project(G: Tensor, P: Tensor, side: str) -> Tensor:
    """``Pᵀ G`` (left) or ``G P`` (right), in the common dtype of ``G`` and ``P``."""
    _check_side(side)
    return P.mT @ G if side == "left" else G @ P


def back_project(R: Tensor, P: Tensor, side: str) -> Tensor:
    """``P R`` (left) or ``R Pᵀ`` (right)."""
    _check_side(side)
    return P @ R if side == "left" else R @ P.mT


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an optimizer's moments for a parameter of ``dtype``: fp32 (16-bit and fp32
    parameters), float64 for float64 parameters (checks against float64 math, and sums over ranks
    that round like one process's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wide(x: Tensor) -> Tensor:
    """The dtype the reference computes in: fp32 for fp32/fp16/bf16, float64 for float64 (a float64
    model stays float64 end to end; its low-rank moments are still fp32 state)."""
    return x if x.dtype == torch.float64 else x.float()


def project_any(G: Tensor, basis: BasisLike, side: str) -> Tensor:
    """Projection for every side the optimizers use, ``"full"`` included, computed in fp32 (float64
    for float64 gradients): ``Basis.project``."""
    return Basis.of(basis, side).project(G)


def back_project_any(N: Tensor, basis: BasisLike, side: str) -> Tensor:
    """Back-projection for every side, ``"full"`` included, computed in fp32 (float64 when the
    basis is float64): ``Basis.back``."""
    return Basis.of(basis, side).back(N)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool = True) -> float:
    """``lr · sqrt(1-β2^t) / (1-β1^t)`` (galore-torch / HF AdamW form), or ``lr`` without correction."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def lowrank_adam_(R: Tensor, M: Tensor, V: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    """Update the fp32 moments ``M``, ``V`` in place with gradient ``R``; return ``N = M/(sqrt(V)+eps)``.

    The bias correction is not applied here: it is folded into the step size (docs/algorithms.md §1).
    """
    R32 = wide(R)
    M.mul_(beta1).add_(R32, alpha=1.0 - beta1)
    V.mul_(beta2).addcmul_(R32, R32, value=1.0 - beta2)
    return M / (V.sqrt() + eps)


def apply_update_(W: Tensor, D: Tensor, step_size: float, scale: float, lr: float, weight_decay: float) -> None:
    """``W ← W − step·α·D``, then ``W ← W − lr·wd·W`` (decay of the updated weight, galore order).

    Computed in fp32 (float64 for a float64 W) and rounded once into ``W``'s dtype.
    """
    W32 = wide(W)  # W itself when W is fp32 or float64, so the update is in place
    W32.add_(D.to(W32.dtype), alpha=-step_size * scale)
    if weight_decay > 0.0:
        W32.add_(W32, alpha=-lr * weight_decay)
    if W32 is not W:
        W.copy_(W32)


def galore_matrix_step_(
    W: Tensor,
    G: Tensor,
    basis: BasisLike,
    M: Tensor,
    V: Tensor,
    *,
    side: str,
    step_size: float,
    scale: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One GaLore AdamW update of a 2-D weight ``W`` (in place), moments ``M``/``V`` (fp32, in place).

    ``step_size`` is the bias-corrected ``adam_step_size(...)`` of the step being taken.
    """
    basis = Basis.of(basis, side)
    N = lowrank_adam_(basis.project(G), M, V, beta1, beta2, eps)
    apply_update_(W, basis.back(N), step_size, scale, lr, weight_decay)


def adam_step_(
    W: Tensor,
    G: Tensor,
    M: Tensor,
    V: Tensor,
    *,
    step_size: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Plain (full-rank) AdamW update with the same conventions and no scale."""
    N = lowrank_adam_(G, M, V, beta1, beta2, eps)
    apply_update_(W, N, step_size, 1.0, lr, weight_decay)


def orthonormal_fallback(rows: int, rank: int, like: Tensor) -> Tensor:
    """First ``rank`` columns of the identity: a finite orthonormal basis for when none can be computed."""
    return torch.eye(rows, rank, dtype=like.dtype, device=like.device)


def principal_angle_cosines(P_old: Tensor, P_new: Tensor, comm=LOCAL) -> Tensor:
    """cos θᵢ = σᵢ(P_oldᵀ P_new), descending; 1 means the subspaces share that direction. ``comm``:
    the bases' rows are sharded (``subspace_ops.distributed``), their product summed over ranks."""
    return torch.linalg.svdvals(comm.sum_(P_old.float().mT @ P_new.float())).clamp_(0.0, 1.0)


def captured_energy(G: Tensor, basis: BasisLike, side: str, comm=LOCAL) -> float:
    """‖project(G)‖² / ‖G‖²: the share of the gradient that the subspace keeps (0 for a zero
    gradient). ``comm``: G's rows (and a left basis's) are sharded; the sums run over ranks."""
    total = comm.sum_(G.float().pow(2).sum())
    if total == 0:
        return 0.0
    basis = Basis.of(basis, side)
    R = basis.project(G)
    if basis.left is not None:  # Plᵀ G sums over the rows: whole before it is squared
        kept = comm.sum_(R).pow(2).sum()
    else:  # G Pr keeps G's rows
        kept = comm.sum_(R.pow(2).sum())
    return float(kept / total)


def transport_matrix(P_old: Tensor, P_new: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``C = P_newᵀ P_old`` (r x r, in ``dtype``): old low-rank coordinates to new ones
    (docs/algorithms.md §6)."""
    return P_new.to(dtype).mT @ P_old.to(dtype)


def transport_moments_(M: Tensor, V: Optional[Tensor], old: BasisLike, new: BasisLike, side: str,
                       comm=LOCAL) -> None:
    """Carry low-rank moments into a new basis, in place (docs/algorithms.md §6; ``Basis.transport_``).

    ``M ← C M`` (left) / ``M Cᵀ`` (right) / ``Cl M Crᵀ`` (full), ``C = transport_matrix(old, new)``, so
    ``back_project(M)`` is kept up to its component outside the new subspace; ``V ← (C∘C) V`` /
    ``V (C∘C)ᵀ`` / both, clamped ≥ 0 (V is not linear in the basis: exact only when C is a signed
    permutation). ``V=None`` moves ``M`` only. For a Gaussian (non-orthonormal) basis the same formula
    is Flora's ``project_new(back_old(M))``. ``comm``: the left parts' rows are sharded.
    """
    Basis.of(old, side).transport_(M, V, Basis.of(new, side), comm)


def subset_norm_shape(m: int, n: int) -> Tuple[int, int]:
    """Shape of the Subset-Norm accumulator: one per row/column of the larger dimension
    (docs/algorithms.md §4)."""
    return (m, 1) if m >= n else (1, n)


def snsm_matrix_step_(
    W: Tensor,
    G: Tensor,
    basis: BasisLike,
    M: Tensor,
    V: Tensor,
    *,
    side: str,
    step_size: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One Subset-Norm + Subspace-Momentum update of a 2-D ``W`` in place (docs/algorithms.md §4).

    ``M`` (low-rank shape, fp32) is the subspace momentum, ``V`` (``subset_norm_shape``, fp32) the
    subset-norm accumulator: ``V ← β2·V + (1−β2)·Σ G²`` over the smaller dimension;
    ``W ← W − step_size · (back(M) + G − back(project(G))) / (sqrt(V) + ε)``, then the decoupled weight
    decay of GaLore (``W ← W − lr·wd·W``). ``step_size`` is ``adam_step_size(...)``: ``lr·c_t``.
    """
    basis = Basis.of(basis, side)
    G32 = wide(G)
    R = basis.project(G32)
    M.mul_(beta1).add_(R, alpha=1.0 - beta1)
    reduce_dim = 1 if V.shape[1] == 1 and V.shape[0] == G32.shape[0] else 0
    V.mul_(beta2).add_(G32.pow(2).sum(dim=reduce_dim, keepdim=True), alpha=1.0 - beta2)
    numerator = basis.back(M).add_(G32).sub_(basis.back(R))
    apply_update_(W, numerator.div_(V.sqrt().add_(eps)), step_size, 1.0, lr, weight_decay)


def grokfast_ema_(grad: Tensor, mu: Tensor, alpha: float, lamb: float, first: bool) -> None:
    """Grokfast EMA filter (docs/algorithms.md §7), in place: ``μ ← α·μ + (1−α)·g`` (``μ = g`` on the
    ``first`` call), then ``g ← g + λ·μ``. ``mu`` is fp32; ``grad`` is rounded once into its dtype."""
    g32 = grad.float()
    if first:
        mu.copy_(g32)
    else:
        mu.mul_(alpha).add_(g32, alpha=1.0 - alpha)
    grad.copy_(g32 + lamb * mu)


def grokfast_ma_(grad: Tensor, buffer: Tensor, count: Tensor, lamb: float, warmup: bool = True) -> None:
    """Grokfast MA filter (docs/algorithms.md §7), in place: push ``g`` into the fp32 ring ``buffer``
    (w, *g.shape), ``count`` (int64 scalar) counting pushes, then
    ``g ← g + λ·mean(last min(count, w) gradients)``, the current one included; with ``warmup`` only
    once the window is full."""
    w = buffer.shape[0]
    g32 = grad.float()
    buffer[int(count) % w].copy_(g32)
    count.add_(1)
    k = min(int(count), w)
    if warmup and k < w:
        return
    grad.copy_(g32 + lamb * buffer[:k].mean(dim=0))


__all__: Sequence[str] = [
    "Basis",
    "project",
    "back_project",
    "project_any",
    "back_project_any",
    "adam_step_size",
    "lowrank_adam_",
    "apply_update_",
    "galore_matrix_step_",
    "adam_step_",
    "orthonormal_fallback",
    "principal_angle_cosines",
    "captured_energy",
    "transport_matrix",
    "transport_moments_",
    "subset_norm_shape",
    "snsm_matrix_step_",
    "grokfast_ema_",
    "grokfast_ma_",
]
