"""Pieces the op files share: dtype handling, the tile GEMM main loop, tile ordering, launch configs.

Conventions of every kernel in this package:

* every tensor reaches a kernel as a pointer plus its strides, so transposed and sliced views are
  read and written in place (the one copy: an elementwise operand of 3+ dims whose strides do not
  collapse to 2-D, see ``lowrank_adam._views``);
* hyperparameters are runtime scalars, never ``tl.constexpr``: a new learning rate or step count does
  not recompile;
* ``INTERPRET`` (a ``tl.constexpr`` the launchers set from :func:`interpreting`) works around the
  Triton CPU interpreter, whose bf16 arithmetic and bf16 ``tl.dot`` give garbage and whose fp32→bf16
  cast truncates instead of rounding to nearest even (measured on triton 3.9): under it bf16 values
  are upcast right after the load and rounded by :func:`rne_bf16` before a bf16 store;
* no autotuning: the in-place kernels must never run twice over their state, and one fixed,
  shape-derived config per launch keeps the interpreter (where ``@triton.autotune`` with several
  configs fails) and the GPU on the same code path.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from . import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Codes for the ``DOT`` constexpr: the dtype both tl.dot operands are cast to.
DOT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (launchers validate before they launch)."""
    if not ok:
        raise ValueError(message)


def check_dtype(name: str, t: torch.Tensor, allowed=SUPPORTED_DTYPES) -> None:
    check(t.dtype in allowed, f"{name} must be one of {allowed}, got {t.dtype}")


def check_fp32_state(name: str, t: torch.Tensor, shape) -> None:
    check(t.dtype == torch.float32, f"{name} (optimizer state) must be float32, got {t.dtype}")
    check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    check(len(set(devices.values())) == 1, f"tensors must be on one device, got {devices}")


