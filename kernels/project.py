"""Projection GEMM ``Pᵀ G`` (side "left") / ``G P`` (side "right"), with an optional fused low-rank
Adam epilogue.

With the epilogue, each program owns a complete tile of the low-rank gradient ``R`` (the whole K
reduction, never split-K, so no atomics touch optimizer state), updates the fp32 moments ``M``, ``V``
of that tile in place and writes the normalized direction ``N = M / (sqrt(V) + eps)``: ``R`` itself
never goes to memory.

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

from . import interpreting
from ._common import (
    check,
    check_dtype,
    check_fp32_state,
    check_same_device,
    device_guard,
    dot_code,
    gemm_config,
    gemm_tile,
    grouped_tile,
    store_rounded,
)

SIDES = ("left", "right")


@triton.jit(do_not_specialize=["M", "N", "K"])  # sizes vary per matrix: one compile per layout
def _project_kernel(
    a_ptr, b_ptr, out_ptr, m_ptr, v_ptr, n_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn,
    s_om, s_on, s_mm, s_mn, s_vm, s_vn, s_nm, s_nn,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    ADAM: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = gemm_tile(a_ptr, b_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, offs_m, offs_n,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT, INTERPRET)
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :].to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ADAM:
        # reference.lowrank_adam_: M·β1 + (1-β1)·R ; V·β2 + (1-β2)·R·R ; N = M / (sqrt(V) + eps),
        # with IEEE sqrt and division (tl.sqrt and "/" are approximate on GPUs).
        m_ptrs = m_ptr + rows * s_mm + cols * s_mn
        v_ptrs = v_ptr + rows * s_vm + cols * s_vn
        m = tl.load(m_ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
        m = m * beta1 + one_minus_beta1 * acc
        v = v * beta2 + (one_minus_beta2 * acc) * acc
        direction = tl.div_rn(m, tl.sqrt_rn(v) + eps)
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
        tl.store(n_ptr + rows * s_nm + cols * s_nn, direction, mask=mask)
    else:
        store_rounded(out_ptr + rows * s_om + cols * s_on, acc, mask, INTERPRET)


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


def _launch(G, P, side, out, M_state, V_state, N_out, beta1, beta2, eps, adam, dot_dtype):
    A, B, (Mo, No, K), (s_am, s_ak), (s_bk, s_bn) = _operands(G, P, side)
    dot = dot_code(A.dtype, B.dtype, dot_dtype)
    if adam:
        check_fp32_state("M", M_state, (Mo, No))
        check_fp32_state("V", V_state, (Mo, No))
        check_same_device(G=G, M=M_state, V=V_state)
        if N_out is None:
            N_out = torch.empty((Mo, No), dtype=torch.float32, device=G.device)
        check_fp32_state("N", N_out, (Mo, No))
        result, out_t = N_out, N_out  # out_ptr unused with the epilogue
    else:
        check(tuple(out.shape) == (Mo, No), f"out must have shape {(Mo, No)}, got {tuple(out.shape)}")
        check_dtype("out", out)
        result, out_t = out, out
        M_state = V_state = N_out = out  # unused pointers without the epilogue
    if Mo == 0 or No == 0:
        return result
    if K == 0:
        # An empty reduction: R = 0 (keeps the kernel free of a zero-trip special case).
        if adam:
            return _launch_zero_k(M_state, V_state, N_out, beta1, beta2, eps)
        out.zero_()
        return result
    cfg = gemm_config(Mo, No, K, A.element_size(), B.element_size(), dot, G.device, heavy_epilogue=adam)
    grid = (triton.cdiv(Mo, cfg["BLOCK_M"]) * triton.cdiv(No, cfg["BLOCK_N"]),)
    with device_guard(G):
        _project_kernel[grid](
            A, B, out_t, M_state, V_state, N_out,
            Mo, No, K,
            s_am, s_ak, s_bk, s_bn,
            out_t.stride(0), out_t.stride(1),
            M_state.stride(0), M_state.stride(1), V_state.stride(0), V_state.stride(1),
            N_out.stride(0), N_out.stride(1),
            float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
            ADAM=adam, DOT=dot, INTERPRET=interpreting(),
            **cfg,
        )
    return result


def _launch_zero_k(M_state, V_state, N_out, beta1, beta2, eps):
    M_state.mul_(beta1)
    V_state.mul_(beta2)
    torch.div(M_state, V_state.sqrt().add_(eps), out=N_out)
    return N_out


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
    return _launch(G, P, side, out, None, None, None, 0.0, 0.0, 0.0, False, dot_dtype)


def project_adam_(G: torch.Tensor, P: torch.Tensor, side: str, M: torch.Tensor, V: torch.Tensor, *,
                  beta1: float, beta2: float, eps: float, out: Optional[torch.Tensor] = None,
                  dot_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``R = project(G, P, side)`` kept in registers, then ``reference.lowrank_adam_(R, M, V, ...)``:
    the fp32 moments ``M``, ``V`` (shape of R) are updated in place and ``N = M / (sqrt(V) + eps)``
    (fp32) is returned (written into ``out`` when given)."""
    return _launch(G, P, side, None, M, V, out, beta1, beta2, eps, True, dot_dtype)
