"""``python -m bench --compile-only sm_90[,sm_80]``: a static GPU codegen report that needs no GPU.

Every kernel launch the optimizers' ops make for a case is compiled for a GPU target on the CPU and
measured from its machine code, instead of being run:

* Triton's active driver is replaced by :class:`StandInDriver` (target ``GPUTarget("cuda", 90, 32)``,
  device 0, stream 0), so ``JITFunction.warmup`` compiles and binds for that target without CUDA;
* ``kernels._common.override`` makes the launchers choose their CUDA configs for the target and hand
  every launch to :meth:`Compiler.hook`, which compiles it (``kernel.warmup``) and keeps the compiled
  kernel with its grid; the ops accept CPU tensors while the hook is active, and nothing runs, so the
  tensors are ``torch.empty`` (never touched: no memory is committed even at 4096x11008);
* ``ptxas -v`` (the one Triton ships) gives registers and spills; the PTX text gives the global
  load/store widths, ``cp.async`` sizes, ``wgmma`` / ``mma.sync`` counts and the ``wgmma`` waits.

One row per (kernel variant, case): a case is one call of an optimizer step at one shape, rank, dtype,
side and algorithm (:func:`run_case` is the one place that says which ops a case calls). Launches
that compile to the same kernel share one analysis (by the compiled kernel's hash).

TRITON_INTERPRET must not be set in this process: the kernels would be interpreter functions, which
have no machine code. ``python -m bench --compile-only`` re-executes itself without it.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str  # "sm_90"
    cc: int  # 90
    ptxas_name: str  # what ptxas --gpu-name takes for Triton's PTX (Triton emits sm_90a for Hopper)
    sms: int  # SMs of the reference part (H100/H200 SXM: 132, A100: 108)
    smem_limit: int  # bytes of shared memory one CTA may use (opt-in maximum)


ARCHS = {
    "sm_90": Arch("sm_90", 90, "sm_90a", 132, 227 * 1024),
    "sm_80": Arch("sm_80", 80, "sm_80", 108, 163 * 1024),
}


def parse_archs(text: str) -> List[Arch]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ARCHS]
    if bad or not names:
        raise ValueError(f"unknown arch {', '.join(bad) or repr(text)}; choose from {', '.join(ARCHS)}")
    return [ARCHS[x] for x in names]


# ---------------------------------------------------------------------------------------------------
# The stand-in driver and the compile hook
# ---------------------------------------------------------------------------------------------------
class StandInDriver:
    """What Triton's JIT asks its active driver during ``warmup`` (compile and bind, no launch), for a
    CUDA target that is not there. Anything else raises, naming what was asked for."""

    def __init__(self, arch: Arch):
        self.arch = arch

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch.cc, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")  # where the stand-in tensors live

    def get_device_interface(self):
        raise RuntimeError("codegen stand-in driver: no device interface (nothing runs on a GPU here)")

    def __getattr__(self, name):
        raise AttributeError(
            f"codegen stand-in driver has no {name!r}: this Triton asks the driver for more than warmup "
            "needed so far; add it to bench/codegen.py's StandInDriver"
        )


@dataclasses.dataclass
class Launch:
    kernel: str  # the JIT function's name
    grid: tuple
    constexprs: dict  # the launch's keyword arguments (constexprs and num_warps/num_stages)
    compiled: object  # Triton's CompiledKernel
    compile_s: float


def _jit_function_class():
    from triton.runtime.jit import JITFunction

    return JITFunction


class Compiler:
    """The launch hook: compiles every launch for ``arch`` and records it."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.launches: List[Launch] = []
        self._saved_caches: Dict[int, tuple] = {}

    def hook(self, kernel, grid, args, kwargs):
        if not isinstance(kernel, _jit_function_class()):
            raise RuntimeError(
                f"{getattr(kernel, '__name__', kernel)!r} is not a compiled JIT function "
                f"({type(kernel).__name__}): TRITON_INTERPRET was set when the kernels were imported; "
                "run the codegen report in a process without it"
            )
        if callable(grid):
            raise RuntimeError("codegen: launchers must pass a grid tuple, not a callable")
        self._isolate(kernel)
        t0 = time.perf_counter()
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        dt = time.perf_counter() - t0
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        self.launches.append(Launch(name, tuple(int(g) for g in grid), dict(kwargs), compiled, dt))
        return None

    def _isolate(self, kernel) -> None:
        # A JIT function keeps its binder (which holds the target) per device index; device 0 is
        # every arch here, so each context starts from fresh caches and puts the old ones back.
        if id(kernel) in self._saved_caches or not hasattr(kernel, "device_caches"):
            return
        self._saved_caches[id(kernel)] = (kernel, kernel.device_caches)
        kernel.device_caches = collections.defaultdict(kernel.create_binder)

    def restore(self) -> None:
        for kernel, caches in self._saved_caches.values():
            kernel.device_caches = caches
        self._saved_caches.clear()


