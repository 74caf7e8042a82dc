"""The ops behind the optimizers, and how each call picks its implementation.

``project`` / ``back_project`` are ``torch.library`` custom ops (``torch.ops.subspace_ops.*``) with
autograd formulas for both inputs and fake (meta) kernels, so they differentiate and trace under
``torch.compile(fullgraph=True)``. ``galore_matrix_step_`` / ``snsm_matrix_step_`` / ``adam_step_`` /
``lowrank_adam_`` are the optimizers' in-place steps: on the Triton backend a composition of the fused
kernels in ``subspace_ops.kernels`` (projection with the Adam or momentum update in its epilogue, then
back-projection with the weight update in its epilogue), else ``subspace_ops.reference``.

Backend choice (``resolve_backend``): ``backend=None`` reads ``SUBSPACE_OPS_BACKEND`` at call time
(unset or empty = ``"auto"``). ``"auto"`` is Triton for CUDA tensors of fp32/fp16/bf16 when Triton is
installed, the reference otherwise. ``"triton"`` on CPU tensors runs the kernels in Triton's CPU
interpreter and is allowed only under ``TRITON_INTERPRET=1`` (how CI tests the kernels).
``"reference"`` is always available. The custom ops take no backend argument: they honour the
environment variable, so ``SUBSPACE_OPS_BACKEND=triton TRITON_INTERPRET=1`` runs them on CPU in
the interpreter.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import kernels as _kernels
from . import reference
from .basis import Basis

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "SUBSPACE_OPS_BACKEND"
SIDES = ("left", "right")
STEP_SIDES = ("left", "right", "full")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BasisLike = Union[Basis, Tensor, Tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------------
def validate_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def _check_triton_usable(like: Tensor) -> None:
    if not _kernels.HAS_TRITON:
        raise ValueError(
            "backend 'triton' needs the triton package, which is not installed: `pip install triton`, "
            f"or use backend='reference' ({ENV_VAR}=reference)"
        )
    if like.device.type in ("cpu", "meta") and _launches_intercepted():
        pass  # bench/codegen.py: kernels are compiled for a GPU target (or counted), never run
    elif like.device.type == "cpu":
        if not _kernels.interpreting():
            raise ValueError(
                "backend 'triton' on CPU tensors runs only in Triton's CPU interpreter: set "
                "TRITON_INTERPRET=1 in the environment before triton is imported, or move the tensors "
                f"to a CUDA device, or use backend='reference' ({ENV_VAR}=reference)"
            )
    elif like.device.type != "cuda":
        raise ValueError(
            f"backend 'triton' supports CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), got a "
            f"tensor on {like.device}; use backend='reference' ({ENV_VAR}=reference)"
        )
    if like.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"backend 'triton' supports dtypes {TRITON_DTYPES}, got {like.dtype}; use "
            f"backend='reference' ({ENV_VAR}=reference) or 'auto'"
        )


def _launches_intercepted() -> bool:
    from .kernels import _common

    return _common.launches_intercepted()


def resolve_backend(backend: Optional[str], like: Tensor) -> str:
    """The concrete backend (``"triton"`` or ``"reference"``) for tensors like ``like``."""
    validate_backend(backend)
    if backend is None:
        backend = os.environ.get(ENV_VAR, "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS} (or unset), got {backend!r}")
    if backend == "auto":
        fast = like.device.type == "cuda" and _kernels.HAS_TRITON and like.dtype in TRITON_DTYPES
        return "triton" if fast else "reference"
    if backend == "triton":
        _check_triton_usable(like)
    return backend


# ---------------------------------------------------------------------------------------------------
# project / back_project: custom ops
# ---------------------------------------------------------------------------------------------------
def _check_2d_pair(name_a: str, a: Tensor, P: Tensor, side: str, op: str) -> None:
    if side not in SIDES:
        raise ValueError(f"{op}: side must be 'left' or 'right', got {side!r}")
    if a.dim() != 2 or P.dim() != 2:
        raise ValueError(f"{op}: {name_a} and P must be 2-D, got shapes {tuple(a.shape)} and {tuple(P.shape)}")
    if a.dtype != P.dtype:
        raise ValueError(f"{op}: {name_a} and P must have one dtype, got {a.dtype} and {P.dtype}")
    if a.device != P.device:
        raise ValueError(f"{op}: {name_a} and P must be on one device, got {a.device} and {P.device}")


@torch.library.custom_op("subspace_ops::project", mutates_args=())
def _project_op(G: Tensor, P: Tensor, side: str) -> Tensor:
    if resolve_backend(None, G) == "triton":
        from .kernels import project as _kproject

        return _kproject.project(G, P, side)
    return reference.project(G, P, side)


@_project_op.register_fake
def _project_fake(G: Tensor, P: Tensor, side: str) -> Tensor:
    shape = (P.shape[1], G.shape[1]) if side == "left" else (G.shape[0], P.shape[1])
    return G.new_empty(shape)


@torch.library.custom_op("subspace_ops::back_project", mutates_args=())
def _back_project_op(R: Tensor, P: Tensor, side: str) -> Tensor:
    if resolve_backend(None, R) == "triton":
        from .kernels import backproject as _kback

        return _kback.back_project(R, P, side)
    return reference.back_project(R, P, side)


@_back_project_op.register_fake
def _back_project_fake(R: Tensor, P: Tensor, side: str) -> Tensor:
    shape = (P.shape[0], R.shape[1]) if side == "left" else (R.shape[0], P.shape[0])
    return R.new_empty(shape)


def _setup_context(ctx, inputs, output) -> None:
    x, P, side = inputs
    ctx.side = side
    ctx.save_for_backward(x, P)


def _project_backward(ctx, grad: Tensor):
    # left:  R = Pᵀ G  ->  dG = P dR,  dP = G dRᵀ
    # right: R = G P   ->  dG = dR Pᵀ, dP = Gᵀ dR = (dRᵀ G)ᵀ
    G, P = ctx.saved_tensors
    dG = dP = None
    if ctx.needs_input_grad[0]:
        dG = back_project(grad, P, ctx.side)
    if ctx.needs_input_grad[1]:
        dP = project(G, grad.mT, "right") if ctx.side == "left" else project(G, grad, "left").mT
    return dG, dP, None


def _back_project_backward(ctx, grad: Tensor):
    # left:  B = P R   ->  dR = Pᵀ dB, dP = dB Rᵀ
    # right: B = R Pᵀ  ->  dR = dB P,  dP = dBᵀ R = (Rᵀ dB)ᵀ
    R, P = ctx.saved_tensors
    dR = dP = None
    if ctx.needs_input_grad[0]:
        dR = project(grad, P, ctx.side)
    if ctx.needs_input_grad[1]:
        dP = project(grad, R.mT, "right") if ctx.side == "left" else project(grad, R, "left").mT
    return dR, dP, None


_project_op.register_autograd(_project_backward, setup_context=_setup_context)
_back_project_op.register_autograd(_back_project_backward, setup_context=_setup_context)


def project(G: Tensor, P: Tensor, side: str) -> Tensor:
    """``Pᵀ G`` (side="left", P (m, r) -> (r, n)) or ``G P`` (side="right", P (n, r) -> (m, r)).

    Differentiable in both inputs; traceable by ``torch.compile(fullgraph=True)``.
    """
    _check_2d_pair("G", G, P, side, "project")
    want = G.shape[0] if side == "left" else G.shape[1]
    if P.shape[0] != want:
        raise ValueError(
            f"project: side {side!r} needs P of shape ({want}, r) for G of shape {tuple(G.shape)}, "
            f"got {tuple(P.shape)}"
        )
    return torch.ops.subspace_ops.project(G, P, side)


def back_project(R: Tensor, P: Tensor, side: str) -> Tensor:
    """``P R`` (side="left", R (r, n) -> (m, n)) or ``R Pᵀ`` (side="right", R (m, r) -> (m, n))."""
    _check_2d_pair("R", R, P, side, "back_project")
    r = R.shape[0] if side == "left" else R.shape[1]
    if P.shape[1] != r:
        raise ValueError(
            f"back_project: side {side!r} needs P with {r} columns for R of shape {tuple(R.shape)}, "
            f"got P of shape {tuple(P.shape)}"
        )
    return torch.ops.subspace_ops.back_project(R, P, side)


# ---------------------------------------------------------------------------------------------------
# In-place optimizer steps
# ---------------------------------------------------------------------------------------------------
def _step_bases(bases, side: str) -> list:
    """``bases`` as ``Basis`` objects for ``side`` (``Basis.of``: the optimizer's pass through as they
    are; a Tensor or a pair is wrapped), a ValueError for a bad side or basis."""
    if side not in STEP_SIDES:
        raise ValueError(f"side must be one of {STEP_SIDES}, got {side!r}")
    of = Basis.of
    return [of(b, side) for b in bases]


# A grouped step stacks each intermediate (the Adam direction N, SNSM's D, the "full" side's T and
# Y) of all its matrices in one workspace; past this many bytes the group is launched in chunks.
WORKSPACE_CAP_BYTES = 256 * 2**20


def _layout(W, G, P, M, V) -> tuple:
    """What one grouped launch needs its matrices to share (kernels/_common.py check_group): shapes,
    strides and dtypes, and the device (every tensor of a matrix must be on its weight's). Written
    out, not looped: this runs once per matrix per step (host cost)."""
    return (W.device, W.shape, W.stride(), W.dtype, G.shape, G.stride(), G.dtype, P.shape, P.stride(), P.dtype,
            M.shape, M.stride(), M.dtype, V.shape, V.stride(), V.dtype)


def _chunks(count: int, keys, bytes_per_matrix: int):
    """Index lists of matrices that one launch can take: same layout key, bounded workspace."""
    by_key: dict = {}
    for i in range(count):
        by_key.setdefault(keys[i], []).append(i)
    size = max(1, WORKSPACE_CAP_BYTES // max(1, bytes_per_matrix))
    for idx in by_key.values():
        for j in range(0, len(idx), size):
            yield idx[j:j + size]


def _project_group(*args, **kwargs):
    from .kernels import project as _kproject

    return _kproject.launch_group(*args, same_layout=True, **kwargs)  # layouts: grouped by _layout


def _back_project_group(*args, **kwargs):
    from .kernels import backproject as _kback

    return _kback.launch_group(*args, same_layout=True, **kwargs)


def _host_step_size(step_size, lr, step, bias_correction, beta1, beta2, correct_bias) -> tuple:
    """(step_size, lr) as host floats, for the reference path (reads device values: a sync)."""
    if step_size is not None and not isinstance(lr, Tensor) and step is None:
        return step_size, lr
    lr_f = float(lr)
    if step is not None:
        return reference.adam_step_size(lr_f, beta1, beta2, int(round(float(step))), correct_bias), lr_f
    return lr_f * bias_correction, lr_f


def _device_hyper(step_size, lr, step, bias_correction, beta1, beta2, correct_bias, scale, weight_decay):
    """A kernels DeviceHyper when the learning rate or the step count lives in a tensor (capturable
    steps, a scheduler's tensor lr: no host sync), else None (host scalars)."""
    if step is None and not isinstance(lr, Tensor):
        return None
    from .kernels._common import DeviceHyper

    if step is None and bias_correction is None:
        raise ValueError("a tensor lr needs bias_correction (the host's sqrt(1-b2^t)/(1-b1^t)) or a step tensor")
    tensor_lr = isinstance(lr, Tensor)
    return DeviceHyper(lr=lr if tensor_lr else None, step=step, lr_value=0.0 if tensor_lr else float(lr),
                       bias_correction=1.0 if bias_correction is None else bias_correction, beta1=beta1,
                       beta2=beta2, correct_bias=correct_bias, scale=scale,
                       weight_decay=weight_decay if weight_decay > 0.0 else 0.0)


def _resolve(backend, Ws) -> tuple:
    """``(backend, None)`` when every tensor of the list resolves to one backend (the usual case),
    else ``(None, [(backend, indices), ...])``: with ``auto`` a float64 or CPU weight takes the
    reference while the rest of its batch takes the kernels. Resolved once per (device, dtype)."""
    dtype, device = Ws[0].dtype, Ws[0].device
    if all(W.dtype == dtype and W.device == device for W in Ws):  # one compare per matrix (host cost)
        return resolve_backend(backend, Ws[0]), None
    seen, out = {}, {}
    for i, W in enumerate(Ws):
        key = (W.device, W.dtype)
        be = seen.get(key)
        if be is None:
            be = seen[key] = resolve_backend(backend, W)
        out.setdefault(be, []).append(i)
    if len(out) == 1:
        return next(iter(out)), None
    return None, list(out.items())


def _update_scalars(step_size, lr, step, bias_correction, beta1, beta2, correct_bias, scale, weight_decay):
    """``(device_hyper, alpha, decay)`` of a weight-update launch: host scalars ``alpha = -step·scale``
    and ``decay = -lr·wd`` (0 skips it), or a DeviceHyper the kernel forms them from."""
    dh = _device_hyper(step_size, lr, step, bias_correction, beta1, beta2, correct_bias, scale, weight_decay)
    if dh is not None:
        return dh, 0.0, 0.0
    return None, -step_size * scale, (-lr * weight_decay if weight_decay > 0.0 else 0.0)


def _plan_one_side(Ws, Gs, Ps, Ms, Vs):
    """(low-rank shape, chunks) of a one-sided grouped step: matrices of one layout per launch, the
    stacked intermediate (low-rank shape, basis dtype) within the workspace cap."""
    keys = [_layout(W, G, P, M, V) for W, G, P, M, V in zip(Ws, Gs, Ps, Ms, Vs)]
    low = tuple(Ms[0].shape)
    return low, _chunks(len(Ws), keys, Ps[0].element_size() * low[0] * low[1])


def _plan_full(Ws, Gs, Pls, Prs, Ms, Vs):
    """((m, n, r1, r2), chunks) of a "full" grouped step: its intermediates are T (r1 x n, fp32), the
    r1 x r2 direction (fp32) and Y (m x r2, basis dtype)."""
    keys = [_layout(W, G, Pl, M, V) + (Pr.shape, Pr.stride(), Pr.dtype)
            for W, G, Pl, Pr, M, V in zip(Ws, Gs, Pls, Prs, Ms, Vs)]
    m, n = Ws[0].shape
    r1, r2 = Pls[0].shape[1], Prs[0].shape[1]
    per = 4 * (r1 * n + r1 * r2) + Prs[0].element_size() * m * r2
    return (m, n, r1, r2), _chunks(len(Ws), keys, per)


def _pick(seq, idx):
    from .kernels._common import Column  # a list that computes its data pointers once

    return Column([seq[i] for i in idx])


def _product_dtype(P: Tensor) -> torch.dtype:
    """The dtype a back-projection multiplies in (the basis dtype: 16-bit tensor cores for 16-bit
    bases), so the intermediate that feeds it is stored in that dtype: the rounding the product
    would apply anyway, done once at the store, and half the traffic of fp32."""
    return P.dtype


def galore_matrices_step_(
    Ws,
    Gs,
    bases,
    Ms,
    Vs,
    *,
    backend: Optional[str] = None,
    side: str,
    step_size: Optional[float],
    scale: float,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Optional[Tensor] = None,
    bias_correction: Optional[float] = None,
    correct_bias: bool = True,
) -> None:
    """``galore_matrix_step_`` for a list of matrices sharing one side and hyperparameters.

    Triton: the matrices of one layout (shape, strides, dtypes) take each stage in one launch, so a
    model's step costs a few launches per distinct shape instead of two per matrix. The result is
    bit-identical to one call per matrix (the same kernels; the group only offsets the pointers).

    Step size: ``step_size`` (host float, ``lr·c_t``) normally. When ``lr`` is a tensor on the
    device (pass ``bias_correction`` = the host's ``c_t = sqrt(1-β2^t)/(1-β1^t)``) or ``step`` is
    a device tensor holding this step's count (capturable), ``step_size`` may be None: the kernels
    read those values from device memory (``kernels._common.DeviceHyper``), with no host sync. The
    reference path reads them on the host.
    """
    bases = _step_bases(bases, side)
    hyper = dict(beta1=beta1, beta2=beta2, eps=eps)
    if not Ws:
        return
    be, split = _resolve(backend, Ws)
    if split is not None:
        for be, idx in split:
            galore_matrices_step_(*(list(_pick(x, idx)) for x in (Ws, Gs, bases, Ms, Vs)), backend=be, side=side,
                                  step_size=step_size, scale=scale, lr=lr, weight_decay=weight_decay, step=step,
                                  bias_correction=bias_correction, correct_bias=correct_bias, **hyper)
        return
    if be == "reference":
        step_size, lr = _host_step_size(step_size, lr, step, bias_correction, beta1, beta2, correct_bias)
        update = dict(step_size=step_size, scale=scale, lr=lr, weight_decay=weight_decay)
        for W, G, basis, M, V in zip(Ws, Gs, bases, Ms, Vs):
            reference.galore_matrix_step_(W, G, basis, M, V, side=side, **update, **hyper)
        return
    from .kernels import backproject as _kback
    from .kernels import project as _kproject
    from .kernels._common import workspace

    dh, alpha, decay = _update_scalars(step_size, lr, step, bias_correction, beta1, beta2, correct_bias, scale,
                                       weight_decay)
    if side == "full":  # the kernel composition needs the two parts apart: a GEMM on each side
        Pls, Prs = [b.left for b in bases], [b.right for b in bases]
        (m, n, r1, r2), chunks = _plan_full(Ws, Gs, Pls, Prs, Ms, Vs)
        for idx in chunks:
            Pr0 = Prs[idx[0]]
            dev = Pr0.device
            Ts = workspace("galore.T", len(idx), (r1, n), torch.float32, dev)
            Ns = workspace("galore.N_full", len(idx), (r1, r2), torch.float32, dev)
            Ys = workspace("galore.Y", len(idx), (m, r2), _product_dtype(Pr0), dev)
            _project_group(_pick(Gs, idx), _pick(Pls, idx), "left", _kproject.STORE, Ts)
            _project_group(Ts, _pick(Prs, idx), "right", _kproject.ADAM, Ns, Ms=_pick(Ms, idx), Vs=_pick(Vs, idx),
                           **hyper)
            _back_project_group(Ns, _pick(Pls, idx), "left", Ys, 0.0, 0.0, _kback.STORE, None)
            _back_project_group(Ys, _pick(Prs, idx), "right", _pick(Ws, idx), alpha, decay, _kback.UPDATE,
                                Pr0.dtype, device_hyper=dh)
        return
    bases = [b.parts[0] for b in bases]  # one side: its one tensor
    low, chunks = _plan_one_side(Ws, Gs, bases, Ms, Vs)
    for idx in chunks:
        P0 = bases[idx[0]]
        Ns = workspace("galore.N", len(idx), low, _product_dtype(P0), P0.device)
        Ps = _pick(bases, idx)
        _project_group(_pick(Gs, idx), Ps, side, _kproject.ADAM, Ns, Ms=_pick(Ms, idx), Vs=_pick(Vs, idx), **hyper)
        _back_project_group(Ns, Ps, side, _pick(Ws, idx), alpha, decay, _kback.UPDATE, P0.dtype, device_hyper=dh)


def galore_matrix_step_(
    W: Tensor,
    G: Tensor,
    basis: BasisLike,
    M: Tensor,
    V: Tensor,
    *,
    backend: Optional[str] = None,
    side: str,
    step_size: Optional[float],
    scale: float,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Optional[Tensor] = None,
    bias_correction: Optional[float] = None,
    correct_bias: bool = True,
) -> None:
    """One GaLore AdamW update of a 2-D weight ``W`` (in place) and its fp32 moments ``M``, ``V``
    (see ``reference.galore_matrix_step_``).

    Triton: two kernels per matrix for one side, ``N = adam(project(G))`` with M, V updated in the
    projection's epilogue, then ``W ← (W − step·α·back_project(N))·(1 − lr·wd)`` in the
    back-projection's epilogue. The back-projection multiplies on the basis dtype's tensor cores, so
    N is stored in the basis dtype, rounded once (2^-9 relative for bf16, far below the rounding of a
    bf16 weight; fp32 bases stay exact fp32). Side ``"full"`` (``R = Plᵀ G Pr``, back
    ``(Pl N) Prᵀ``, the reference's association) adds one small GEMM on each side: ``Plᵀ G`` (r x n,
    fp32), then ``(·) Pr`` with the Adam epilogue; ``Pl N`` (m x r, basis dtype), then ``(·) Prᵀ``
    with the weight update. ``galore_matrices_step_`` does the same for many matrices per launch.
    """
    galore_matrices_step_([W], [G], [basis], [M], [V], backend=backend, side=side, step_size=step_size,
                          scale=scale, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                          step=step, bias_correction=bias_correction, correct_bias=correct_bias)


def back_updates_(
    Ws,
    Ns,
    bases,
    *,
    backend: Optional[str] = None,
    side: str,
    step_size: Optional[float],
    scale: float,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float = 0.0,
    step: Optional[Tensor] = None,
    bias_correction: Optional[float] = None,
    correct_bias: bool = True,
) -> None:
    """``W ← (W − step·scale·back(N))·(1 − lr·wd)`` for matrices whose low-rank Adam direction ``N``
    is already known (the second half of ``galore_matrices_step_``): FSDP2's row-sharded left side,
    where N comes from moments split over ranks. ``eps`` is accepted and unused (the step's
    hyperparameters pass through as they are).

    Triton: the back-projection kernel with the weight update in its epilogue, per matrix (side
    "full": ``Y = Pl N`` first, in the basis dtype, then ``Y Prᵀ`` with the update). Reference:
    ``reference.apply_update_`` of ``Basis.back(N)``."""
    bases = _step_bases(bases, side)
    if not Ws:
        return
    be, split = _resolve(backend, Ws)
    hyper = dict(side=side, step_size=step_size, scale=scale, lr=lr, beta1=beta1, beta2=beta2,
                 weight_decay=weight_decay, step=step, bias_correction=bias_correction, correct_bias=correct_bias)
    if split is not None:
        for be, idx in split:
            back_updates_(*(list(_pick(x, idx)) for x in (Ws, Ns, bases)), backend=be, **hyper)
        return
    if be == "reference":
        step_size, lr = _host_step_size(step_size, lr, step, bias_correction, beta1, beta2, correct_bias)
        for W, N, basis in zip(Ws, Ns, bases):
            reference.apply_update_(W, basis.back(N), step_size, scale, lr, weight_decay)
        return
    from .kernels import backproject as _kback

    dh, alpha, decay = _update_scalars(step_size, lr, step, bias_correction, beta1, beta2, correct_bias, scale,
                                       weight_decay)
    for W, N, basis in zip(Ws, Ns, bases):
        last = basis.parts[-1]
        if side == "full":
            Y = torch.empty((W.shape[0], N.shape[1]), dtype=_product_dtype(last), device=W.device)
            _kback.launch_group([N.to(basis.left.dtype).contiguous()], [basis.left], "left", [Y], 0.0, 0.0,
                                _kback.STORE, None)
            N, side_last = Y, "right"
        else:
            N, side_last = N.to(_product_dtype(last)).contiguous(), side
        _kback.launch_group([N], [last], side_last, [W], alpha, decay, _kback.UPDATE, last.dtype, device_hyper=dh)


def snsm_matrices_step_(
    Ws,
    Gs,
    bases,
    Ms,
    Vs,
    *,
    backend: Optional[str] = None,
    side: str,
    step_size: Optional[float],
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Optional[Tensor] = None,
    bias_correction: Optional[float] = None,
    correct_bias: bool = True,
) -> None:
    """``snsm_matrix_step_`` for a list of matrices sharing one side and hyperparameters (grouped
    launches as in ``galore_matrices_step_``)."""
    bases = _step_bases(bases, side)
    if not Ws:
        return
    be, split = _resolve(backend, Ws)
    if split is not None:
        for be, idx in split:
            snsm_matrices_step_(*(list(_pick(x, idx)) for x in (Ws, Gs, bases, Ms, Vs)), backend=be, side=side,
                                step_size=step_size, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay, step=step, bias_correction=bias_correction,
                                correct_bias=correct_bias)
        return
    if be == "reference":
        step_size, lr = _host_step_size(step_size, lr, step, bias_correction, beta1, beta2, correct_bias)
        hyper = dict(step_size=step_size, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        for W, G, basis, M, V in zip(Ws, Gs, bases, Ms, Vs):
            reference.snsm_matrix_step_(W, G, basis, M, V, side=side, **hyper)
        return
    from .kernels import backproject as _kback
    from .kernels import project as _kproject
    from .kernels import subset_norm as _ksn
    from .kernels._common import workspace

    dh, alpha, decay = _update_scalars(step_size, lr, step, bias_correction, beta1, beta2, correct_bias, 1.0,
                                       weight_decay)
    m, n = Ws[0].shape
    if side == "full":  # the kernel composition needs the two parts apart: a GEMM on each side
        Pls, Prs = [b.left for b in bases], [b.right for b in bases]
        (m, n, r1, r2), chunks = _plan_full(Ws, Gs, Pls, Prs, Ms, Vs)
        for idx in chunks:
            Pr0 = Prs[idx[0]]
            dev = Pr0.device
            for i in idx:
                _ksn.subset_norm_(Gs[i], Vs[i], beta2=beta2)
            Ts = workspace("snsm.T", len(idx), (r1, n), torch.float32, dev)
            Ds = workspace("snsm.D_full", len(idx), (r1, r2), torch.float32, dev)
            Ys = workspace("snsm.Y", len(idx), (m, r2), _product_dtype(Pr0), dev)
            _project_group(_pick(Gs, idx), _pick(Pls, idx), "left", _kproject.STORE, Ts)
            _project_group(Ts, _pick(Prs, idx), "right", _kproject.MOMENTUM, Ds, Ms=_pick(Ms, idx), beta1=beta1)
            _back_project_group(Ds, _pick(Pls, idx), "left", Ys, 0.0, 0.0, _kback.STORE, None)
            _back_project_group(Ys, _pick(Prs, idx), "right", _pick(Ws, idx), alpha, decay, _kback.SNSM_UPDATE,
                                Pr0.dtype, Gs=_pick(Gs, idx), Vs=_pick(Vs, idx), eps=eps, device_hyper=dh)
        return
    bases = [b.parts[0] for b in bases]  # one side: its one tensor
    low, chunks = _plan_one_side(Ws, Gs, bases, Ms, Vs)
    # The fused sum of squares for 16-bit gradients; fp32 ones take the standalone pass (fused into
    # the fp32 FMA GEMM it spills registers on sm_80: python -m bench --compile-only sm_80).
    fused_v = tuple(Vs[0].shape) == ((m, 1) if side == "right" else (1, n)) and Gs[0].dtype != torch.float32
    for idx in chunks:
        P0 = bases[idx[0]]
        Ds = workspace("snsm.D", len(idx), low, _product_dtype(P0), P0.device)
        Ps, Gi, Vi = _pick(bases, idx), _pick(Gs, idx), _pick(Vs, idx)
        if not fused_v:
            for G, V in zip(Gi, Vi):
                _ksn.subset_norm_(G, V, beta2=beta2)
        _project_group(Gi, Ps, side, _kproject.MOMENTUM, Ds, Ms=_pick(Ms, idx), Vsums=Vi if fused_v else None,
                       beta1=beta1, beta2=beta2)
        _back_project_group(Ds, Ps, side, _pick(Ws, idx), alpha, decay, _kback.SNSM_UPDATE, P0.dtype,
                            Gs=Gi, Vs=Vi, eps=eps, device_hyper=dh)


def snsm_matrix_step_(
    W: Tensor,
    G: Tensor,
    basis: BasisLike,
    M: Tensor,
    V: Tensor,
    *,
    backend: Optional[str] = None,
    side: str,
    step_size: Optional[float],
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Optional[Tensor] = None,
    bias_correction: Optional[float] = None,
    correct_bias: bool = True,
) -> None:
    """One Subset-Norm + Subspace-Momentum update of a 2-D weight ``W`` (in place), its fp32
    momentum ``M`` (low-rank shape) and Subset-Norm accumulator ``V`` ((m, 1) or (1, n)); see
    ``reference.snsm_matrix_step_``.

    Triton, one side: ``D = M_new − R`` from the projection with the momentum update in its epilogue
    (``R = project(G)`` never leaves registers), then ``W ← (W − step·(back(D) + G)/(sqrt(V)+ε))``
    and the decay in the back-projection's epilogue (G read there once more, W read and written
    once), since ``back(M) + G − back(R) = back(M − R) + G``. V's sum of squares runs in the
    projection's GEMM loop when it is along the projection's reduction (side "right" with V (m, 1),
    "left" with V (1, n): the "std" side of every matrix), else in a standalone pass over G
    (``kernels.subset_norm``). As in ``galore_matrix_step_``, D is stored in the basis dtype the
    back-projection multiplies in. Side ``"full"`` composes the same pieces with one GEMM on each
    side (``Plᵀ G``, then ``Pl D``), in the reference's association, and always takes the standalone
    V pass. ``snsm_matrices_step_`` does the same for many matrices per launch.
    """
    snsm_matrices_step_([W], [G], [basis], [M], [V], backend=backend, side=side, step_size=step_size, lr=lr,
                        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        step=step, bias_correction=bias_correction, correct_bias=correct_bias)


def adam_steps_(
    Ws,
    Gs,
    Ms,
    Vs,
    *,
    backend: Optional[str] = None,
    step_size: Optional[float],
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Optional[Tensor] = None,
    bias_correction: Optional[float] = None,
    correct_bias: bool = True,
) -> None:
    """``adam_step_`` for many tensors; Triton: one multi-tensor launch per (W dtype, G dtype)."""
    if not Ws:
        return
    be, split = _resolve(backend, Ws)
    if split is not None:
        for be, idx in split:
            adam_steps_(*(list(_pick(x, idx)) for x in (Ws, Gs, Ms, Vs)), backend=be, step_size=step_size, lr=lr,
                        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                        bias_correction=bias_correction, correct_bias=correct_bias)
        return
    if be == "reference":
        step_size, lr = _host_step_size(step_size, lr, step, bias_correction, beta1, beta2, correct_bias)
        hyper = dict(step_size=step_size, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        for W, G, M, V in zip(Ws, Gs, Ms, Vs):
            reference.adam_step_(W, G, M, V, **hyper)
        return
    from .kernels import lowrank_adam as _kadam

    dh = _device_hyper(step_size, lr, step, bias_correction, beta1, beta2, correct_bias, 1.0, weight_decay)
    hyper = dict(step_size=step_size if dh is None else 0.0, lr=lr if dh is None else 0.0, beta1=beta1,
                 beta2=beta2, eps=eps, weight_decay=weight_decay, device_hyper=dh)
    by_dtype: dict = {}
    for i, (W, G) in enumerate(zip(Ws, Gs)):
        by_dtype.setdefault((W.dtype, G.dtype, W.device), []).append(i)
    for idx in by_dtype.values():
        _kadam.adamw_multi_(_pick(Ws, idx), _pick(Gs, idx), _pick(Ms, idx), _pick(Vs, idx), **hyper)


def adam_step_(
    W: Tensor,
    G: Tensor,
    M: Tensor,
    V: Tensor,
    *,
    backend: Optional[str] = None,
    step_size: Optional[float],
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Optional[Tensor] = None,
    bias_correction: Optional[float] = None,
    correct_bias: bool = True,
) -> None:
    """One plain AdamW update (see ``reference.adam_step_``); Triton: one fused elementwise pass."""
    adam_steps_([W], [G], [M], [V], backend=backend, step_size=step_size, lr=lr, beta1=beta1, beta2=beta2,
                eps=eps, weight_decay=weight_decay, step=step, bias_correction=bias_correction,
                correct_bias=correct_bias)


def lowrank_adam_(R: Tensor, M: Tensor, V: Tensor, *, backend: Optional[str] = None, beta1: float,
                  beta2: float, eps: float) -> Tensor:
    """Unfused low-rank Adam moment update (see ``reference.lowrank_adam_``); returns ``N``."""
    if resolve_backend(backend, R) == "reference":
        return reference.lowrank_adam_(R, M, V, beta1, beta2, eps)
    from .kernels import lowrank_adam as _kadam

    return _kadam.lowrank_adam_(R, M, V, beta1=beta1, beta2=beta2, eps=eps)
