"""Projection GEMM ``Pᵀ G`` (side "left") / ``G P`` (side "right"), with an optional fused epilogue:
low-rank Adam (GaLore) or subspace momentum (SNSM).

With an epilogue, each program owns a complete tile of the low-rank gradient ``R`` (the whole K
reduction, never split-K, so no atomics touch optimizer state) and ``R`` itself never goes to memory:

* Adam: the fp32 moments ``M``, ``V`` of the tile are updated in place and the normalized direction
  ``N = M / (sqrt(V) + eps)`` is written;
* momentum: ``M ← β1·M + (1−β1)·R`` in place, and ``D = M − R`` is written (fp32), so that the
  SNSM numerator ``back(M) + G − back(R)`` is one back-projection, ``back(D) + G``.

The momentum epilogue can also update the Subset-Norm accumulator ``V ← β2·V + (1−β2)·Σ G²`` when
its sum runs along the projection's reduction (side "right" with V of shape (m, 1), side "left"
with V of shape (1, n): the default "std" side of every matrix): the K loop already loads every
element of the G slab, so the squares cost no memory traffic, and the programs of the first rank
tile, each the sole owner of its rows (columns) of V, store them (no atomics). Not yet measured on a
GPU: should squaring the G tile in registers slow the Hopper GEMM pipeline, the standalone pass of
``subset_norm.py`` (one more read of G) is the fallback the ops layer already uses for other sides.

Tiling: right side ``G (m x n) @ P (n x r)``: programs over (m-tile, r-tile), loop over n. Left side
``Pᵀ (r x m) @ G (m x n)``: programs over (r-tile, n-tile), loop over m (``Pᵀ`` is read through
swapped strides, not transposed in memory). Programs are ordered in groups so the ones sharing a
slab of ``G`` run together and read it once from memory.
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
    check_group_unless,
    dot_code,
    gemm_tile,
    group_offset,
    group_table,
    grouped_tile,
    project_config,
    store_rounded,
)

SIDES = ("left", "right")


# EPILOGUE codes of _project_kernel
STORE, ADAM, MOMENTUM = 0, 1, 2
# Columns of the group table (kernels/_common.py group_table): A, B, M, V, N (N = the output).
NCOL = tl.constexpr(5)


@triton.jit
def _project_kernel(
    a_ptr, b_ptr, m_ptr, v_ptr, n_ptr, table_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn,
    s_mm, s_mn, s_vm, s_vn, s_nm, s_nn,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    EPILOGUE: tl.constexpr, SUMSQ: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Sizes and strides are specialized (Triton's default: ==1 and multiple-of-16 classes), so the
    # compiler can prove 16-byte alignment and vectorize: a few compiles per model, not per matrix.
    # Axis 1 walks the matrices of a group; each column's pointer is offset through the table.
    g = tl.program_id(1)
    a_ptr += group_offset(table_ptr, g, 0, NCOL, ALIGN)
    b_ptr += group_offset(table_ptr, g, 1, NCOL, ALIGN)
    m_ptr += group_offset(table_ptr, g, 2, NCOL, ALIGN)
    v_ptr += group_offset(table_ptr, g, 3, NCOL, ALIGN)
    n_ptr += group_offset(table_ptr, g, 4, NCOL, ALIGN)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, sumsq = gemm_tile(a_ptr, b_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, DOT, INTERPRET, SUMSQ)
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :].to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    n_ptrs = n_ptr + rows * s_nm + cols * s_nn
    if EPILOGUE == 1:
        # reference.lowrank_adam_: M·β1 + (1-β1)·R ; V·β2 + (1-β2)·R·R ; N = M / (sqrt(V) + eps),
        # with IEEE sqrt and division (tl.sqrt and "/" are approximate on GPUs). N is stored in its
        # buffer's dtype: the basis dtype when the back-projection multiplies in it (the rounding it
        # would do anyway, here once, halving N's traffic), else fp32.
        m_ptrs = m_ptr + rows * s_mm + cols * s_mn
        v_ptrs = v_ptr + rows * s_vm + cols * s_vn
        m = tl.load(m_ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
        m = m * beta1 + one_minus_beta1 * acc
        v = v * beta2 + (one_minus_beta2 * acc) * acc
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
        store_rounded(n_ptrs, tl.div_rn(m, tl.sqrt_rn(v) + eps), mask, INTERPRET)
    elif EPILOGUE == 2:
        # reference.snsm_matrix_step_'s momentum: M·β1 + (1-β1)·R, and D = M − R for back(D) + G.
        m_ptrs = m_ptr + rows * s_mm + cols * s_mn
        m = tl.load(m_ptrs, mask=mask, other=0.0)
        m = m * beta1 + one_minus_beta1 * acc
        tl.store(m_ptrs, m, mask=mask)
        store_rounded(n_ptrs, m - acc, mask, INTERPRET)
    else:
        store_rounded(n_ptrs, acc, mask, INTERPRET)
    if SUMSQ == 1:
        # Row sums of A = G (side right): V (M x 1), written by the programs of the first rank tile.
        if pid_n == 0:
            v_ptrs = v_ptr + offs_m.to(tl.int64) * s_vm
            v = tl.load(v_ptrs, mask=offs_m < M, other=0.0)
            tl.store(v_ptrs, v * beta2 + one_minus_beta2 * sumsq, mask=offs_m < M)
    if SUMSQ == 2:
        # Column sums of B = G (side left): V (1 x N), written by the programs of the first rank tile.
        if pid_m == 0:
            v_ptrs = v_ptr + offs_n.to(tl.int64) * s_vn
            v = tl.load(v_ptrs, mask=offs_n < N, other=0.0)
            tl.store(v_ptrs, v * beta2 + one_minus_beta2 * sumsq, mask=offs_n < N)


def _operands(G: torch.Tensor, P: torch.Tensor, side: str):
    """(A, B, (M, N, K), A strides, B strides) with the product written as A @ B."""
    check(side in SIDES, f"side must be 'left' or 'right', got {side!r}")
    check(G.dim() == 2 and P.dim() == 2, f"G and P must be 2-D, got shapes {tuple(G.shape)} and {tuple(P.shape)}")
    check_dtype("G", G)
    check_dtype("P", P)
    check_same_device(G=G, P=P)
    m, n = G.shape
    if side == "left":
        check(P.shape[0] == m, f"side 'left' needs P of shape ({m}, r) for G of shape {tuple(G.shape)}, got {tuple(P.shape)}")
        r = P.shape[1]
        # Pᵀ @ G: A = Pᵀ through swapped strides.
        return P, G, (r, n, m), (P.stride(1), P.stride(0)), (G.stride(0), G.stride(1))
    check(P.shape[0] == n, f"side 'right' needs P of shape ({n}, r) for G of shape {tuple(G.shape)}, got {tuple(P.shape)}")
    r = P.shape[1]
    return G, P, (m, r, n), (G.stride(0), G.stride(1)), (P.stride(0), P.stride(1))


def _out_dtypes(basis_dtype):
    return (torch.float32, basis_dtype)


def launch_group(Gs, Ps, side, epilogue, outs, *, Ms=None, Vs=None, Vsums=None,
                 beta1=0.0, beta2=0.0, eps=0.0, dot_dtype=None, same_layout=False):
    """One launch for a group of same-layout matrices: ``Gs[i]``, ``Ps[i]`` -> ``outs[i]``.

    ``epilogue``: STORE (``outs`` of any supported dtype), ADAM (fp32 ``Ms``, ``Vs``; N into ``outs``,
    fp32 or the basis dtype) or MOMENTUM (``Ms``; D into ``outs``, fp32 or the basis dtype), the last
    optionally with the Subset-Norm accumulators ``Vsums``. Every list holds one tensor per matrix and
    all tensors of a list share shape, strides and dtype (``same_layout=True``: the caller has
    checked that already, e.g. ``ops`` groups by layout; saves the per-tensor host checks).
    """
    count = len(Gs)
    check(count > 0 and len(Ps) == count and len(outs) == count, "Gs, Ps and outs must be non-empty lists of one length")
    check_group_unless(same_layout, "G", Gs)
    check_group_unless(same_layout, "P", Ps)
    check_group_unless(same_layout, "out", outs)
    A, B, (Mo, No, K), (s_am, s_ak), (s_bk, s_bn) = _operands(Gs[0], Ps[0], side)
    out = outs[0]
    dot = dot_code(A.dtype, B.dtype, dot_dtype)
    out_name = {STORE: "out", ADAM: "N", MOMENTUM: "D"}[epilogue]
    check(tuple(out.shape) == (Mo, No), f"{out_name} must have shape {(Mo, No)}, got {tuple(out.shape)}")
    check_same_device(G=Gs[0], out=out)
    if epilogue == STORE:
        check_dtype("out", out)
    else:
        check(out.dtype in _out_dtypes(Ps[0].dtype),
              f"{out_name} must be float32 or the basis dtype {Ps[0].dtype}, got {out.dtype}")
        check(Ms is not None and len(Ms) == count, "Ms must hold one moment per matrix")
        check_fp32_state("M", Ms[0], (Mo, No))
        check_group_unless(same_layout, "M", Ms)
        check_same_device(G=Gs[0], M=Ms[0])
        if epilogue == ADAM:
            check(Vs is not None and len(Vs) == count, "Vs must hold one moment per matrix")
            check_fp32_state("V", Vs[0], (Mo, No))
            check_group_unless(same_layout, "V", Vs)
            check_same_device(G=Gs[0], V=Vs[0])
    sumsq = 0
    if Vsums is not None:
        m, n = Gs[0].shape
        want = (m, 1) if side == "right" else (1, n)
        check(
            tuple(Vsums[0].shape) == want,
            f"the fused Subset-Norm sum runs along the projection's reduction: side {side!r} needs V of "
            f"shape {want}, got {tuple(Vsums[0].shape)} (kernels.subset_norm.subset_norm_ does the other sum)",
        )
        check_fp32_state("V", Vsums[0], want)
        check_group_unless(same_layout, "V", Vsums)
        check_same_device(G=Gs[0], V=Vsums[0])
        sumsq = 1 if side == "right" else 2
    if Mo == 0 or No == 0 or K == 0:
        for i in range(count):
            _launch_degenerate(Gs[i], outs[i], Ms[i] if Ms else None, Vs[i] if Vs else None,
                               Vsums[i] if Vsums else None, beta1, beta2, eps, epilogue)
        return outs
    Mt = Ms if Ms is not None else outs  # unused pointers where the epilogue has none
    Vt = Vs if Vs is not None else (Vsums if Vsums is not None else outs)
    if side == "left":
        As, Bs = Ps, Gs
    else:
        As, Bs = Gs, Ps
    table, align = group_table([As, Bs, Mt, Vt, outs], Gs[0].device)
    target = current_target(Gs[0].device)
    cfg = project_config(Mo, No, K, A.element_size(), B.element_size(), dot, target, count,
                         rank_dim=0 if side == "left" else 1, heavy_epilogue=epilogue != STORE)
    grid = (cdiv(Mo, cfg["BLOCK_M"]) * cdiv(No, cfg["BLOCK_N"]), count)
    with device_guard(Gs[0]):
        launch(
            _project_kernel, grid,
            As[0], Bs[0], Mt[0], Vt[0], out, table,
            Mo, No, K,
            s_am, s_ak, s_bk, s_bn,
            Mt[0].stride(0), Mt[0].stride(1), Vt[0].stride(0), Vt[0].stride(1),
            out.stride(0), out.stride(1),
            float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
            EPILOGUE=epilogue, SUMSQ=sumsq, DOT=dot, INTERPRET=target.interpret, ALIGN=align,
            **cfg,
        )
    return outs


def _launch(G, P, side, epilogue, *, out=None, M_state=None, V_state=None, V_sumsq=None,
            beta1=0.0, beta2=0.0, eps=0.0, dot_dtype=None):
    """One matrix: a group of one."""
    if out is None and epilogue != STORE:
        _, _, (Mo, No, _), _, _ = _operands(G, P, side)
        out = torch.empty((Mo, No), dtype=torch.float32, device=G.device)
    launch_group([G], [P], side, epilogue, [out],
                 Ms=None if M_state is None else [M_state], Vs=None if V_state is None else [V_state],
                 Vsums=None if V_sumsq is None else [V_sumsq], beta1=beta1, beta2=beta2, eps=eps,
                 dot_dtype=dot_dtype)
    return out


def _launch_degenerate(G, out, M_state, V_state, V_sumsq, beta1, beta2, eps, epilogue):
    """An empty output or an empty reduction (R = 0): keeps the kernel free of zero-trip cases."""
    if V_sumsq is not None:
        from .subset_norm import subset_norm_

        subset_norm_(G, V_sumsq, beta2=beta2)
    if out.numel() == 0:
        return out
    if epilogue == STORE:
        out.zero_()
    elif epilogue == ADAM:
        M_state.mul_(beta1)
        V_state.mul_(beta2)
        out.copy_(torch.div(M_state, V_state.sqrt().add_(eps)))
    else:
        M_state.mul_(beta1)
        out.copy_(M_state)
    return out


def project(G: torch.Tensor, P: torch.Tensor, side: str, *, out: Optional[torch.Tensor] = None,
            out_dtype: Optional[torch.dtype] = None, dot_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``Pᵀ G`` (side "left", (r, n)) or ``G P`` (side "right", (m, r)), accumulated in fp32.

    ``out_dtype`` defaults to G's dtype when G and P share one, else fp32. ``dot_dtype`` is the dtype
    the products are taken in (default: the operands' common dtype, fp32 when they differ; fp32
    products are IEEE, never TF32). Any strides; fp32, fp16 or bf16.
    """
    A, B, (Mo, No, _), _, _ = _operands(G, P, side)
    if out is None:
        if out_dtype is None:
            out_dtype = G.dtype if G.dtype == P.dtype else torch.float32
        out = torch.empty((Mo, No), dtype=out_dtype, device=G.device)
    return _launch(G, P, side, STORE, out=out, dot_dtype=dot_dtype)