def _driver_config():
    import triton.runtime

    return triton.runtime.driver


@contextlib.contextmanager
def compiling_for(arch: Arch):
    """Inside: Triton's active driver is a :class:`StandInDriver` for ``arch`` and every kernel launch
    of ``subspace_ops.kernels`` is compiled (not run) by the yielded :class:`Compiler`."""
    from subspace_ops import kernels as _kernels
    from subspace_ops.kernels import _common

    if _kernels.interpreting():
        raise RuntimeError(
            "TRITON_INTERPRET is set: the kernels are interpreter functions without machine code; run "
            "`python -m bench --compile-only ...` (it restarts itself without TRITON_INTERPRET)"
        )
    config = _driver_config()
    # The raw attribute: reading `.active` would create the default driver, and a CPU machine has none.
    previous = config.__dict__.get("_active", None)
    config.set_active(StandInDriver(arch))
    compiler = Compiler(arch)
    try:
        target = _common.Target(interpret=False, arch=arch.cc, num_sms=arch.sms)
        with _common.override(target=target, launch_hook=compiler.hook):
            yield compiler
    finally:
        compiler.restore()
        if "_active" in config.__dict__:
            config._active = previous
        else:
            config.set_active(previous)


# ---------------------------------------------------------------------------------------------------
# Cases: which ops one optimizer step calls
# ---------------------------------------------------------------------------------------------------
# Iteration order is priority order (a run cut short by a timeout keeps the first cases): the issue-4
# target, 4096x11008 at rank 256, first.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LLAMA_SHAPES = [(4096, 11008), (4096, 4096), (11008, 4096)]
RANKS = [256, 128, 512]
SIDES = ["left", "right", "full"]
MATRIX_ALGOS = ["galore", "snsm"]


@dataclasses.dataclass(frozen=True)
class Case:
    """``algo``: "galore" / "snsm" (one matrix step: ``m x n`` weight, ``rank``, ``side``), "adamw"
    (plain AdamW over an ``m x n`` tensor, ``m = 0`` for a vector of ``n``), "lowrank_adam" (the
    standalone low-rank Adam over an ``m x n`` R), "subset_norm" (``side`` "rows": V (m, 1), "cols":
    V (1, n))."""

    algo: str
    m: int
    n: int
    dtype: str
    rank: int = 0
    side: str = ""
    # capturable=True (or a tensor lr): the update kernels read lr and the step count from memory
    capturable: bool = False

    @property
    def label(self) -> str:
        tail = " capturable" if self.capturable else ""
        if self.algo in MATRIX_ALGOS:
            return f"{self.m}x{self.n} r{self.rank} {self.dtype} {self.side} {self.algo}{tail}"
        shape = f"{self.n}" if self.m == 0 else f"{self.m}x{self.n}"
        return f"{shape} {self.dtype} {self.algo}" + (f" {self.side}" if self.side else "") + tail

    @property
    def matrix(self) -> bool:
        return self.algo in MATRIX_ALGOS


