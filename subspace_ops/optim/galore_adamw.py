"""GaLore AdamW: a drop-in for galore-torch 1.0's ``GaLoreAdamW`` (ALGORITHMS.md §1, §2)."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops, reference
from ..projectors import PROJ_TYPES, PROJECTORS, basis_side, compute_basis, effective_rank, lowrank_shape

# Keys a low-rank group may carry, with the defaults filled in for missing ones (galore-torch's
# defaults for the first three).
LOWRANK_DEFAULTS = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "projector": "svd",
    "oversample": 8,
    "power_iters": 1,
    "stagger": False,
    "seed": 0,
}

# State tensors that are fp32 whatever the parameter's dtype (see load_state_dict).
FP32_STATE = ("exp_avg", "exp_avg_sq")


def _check_number(name: str, value, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}: {value!r}; {want}")


def validate_hyperparameters(group: dict) -> None:
    """Raise a ValueError naming the bad value and the valid range."""
    lr, betas, eps = group.get("lr"), group.get("betas"), group.get("eps")
    if lr is not None:
        lr_value = lr.item() if isinstance(lr, Tensor) else lr
        _check_number("lr", lr, lr_value >= 0.0, "lr must be >= 0")
    if betas is not None:
        for i, b in enumerate(betas):
            _check_number(f"betas[{i}]", b, 0.0 <= b < 1.0, "each beta must be in [0, 1)")
    if eps is not None:
        _check_number("eps", eps, eps >= 0.0, "eps must be >= 0")
    wd = group.get("weight_decay")
    if wd is not None:
        _check_number("weight_decay", wd, wd >= 0.0, "weight_decay must be >= 0")
    if "rank" not in group:
        return
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"invalid rank: {rank!r}; rank must be a positive int (e.g. rank=128)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"invalid update_proj_gap: {gap!r}; must be a positive int (e.g. 200)")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"invalid proj_type: {group['proj_type']!r}; expected one of {PROJ_TYPES}")
    if group["projector"] not in PROJECTORS:
        raise ValueError(f"invalid projector: {group['projector']!r}; expected one of {PROJECTORS}")
    for key in ("oversample", "power_iters"):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"invalid {key}: {v!r}; must be an int >= 0")


class GaLoreAdamW(Optimizer):
    """AdamW whose matrices in groups with a ``rank`` key take their Adam step in a rank-r subspace.

    Accepts galore-torch's param groups unchanged: a group with ``rank`` (and optionally
    ``update_proj_gap`` = 200, ``scale`` = 0.25, ``proj_type`` = "std") is low-rank; other groups are
    plain AdamW (galore-torch's bias correction and eps placement, decoupled weight decay applied to
    the updated weight). Extra low-rank group keys:

    * ``projector``: ``"svd"`` (exact, galore-torch's call) or ``"randomized"`` (range finder with
      ``oversample`` extra columns and ``power_iters`` power iterations, warm-started from the
      previous basis, seeded per parameter from ``seed``, the parameter's index and the step).
    * ``stagger``: when True, parameter number ``i`` (in optimizer order) refreshes when
      ``(step + i) % update_proj_gap == 0`` instead of all at once, so refresh cost is spread.

    Low-rank moments are fp32 whatever the parameter dtype; 1-D parameters in a low-rank group (biases,
    norms) take plain AdamW steps. Matrices of more dimensions (conv) are viewed as
    ``(shape[0], prod(shape[1:]))``. A rank at or above ``min(m, n)`` runs as full rank. A refresh that
    fails (non-finite gradient, SVD not converging) keeps the previous basis and warns once.

    ``backend``: ``None`` / ``"auto"`` (fused Triton kernels for CUDA tensors, the reference path
    otherwise), ``"triton"`` or ``"reference"``; see ``subspace_ops.ops``.
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
    ):
        ops.validate_backend(backend)
        self.backend = backend
        self._warned_refresh = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        validate_hyperparameters(defaults)
        super().__init__(params, defaults)

    # -- param groups -----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in LOWRANK_DEFAULTS.items():
                param_group.setdefault(key, value)
        if "betas" in param_group:
            param_group["betas"] = tuple(param_group["betas"])
        validate_hyperparameters(param_group)
        super().add_param_group(param_group)

    # -- checkpoints ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim's, but the fp32 moments stay fp32 with 16-bit parameters.

        torch.optim casts floating state to the parameter's dtype on load, which would round the
        low-rank moments of a bf16 model to bf16 and change the trajectory after a resume.
        """
        saved = state_dict["state"]
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved or p not in self.state:
                continue
            for key in FP32_STATE:
                if key in saved[pid]:
                    self.state[p][key] = saved[pid][key].to(device=p.device, dtype=torch.float32, copy=True)

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group, index)
                index += 1
        return loss

    def _step_param(self, p: Tensor, group: dict, index: int) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise ValueError(
                f"GaLoreAdamW: parameter {index} (shape {tuple(p.shape)}) has a sparse gradient, which "
                "is not supported; use dense gradients (e.g. nn.Embedding(sparse=False))"
            )
        lowrank = "rank" in group and p.dim() >= 2
        if lowrank and torch.is_complex(p):
            raise ValueError(
                f"GaLoreAdamW: parameter {index} (shape {tuple(p.shape)}) is complex, which a low-rank "
                "group does not support; put it in a group without 'rank'"
            )
        if p.numel() == 0:
            return
        if lowrank:
            self._lowrank_step(p, grad, group, index)
        else:
            self._plain_step(p, grad, group)

    def _hyper(self, group: dict, state: dict) -> dict:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = int(state["step"].item())
        lr = group["lr"]
        lr = float(lr) if not isinstance(lr, Tensor) else lr.item()
        return dict(
            step_size=reference.adam_step_size(lr, beta1, beta2, t, group["correct_bias"]),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

    def _plain_step(self, p: Tensor, grad: Tensor, group: dict) -> None:
        W, G = p, grad
        if torch.is_complex(p):
            W, G = torch.view_as_real(p), torch.view_as_real(grad)
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(W.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(W.shape, dtype=torch.float32, device=p.device)
        hyper = self._hyper(group, state)
        ops.adam_step_(W, G, state["exp_avg"], state["exp_avg_sq"], backend=self.backend, **hyper)

    def _lowrank_step(self, p: Tensor, grad: Tensor, group: dict, index: int) -> None:
        m = p.shape[0]
        n = p.numel() // m
        side = basis_side(group["proj_type"], m, n)
        rank = effective_rank(group["rank"], m, n)
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            shape = lowrank_shape(side, m, n, rank)
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            offset = index % group["update_proj_gap"] if group["stagger"] else 0
            state["refresh_offset"] = torch.tensor(offset, dtype=torch.int64)

        G = grad.reshape(m, n)
        s = int(state["step"].item())
        if "basis" not in state or (s + int(state["refresh_offset"])) % group["update_proj_gap"] == 0:
            self._refresh(state, G, group, side, rank, index, s)

        basis = (state["basis"], state["basis_right"]) if side == "full" else state["basis"]
        hyper = self._hyper(group, state)
        # An in-place view of the weight; a non-contiguous weight is updated through a copy.
        W = p.view(m, n) if p.is_contiguous() else p.reshape(m, n).clone()
        ops.galore_matrix_step_(
            W, G, basis, state["exp_avg"], state["exp_avg_sq"],
            backend=self.backend, side=side, scale=group["scale"], **hyper,
        )
        if W.data_ptr() != p.data_ptr():
            p.copy_(W.view_as(p))

    def _refresh(self, state: dict, G: Tensor, group: dict, side: str, rank: int, index: int, s: int) -> None:
        previous = None
        if "basis" in state:
            previous = (state["basis"], state["basis_right"]) if side == "full" else state["basis"]
        # Seeded from (group seed, parameter index, step): reproducible and resumable from a
        # checkpoint without storing a generator.
        seed = (int(group["seed"]) * 1_000_003 + index) * 1_000_003 + s
        basis = compute_basis(
            G, rank, side, group["projector"], previous=previous, seed=seed,
            oversample=group["oversample"], power_iters=group["power_iters"],
        )
        if basis is None:
            if not self._warned_refresh:
                warnings.warn(
                    f"GaLoreAdamW: could not compute a basis for parameter {index} at step {s} "
                    "(non-finite gradient or SVD did not converge); keeping the previous basis. "
                    "This warning is shown once.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._warned_refresh = True
            if previous is not None:
                return
            m, n = G.shape
            left = reference.orthonormal_fallback(m, rank, G)
            right = reference.orthonormal_fallback(n, rank, G)
            basis = {"left": left, "right": right, "full": (left, right)}[side]
        if side == "full":
            state["basis"], state["basis_right"] = basis
        else:
            state["basis"] = basis
