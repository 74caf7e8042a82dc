"""Pure-PyTorch reference of every op: the specification the Triton kernels are tested against.

Conventions (DESIGN.md): a basis ``P`` has orthonormal columns.

* side ``"left"``:  ``P`` is (m, r), ``project(G) = Pᵀ G`` (r, n), ``back_project(R) = P R`` (m, n)
* side ``"right"``: ``P`` is (n, r), ``project(G) = G P`` (m, r), ``back_project(R) = R Pᵀ`` (m, n)
* side ``"full"``:  ``P = (Pl, Pr)``, ``project(G) = Plᵀ G Pr`` (r, r), ``back_project(N) = Pl N Prᵀ``

Everything here runs on any device and in float64, needs no Triton, and computes in the dtype of its
inputs except where noted: 16-bit inputs are upcast to fp32 for the math and rounded once on store,
which is also what the fused kernels do.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

Basis = Union[Tensor, Tuple[Tensor, Tensor]]
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


def project_any(G: Tensor, basis: Basis, side: str) -> Tensor:
    """Projection for every side the optimizers use, ``"full"`` included, computed in fp32."""
    G32 = G.float()
    if side == "full":
        Pl, Pr = basis
        return Pl.float().mT @ G32 @ Pr.float()
    return project(G32, basis.float(), side)


def back_project_any(N: Tensor, basis: Basis, side: str) -> Tensor:
    """Back-projection for every side, ``"full"`` included, computed in fp32."""
    N32 = N.float()
    if side == "full":
        Pl, Pr = basis
        return Pl.float() @ N32 @ Pr.float().mT
    return back_project(N32, basis.float(), side)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool = True) -> float:
    """``lr · sqrt(1-β2^t) / (1-β1^t)`` (galore-torch / HF AdamW form), or ``lr`` without correction."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def lowrank_adam_(R: Tensor, M: Tensor, V: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    """Update the fp32 moments ``M``, ``V`` in place with gradient ``R``; return ``N = M/(sqrt(V)+eps)``.

    The bias correction is not applied here: it is folded into the step size (ALGORITHMS.md §1).
    """
    R32 = R.float()
    M.mul_(beta1).add_(R32, alpha=1.0 - beta1)
    V.mul_(beta2).addcmul_(R32, R32, value=1.0 - beta2)
    return M / (V.sqrt() + eps)


def apply_update_(W: Tensor, D: Tensor, step_size: float, scale: float, lr: float, weight_decay: float) -> None:
    """``W ← W − step·α·D``, then ``W ← W − lr·wd·W`` (decay of the updated weight, galore order).

    Computed in fp32 and rounded once into ``W``'s dtype.
    """
    W32 = W.float()  # W itself when W is fp32, so the update is in place
    W32.add_(D.float(), alpha=-step_size * scale)
    if weight_decay > 0.0:
        W32.add_(W32, alpha=-lr * weight_decay)
    if W32 is not W:
        W.copy_(W32)


def galore_matrix_step_(
    W: Tensor,
    G: Tensor,
    basis: Basis,
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
    R = project_any(G, basis, side)
    N = lowrank_adam_(R, M, V, beta1, beta2, eps)
    apply_update_(W, back_project_any(N, basis, side), step_size, scale, lr, weight_decay)


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


def principal_angle_cosines(P_old: Tensor, P_new: Tensor) -> Tensor:
    """cos θᵢ = σᵢ(P_oldᵀ P_new), descending; 1 means the subspaces share that direction."""
    return torch.linalg.svdvals(P_old.float().mT @ P_new.float()).clamp_(0.0, 1.0)


def captured_energy(G: Tensor, basis: Basis, side: str) -> float:
    """‖project(G)‖² / ‖G‖²: the share of the gradient that the subspace keeps (0 for a zero gradient)."""
    total = G.float().pow(2).sum()
    if total == 0:
        return 0.0
    return float(project_any(G, basis, side).pow(2).sum() / total)


__all__: Sequence[str] = [
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
]
