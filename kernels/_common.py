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
import contextvars
import dataclasses
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


# ---------------------------------------------------------------------------------------------------
# Launch target and the one launch point
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """What the launch configs are chosen for: the interpreter, or a CUDA GPU of compute capability
    ``arch`` (90 for H100/H200) with ``num_sms`` SMs."""

    interpret: bool
    arch: int = 0
    num_sms: int = 1


_TARGET = contextvars.ContextVar("subspace_ops_kernels_target", default=None)
_LAUNCH_HOOK = contextvars.ContextVar("subspace_ops_kernels_launch_hook", default=None)


@contextlib.contextmanager
def override(target: Target = None, launch_hook=None):
    """Inside: configs are chosen for ``target`` whatever the tensors' device, and every launch goes to
    ``launch_hook(kernel, grid, args, kwargs)`` instead of running. ``bench/codegen.py`` uses this to
    compile for sm_90 on a CPU (the hook calls Triton's ``warmup``) and to time the host path."""
    t1 = _TARGET.set(target) if target is not None else None
    t2 = _LAUNCH_HOOK.set(launch_hook) if launch_hook is not None else None
    try:
        yield
    finally:
        if t2 is not None:
            _LAUNCH_HOOK.reset(t2)
        if t1 is not None:
            _TARGET.reset(t1)


def current_target(device: torch.device) -> Target:
    """The override's target, else the interpreter, else ``device``'s GPU."""
    target = _TARGET.get()
    if target is not None:
        return target
    if interpreting() or device.type != "cuda":
        return Target(interpret=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return Target(interpret=False, arch=10 * major + minor, num_sms=_num_sms(index))


def launches_intercepted() -> bool:
    """True inside :func:`override` with a launch hook: kernels are compiled or counted, never run, so
    tensors on any device (CPU, meta) may stand in for CUDA ones."""
    return _LAUNCH_HOOK.get() is not None


def launch(kernel, grid, *args, **kwargs):
    """Every kernel launch of this package goes through here (see :func:`override`)."""
    hook = _LAUNCH_HOOK.get()
    if hook is not None:
        return hook(kernel, grid, args, kwargs)
    return kernel[grid](*args, **kwargs)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a wrapper object: ~2.6 µs a call on Triton 3.9)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _fit(dim: int, cap: int, floor: int = 16) -> int:
    """Smallest power of two >= dim, within [floor, cap] (tl.dot needs tiles of at least 16)."""
    return max(floor, min(cap, next_pow2(dim)))


def _interpreter_tiles(M: int, N: int, K: int) -> dict:
    return dict(BLOCK_M=_fit(M, 32), BLOCK_N=_fit(N, 32), BLOCK_K=_fit(K, 32), GROUP_M=4,
                num_warps=4, num_stages=1)


def _k_tile_and_stages(bm: int, bn: int, K: int, a_size: int, b_size: int, dot: int) -> tuple:
    """K tiles of 64 for 16-bit products and 32 for fp32, up to 3 pipeline stages, all within
    ~160 KB of shared memory (sm_90 has 227 KB; sm_80 163 KB)."""
    bk = _fit(K, 64 if dot != 0 else 32, 16)
    stages = 3

    def smem(bk, stages):
        return stages * (bm * bk * a_size + bk * bn * b_size)

    while smem(bk, stages) > 160 * 1024 and bk > 16:
        bk //= 2
    while smem(bk, stages) > 160 * 1024 and stages > 2:
        stages -= 1
    return bk, stages


