"""Subset-Norm step size with Subspace-Momentum (Nguyen & Nguyen 2024; docs/algorithms.md §4)."""
from __future__ import annotations

from typing import Iterable, Optional


from .. import ops, reference
from ..projectors import lowrank_shape
from ..distributed import LOCAL, REPLICATE, ROWS
from .base import SubspaceOptimizer

# Keys a low-rank group may carry, with the defaults filled in for missing ones. As GaLoreAdamW's,
# without ``scale`` (SNSM has none).
# Low-rank group keys of this optimizer; the projector adds its own (projectors.Projector.defaults).
SNSM_DEFAULTS = {
    "proj_type": "std",
    "projector": "svd",
    "transport_moments": False,
}


class AdamSNSM(SubspaceOptimizer):
    """Adam with Subset-Norm step sizes and Subspace Momentum for the matrices of low-rank groups.

    Same param-group conventions as ``GaLoreAdamW``: a group with ``rank`` is low-rank (keys
    ``update_proj_gap`` = 200, ``proj_type`` = "std", ``projector`` = "svd" | "randomized" |
    "online_pca" | "gaussian" | "srht", ``transport_moments``, ``stagger``, ``seed``, ``oversample``,
    ``power_iters``); its matrices (m x n, conv viewed as 2-D) take the SNSM step of
    ``reference.snsm_matrix_step_``::

        m̂ ← β1·m̂ + (1−β1)·project(G)                      # r-dim momentum, fp32 (state "exp_avg")
        v ← β2·v + (1−β2)·Σ_small-dim G²                 # (m, 1) if m >= n else (1, n) (state "exp_avg_sq")
        W ← W − lr·c_t·(back(m̂) + G − back(project(G))) / (sqrt(v) + ε),   c_t = sqrt(1−β2^t)/(1−β1^t)

    i.e. momentum inside the subspace and plain SGD on its complement, with one adaptive step size
    per row (column) of the larger dimension. ``m̂`` is reset to 0 whenever a refresh changes the
    basis (every ``update_proj_gap`` steps; for ``"online_pca"`` the basis drifts every step and
    ``m̂`` is kept, as GaLore keeps its moments); with ``transport_moments=True`` it is carried into
    the new basis (``m̂ ← C m̂``, §6) instead of reset. State per matrix: ``m̂``, the basis and
    ``max(m, n)`` accumulators. Weight decay is decoupled, applied to the updated weight (as
    ``GaLoreAdamW``). Everything else (other groups, 1-D parameters) takes ``GaLoreAdamW``'s plain
    AdamW step. ``projector="gaussian"`` uses the orthonormalised (QR) Gaussian basis here: a random
    subspace with an exact complement (the raw Flora scaling does not give one).

    Defaults: ``lr = 1e-2``, 10x ``GaLoreAdamW``'s, following the paper's guidance that SNSM wants an
    LR about 10x Adam's (0.05 vs 0.005 on LLaMA-60M); since non-matrix parameters take Adam at the
    group's LR, give them their own group with an Adam LR. ``eps = 1e-6``, ``betas = (0.9, 0.999)``.

    ``backend`` as in ``GaLoreAdamW``: on the Triton backend the SNSM matrix update is
    ``ops.snsm_matrix_step_``'s fused kernels (projection with the momentum update, and for the "std"
    side the Subset-Norm sum, in its epilogue; back-projection with the weight update in its
    epilogue), and plain parameters take the fused AdamW kernel.
    """

    lowrank_defaults = SNSM_DEFAULTS
    # SNSM's complement term G − back(project(G)) is a complement only for an orthogonal projector:
    # with the raw N(0, 1/r) Gaussian basis its norm grows like sqrt(n/r)·‖G‖ and training diverges.
    orthonormal_bases = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        backend: Optional[str] = None,
        capturable: bool = False,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        capturable=capturable)
        super().__init__(params, defaults, backend=backend)

    def _state_shapes(self, side: str, m: int, n: int, rank: int) -> dict:
        return {"exp_avg": lowrank_shape(side, m, n, rank), "exp_avg_sq": reference.subset_norm_shape(m, n)}

    def _matrix_updates(self, Ws, Gs, bases, states, group: dict, side: str, hyper: dict) -> None:
        ops.snsm_matrices_step_(Ws, Gs, bases, [st["exp_avg"] for st in states],
                                [st["exp_avg_sq"] for st in states], backend=self.backend, side=side, **hyper)

    def _state_placement(self, key, side, m, n):
        if key == "exp_avg_sq":  # one accumulator per row (with the weight's rows) or per column (whole)
            return ROWS if reference.subset_norm_shape(m, n)[1] == 1 else REPLICATE
        return super()._state_placement(key, side, m, n)

    def _rows_local(self, side, m, n):
        # per-column subset norms (m < n) sum G² over all rows: over ranks too
        return side == "right" and reference.subset_norm_shape(m, n)[1] == 1

    def _sharded_update(self, W, G, basis, state, group, side, hyper, comm, R=None) -> None:
        """Row-sharded matrix (reference math on the local rows) whose update needs sums over ranks:
        ``R = Plᵀ G (Pr)`` is all-reduced when the basis has a left part (the complement
        ``G − back(R)`` needs all of it; ``G Pr`` keeps G's rows); the momentum is kept as this
        rank's columns of m̂ ("left", all-gathered for ``back(m̂)``), its rows ("right") or whole
        ("full"); per-column subset norms (m < n) are all-reduced, per-row ones are local."""
        G32 = reference.wide(G)
        n = G32.shape[1]
        beta1, beta2 = hyper["beta1"], hyper["beta2"]
        R = basis.project(G32)
        if basis.left is not None:
            R = comm.sum_(R)
        M, V = state["exp_avg"], state["exp_avg_sq"]
        if side == "left":
            start, count = comm.col_range(n)
            M.mul_(beta1).add_(R[:, start:start + count], alpha=1.0 - beta1)
            M_whole = comm.gather_cols(M, n)
        else:
            M_whole = M.mul_(beta1).add_(R, alpha=1.0 - beta1)
        if reference.subset_norm_shape(comm.global_rows(G32.shape[0]), n)[1] == 1:  # per row: this rank's rows
            V.mul_(beta2).add_(G32.pow(2).sum(dim=1, keepdim=True), alpha=1.0 - beta2)
        else:
            V.mul_(beta2).add_(comm.sum_(G32.pow(2).sum(dim=0, keepdim=True)), alpha=1.0 - beta2)
        step_size, lr = ops._host_step_size(hyper["step_size"], hyper["lr"], hyper.get("step"),
                                            hyper.get("bias_correction"), beta1, beta2, hyper["correct_bias"])
        numerator = basis.back(M_whole).add_(G32).sub_(basis.back(R))
        reference.apply_update_(W, numerator.div_(V.sqrt().add_(hyper["eps"])), step_size, 1.0, lr,
                                hyper["weight_decay"])

    def _on_basis_change(self, state, group: dict, side: str, old, new, refresh: bool, comm=LOCAL) -> None:
        # v lives in the full space: only the subspace momentum is affected by a basis change.
        if group["transport_moments"]:
            reference.transport_moments_(state["exp_avg"], None, old, new, side, comm)
        elif refresh:
            state["exp_avg"].zero_()