def run_case(case: Case, device: str = "cpu") -> None:
    """Call the ops one optimizer step makes for ``case``, as the optimizers call them
    (``subspace_ops/optim``): inside :func:`compiling_for` every kernel launch is compiled, not run.

    The tensors are never read or written: empty tensors with the optimizers' shapes, dtypes and
    (contiguous, 64-byte aligned) layouts are all the binder needs."""
    from subspace_ops import ops, projectors, reference

    dt = DTYPES[case.dtype]
    m, n = case.m, case.n

    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)
    step_size = 1e-3
    if case.capturable:  # what a capturable group passes (SubspaceOptimizer._hyper)
        hyper.update(lr=empty(), step=empty())
        step_size = None
    if case.matrix:
        W, G = empty(m, n, dtype=dt), empty(m, n, dtype=dt)
        r = projectors.effective_rank(case.rank, m, n)
        # bases have the gradient's dtype (projectors.svd_basis): left (m, r), right (n, r), full both
        basis = {
            "left": lambda: empty(m, r, dtype=dt),
            "right": lambda: empty(n, r, dtype=dt),
            "full": lambda: (empty(m, r, dtype=dt), empty(n, r, dtype=dt)),
        }[case.side]()
        M = empty(*projectors.lowrank_shape(case.side, m, n, r))
        if case.algo == "galore":  # GaLoreAdamW._matrix_update
            V = empty(*M.shape)
            ops.galore_matrix_step_(W, G, basis, M, V, backend="triton", side=case.side, step_size=step_size,
                                    scale=0.25, **hyper)
        else:  # AdamSNSM._matrix_update
            V = empty(*reference.subset_norm_shape(m, n))
            ops.snsm_matrix_step_(W, G, basis, M, V, backend="triton", side=case.side, step_size=step_size,
                                  **hyper)
    elif case.algo == "adamw":  # SubspaceOptimizer._plain_step
        shape = (n,) if m == 0 else (m, n)
        W, G = empty(*shape, dtype=dt), empty(*shape, dtype=dt)
        ops.adam_step_(W, G, empty(*shape), empty(*shape), backend="triton", step_size=step_size, **hyper)
    elif case.algo == "lowrank_adam":
        ops.lowrank_adam_(empty(m, n, dtype=dt), empty(m, n), empty(m, n), backend="triton",
                          beta1=0.9, beta2=0.999, eps=1e-6)
    elif case.algo == "subset_norm":
        from subspace_ops.kernels import subset_norm

        V = empty(m, 1) if case.side == "rows" else empty(1, n)
        subset_norm.subset_norm_(empty(m, n, dtype=dt), V, beta2=0.999)
    else:
        raise ValueError(f"unknown case algo {case.algo!r}")


def all_cases() -> List[Case]:
    """The full coverage: every matrix step at the LLaMA-7B shapes, ranks, dtypes, sides and both
    algorithms, then the elementwise kernels."""
    out = [
        Case(algo, m, n, dtype, rank, side)
        for rank, (m, n), dtype, side, algo in itertools.product(RANKS, LLAMA_SHAPES, DTYPES, SIDES, MATRIX_ALGOS)
    ]
    out += [
        Case(algo, m, n, "bf16", 256, side, capturable=True)
        for (m, n), side, algo in itertools.product(LLAMA_SHAPES, ("left", "right"), MATRIX_ALGOS)
    ]
    for dtype in DTYPES:
        out.append(Case("adamw", 0, 4096, dtype))  # biases and norms
        out.append(Case("adamw", 0, 4096, dtype, capturable=True))
        out.append(Case("adamw", 32000, 4096, dtype))  # embedding / output head (full rank)
    from subspace_ops import projectors

    lowrank = sorted({
        projectors.lowrank_shape(side, m, n, r)
        for (m, n), r, side in itertools.product(LLAMA_SHAPES, RANKS, ("left", "right"))
    })
    out += [Case("lowrank_adam", a, b, dtype) for (a, b) in lowrank for dtype in DTYPES]
    out += [
        Case("subset_norm", m, n, dtype, side=side)
        for (m, n), dtype, side in itertools.product(LLAMA_SHAPES, DTYPES, ("rows", "cols"))
    ]
    return out


PRESETS = {
    # A handful of variants for CI: both GEMM kernels with every epilogue (Adam, momentum with and
    # without the fused Subset-Norm sum, plain stores of the "full" side), left and right, bf16 and
    # fp32, the rank-256 4096x11008 case for the wave check, and the elementwise kernels.
    "ci": [
        "4096x11008 r256 bf16 left galore",
        "11008x4096 r256 bf16 right snsm",
        "4096x4096 r128 fp32 right galore",
        "4096x4096 r128 fp32 left snsm",
        "4096x4096 r128 bf16 full galore",
        "4096 bf16 adamw",
        "4096x11008 r256 bf16 left galore capturable",
        "4096 bf16 adamw capturable",
        "256x11008 fp32 lowrank_adam",
        "4096x11008 bf16 subset_norm cols",
    ],
    # The cases measured before and after a kernel change (bench/results/codegen-*.json).
    "before": [
        "4096x11008 r256 bf16 left galore",
        "4096x4096 r128 bf16 right galore",
        "11008x4096 r256 bf16 right galore",
    ],
}