@functools.lru_cache(maxsize=4096)
def project_config(M: int, N: int, K: int, a_size: int, b_size: int, dot: int, target: Target,
                   count: int = 1, *, rank_dim: int = 0, heavy_epilogue: bool = False) -> dict:
    """Tiles for a projection ``(M x K) @ (K x N)`` whose output dimension ``rank_dim`` (0: M, 1: N)
    is the rank, over a group of ``count`` matrices.

    GPU: the rank dimension takes one tile of up to 128 (a rank of 256 is two tiles, whose programs
    run next to each other in grouped order, so the second read of a G slab hits L2); the other
    dimension 64, halved while the whole group's grid stays under ~one wave, but never below 64 rows
    for 16-bit products (wgmma; side "right" then halves the rank tile instead). The epilogue needs the
    complete K sum, so K is never split; filling the SMs comes from the group dimension (one launch
    per same-shape group: 32+ matrices in a 7B model) and from the long side of G. With the Adam
    epilogue the accumulator and the M and V tiles are live together: 128x64 fp32 each over 8 warps
    is 96 registers of tiles per thread (register use: ``python -m bench --compile-only sm_90``).
    """
    if target.interpret:
        return _interpreter_tiles(M, N, K)
    if dot == 0:
        # fp32 products run on FMA units, operands in registers: 64x64 tiles (ptxas: larger ones spill).
        br, bo = _fit(N if rank_dim else M, 64, 32), 64
    else:
        br = _fit(N if rank_dim else M, 128, 64)
        bo = 64 if heavy_epilogue else 128
    bm, bn = (br, bo) if rank_dim == 0 else (bo, br)
    # wgmma (sm_90's tensor-core instruction) needs tiles of at least 64 rows: below that Triton
    # falls back to mma.sync. Shrink toward ~one wave without going there: the non-rank side first,
    # then (side "right", where the rank is the column tile) the rank tile.
    min_m = 64 if dot != 0 else 16

    def ctas(bm, bn):
        return cdiv(M, bm) * cdiv(N, bn) * count

    while 10 * ctas(bm, bn) < 9 * target.num_sms:
        if rank_dim == 0 and bn > 32:
            bn //= 2
        elif rank_dim == 1 and bm > max(min_m, 32):
            bm //= 2
        elif rank_dim == 1 and bn > 32:
            bn //= 2
        else:
            break
    bk, stages = _k_tile_and_stages(bm, bn, K, a_size, b_size, dot)
    num_warps = 8 if bm * bn >= 128 * 64 or (dot == 0 and bm * bn >= 64 * 64) else 4
    if dot == 0:
        stages = 2  # fp32 FMA products: 3 stages spill on sm_80 and, with the fused column sums, on sm_90
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=num_warps, num_stages=stages)


@functools.lru_cache(maxsize=4096)
def back_project_config(M: int, N: int, K: int, a_size: int, b_size: int, dot: int, target: Target,
                        count: int = 1) -> dict:
    """Tiles for a back-projection ``(M x K) @ (K x N)``, K the (small) rank, output the weight.

    GPU: 128x128 output tiles over 8 warps (the W tile is loaded before the K loop, so its latency
    hides behind the GEMM), halved while the whole group's grid stays under one wave. Every program
    reads a (128 x r) and an (r x 128) operand slab; larger tiles would read them less often but hold
    more registers.
    """
    if target.interpret:
        return _interpreter_tiles(M, N, K)
    cap = 64 if dot == 0 else 128  # fp32 products on FMA units: 128x128 spills (ptxas, sm_90)
    bm, bn = _fit(M, cap, 64), _fit(N, cap, 64)
    while cdiv(M, bm) * cdiv(N, bn) * count < target.num_sms and max(bm, bn) > 64:
        if bm >= bn:
            bm //= 2
        else:
            bn //= 2
    bk, stages = _k_tile_and_stages(bm, bn, K, a_size, b_size, dot)
    num_warps = 8 if bm * bn >= 128 * 64 or (dot == 0 and bm * bn >= 64 * 64) else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=num_warps, num_stages=stages)


def elementwise_config(target: Target) -> dict:
    """1024 elements per program, 8 per thread: enough bytes in flight for a streaming kernel, and
    few programs for the interpreter."""
    return dict(BLOCK=1024, num_warps=4)


