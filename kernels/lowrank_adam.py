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

from ._common import (
    cdiv,
    check,
    check_dtype,
    check_fp32_state,
    check_same_device,
    current_target,
    device_guard,
    launch,
    elem_offsets,
    elementwise_config,
    group_offset,
    group_table,
    host_hyper_args,
    update_scalars,
    rows_cols,
    store_rounded,
    view_2d,
)


@triton.jit
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


@triton.jit
def _adamw_kernel(
    g_ptr, w_ptr, m_ptr, v_ptr, table_ptr, blocks_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, decay,
    lr_ptr, step_ptr, lr_value, bias_correction, log2_beta1, log2_beta2, scale, weight_decay,
    INTERPRET: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
    HYPER: tl.constexpr, LR_PTR: tl.constexpr, STEP_PTR: tl.constexpr, CORRECT_BIAS: tl.constexpr,
):
    """Multi-tensor AdamW: program b updates block ``blocks[b] = (tensor t, first element, numel of
    t)`` of tensor t, whose four pointers are offset through the group table (columns G, W, M, V).
    Whole blocks take unmasked (vectorizable) loads; only a tensor's last block is masked."""
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 3 * pid)
    start = tl.load(blocks_ptr + 3 * pid + 1)
    numel = tl.load(blocks_ptr + 3 * pid + 2)
    if ALIGN > 1:
        # Every tensor's size is a multiple of ALIGN too (see adamw_multi_): the tail mask then
        # changes only every ALIGN elements and the tail block's loads stay vectorized.
        start = tl.multiple_of(start, BLOCK)
        numel = tl.multiple_of(numel, ALIGN)
    g_ptr += group_offset(table_ptr, t, 0, 4, ALIGN) + start
    w_ptr += group_offset(table_ptr, t, 1, 4, ALIGN) + start
    m_ptr += group_offset(table_ptr, t, 2, 4, ALIGN) + start
    v_ptr += group_offset(table_ptr, t, 3, 4, ALIGN) + start
    alpha, decay = update_scalars(alpha, decay, lr_ptr, step_ptr, lr_value, bias_correction, log2_beta1,
                                  log2_beta2, scale, weight_decay, HYPER, LR_PTR, STEP_PTR, CORRECT_BIAS)
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
        w = tl.load(w_ptr + offs)
        w, m, v = _adamw_math(g, w, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, decay)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        store_rounded(w_ptr + offs, w, None, INTERPRET)
    else:
        mask = offs < numel - start
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        w, m, v = _adamw_math(g, w, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, decay)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        store_rounded(w_ptr + offs, w, mask, INTERPRET)


@triton.jit
def _adamw_math(g, w, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, decay):
    """reference.adam_step_ on fp32 values (w in its own dtype, upcast here)."""
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + (one_minus_beta2 * g) * g
    direction = tl.div_rn(m, tl.sqrt_rn(v) + eps)
    w = w.to(tl.float32) + alpha * direction  # alpha = -step_size
    w = tl.where(decay != 0.0, w + decay * w, w)  # decay = -lr * weight_decay (0: skipped)
    return w, m, v


_BLOCKS: dict = {}


def _block_table(numels, block: int, device: torch.device) -> torch.Tensor:
    """(tensor, first element, numel) per block of ``block`` elements, cached by the sizes."""
    key = (tuple(numels), block, device)
    table = _BLOCKS.get(key)
    if table is None:
        rows = [(t, start, n) for t, n in enumerate(numels) for start in range(0, n, block)]
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(device)
        if len(_BLOCKS) >= 256:
            _BLOCKS.pop(next(iter(_BLOCKS)))
        _BLOCKS[key] = table
    return table


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
    cfg = elementwise_config(current_target(R.device))
    grid = (cdiv(numel, cfg["BLOCK"]),)
    with device_guard(R):
        launch(
            _lowrank_adam_kernel, grid,
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
    adamw_multi_([W], [G], [M], [V], step_size=step_size, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                 weight_decay=weight_decay)


def adamw_multi_(Ws, Gs, Ms, Vs, *, step_size: float, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, device_hyper=None) -> None:
    """``adamw_`` for many tensors (any shapes; one W dtype, one G dtype) in one launch.

    A tensor that is not contiguous is updated through a contiguous copy written back afterwards.
    ``device_hyper`` (a ``DeviceHyper``): the step size comes from the learning rate and step count it
    points to (``step_size`` and ``lr`` are then ignored).
    """
    count = len(Ws)
    check(count > 0 and len(Gs) == count and len(Ms) == count and len(Vs) == count,
          "Ws, Gs, Ms and Vs must be non-empty lists of one length")
    w_dtype, g_dtype, device = Ws[0].dtype, Gs[0].dtype, Ws[0].device
    check_dtype("W", Ws[0])
    check_dtype("G", Gs[0])
    f32 = torch.float32
    for i, (W, G, M, V) in enumerate(zip(Ws, Gs, Ms, Vs)):
        shape = W.shape
        # One comparison per tensor on the common path; the detailed checks name what is wrong.
        if not (W.dtype == w_dtype and G.dtype == g_dtype and G.shape == shape and M.shape == shape
                and V.shape == shape and M.dtype == f32 and V.dtype == f32 and W.device == device
                and G.device == device and M.device == device and V.device == device):
            check(W.dtype == w_dtype and G.dtype == g_dtype,
                  f"one launch takes one W dtype and one G dtype; tensor {i} has {W.dtype} and {G.dtype}")
            check(tuple(G.shape) == tuple(shape), f"G must have W's shape {tuple(shape)}, got {tuple(G.shape)}")
            check_fp32_state("M", M, shape)
            check_fp32_state("V", V, shape)
            check_same_device(W=W, G=G, M=M, V=V, first=Ws[0])
    keep = [i for i in range(count) if Ws[i].numel() > 0]
    if not keep:
        return
    cols, copies = [[], [], [], []], []
    for i in keep:
        for c, (t, writable) in enumerate(((Gs[i], False), (Ws[i], True), (Ms[i], True), (Vs[i], True))):
            if not t.is_contiguous():
                contiguous = t.contiguous()
                if writable:
                    copies.append((t, contiguous))
                t = contiguous
            cols[c].append(t)
    device = Ws[0].device
    target = current_target(device)
    cfg = elementwise_config(target)
    table, align = group_table(cols, device)
    numels = [t.numel() for t in cols[1]]
    blocks = _block_table(numels, cfg["BLOCK"], device)
    if any(n % align for n in numels):
        align = 1
    if device_hyper is not None:
        alpha = decay = 0.0
        hyper_args, hyper_flags = device_hyper.kernel_args(table)
    else:
        alpha, decay = -step_size, (-lr * weight_decay if weight_decay > 0.0 else 0.0)
        hyper_args, hyper_flags = host_hyper_args(table)
    with device_guard(Ws[0]):
        launch(
            _adamw_kernel, (blocks.shape[0],),
            cols[0][0], cols[1][0], cols[2][0], cols[3][0], table, blocks,
            float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
            float(alpha), float(decay), *hyper_args,
            INTERPRET=target.interpret, ALIGN=align, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
            HYPER=device_hyper is not None, **hyper_flags,
        )
    _write_back(copies)