def select_cases(spec: Optional[str]) -> List[Case]:
    """``spec``: None or "all" (everything), else comma-separated tokens, each a preset name
    (``ci``, ``before``), an exact case label, or a substring of labels."""
    cases = all_cases()
    if spec is None or spec.strip() in ("", "all"):
        return cases
    by_label = {c.label: c for c in cases}
    chosen: Dict[str, Case] = {}
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token == "all":
            labels = list(by_label)
        elif token in PRESETS:
            labels = PRESETS[token]
        elif token in by_label:
            labels = [token]
        else:
            labels = [label for label in by_label if token in label]
            if not labels:
                raise ValueError(f"--cases: {token!r} is no preset ({', '.join(PRESETS)}) and matches no case")
        for label in labels:
            chosen.setdefault(label, by_label[label])
    return list(chosen.values())


# ---------------------------------------------------------------------------------------------------
# PTX and ptxas parsing
# ---------------------------------------------------------------------------------------------------
_COMMENT = re.compile(r"//.*$", re.M)
_LDST = re.compile(r"(?<![\w.])(ld|st)\.global((?:\.[\w:]+)+)")
_CP_ASYNC = re.compile(
    r"(?<![\w.])cp\.async((?:\.[\w:]+)*)\s+\[[^\]]*\]\s*,\s*\[[^\]]*\]\s*,\s*(0x[0-9a-fA-F]+|\d+)"
)
_CP_ASYNC_BULK = re.compile(r"(?<![\w.])cp\.async\.bulk(?:\.[\w:]+)*\s")
_WGMMA = re.compile(r"(?<![\w.])wgmma\.mma_async\b")
_WGMMA_WAIT = re.compile(r"(?<![\w.])wgmma\.wait_group\.sync\.aligned\s+(\d+)")
_MMA_SYNC = re.compile(r"(?<![\w.])mma\.sync\b")
_LDMATRIX = re.compile(r"(?<![\w.])ldmatrix\b")
_TYPE = re.compile(r"^(?:b|s|u|f|bf)(\d+)(?:x(\d+))?$")


def _access_bytes(qualifiers: str) -> Optional[int]:
    """Bytes one ld/st moves from its qualifiers (".v4.b32" -> 16, ".b16" -> 2), None if unknown."""
    vec, bits = 1, None
    for q in qualifiers.strip(".").split("."):
        if re.fullmatch(r"v\d+", q):
            vec = int(q[1:])
        elif (t := _TYPE.match(q)) is not None:
            bits = int(t.group(1)) * int(t.group(2) or 1)
    return None if bits is None else vec * bits // 8


def ptx_counts(ptx: str) -> dict:
    """Instruction counts of one kernel's PTX (static counts: instructions in the text, not executed).

    ``ld_global`` / ``st_global``: {bytes per instruction: count}, e.g. {16: 8} for eight
    ``ld.global.v4.b32``; ``ld_scalar16`` / ``st_scalar16``: scalar 16-bit accesses (``.b16`` etc.
    without a vector); ``cp_async``: {bytes: count} of the ``cp.async`` copies (``0x10`` = 16);
    ``cp_async_bulk``: TMA copies; ``wgmma``: ``wgmma.mma_async``; ``wgmma_wait``: {N: count} of
    ``wgmma.wait_group.sync.aligned N``; ``mma_sync``: ``mma.sync``; ``ldmatrix``."""
    text = _COMMENT.sub("", ptx)
    ld: collections.Counter = collections.Counter()
    st: collections.Counter = collections.Counter()
    scalar16 = {"ld": 0, "st": 0}
    for op, quals in _LDST.findall(text):
        nbytes = _access_bytes(quals)
        key = nbytes if nbytes is not None else 0
        (ld if op == "ld" else st)[key] += 1
        if nbytes == 2 and not re.search(r"\.v\d+", quals):
            scalar16[op] += 1
    cp = collections.Counter()
    for quals, size in _CP_ASYNC.findall(text):
        if "bulk" in quals:
            continue
        cp[int(size, 0)] += 1
    waits = collections.Counter(int(n) for n in _WGMMA_WAIT.findall(text))
    return {
        "ld_global": dict(sorted(ld.items())),
        "st_global": dict(sorted(st.items())),
        "ld_vec_max_bytes": max(ld) if ld else 0,
        "st_vec_max_bytes": max(st) if st else 0,
        "ld_scalar16": scalar16["ld"],
        "st_scalar16": scalar16["st"],
        "cp_async": dict(sorted(cp.items())),
        "cp_async_min_bytes": min(cp) if cp else None,
        "cp_async_bulk": len(_CP_ASYNC_BULK.findall(text)),
        "wgmma": len(_WGMMA.findall(text)),
        "wgmma_wait": dict(sorted(waits.items())),
        "wgmma_wait0": waits.get(0, 0),
        "wgmma_wait_other": sum(v for k, v in waits.items() if k != 0),
        "mma_sync": len(_MMA_SYNC.findall(text)),
        "ldmatrix": len(_LDMATRIX.findall(text)),
    }


