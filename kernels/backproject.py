"""Back-projection GEMM ``P R`` (side "left") / ``R Pᵀ`` (side "right"), plain or with the weight
update fused into the epilogue.

Programs tile the (m x n) output and loop over the rank in K tiles (any rank; the reduction is never
split). With the update epilogue the output is the weight itself: each program loads its W tile once,
applies ``reference.apply_update_`` in fp32, ``W32 - step·α·back`` and then ``W32 + (-lr·wd)·W32``,
and stores it once, rounded once to W's dtype. The back-projected direction never goes to memory.

The SNSM variant first turns the back-projected tile into the Subset-Norm direction
``(back + G) / (sqrt(V) + eps)``: G's tile is read once, and V (one fp32 accumulator per row, shape
(m, 1), or per column, (1, n)) is loaded as a vector and broadcast over the tile.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv,
    check,
    check_dtype,
    check_fp32_state,
    check_same_device,
    current_target,
    device_guard,
    launch,
    back_project_config,
    check_group_unless,
    dot_code,
    gemm_tile,
    group_offset,
    group_table,
    grouped_tile,
    host_hyper_args,
    update_scalars,
    store_rounded,
)

SIDES = ("left", "right")


# EPILOGUE codes of _back_project_kernel
STORE, UPDATE, SNSM_UPDATE = 0, 1, 2
# Columns of the group table (kernels/_common.py group_table): A, B, out (W), G, V.
NCOL = tl.constexpr(5)


@triton.jit
def _back_project_kernel(
    a_ptr, b_ptr, out_ptr, g_ptr, v_ptr, table_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn, s_om, s_on, s_gm, s_gn, s_v,
    alpha, decay, eps,
    lr_ptr, step_ptr, lr_value, bias_correction, log2_beta1, log2_beta2, scale, weight_decay,
    EPILOGUE: tl.constexpr, V_ROWS: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr,
    ALIGN: tl.constexpr, HYPER: tl.constexpr, LR_PTR: tl.constexpr, STEP_PTR: tl.constexpr,
    CORRECT_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Sizes specialized as in project.py; axis 1 walks the matrices of a group.
    g_idx = tl.program_id(1)
    a_ptr += group_offset(table_ptr, g_idx, 0, NCOL, ALIGN)
    b_ptr += group_offset(table_ptr, g_idx, 1, NCOL, ALIGN)
    out_ptr += group_offset(table_ptr, g_idx, 2, NCOL, ALIGN)
    g_ptr += group_offset(table_ptr, g_idx, 3, NCOL, ALIGN)
    v_ptr += group_offset(table_ptr, g_idx, 4, NCOL, ALIGN)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :].to(tl.int64)
    out_ptrs = out_ptr + rows * s_om + cols * s_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    # The epilogue's operands are loaded before the K loop: their memory latency overlaps the GEMM
    # instead of following it (the W tile is the one large read of this kernel).
    if EPILOGUE != 0:
        w = tl.load(out_ptrs, mask=mask, other=0.0)
    if EPILOGUE == 2:
        g = tl.load(g_ptr + rows * s_gm + cols * s_gn, mask=mask, other=0.0)
        if V_ROWS:
            v = tl.load(v_ptr + offs_m.to(tl.int64) * s_v, mask=offs_m < M, other=1.0)[:, None]
        else:
            v = tl.load(v_ptr + offs_n.to(tl.int64) * s_v, mask=offs_n < N, other=1.0)[None, :]
    acc, _ = gemm_tile(a_ptr, b_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, offs_m, offs_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT, INTERPRET, 0)
    if EPILOGUE == 2:
        # reference.snsm_matrix_step_: (back(M) + G − back(R)) / (sqrt(V) + eps) with acc = back(M − R);
        # IEEE sqrt and division, as the reference.
        acc = tl.div_rn(acc + g.to(tl.float32), tl.sqrt_rn(v) + eps)
    if EPILOGUE != 0:
        alpha, decay = update_scalars(alpha, decay, lr_ptr, step_ptr, lr_value, bias_correction, log2_beta1,
                                      log2_beta2, scale, weight_decay, HYPER, LR_PTR, STEP_PTR, CORRECT_BIAS)
        w = w.to(tl.float32)
        w = w + alpha * acc  # alpha = -step_size * scale
        # decay = -lr * weight_decay; skipped when 0 as the reference does (keeps an inf weight inf).
        w = tl.where(decay != 0.0, w + decay * w, w)
        store_rounded(out_ptrs, w, mask, INTERPRET)
    else:
        store_rounded(out_ptrs, acc, mask, INTERPRET)


def _operands(R: torch.Tensor, P: torch.Tensor, side: str):
    """(A, B, (M, N, K), A strides, B strides) with the product written as A @ B."""
    check(side in SIDES, f"side must be 'left' or 'right', got {side!r}")
    check(R.dim() == 2 and P.dim() == 2, f"R and P must be 2-D, got shapes {tuple(R.shape)} and {tuple(P.shape)}")
    check_dtype("R", R)
    check_dtype("P", P)
    check_same_device(R=R, P=P)
    if side == "left":
        # P (m x r) @ R (r x n)
        check(P.shape[1] == R.shape[0], f"side 'left' needs P (m, r) and R (r, n), got {tuple(P.shape)} and {tuple(R.shape)}")
        m, r = P.shape
        n = R.shape[1]
        return P, R, (m, n, r), (P.stride(0), P.stride(1)), (R.stride(0), R.stride(1))
    # R (m x r) @ Pᵀ (r x n): Pᵀ through swapped strides.
    check(P.shape[1] == R.shape[1], f"side 'right' needs R (m, r) and P (n, r), got {tuple(R.shape)} and {tuple(P.shape)}")
    m, r = R.shape
    n = P.shape[0]
    return R, P, (m, n, r), (R.stride(0), R.stride(1)), (P.stride(1), P.stride(0))


def launch_group(Rs, Ps, side, outs, alpha, decay, epilogue, dot_dtype, Gs=None, Vs=None, eps=0.0,
                 same_layout=False, device_hyper=None):
    """One launch for a group of same-layout matrices: ``outs[i]`` (W for the update epilogues)
    from ``Rs[i]``, ``Ps[i]`` (and ``Gs[i]``, ``Vs[i]`` for SNSM). Every list holds one tensor per
    matrix, all of one layout (``same_layout=True``: checked by the caller, see project.launch_group).
    ``device_hyper`` (a ``DeviceHyper``): the update epilogues form alpha and decay from the learning
    rate and step count it points to, instead of the host scalars ``alpha`` and ``decay``."""
    count = len(Rs)
    check(count > 0 and len(Ps) == count and len(outs) == count, "Rs, Ps and outs must be non-empty lists of one length")
    check_group_unless(same_layout, "R", Rs)
    check_group_unless(same_layout, "P", Ps)
    update = epilogue != STORE
    check_group_unless(same_layout, "W" if update else "out", outs)
    A, B, (Mo, No, K), (s_am, s_ak), (s_bk, s_bn) = _operands(Rs[0], Ps[0], side)
    out = outs[0]
    dot = dot_code(A.dtype, B.dtype, dot_dtype)
    check(tuple(out.shape) == (Mo, No), f"{'W' if update else 'out'} must have shape {(Mo, No)}, got {tuple(out.shape)}")
    check_dtype("W" if update else "out", out)
    check_same_device(R=Rs[0], out=out)
    v_rows, s_v = False, 0
    if epilogue == SNSM_UPDATE:
        check(Gs is not None and Vs is not None and len(Gs) == count and len(Vs) == count,
              "the SNSM update needs one G and one V per matrix")
        G, V = Gs[0], Vs[0]
        check_dtype("G", G)
        check(tuple(G.shape) == (Mo, No), f"G must have W's shape {(Mo, No)}, got {tuple(G.shape)}")
        check(tuple(V.shape) in ((Mo, 1), (1, No)),
              f"V must have shape {(Mo, 1)} or {(1, No)} (one accumulator per row or column), got {tuple(V.shape)}")
        check_fp32_state("V", V, tuple(V.shape))
        check_group_unless(same_layout, "G", Gs)
        check_group_unless(same_layout, "V", Vs)
        check_same_device(W=out, G=G, V=V)
        v_rows = tuple(V.shape) == (Mo, 1)
        s_v = V.stride(0) if v_rows else V.stride(1)
    else:
        Gs = Vs = outs  # unused pointers
    if Mo == 0 or No == 0:
        return outs
    if device_hyper is not None and (K == 0 and epilogue == UPDATE):
        alpha, decay = _host_alpha_decay(device_hyper)
    if K == 0:
        if epilogue == UPDATE:
            # A rank-0 direction is 0: only the decay applies.
            if decay != 0.0:
                for W in outs:
                    W.copy_(W.float().add_(W.float(), alpha=decay))
            return outs
        if epilogue == STORE:
            for o in outs:
                o.zero_()
            return outs
        # SNSM: back(D) = 0 but G still moves W: a rank-1 zero product keeps the one kernel path.
        zero_a = torch.zeros((Mo, 1), dtype=torch.float32, device=out.device)
        zero_b = torch.zeros((1, No), dtype=torch.float32, device=out.device)
        Rs, Ps = [zero_a] * count, [zero_b] * count
        K, (s_am, s_ak), (s_bk, s_bn), dot = 1, zero_a.stride(), zero_b.stride(), 0
        As, Bs = Rs, Ps
    elif side == "left":
        As, Bs = Ps, Rs
    else:
        As, Bs = Rs, Ps
    table, align = group_table([As, Bs, outs, Gs, Vs], out.device)
    if device_hyper is not None and update:
        hyper_args, hyper_flags = device_hyper.kernel_args(table)
    else:
        hyper_args, hyper_flags = host_hyper_args(table)
    target = current_target(out.device)
    cfg = back_project_config(Mo, No, K, As[0].element_size(), Bs[0].element_size(), dot, target, count)
    grid = (cdiv(Mo, cfg["BLOCK_M"]) * cdiv(No, cfg["BLOCK_N"]), count)
    with device_guard(out):
        launch(
            _back_project_kernel, grid,
            As[0], Bs[0], out, Gs[0], Vs[0], table,
            Mo, No, K,
            s_am, s_ak, s_bk, s_bn, out.stride(0), out.stride(1), Gs[0].stride(0), Gs[0].stride(1), s_v,
            float(alpha), float(decay), float(eps), *hyper_args,
            EPILOGUE=epilogue, V_ROWS=v_rows, DOT=dot, INTERPRET=target.interpret, ALIGN=align,
            HYPER=device_hyper is not None and update, **hyper_flags,
            **cfg,
        )
    return outs


def _host_alpha_decay(h):
    """alpha and decay of a DeviceHyper on the host (the rare rank-0 case; reads device values)."""
    lr = float(h.lr) if h.lr is not None else h.lr_value
    if h.step is not None:
        t = float(h.step)
        c = ((1.0 - h.beta2 ** t) ** 0.5 / (1.0 - h.beta1 ** t)) if h.correct_bias else 1.0
    else:
        c = h.bias_correction
    return -(lr * c) * h.scale, -lr * h.weight_decay


def _launch(R, P, side, out, alpha, decay, epilogue, dot_dtype, G=None, V=None, eps=0.0):
    """One matrix: a group of one."""
    launch_group([R], [P], side, [out], alpha, decay, epilogue, dot_dtype,
                 Gs=None if G is None else [G], Vs=None if V is None else [V], eps=eps)
    return out


def back_project(R: torch.Tensor, P: torch.Tensor, side: str, *, out: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None, dot_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``P R`` (side "left") or ``R Pᵀ`` (side "right"), (m, n), accumulated in fp32.

    ``out_dtype`` defaults to R's dtype when R and P share one, else fp32; ``dot_dtype`` as in
    ``project.project``. Any strides; fp32, fp16 or bf16.
    """
    _, _, (Mo, No, _), _, _ = _operands(R, P, side)
    if out is None:
        if out_dtype is None:
            out_dtype = R.dtype if R.dtype == P.dtype else torch.float32
        out = torch.empty((Mo, No), dtype=out_dtype, device=R.device)
    return _launch(R, P, side, out, 0.0, 0.0, STORE, dot_dtype)