# ---------------------------------------------------------------------------------------------------
# Step sizes read from device memory (capturable steps, a learning rate held in a CUDA tensor)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DeviceHyper:
    """The inputs of a weight update's step size when some live in device memory.

    ``lr``: a 0-d tensor on the weights' device (read by the kernel: a scheduler may change it with no
    host sync), or None to use ``lr_value``. ``step``: a 0-d fp32 tensor holding the step count of
    this step (capturable: advanced on the device), or None to use ``bias_correction``, the host's
    ``sqrt(1-β2^t)/(1-β1^t)``. The kernel forms ``alpha = -lr·c_t·scale`` and ``decay = -lr·wd`` in
    fp32 (docs/algorithms.md §1), one rounding away from the host's float64 step size.
    """

    lr: object = None
    step: object = None
    lr_value: float = 0.0
    bias_correction: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    correct_bias: bool = True
    scale: float = 1.0
    weight_decay: float = 0.0

    def kernel_args(self, dummy: torch.Tensor) -> tuple:
        """(lr_ptr, step_ptr, lr_value, bias_correction, log2_beta1, log2_beta2, scale, weight_decay)
        and the constexprs LR_PTR, STEP_PTR, CORRECT_BIAS."""
        import math

        def log2(b):
            return math.log2(b) if b > 0.0 else float("-inf")

        args = (self.lr if self.lr is not None else dummy, self.step if self.step is not None else dummy,
                float(self.lr_value), float(self.bias_correction), log2(self.beta1), log2(self.beta2),
                float(self.scale), float(self.weight_decay))
        flags = dict(LR_PTR=self.lr is not None, STEP_PTR=self.step is not None,
                     CORRECT_BIAS=bool(self.correct_bias))
        return args, flags


def host_hyper_args(dummy: torch.Tensor) -> tuple:
    """Placeholders for the DeviceHyper arguments of a launch whose step size is a host scalar."""
    return (dummy, dummy, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0), dict(LR_PTR=False, STEP_PTR=False, CORRECT_BIAS=False)


@triton.jit
def update_scalars(alpha, decay, lr_ptr, step_ptr, lr_value, bias_correction, log2_beta1, log2_beta2,
                   scale, weight_decay, HYPER: tl.constexpr, LR_PTR: tl.constexpr, STEP_PTR: tl.constexpr,
                   CORRECT_BIAS: tl.constexpr):
    """(alpha, decay) of a weight update: the host's scalars (HYPER = 0), or formed from the learning
    rate and step count in device memory (HYPER = 1, see DeviceHyper)."""
    if HYPER:
        if LR_PTR:
            lr = tl.load(lr_ptr).to(tl.float32)
        else:
            lr = lr_value
        if STEP_PTR:
            t = tl.load(step_ptr).to(tl.float32)
            if CORRECT_BIAS:
                c = tl.div_rn(tl.sqrt_rn(1.0 - tl.exp2(t * log2_beta2)), 1.0 - tl.exp2(t * log2_beta1))
            else:
                c = 1.0
        else:
            c = bias_correction
        alpha = -(lr * c) * scale
        decay = -lr * weight_decay
    return alpha, decay


# ---------------------------------------------------------------------------------------------------
# Groups: one launch for several same-layout matrices
# ---------------------------------------------------------------------------------------------------
_TABLES: dict = {}
_TABLES_MAX = 512
_WORKSPACES: dict = {}
# Offsets that are multiples of this many elements keep 16-byte vector access for every dtype (the
# base pointers themselves are 16-byte aligned, which Triton specializes on).
TABLE_ALIGN = 16


class Column(list):
    """A list of tensors (one per matrix of a group) that computes their data pointers once: the same
    column (a basis list, a workspace) often feeds two launches of a step."""

    __slots__ = ("_ptrs",)

    def __init__(self, tensors=(), ptrs=None):
        super().__init__(tensors)
        self._ptrs = ptrs

    def ptrs(self) -> tuple:
        if self._ptrs is None:
            self._ptrs = tuple(t.data_ptr() for t in self)
        return self._ptrs