def wgmma_serialized(counts: dict) -> Optional[bool]:
    """True when every wgmma wait drains the queue (``wait_group 0`` only: no MMA overlaps the next
    loads), None without wgmma."""
    if not counts["wgmma"]:
        return None
    return counts["wgmma_wait_other"] == 0


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(text: str) -> dict:
    """Registers (the largest over the functions compiled), spill stores/loads and stack frame bytes
    (summed) from ``ptxas -v`` output."""
    regs = [int(x) for x in _REGS.findall(text)]
    spills = [(int(a), int(b)) for a, b in _SPILLS.findall(text)]
    if not regs:
        raise ValueError(f"no 'Used N registers' line in ptxas output:\n{text}")
    stores = sum(a for a, _ in spills)
    loads = sum(b for _, b in spills)
    return {
        "regs": max(regs),
        "spill_stores": stores,
        "spill_loads": loads,
        "spill_bytes": stores + loads,
        "stack_bytes": sum(int(x) for x in _STACK.findall(text)),
    }


def find_ptxas(arch: Optional[Arch] = None) -> str:
    """The ptxas Triton itself compiles ``arch`` with (Triton 3.9 takes ``bin/ptxas-blackwell``, CUDA
    13, for sm_90 and up; 3.6 ``bin/ptxas``, CUDA 12.8, below sm_100), else TRITON_PTXAS_PATH, the
    ``bin/ptxas`` inside the triton package, or the one on PATH."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env and os.access(env, os.X_OK):
        return env
    if arch is not None:
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            path = get_ptxas(arch.cc).path
            if path and os.access(path, os.X_OK):
                return path
        except Exception:  # another Triton layout: fall back to the file search below
            pass
    import triton

    root = Path(triton.__file__).resolve().parent
    for rel in ("backends/nvidia/bin/ptxas", "third_party/cuda/bin/ptxas"):
        p = root / rel
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which("ptxas")
    if found:
        return found
    raise FileNotFoundError(f"no ptxas: not under {root}/backends/nvidia/bin, TRITON_PTXAS_PATH or PATH")


def triton_ptxas_flags() -> List[str]:
    """The code-changing flags Triton's own ptxas call adds (3.9: ``--regAllocOptLevel=2``, a
    workaround for a ptxas 13 bug; 3.6: none), so registers and spills match the cubin it builds."""
    try:
        import inspect

        from triton.backends.nvidia.compiler import CUDABackend

        src = inspect.getsource(CUDABackend.make_cubin)
    except Exception:
        return []
    return [flag for flag in ("--regAllocOptLevel=2",) if flag in src]


def ptxas_version(ptxas: str) -> str:
    try:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    found = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{found.group(1)} ({found.group(2)})" if found else "unknown"


def _ptxas_cache_dir() -> Optional[Path]:
    """Where ptxas results are kept between runs (``SUBSPACE_OPS_CODEGEN_CACHE``, default
    ``~/.cache/subspace_ops/codegen``; "0" or "" turns it off): a rerun then only compiles what changed."""
    text = os.environ.get("SUBSPACE_OPS_CODEGEN_CACHE")
    if text is not None:
        return Path(text) if text not in ("", "0") else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "subspace_ops" / "codegen"


def run_ptxas(ptx: str, arch: Arch, ptxas: Optional[str] = None, flags: Sequence[str] = ()) -> dict:
    """``ptxas -v`` on ``ptx`` for ``arch``, parsed (:func:`parse_ptxas`); cached on disk by the
    ptxas binary, flags, arch and PTX text."""
    ptxas = ptxas or find_ptxas(arch)
    cache = _ptxas_cache_dir()
    entry = None
    if cache is not None:
        st = os.stat(ptxas)
        key = hashlib.sha256(
            "\0".join([ptxas, str(st.st_size), str(st.st_mtime_ns), *flags, arch.ptxas_name, ptx]).encode()
        ).hexdigest()
        entry = cache / f"{key}.json"
        try:
            return json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    info = _run_ptxas(ptx, arch, ptxas, flags)
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(entry, json.dumps(info))
        except OSError:
            pass  # a read-only home: no cache
    return info


def _run_ptxas(ptx: str, arch: Arch, ptxas: str, flags: Sequence[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="codegen-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx, encoding="utf-8")
        out = subprocess.run(
            [ptxas, "-v", *flags, f"--gpu-name={arch.ptxas_name}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, timeout=300,
        )
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    return parse_ptxas(out.stdout + out.stderr)


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------
_DOT_NAMES = {0: "fp32", 1: "fp16", 2: "bf16"}
_ROLES = {
    "_project_kernel": {0: "project", 1: "project+adam", 2: "project+momentum"},
    "_back_project_kernel": {0: "back_project", 1: "back_project+update", 2: "back_project+snsm_update"},
}


def role(kernel: str, constexprs: dict) -> str:
    """A readable name of what the launch does (the kernel and its epilogue)."""
    name = _ROLES.get(kernel, {}).get(constexprs.get("EPILOGUE"), kernel.strip("_").removesuffix("_kernel"))
    if constexprs.get("SUMSQ"):
        name += "+sumsq"
    return name


def _config_text(constexprs: dict) -> str:
    keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in constexprs]
    tile = "x".join(str(constexprs[k]) for k in keys)
    if not tile:
        tile = "x".join(str(v) for k, v in constexprs.items() if k.startswith("BLOCK"))
    return tile


def _write_atomic(path: Path, text: str) -> None:
    # worker processes may write the same variant's file at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-")


class Report:
    """Compiles cases for archs and builds the rows."""

    def __init__(self, ptx_dir: Optional[str] = None, log=None):
        self.rows: List[dict] = []
        self.ptx_dir = Path(ptx_dir) if ptx_dir else None
        self._analysis: Dict[tuple, dict] = {}  # (arch, compiled hash) -> ptxas + PTX counts
        self._ptxas = {}  # arch name -> ptxas path
        self._flags = triton_ptxas_flags()
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if self.ptx_dir:
            self.ptx_dir.mkdir(parents=True, exist_ok=True)

    def run(self, archs: Sequence[Arch], cases: Sequence[Case], jobs: int = 1) -> List[dict]:
        """Rows of every case for every arch, in that order; ``jobs`` > 1 compiles in that many worker
        processes (compiling and ptxas are single-threaded, and cases are independent)."""
        for arch in archs:
            self._ptxas.setdefault(arch.name, find_ptxas(arch))
        tasks = [(arch, case) for arch in archs for case in cases]
        jobs = max(1, min(jobs, len(tasks)))
        if jobs == 1:
            results = (self.run_one(arch, case) for arch, case in tasks)
            pool = None
        else:
            ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked Triton/torch state
            pool = ctx.Pool(jobs, initializer=_worker_init, initargs=(str(self.ptx_dir) if self.ptx_dir else None,))
            results = pool.imap(_worker_task, tasks, chunksize=1)
        try:
            for i, ((arch, case), (rows, seconds)) in enumerate(zip(tasks, results)):
                self.rows.extend(rows)
                self._log(f"[{i + 1}/{len(tasks)} {arch.name}] {case.label:<38} {len(rows)} kernel(s) {seconds:5.1f} s")
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        return self.rows

    def run_one(self, arch: Arch, case: Case) -> tuple:
        """(rows, seconds) of one case compiled for one arch, in this process."""
        t0 = time.perf_counter()
        with compiling_for(arch) as compiler:
            run_case(case)
        rows = self._rows(arch, case, compiler.launches)
        return rows, time.perf_counter() - t0

    def _analyze(self, arch: Arch, launch: Launch) -> dict:
        ck = launch.compiled
        key = (arch.name, ck.hash)
        if key not in self._analysis:
            ptx = ck.asm["ptx"]
            ptxas = self._ptxas.setdefault(arch.name, find_ptxas(arch))
            info = run_ptxas(ptx, arch, ptxas, self._flags)
            info.update(ptx_counts(ptx))
            info["wgmma_serialized"] = wgmma_serialized(info)
            info["ptx_file"] = None
            if self.ptx_dir:
                c = launch.constexprs
                stem = _safe(f"{arch.name}-{role(launch.kernel, c)}-{_dot_name(c) or 'elem'}-{_config_text(c)}-"
                             f"{ck.hash[:10]}")
                _write_atomic(self.ptx_dir / f"{stem}.ptx", ptx)
                if "ttgir" in ck.asm:
                    _write_atomic(self.ptx_dir / f"{stem}.ttgir", ck.asm["ttgir"])
                info["ptx_file"] = f"{stem}.ptx"
            self._analysis[key] = info
        return self._analysis[key]

    def _rows(self, arch: Arch, case: Case, launches: Iterable[Launch]) -> List[dict]:
        rows, seen = [], set()
        for launch in launches:
            ck = launch.compiled
            key = (ck.hash, launch.grid)
            if key in seen:  # the same compiled kernel on the same grid twice in one step: one row
                continue
            seen.add(key)
            info = self._analyze(arch, launch)
            md = ck.metadata
            ctas = 1
            for g in launch.grid:
                ctas *= g
            rows.append({
                "kernel": launch.kernel,
                "role": role(launch.kernel, launch.constexprs),
                "case": case.label,
                "algo": case.algo,
                "m": case.m, "n": case.n, "rank": case.rank, "dtype": case.dtype, "side": case.side,
                "arch": arch.name,
                "variant": ck.hash[:16],
                "dot": _dot_name(launch.constexprs),
                "tile": _config_text(launch.constexprs),
                "constexprs": {k: v for k, v in launch.constexprs.items() if isinstance(v, (int, float, bool, str))},
                "regs": info["regs"],
                "spill_bytes": info["spill_bytes"],
                "spill_stores": info["spill_stores"],
                "spill_loads": info["spill_loads"],
                "stack_bytes": info["stack_bytes"],
                "shared_bytes": int(getattr(md, "shared", 0) or 0),
                "shared_limit": arch.smem_limit,
                "num_warps": int(getattr(md, "num_warps", 0) or 0),
                "num_stages": int(getattr(md, "num_stages", 0) or 0),
                "grid": list(launch.grid),
                "ctas": ctas,
                "sms": arch.sms,
                "waves": round(ctas / arch.sms, 3),
                **{k: info[k] for k in (
                    "ld_vec_max_bytes", "st_vec_max_bytes", "ld_scalar16", "st_scalar16", "ld_global",
                    "st_global", "cp_async", "cp_async_min_bytes", "cp_async_bulk", "wgmma", "wgmma_wait",
                    "wgmma_wait0", "wgmma_wait_other", "wgmma_serialized", "mma_sync", "ldmatrix", "ptx_file",
                )},
                "name": getattr(md, "name", launch.kernel),
                "compile_s": round(launch.compile_s, 2),
            })
        return rows


_WORKER: Optional[Report] = None


def _worker_init(ptx_dir: Optional[str]) -> None:
    global _WORKER
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    _WORKER = Report(ptx_dir=ptx_dir, log=lambda msg: None)


def _worker_task(task: tuple) -> tuple:
    arch, case = task
    return _WORKER.run_one(arch, case)


def default_jobs() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def _dot_name(constexprs: dict) -> Optional[str]:
    return _DOT_NAMES.get(constexprs["DOT"]) if "DOT" in constexprs else None


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
def _sizes(counter: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in counter.items()) or "-"


COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("case", lambda r: r["case"]),
    ("kernel", lambda r: r["role"]),
    ("dot", lambda r: r["dot"] or "-"),
    ("tile", lambda r: r["tile"]),
    ("w/s", lambda r: f"{r['num_warps']}/{r['num_stages']}"),
    ("regs", lambda r: r["regs"]),
    ("spill", lambda r: r["spill_bytes"]),
    ("smem KB", lambda r: f"{r['shared_bytes'] / 1024:.0f}"),
    ("ctas", lambda r: r["ctas"]),
    ("waves", lambda r: f"{r['waves']:.2f}"),
    ("ld B max", lambda r: r["ld_vec_max_bytes"]),
    ("st B max", lambda r: r["st_vec_max_bytes"]),
    ("ld16", lambda r: r["ld_scalar16"]),
    ("st16", lambda r: r["st_scalar16"]),
    ("cp.async B:n", lambda r: _sizes(r["cp_async"])),
    ("wgmma", lambda r: r["wgmma"]),
    ("wait0/other", lambda r: f"{r['wgmma_wait0']}/{r['wgmma_wait_other']}"),
    ("mma.sync", lambda r: r["mma_sync"]),
]


def table(rows: Sequence[dict]) -> str:
    cells = [[str(f(r)) for _, f in COLUMNS] for r in rows]
    heads = [h for h, _ in COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells]
    return "\n".join(out) + "\n"


def _versions() -> dict:
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__}


def document(rows: List[dict], archs: Sequence[Arch], command: str, report: "Report") -> dict:
    from .cli import git_dirty, git_sha

    import subspace_ops.kernels as _k

    return {
        "rows": rows,
        **_versions(),
        "git": git_sha(),
        "git_dirty": git_dirty(),
        "kernels": str(Path(_k.__file__).resolve().parent),
        "archs": [a.name for a in archs],
        "ptxas": {name: {"path": path, "version": ptxas_version(path), "flags": report._flags}
                  for name, path in report._ptxas.items()},
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def dumps(doc: dict) -> str:
    """The report as JSON, one row per line (diffable, a third of indented JSON's size)."""
    head = {k: v for k, v in doc.items() if k != "rows"}
    rows = ",\n".join(json.dumps(r) for r in doc["rows"])
    return json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def interpret_env_set() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def main(args, argv: Optional[Sequence[str]]) -> int:
    """``python -m bench --compile-only ARCHS``: compile, measure, print the table, write JSON/PTX."""
    if interpret_env_set():
        if argv is not None or os.environ.get("_BENCH_CODEGEN_REEXEC"):
            raise SystemExit(
                "python -m bench --compile-only: TRITON_INTERPRET is set, so the kernels are interpreter "
                "functions without machine code; unset it (env -u TRITON_INTERPRET python -m bench ...)"
            )
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["_BENCH_CODEGEN_REEXEC"] = "1"
        print("bench --compile-only: restarting without TRITON_INTERPRET", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], env)
    # Triton 3.9 warns once that it will change its FP-fusion default; the report shows what the
    # GPU run compiles, which is the same default.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        archs = parse_archs(args.compile_only)
        cases = select_cases(args.cases)
    except ValueError as exc:
        raise SystemExit(f"python -m bench --compile-only: {exc}") from None
    t0 = time.perf_counter()
    report = Report(ptx_dir=args.ptx_dir)
    jobs = args.jobs if getattr(args, "jobs", None) else default_jobs()
    # A run stopped by `timeout` (SIGTERM) or Ctrl-C still writes the rows it has, marked partial.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    partial = False
    try:
        rows = report.run(archs, cases, jobs=jobs)
    except KeyboardInterrupt:
        rows, partial = report.rows, True
        print(f"bench --compile-only: interrupted, writing the {len(rows)} rows done", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    from .report import command_line

    command = command_line(argv)
    doc = document(rows, archs, command, report)
    doc["partial"] = partial
    doc["cases"] = len(cases)
    print(table(rows), end="")
    variants = len({(r["arch"], r["variant"]) for r in rows})
    print(f"\n{len(rows)} rows, {variants} distinct compiled variants, {len(cases)} case(s) x {len(archs)} arch(s)"
          f"{' (PARTIAL)' if partial else ''}, triton {doc['triton']}, {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumps(doc), encoding="utf-8")
    return 1 if partial else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
