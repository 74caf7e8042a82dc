"""Online Subspace Descent: the basis follows the gradient by one AdamW step on the online-PCA loss
per training step (docs/algorithms.md §3)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..distributed import LOCAL, all_finite, owner_compute
from .base import STATE_KEYS, Basis, Projector, orthonormalize, register
from .svd import exact_basis


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


def online_pca_grad(G: Tensor, P: Tensor, side: str, comm=LOCAL) -> Tensor:
    """Closed-form ``∇_P`` of ``online_pca_loss`` in fp32 (float64 for float64 inputs), no autograd.

    Left, with ``A = Pᵀ Ĝ`` (r x n): ``2 [R Ĝᵀ P + Ĝ Rᵀ P] = 2 [P (A Aᵀ) + (Ĝ Aᵀ)(PᵀP − 2I)]``,
    ``R = (P Pᵀ − I) Ĝ``, never forming the m x n residual: ≈ 4·m·n·r flops. The right side is the
    left side of ``Gᵀ`` (the loss is invariant under transposition).

    ``comm`` shards G's rows (``subspace_ops.distributed``): then a left ``P`` is this rank's rows
    and the gradient comes back as this rank's rows; a right ``P`` (n x r) is whole everywhere.
    Communication: sums of r x n (left) or n x r (right) and r x r matrices, and of ‖G‖².
    """
    G = _wide(G)
    norm = comm.sum_(G.pow(2).sum()).sqrt()
    P = _wide(P).to(G.dtype)
    eye = torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
    if side == "left":  # Ĝ's rows are G's rows: sharded like P
        Gh = G / norm
        A = comm.sum_(P.mT @ Gh)
        AAt, GA, PtP = A @ A.mT, Gh @ A.mT, comm.sum_(P.mT @ P)
    elif side == "right":  # Ĝ = Gᵀ/‖G‖: its columns are G's rows, A's columns too
        Gh = G.mT / norm
        A = P.mT @ Gh
        AAt, GA, PtP = comm.sum_(A @ A.mT), comm.sum_(Gh @ A.mT), P.mT @ P
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return 2.0 * (P @ AAt + GA @ (PtP - 2.0 * eye))


def adamw_(P: Tensor, grad: Tensor, M: Tensor, V: Tensor, step: int, lr: float,
           betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
    """torch.optim.AdamW's single-tensor update of fp32 ``P`` in place (decay first, bias-corrected)."""
    beta1, beta2 = betas
    P.mul_(1.0 - lr * weight_decay)
    g = grad.to(M.dtype)  # the moments are fp32 state; a float64 basis's gradient is float64
    M.lerp_(g, 1.0 - beta1)
    V.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (V.sqrt() / (1.0 - beta2**step) ** 0.5).add_(eps)
    P.addcdiv_(M, denom, value=-lr / (1.0 - beta1**step))


def online_pca_update(P: Tensor, G: Tensor, M: Tensor, V: Tensor, step: int, lr: float, side: str,
                      comm=LOCAL, **adamw) -> Optional[Tensor]:
    """One Online Subspace Descent step on the basis ``P`` for gradient ``G``; returns the new basis.

    Variant (official code): one AdamW step (``ONLINE_PCA_ADAMW``, fp32 moments ``M``/``V`` updated in
    place, ``step`` counting these updates) on the online-PCA loss at the current ``P``, then a
    re-orthonormalisation by QR (``orthonormalize``; the official code never re-orthonormalises, we do
    it every step so that ``P`` always has orthonormal columns, for ≈ 2·rows·r² flops). Returns
    ``None`` and leaves ``M``/``V`` untouched when ``G`` is zero or not finite. ``comm``: as in
    ``online_pca_grad`` (a left ``P``, ``M``, ``V`` are this rank's rows; the QR is then a TSQR).
    """
    norm2 = comm.sum_(G.float().pow(2).sum())
    meta = G.device.type == "meta"  # memory estimates (bench/memory.py): no values to check
    if not meta and (not bool(torch.isfinite(norm2)) or float(norm2) == 0.0):
        return None
    opts = {**ONLINE_PCA_ADAMW, **adamw}
    P32 = _wide(P).clone()  # float64 bases stay float64
    adamw_(P32, online_pca_grad(G, P32, side, comm), M, V, step, lr, **opts)
    Q = comm.orthonormalize(P32) if side == "left" else orthonormalize(P32)
    if not all_finite(comm if side == "left" else LOCAL, Q):
        return None
    return Q.to(P.dtype)


