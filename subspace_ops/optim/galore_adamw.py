"""GaLore AdamW: a drop-in for galore-torch 1.0's ``GaLoreAdamW`` (docs/algorithms.md §1, §2)."""
from __future__ import annotations

from typing import Iterable, Optional


from .. import ops
from ..projectors import lowrank_shape
from .base import FP32_STATE, SubspaceOptimizer, validate_hyperparameters  # noqa: F401 (re-exported)

# Keys a low-rank group may carry, with the defaults filled in for missing ones (galore-torch's
# defaults for the first three).
# Low-rank group keys of this optimizer; the projector adds its own (projectors.Projector.defaults).
LOWRANK_DEFAULTS = {
    "scale": 0.25,
    "proj_type": "std",
    "projector": "svd",
    "transport_moments": False,
}


class GaLoreAdamW(SubspaceOptimizer):
    """AdamW whose matrices in groups with a ``rank`` key take their Adam step in a rank-r subspace.

    Accepts galore-torch's param groups unchanged: a group with ``rank`` (and optionally
    ``update_proj_gap`` = 200, ``scale`` = 0.25, ``proj_type`` = "std") is low-rank; other groups are
    plain AdamW (galore-torch's bias correction and eps placement, decoupled weight decay applied to
    the updated weight). Extra low-rank group keys:

    * ``projector``: ``"svd"`` (exact, galore-torch's call) or ``"randomized"`` (range finder with
      ``oversample`` extra columns and ``power_iters`` power iterations, warm-started from the
      previous basis, seeded per parameter from ``seed``, the parameter's index and the step),
      ``"online_pca"`` (Online Subspace Descent, docs/algorithms.md §3: SVD basis at the first step, then
      one AdamW step on the online-PCA loss per training step, after the weight update, at
      ``lr_t / initial_lr / update_proj_gap``, re-orthonormalised by QR; no periodic SVD),
      ``"gaussian"`` (Flora: N(0, 1/r) projection, not orthonormal) or ``"srht"`` (subsampled
      randomized Hadamard, orthonormal); the last two are regenerated from the seed every step and
      never stored, resampled every ``update_proj_gap`` steps (§5).
    * ``transport_moments``: when True, a basis change carries the moments into the new basis
      (``M ← C M``, ``V ← (C∘C) V``, ``C = P_newᵀ P_old``, §6) instead of keeping stale
      coordinates; False by default, as galore-torch.
    * ``stagger``: when True, parameter number ``i`` (in optimizer order) refreshes when
      ``(step + i) % update_proj_gap == 0`` instead of all at once, so refresh cost is spread.

    ``subspace_stats()`` returns per low-rank matrix the captured gradient energy and the principal
    angles between the old and new basis at the last refresh (see ``SubspaceOptimizer``).

    Low-rank moments are fp32 (float64 for float64 parameters); 1-D parameters in a low-rank group (biases,
    norms) take plain AdamW steps. Matrices of more dimensions (conv) are viewed as
    ``(shape[0], prod(shape[1:]))``. A rank at or above ``min(m, n)`` runs as full rank. A refresh that
    fails (non-finite gradient, SVD not converging) keeps the previous basis and warns once.

    ``backend``: ``None`` / ``"auto"`` (fused Triton kernels for CUDA tensors, the reference path
    otherwise), ``"triton"`` or ``"reference"``; see ``subspace_ops.ops``.

    ``capturable``: step counters live on the parameters' device and the fused kernels read the step
    count and the learning rate (a float, or a tensor on the device that a scheduler updates) from
    device memory, so ``step()`` can be captured in a CUDA graph and replayed. Basis refreshes are
    host decisions (an SVD cannot be captured): they follow a host copy of the step count, which
    counts ``step()`` calls, so run the steps on which a refresh is due (``update_proj_gap``) eagerly
    and replay the graph in between. Without it, a learning rate in a CUDA tensor is still read by
    the kernels, never synced to the host.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
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

    lowrank_defaults = LOWRANK_DEFAULTS

    def _state_shapes(self, side: str, m: int, n: int, rank: int) -> dict:
        shape = lowrank_shape(side, m, n, rank)
        return {"exp_avg": shape, "exp_avg_sq": shape}

    def _matrix_updates(self, Ws, Gs, bases, states, group: dict, side: str, hyper: dict) -> None:
        ops.galore_matrices_step_(
            Ws, Gs, bases, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
            backend=self.backend, side=side, scale=group["scale"], **hyper,
        )

    projects_accumulation = True

    def _projected_updates(self, Ws, Rs, bases, states, group, side, hyper) -> None:
        adam = dict(backend=self.backend, beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"])
        Ns = [ops.lowrank_adam_(R, st["exp_avg"], st["exp_avg_sq"], **adam) for R, st in zip(Rs, states)]
        ops.back_updates_(Ws, Ns, bases, backend=self.backend, side=side, scale=group["scale"], **hyper)

    def _sharded_update(self, W, G, basis, state, group, side, hyper, comm, R=None) -> None:
        """Row-sharded "left" / "full" matrix: ``R = Plᵀ G (Pr)`` is a sum over ranks. Left: a
        reduce-scatter hands each rank its columns of R, Adam runs on this rank's columns of the
        moments (1/world of them), and an all-gather of the direction N (r x n) feeds the local
        back-projection. Full: R (r x r) is all-reduced and the tiny moments are kept whole."""
        if R is None:
            R = basis.project(G)  # this rank's rows' share, fp32 (float64 for float64)
            R = comm.scatter_cols(R) if side == "left" else comm.sum_(R)
        adam = dict(backend=self.backend, beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"])
        N = ops.lowrank_adam_(R, state["exp_avg"], state["exp_avg_sq"], **adam)
        if side == "left":
            N = comm.gather_cols(N, W.shape[1])
        ops.back_updates_([W], [N], [basis], backend=self.backend, side=side, scale=group["scale"], **hyper)
