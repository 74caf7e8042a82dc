"""Elementwise Adam kernels.

* ``_lowrank_adam_kernel``: the unfused low-rank moment update (``reference.lowrank_adam_``): M, V in
  place (fp32), returns ``N = M / (sqrt(V) + eps)`` (fp32).
* ``_adamw_kernel``: a whole plain AdamW step (``reference.adam_step_``) in one pass for the
  parameters that are not projected (biases, norms): reads G, W, M, V once, writes W, M, V once.

Same-shape tensors are indexed by one flat offset when all are contiguous, else by (row, col)
through each tensor's strides.
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
    elem_offsets,
    elementwise_config,
    rows_cols,
    store_rounded,
    view_2d,
)


@triton.jit(do_not_specialize=["numel", "ncols"])  # sizes vary per matrix: one compile per layout
def _lowrank_adam_kernel(
    r_ptr, m_ptr, v_ptr, n_ptr,
    numel, ncols,
    s_r0, s_r1, s_m0, s_m1, s_v0, s_v1, s_n0, s_n1,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    FLAT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r_ptrs = r_ptr + elem_offsets(offs, ncols, s_r0, s_r1, FLAT)
    m_ptrs = m_ptr + elem_offsets(offs, ncols, s_m0, s_m1, FLAT)
    v_ptrs = v_ptr + elem_offsets(offs, ncols, s_v0, s_v1, FLAT)
    r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    m = m * beta1 + one_minus_beta1 * r
    v = v * beta2 + (one_minus_beta2 * r) * r
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    tl.store(n_ptr + elem_offsets(offs, ncols, s_n0, s_n1, FLAT), tl.div_rn(m, tl.sqrt_rn(v) + eps), mask=mask)


@triton.jit(do_not_specialize=["numel", "ncols"])  # sizes vary per matrix: one compile per layout
def _adamw_kernel(
    g_ptr, w_ptr, m_ptr, v_ptr,
    numel, ncols,
    s_g0, s_g1, s_w0, s_w1, s_m0, s_m1, s_v0, s_v1,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, decay,
    FLAT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w_ptrs = w_ptr + elem_offsets(offs, ncols, s_w0, s_w1, FLAT)
    m_ptrs = m_ptr + elem_offsets(offs, ncols, s_m0, s_m1, FLAT)
    v_ptrs = v_ptr + elem_offsets(offs, ncols, s_v0, s_v1, FLAT)
    g = tl.load(g_ptr + elem_offsets(offs, ncols, s_g0, s_g1, FLAT), mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + (one_minus_beta2 * g) * g
    direction = tl.div_rn(m, tl.sqrt_rn(v) + eps)
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = w + alpha * direction  # alpha = -step_size
    w = tl.where(decay != 0.0, w + decay * w, w)  # decay = -lr * weight_decay (0: skipped)
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    store_rounded(w_ptrs, w, mask, INTERPRET)


def _views(tensors, writable):
    """Per tensor: a (rows, cols) view, or a contiguous copy where no view exists (a non-contiguous
    tensor of 3+ dims whose dims do not collapse, e.g. a channels-last conv weight); the copies of
    ``writable`` tensors are written back by ``_write_back``."""
    views, copies = [], []
    for i, t in enumerate(tensors):
        v = view_2d(t)
        if v is None:
            c = t.contiguous()
            v = view_2d(c)
            if writable[i]:
                copies.append((t, c))
        views.append(v)
    flat = all(v.is_contiguous() for v in views)
    return views, copies, flat


def _write_back(copies):
    for original, copy in copies:
        original.copy_(copy)


def _strides(views):
    out = []
    for v in views:
        out += [v.stride(0), v.stride(1)]
    return out


def lowrank_adam_(R: torch.Tensor, M: torch.Tensor, V: torch.Tensor, *, beta1: float, beta2: float,
                  eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``reference.lowrank_adam_``: fp32 moments ``M``, ``V`` updated in place with gradient ``R``
    (fp32/fp16/bf16, any strides); returns ``N = M / (sqrt(V) + eps)`` in fp32 (into ``out`` if given)."""
    check_dtype("R", R)
    check_fp32_state("M", M, R.shape)
    check_fp32_state("V", V, R.shape)
    if out is None:
        out = torch.empty(R.shape, dtype=torch.float32, device=R.device)
    check_fp32_state("out", out, R.shape)
    check_same_device(R=R, M=M, V=V, out=out)
    numel = R.numel()
    if numel == 0:
        return out
    (r, m, v, n), copies, flat = _views((R, M, V, out), (False, True, True, True))
    cfg = elementwise_config(R.device)
    grid = (triton.cdiv(numel, cfg["BLOCK"]),)
    with device_guard(R):
        _lowrank_adam_kernel[grid](
            r, m, v, n, numel, rows_cols(R.shape)[1], *_strides((r, m, v, n)),
            float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
            FLAT=flat, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        )
    _write_back(copies)
    return out


def adamw_(W: torch.Tensor, G: torch.Tensor, M: torch.Tensor, V: torch.Tensor, *, step_size: float,
           lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """``reference.adam_step_`` in one pass: M, V (fp32) and W (fp32/fp16/bf16) updated in place.

    ``step_size`` is the bias-corrected step; the decay ``W ← W − lr·wd·W`` applies to the updated W.
    """
    check_dtype("W", W)
    check_dtype("G", G)
    check(tuple(G.shape) == tuple(W.shape), f"G must have W's shape {tuple(W.shape)}, got {tuple(G.shape)}")
    check_fp32_state("M", M, W.shape)
    check_fp32_state("V", V, W.shape)
    check_same_device(W=W, G=G, M=M, V=V)
    numel = W.numel()
    if numel == 0:
        return
    (g, w, m, v), copies, flat = _views((G, W, M, V), (False, True, True, True))
    decay = -lr * weight_decay if weight_decay > 0.0 else 0.0
    cfg = elementwise_config(W.device)
    grid = (triton.cdiv(numel, cfg["BLOCK"]),)
    with device_guard(W):
        _adamw_kernel[grid](
            g, w, m, v, numel, rows_cols(W.shape)[1], *_strides((g, w, m, v)),
            float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
            float(-step_size), float(decay),
            FLAT=flat, INTERPRET=interpreting(), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        )
    _write_back(copies)