def _as_basis(obj, side: str):
    return None if obj is None else Basis.of(obj, side)


def _float(x) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


@register
class OnlinePCAProjector(Projector):
    """``projector="online_pca"``: an SVD basis at the first step, then one AdamW step on the
    online-PCA loss after every weight update, at ``(lr_t / initial_lr) / update_proj_gap`` (the
    official code's schedule; ``initial_lr`` is what torch LR schedulers store in the group), and a QR.
    No periodic SVD: the diagnostics record the basis step taken on the ``update_proj_gap`` schedule."""

    name = "online_pca"
    fp32_state = ("proj_exp_avg", "proj_exp_avg_sq", "proj_exp_avg_right", "proj_exp_avg_sq_right", "proj_step")

    def refresh_due(self, state, group, s):
        return not self.has_basis(state)  # refreshed only by its own steps after the SVD start

    shards_rows = True

    def compute(self, G, rank, side, group, *, index, step, previous=None, comm=LOCAL):
        if not comm.sharded:
            return exact_basis(G, rank, side)
        basis = owner_compute(comm, G, side, rank, index % comm.world,
                              lambda whole: _as_basis(exact_basis(whole, rank, side), side))
        return None if basis is None else basis.legacy()

    def state_placement(self, key, side):
        base = key.replace("proj_exp_avg_sq", "basis").replace("proj_exp_avg", "basis")
        return super().state_placement(base, side)

    def store(self, state, basis, side, step):
        super().store(state, basis, side, step)
        if "proj_step" in state:
            return
        for suffix, P in zip(("", "_right"), basis.parts):
            dtype = torch.float64 if P.dtype == torch.float64 else torch.float32  # reference.state_dtype
            state["proj_exp_avg" + suffix] = torch.zeros(P.shape, dtype=dtype, device=P.device)
            state["proj_exp_avg_sq" + suffix] = torch.zeros(P.shape, dtype=dtype, device=P.device)
        state["proj_step"] = torch.zeros((), dtype=torch.float32)

    def state_shapes(self, side, m, n, rank):
        shapes = dict(super().state_shapes(side, m, n, rank))
        for suffix, key in zip(("", "_right"), STATE_KEYS):
            if key in shapes:
                shapes["proj_exp_avg" + suffix] = shapes["proj_exp_avg_sq" + suffix] = shapes[key]
        shapes["proj_step"] = ()
        return shapes

    def after_update(self, state, G, basis, group, side, *, index, step, comm=LOCAL):
        lr = _float(group["lr"])
        lr0 = _float(group.get("initial_lr", lr))
        lr_proj = (lr / lr0 if lr0 != 0.0 else 0.0) / group["update_proj_gap"]
        t = int(state["proj_step"].item()) + 1
        parts = []  # each part takes its own step, on its own side ("full": left, then right)
        for suffix, part_side, P in zip(("", "_right"), Basis.part_sides(side), basis.parts):
            new = online_pca_update(P, G, state["proj_exp_avg" + suffix], state["proj_exp_avg_sq" + suffix], t,
                                    lr_proj, part_side, comm)
            if new is None:
                return None
            parts.append(new)
        new = Basis.from_parts(side, parts)
        super().store(state, new, side, step)
        state["proj_step"].fill_(t)
        on_schedule = (step + state["refresh_offset"].item()) % group["update_proj_gap"] == 0
        return basis, new, on_schedule