def back_project_update_(W: torch.Tensor, R: torch.Tensor, P: torch.Tensor, side: str, *,
                         step_size: float, scale: float, lr: float, weight_decay: float,
                         dot_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """In place: ``W ← W − step_size·scale·back_project(R, P, side)``, then ``W ← W − lr·wd·W``.

    Exactly ``reference.apply_update_(W, back_project(R, P, side), ...)`` with the back-projection
    never leaving registers; W (any strides, fp32/fp16/bf16) is read once and written once, the math
    in fp32, rounded once to W's dtype. ``dot_dtype``: see ``project.project``; pass the basis dtype to
    multiply an fp32 ``R`` on 16-bit tensor cores.
    """
    decay = -lr * weight_decay if weight_decay > 0.0 else 0.0
    return _launch(R, P, side, W, -step_size * scale, decay, UPDATE, dot_dtype)


def back_project_snsm_update_(W: torch.Tensor, G: torch.Tensor, V: torch.Tensor, D: torch.Tensor,
                              P: torch.Tensor, side: str, *, step_size: float, lr: float,
                              weight_decay: float, eps: float,
                              dot_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """In place: ``W ← W − step_size·(back_project(D, P, side) + G) / (sqrt(V) + eps)``, then
    ``W ← W − lr·wd·W``.

    ``G`` has W's shape (fp32/fp16/bf16, any strides), read once; ``V`` (fp32) is (m, 1), one
    divisor per row, or (1, n), one per column. With ``D = M − R`` this is the SNSM step of
    ``reference.snsm_matrix_step_`` (``back(M) − back(R) = back(M − R)``). W is read once and written
    once, the math in fp32, rounded once to W's dtype. ``dot_dtype``: see ``project.project``.
    """
    decay = -lr * weight_decay if weight_decay > 0.0 else 0.0
    return _launch(D, P, side, W, -step_size, decay, SNSM_UPDATE, dot_dtype, G=G, V=V, eps=eps)