def _ptrs(col) -> tuple:
    return col.ptrs() if isinstance(col, Column) else tuple(t.data_ptr() for t in col)


def group_table(columns, device: torch.device):
    """``(table, align)`` for a grouped launch: ``columns`` is a list of tensor lists (one list per
    kernel pointer argument, one tensor per matrix). The kernel gets each column's first tensor as its
    pointer argument and ``table[g, c]``, the element offset of matrix g's tensor from that first
    tensor, so one launch walks the whole group. ``align`` is TABLE_ALIGN when every offset is a
    multiple of it (separate allocations are 512-byte aligned; a stacked workspace is when one
    matrix's size is), else 1. Tables are cached by the pointers they hold: parameters, states and
    workspaces keep their addresses from step to step, and the caching allocator mostly hands a new
    gradient its predecessor's address, so a steady loop builds no table and copies nothing to the
    device (which also keeps a CUDA graph capture free of host-to-device copies)."""
    ptrs = tuple(_ptrs(col) for col in columns)
    sizes = tuple(col[0].element_size() for col in columns)
    key = (device, ptrs, sizes)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    rows = []
    align = TABLE_ALIGN
    count = len(columns[0])
    for g in range(count):
        row = []
        for col_ptrs, size in zip(ptrs, sizes):
            delta = col_ptrs[g] - col_ptrs[0]
            check(delta % size == 0, "tensors of one group column must be element-aligned with each other")
            off = delta // size
            if off % TABLE_ALIGN:
                align = 1
            row.append(off)
        rows.append(row)
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (table, align)
    return table, align


def workspace(name: str, count: int, shape, dtype: torch.dtype, device: torch.device) -> Column:
    """``count`` matrices of ``shape`` stacked in one buffer that is allocated once per (name, shape,
    dtype, device) and grown, never shrunk (intermediates of a grouped step, e.g. the Adam direction
    N between the projection and the back-projection). The views are cached too."""
    key = (name, tuple(shape), dtype, device)
    entry = _WORKSPACES.get(key)
    if entry is None or entry[0].shape[0] < count:
        buf = torch.empty((count, *shape), dtype=dtype, device=device)
        entry = _WORKSPACES[key] = (buf, {})
    buf, views = entry
    col = views.get(count)
    if col is None:
        base, step = buf.data_ptr(), buf.stride(0) * buf.element_size()
        col = views[count] = Column(buf[:count].unbind(0), tuple(base + i * step for i in range(count)))
    return col


def check_group(name: str, tensors, like=None) -> None:
    """Every tensor of a group column has the first one's shape, strides, dtype and device."""
    first = tensors[0] if like is None else like
    want = (first.shape, first.stride(), first.dtype, first.device)
    for i, t in enumerate(tensors):
        if (t.shape, t.stride(), t.dtype, t.device) != want:  # the message only when it fails (host cost)
            raise ValueError(
                f"{name}[{i}] must match {name}[0]'s layout (shape {tuple(first.shape)}, strides "
                f"{first.stride()}, {first.dtype}, {first.device}), got {tuple(t.shape)}, {t.stride()}, "
                f"{t.dtype}, {t.device}")


def check_group_unless(checked: bool, name: str, tensors) -> None:
    if not checked:
        check_group(name, tensors)


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
def group_offset(table_ptr, g, COL: tl.constexpr, NCOL: tl.constexpr, ALIGN: tl.constexpr):
    """Element offset of matrix ``g``'s tensor in column ``COL`` of a group table (see
    :func:`group_table`), marked a multiple of ``ALIGN`` so the loads stay vectorized."""
    off = tl.load(table_ptr + g * NCOL + COL)
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off


@triton.jit
def elem_offsets(offs, ncols, s0, s1, FLAT: tl.constexpr):
    """Memory offsets of flat element indices ``offs`` in a (rows x ncols) tensor with strides."""
    if FLAT:
        o = offs
    else:
        o = (offs // ncols) * s0 + (offs % ncols) * s1
    return o