def project_adam_(G: torch.Tensor, P: torch.Tensor, side: str, M: torch.Tensor, V: torch.Tensor, *,
                  beta1: float, beta2: float, eps: float, out: Optional[torch.Tensor] = None,
                  dot_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``R = project(G, P, side)`` kept in registers, then ``reference.lowrank_adam_(R, M, V, ...)``:
    the fp32 moments ``M``, ``V`` (shape of R) are updated in place and ``N = M / (sqrt(V) + eps)``
    (fp32) is returned (written into ``out`` when given)."""
    return _launch(G, P, side, ADAM, out=out, M_state=M, V_state=V, beta1=beta1, beta2=beta2, eps=eps,
                   dot_dtype=dot_dtype)


def project_momentum_(G: torch.Tensor, P: torch.Tensor, side: str, M: torch.Tensor,
                      V: Optional[torch.Tensor] = None, *, beta1: float, beta2: float = 0.0,
                      out: Optional[torch.Tensor] = None,
                      dot_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``R = project(G, P, side)`` kept in registers; ``M ← β1·M + (1−β1)·R`` in place (fp32, shape of
    R); returns ``D = M − R`` (fp32, the new M; written into ``out`` when given).

    With ``V`` (fp32), also ``V ← β2·V + (1−β2)·Σ G²`` summed along the projection's reduction, from
    the G tiles the GEMM loads anyway: side "right" sums each row (V of shape (m, 1)), side "left"
    each column (V of shape (1, n)). For the other orientation use ``subset_norm.subset_norm_``.
    """
    return _launch(G, P, side, MOMENTUM, out=out, M_state=M, V_sumsq=V, beta1=beta1, beta2=beta2,
                   dot_dtype=dot_dtype)
