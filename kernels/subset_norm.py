"""Subset-Norm accumulator update ``V ← β2·V + (1−β2)·Σ G²`` (docs/algorithms.md §4), as a standalone pass.

``V`` holds one fp32 accumulator per row of G (shape (m, 1), the sum over each row) or per column
(shape (1, n), the sum over each column). Each program owns a block of whole rows (columns) and loops
over the other dimension, so it writes its accumulators once with the complete sum: no split
reduction, no atomics on optimizer state.

Where the sum runs along a projection's reduction (the "std" side of every matrix) the SNSM step does
not need this pass: ``project.project_momentum_`` sums the squares of the G tiles its GEMM loop loads
anyway. This pass serves the other orientations ("reverse_std", forced sides, "full"), at the cost
of one more read of G, because a row sum needs the whole row, which neither GEMM's program sees there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, check_dtype, check_fp32_state, check_same_device, device_guard, launch


@triton.jit
def _subset_norm_kernel(
    g_ptr, v_ptr,
    R, C,
    s_gr, s_gc, s_v,
    beta2, one_minus_beta2,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``V[i] ← β2·V[i] + (1−β2)·Σ_j G[i, j]²`` for this program's BLOCK_R rows i of an (R x C) view
    of G (a column sum is the row sum of Gᵀ, read through swapped strides)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_mask = offs_r < R
    g_ptrs = g_ptr + offs_r[:, None].to(tl.int64) * s_gr + offs_c[None, :].to(tl.int64) * s_gc
    sumsq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c in range(0, tl.cdiv(C, BLOCK_C)):
        mask = row_mask[:, None] & (offs_c[None, :] < C - c * BLOCK_C)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)  # upcast at once (interpreter bf16)
        sumsq += tl.sum(g * g, axis=1)
        g_ptrs += BLOCK_C * s_gc
    v_ptrs = v_ptr + offs_r.to(tl.int64) * s_v
    v = tl.load(v_ptrs, mask=row_mask, other=0.0)
    tl.store(v_ptrs, v * beta2 + one_minus_beta2 * sumsq, mask=row_mask)


def _config(contiguous_reduction: bool) -> dict:
    """4096-element tiles (chosen without measurements): long along the reduction when it is G's
    contiguous dimension, else long across the rows kept (the contiguous ones), so loads stay
    coalesced either way. The interpreter takes the same tiles (few, large: it is slow per program)."""
    if contiguous_reduction:
        return dict(BLOCK_R=16, BLOCK_C=256, num_warps=4)
    return dict(BLOCK_R=64, BLOCK_C=64, num_warps=4)


def subset_norm_(G: torch.Tensor, V: torch.Tensor, *, beta2: float) -> torch.Tensor:
    """In place: ``V ← β2·V + (1−β2)·Σ G²`` over each row of G (V of shape (m, 1)) or each column
    (V of shape (1, n)); G (m x n) fp32/fp16/bf16 with any strides, squares summed in fp32. Returns V.
    """
    check(G.dim() == 2, f"G must be 2-D, got shape {tuple(G.shape)}")
    check_dtype("G", G)
    m, n = G.shape
    check(tuple(V.shape) in ((m, 1), (1, n)),
          f"V must have shape {(m, 1)} or {(1, n)} (one accumulator per row or column), got {tuple(V.shape)}")
    check_fp32_state("V", V, tuple(V.shape))
    check_same_device(G=G, V=V)
    if tuple(V.shape) == (m, 1):
        R, C, s_gr, s_gc, s_v = m, n, G.stride(0), G.stride(1), V.stride(0)
    else:
        R, C, s_gr, s_gc, s_v = n, m, G.stride(1), G.stride(0), V.stride(1)
    if R == 0:
        return V
    if C == 0:
        return V.mul_(beta2)  # an empty sum
    cfg = _config(s_gc == 1)
    grid = (cdiv(R, cfg["BLOCK_R"]),)
    with device_guard(G):
        launch(
            _subset_norm_kernel, grid,
            G, V, R, C, s_gr, s_gc, s_v, float(beta2), float(1.0 - beta2),
            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        )
    return V