def dot_code(a_dtype: torch.dtype, b_dtype: torch.dtype, dot_dtype) -> int:
    """The dtype the GEMM multiplies in: ``dot_dtype`` when given, else the operands' common dtype
    (fp32, without TF32, when they differ, e.g. an fp32 low-rank tensor times a bf16 basis)."""
    if dot_dtype is None:
        dot_dtype = a_dtype if a_dtype == b_dtype else torch.float32
    check(dot_dtype in DOT_CODES, f"dot_dtype must be one of {tuple(DOT_CODES)}, got {dot_dtype}")
    return DOT_CODES[dot_dtype]


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fit(dim: int, cap: int, floor: int = 16) -> int:
    """Smallest power of two >= dim, within [floor, cap] (tl.dot needs tiles of at least 16)."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(dim), 1))))


def gemm_config(M: int, N: int, K: int, a_size: int, b_size: int, dot: int, device: torch.device,
                *, heavy_epilogue: bool = False) -> dict:
    """Tile sizes for an (M x K) @ (K x N) product.

    Interpreter: small tiles (it is slow per element and cannot autotune). GPU (for Hopper, chosen
    without measurements, so conservative): output tiles of 64 or 128 (a small rank is padded to 64:
    the MMA waste is cheap next to reading G, and few distinct tiles keep compile count down), 128
    shrunk to 64 while the grid would leave SMs idle (the projection of a tall G has few output tiles
    and, since the Adam epilogue needs the complete K sum, cannot split K); K tiles of 64 for 16-bit
    products and 32 for fp32; 3 pipeline stages within ~160 KB of shared memory. Register use
    checked with ptxas for sm_90 (the 64x128, 8-warp Adam-epilogue tile spills a few bytes; 128x128
    would spill ~1.4 KB).
    """
    if interpreting() or device.type != "cuda":
        return dict(BLOCK_M=_fit(M, 32), BLOCK_N=_fit(N, 32), BLOCK_K=_fit(K, 32), GROUP_M=4,
                    num_warps=4, num_stages=1)
    bm, bn = _fit(M, 128, 64), _fit(N, 128, 64)
    if heavy_epilogue:
        # acc, M and V tiles are all live in the epilogue: at most 64x128 fp32 each with 8 warps
        # (ptxas, sm_90: 255 registers and 32 bytes of spill; 128x128 spills ~1.4 KB).
        while bm * bn > 128 * 64:
            if bm >= bn:
                bm //= 2
            else:
                bn //= 2
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    while triton.cdiv(M, bm) * triton.cdiv(N, bn) < sms and max(bm, bn) > 64:
        if bm >= bn:
            bm //= 2
        else:
            bn //= 2
    bk = _fit(K, 64 if dot != 0 else 32, 32)
    stages = 3

    def smem(bk, stages):
        return stages * (bm * bk * a_size + bk * bn * b_size)

    while smem(bk, stages) > 160 * 1024 and bk > 16:
        bk //= 2
    while smem(bk, stages) > 160 * 1024 and stages > 2:
        stages -= 1
    num_warps = 8 if bm * bn >= 128 * 64 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=num_warps, num_stages=stages)


def elementwise_config(device: torch.device) -> dict:
    """1024 elements per program, 8 per thread: enough bytes in flight for a streaming kernel, and
    few programs for the interpreter."""
    return dict(BLOCK=1024, num_warps=4)


def rows_cols(shape) -> tuple:
    """The (rows, cols) an elementwise kernel sees a tensor of ``shape`` as: (prod(shape[:-1]), shape[-1])."""
    cols = int(shape[-1]) if len(shape) else 1
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows, cols


def view_2d(t: torch.Tensor):
    """``t`` as a (rows, cols) view with its own strides, or None where no such view exists (a
    non-contiguous tensor of 3+ dims whose dims do not collapse: the caller then copies)."""
    rows, cols = rows_cols(t.shape)
    try:
        return t.view(rows, cols)
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------------------
# Device functions
# ---------------------------------------------------------------------------------------------------
@triton.jit
def rne_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still held in fp32.

    What a GPU's fp32→bf16 cast does; used under the interpreter, whose cast truncates. NaN is passed
    through (adding the rounding bias to a NaN's bits could carry into the sign).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def store_rounded(ptrs, x, mask, INTERPRET: tl.constexpr):
    """Store fp32 ``x`` into ``ptrs``' dtype, rounded once to nearest even."""
    if INTERPRET:
        if ptrs.dtype.element_ty == tl.bfloat16:
            x = rne_bf16(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def dot_operand(x, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast a loaded tile to the product dtype (fp32 for DOT=0, fp16 for 1, bf16 for 2)."""
    if DOT == 0:
        y = x.to(tl.float32)
    elif DOT == 1:
        y = x.to(tl.float16)
    else:
        if INTERPRET:
            # bf16 values carried in fp32: bf16 tl.dot is broken in the interpreter, and the
            # products of bf16 values are exact in fp32 anyway.
            y = rne_bf16(x.to(tl.float32))
        else:
            y = x.to(tl.bfloat16)
    return y


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row-tiles sweep the column tiles together, so the
    rows of A (and the columns of B) they share are read from L2 rather than from memory again."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def gemm_tile(a_ptr, b_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, offs_m, offs_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT: tl.constexpr, INTERPRET: tl.constexpr, SUMSQ: tl.constexpr):
    """The complete-K fp32 accumulator of one (BLOCK_M x BLOCK_N) tile of A @ B (masked edges), and
    the sums of squares along K of the operand tiles the loop reads anyway: ``SUMSQ`` = 1 gives
    ``Σ_k A[i, k]²`` for the tile's rows i (BLOCK_M), 2 gives ``Σ_k B[k, j]²`` for its columns j
    (BLOCK_N), of the loaded values in fp32; 0 returns an unused zero vector (no work in the loop)."""
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones instead of being masked (their results are
    # never stored), so only the K edge is masked in the loop (fewer live registers: measured with
    # ptxas for sm_90, 48 -> 32 bytes of spill in the Adam-epilogue config). Row offsets in int64.
    am = offs_m % M
    bn = offs_n % N
    a_ptrs = a_ptr + am[:, None].to(tl.int64) * s_am + offs_k[None, :] * s_ak
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + bn[None, :].to(tl.int64) * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SUMSQ == 2:
        sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        # Reduced per K tile rather than into a 2-D accumulator: one vector of live registers more.
        if SUMSQ == 1:
            a32 = a.to(tl.float32)
            sumsq += tl.sum(a32 * a32, axis=1)
        if SUMSQ == 2:
            b32 = b.to(tl.float32)
            sumsq += tl.sum(b32 * b32, axis=0)
        a = dot_operand(a, DOT, INTERPRET)
        b = dot_operand(b, DOT, INTERPRET)
        if DOT == 0 or (INTERPRET and DOT == 2):
            # fp32 operands: IEEE products (no TF32), so fp32 matches the reference.
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)  # 16-bit tensor cores, fp32 accumulation
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    return acc, sumsq


@triton.jit
def elem_offsets(offs, ncols, s0, s1, FLAT: tl.constexpr):
    """Memory offsets of flat element indices ``offs`` in a (rows x ncols) tensor with strides."""
    if FLAT:
        o = offs
    else:
        o = (offs // ncols) * s0 + (offs % ncols) * s1
    return o
