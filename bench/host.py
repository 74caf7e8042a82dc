"""``python -m bench --op host_step``: the host (CPU) cost of ``opt.step()`` on the fused Triton path,
measured without a GPU.

What is timed: ``opt.step()`` of ``GaLoreAdamW(..., backend="triton")`` and ``AdamSNSM(...,
backend="triton")`` on a LLaMA-7B-like parameter set (per layer q, k, v, o 4096x4096, gate and up
11008x4096, down 4096x11008, as nn.Linear weights; 32 layers: 224 low-rank matrices at rank 256 in
one group, plus the 65 RMSNorm vectors of 4096 in a plain group; bf16), with the kernels compiled for
sm_90 but never executed:

* inside ``bench.codegen.compiling_for(sm_90)`` Triton's driver is a stand-in and every launch of
  ``subspace_ops.kernels`` goes to a hook. The first (warm-up) steps go to the codegen compiler's hook,
  which compiles each launch; the timed steps go to a lean hook that calls ``JITFunction.warmup``:
  Triton's argument binding, specialization and kernel-cache lookup, and no launch. A real launch adds
  Triton's launcher call (``launch_metadata`` and the C launcher with ``cuLaunchKernel``), which is
  not measured here;
* what is measured is the steady host path: the optimizer's Python loop, the ops layer, the
  launchers and Triton's binding. Refreshes never happen (``update_proj_gap`` = 10^9) and the state
  is loaded up front with ``load_state_dict`` (step 1, zero bases, zero fp32 moments), so no SVD runs;
* memory: W and G of every matrix are ``torch.as_strided`` views of one shared buffer (contiguous
  strides, each at its own offset, 512-byte aligned like the CUDA caching allocator's blocks, so
  Triton's pointer specialization and the group tables' alignment see what real tensors give); the
  bases are views of a second buffer. Nothing reads or writes them. The fp32 moments are real.

Next to it, in the same interleaved rounds: ``torch.optim.AdamW`` over the same shapes on meta
tensors (no kernel runs either), with ``foreach=True`` and with ``fused=True`` (torch refuses meta
tensors for ``fused`` only in a device check at state creation; that check is bypassed for meta
tensors during the first step, the steady steps run torch's unmodified fused code path with the
``_fused_adamw_`` meta kernel).

Per provider: the per-step time (median, p20, p80 over every timed step) and the same divided by the
number of matrices (``us_per_matrix``) and of parameters (``us_per_param``); for ours also the
launches per step (hook calls). ``--profile N`` adds a cProfile of N steady steps per optimizer.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import dataclasses
import gc
import hashlib
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import report

ROOT = Path(__file__).resolve().parent.parent
ARCH = "sm_90"
NEVER = 10**9  # update_proj_gap: no refresh in any timed step
ALIGN_BYTES = 512  # offset between aliasing views: the CUDA caching allocator's block alignment
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURS = ("galore_triton", "snsm_triton")
TORCH = ("torch_adamw_fused", "torch_adamw_foreach")
PROVIDERS = OURS + TORCH
# Hyperparameters of every provider (no weight decay, as the other bench ops).
LR, SCALE = 1e-3, 0.25


@dataclasses.dataclass(frozen=True)
class HostConfig:
    layers: int
    hidden: int = 4096
    intermediate: int = 11008
    rank: int = 256
    dtype: str = "bf16"
    warm_steps: int = 3  # untimed; the first compiles every kernel variant
    rounds: int = 12  # interleaved rounds (rotating provider order)
    steps_per_round: int = 20  # timed steps per provider per round, each timed on its own


# torch's foreach AdamW on meta tensors runs every foreach op through Python reference
# decompositions (hundreds of ms per 7B step): fewer steps of it per round.
SLOW_PROVIDERS = {"torch_adamw_foreach": 10}


def steps_for(name: str, steps: int) -> int:
    return max(1, steps // SLOW_PROVIDERS.get(name, 1))


MODES = {
    "full": HostConfig(layers=32),
    "quick": HostConfig(layers=4, rounds=8, steps_per_round=20),
    # CI: one layer of the 7B shapes (7 matrices, 3 norm vectors), a few steps
    "smoke": HostConfig(layers=1, warm_steps=2, rounds=3, steps_per_round=5),
}


def matrix_shapes(cfg: HostConfig) -> List[Tuple[str, int, int]]:
    """(name, m, n) of every low-rank matrix in registration order (nn.Linear weights: (out, in))."""
    h, i = cfg.hidden, cfg.intermediate
    out = []
    for layer in range(cfg.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"layers.{layer}.self_attn.{name}", h, h))
        out.append((f"layers.{layer}.mlp.gate_proj", i, h))
        out.append((f"layers.{layer}.mlp.up_proj", i, h))
        out.append((f"layers.{layer}.mlp.down_proj", h, i))
    return out


def norm_count(cfg: HostConfig) -> int:
    return 2 * cfg.layers + 1  # input and post-attention RMSNorm per layer, and the final norm


def shapes_text(cfg: HostConfig) -> str:
    h, i = cfg.hidden, cfg.intermediate
    return (f"{cfg.layers} x [4 x {h}x{h}, 2 x {i}x{h}, {h}x{i}] rank {cfg.rank} + {norm_count(cfg)} x {h}, "
            f"{cfg.dtype}")


# ---------------------------------------------------------------------------------------------------
# Parameters and state
# ---------------------------------------------------------------------------------------------------
def _aliased(shapes: Sequence[Tuple[int, int]], dtype: torch.dtype, per: int) -> Tuple[torch.Tensor, list]:
    """``per`` contiguous views per shape, every one at its own ALIGN_BYTES-aligned offset of one
    buffer large enough for the largest shape (never read or written: nothing is committed)."""
    esize = torch.empty((), dtype=dtype).element_size()
    step = ALIGN_BYTES // esize
    count = len(shapes) * per
    biggest = max(m * n for m, n in shapes)
    buf = torch.empty(biggest + count * step + step, dtype=dtype)
    # the first offset that makes the buffer's address ALIGN_BYTES-aligned
    base = (-buf.data_ptr() % ALIGN_BYTES) // esize
    views, k = [], 0
    for m, n in shapes:
        row = []
        for _ in range(per):
            row.append(torch.as_strided(buf, (m, n), (n, 1), base + k * step))
            k += 1
        views.append(row)
    return buf, views


@dataclasses.dataclass
class Model:
    """Parameters with gradients; ``keep`` holds the buffers the views alias."""

    matrices: list
    vectors: list
    keep: list


def make_model(cfg: HostConfig, device: str) -> Model:
    """``device`` "cpu": W and G of each matrix alias one buffer (see the module doc); the norm
    vectors are real. ``device`` "meta": every tensor on the meta device (torch's AdamW)."""
    dt = DTYPES[cfg.dtype]
    shapes = [(m, n) for _, m, n in matrix_shapes(cfg)]
    matrices, keep = [], []
    if device == "meta":
        for m, n in shapes:
            p = torch.nn.Parameter(torch.empty((m, n), dtype=dt, device="meta"))
            p.grad = torch.empty_like(p)
            matrices.append(p)
    else:
        buf, views = _aliased(shapes, dt, per=2)
        keep.append(buf)
        for W, G in views:
            p = torch.nn.Parameter(W)
            p.grad = G
            matrices.append(p)
    vectors = []
    for _ in range(norm_count(cfg)):
        p = torch.nn.Parameter(torch.ones(cfg.hidden, dtype=dt, device=device))
        p.grad = torch.zeros(cfg.hidden, dtype=dt, device=device)
        vectors.append(p)
    return Model(matrices, vectors, keep)


def preload_state(opt, model: Model, cfg: HostConfig, algo: str) -> None:
    """State as after one step, through ``opt.load_state_dict``: step 1, refresh_offset 0, a zero
    basis (a view of a shared buffer, in the gradient's dtype), zero fp32 moments. No refresh is
    due before step 10^9, so no SVD ever runs."""
    from subspace_ops import reference
    from subspace_ops.projectors import basis_side, effective_rank, lowrank_shape

    group = opt.param_groups[0]
    sd = opt.state_dict()
    basis_shapes = []
    for p in model.matrices:
        m, n = p.shape
        side = basis_side(group["proj_type"], m, n)
        basis_shapes.append((m if side == "left" else n, effective_rank(group["rank"], m, n)))
    dt = model.matrices[0].dtype
    buf, bases = _aliased(basis_shapes, dt, per=1)
    model.keep.append(buf)
    # Zero moments as stride-0 views in the parameter's dtype: torch.optim's load_state_dict casts
    # them to that dtype (a no-op here, so no transient copy), and SubspaceOptimizer.load_state_dict
    # then copies them into contiguous fp32 tensors.
    zeros = lambda shape: torch.zeros((), dtype=dt).expand(shape)  # noqa: E731
    state = {}
    for i, p in enumerate(model.matrices):  # the low-rank group comes first: index i is p's
        m, n = p.shape
        side = basis_side(group["proj_type"], m, n)
        low = lowrank_shape(side, m, n, group["rank"])
        state[i] = {
            "step": torch.tensor(1.0),
            "refresh_offset": torch.tensor(0, dtype=torch.int64),
            "basis": bases[i][0],
            "exp_avg": zeros(low),
            "exp_avg_sq": zeros(low) if algo == "galore" else zeros(reference.subset_norm_shape(m, n)),
        }
    sd["state"] = state
    opt.load_state_dict(sd)
    for p in model.matrices:
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            t = st[key]
            assert t.dtype == torch.float32 and t.is_contiguous() and t.stride()[-1] == 1, f"{key} must load as fp32"


def make_ours(cfg: HostConfig, algo: str):
    from subspace_ops import AdamSNSM, GaLoreAdamW

    model = make_model(cfg, "cpu")
    low = {"params": model.matrices, "rank": cfg.rank, "update_proj_gap": NEVER, "proj_type": "std"}
    if algo == "galore":
        low["scale"] = SCALE
        opt = GaLoreAdamW([low, {"params": model.vectors}], lr=LR, weight_decay=0.0, backend="triton")
    else:
        opt = AdamSNSM([low, {"params": model.vectors}], lr=LR, weight_decay=0.0, backend="triton")
    preload_state(opt, model, cfg, algo)
    return opt, model


@contextlib.contextmanager
def _fused_meta_allowed():
    """torch.optim.Adam(W) checks, when it creates a parameter's state, that ``fused=True`` runs on a
    device with fused kernels (meta is not listed, although ``_fused_adamw_`` has a meta kernel).
    Inside, that check passes meta tensors; it is not called again after the state exists."""
    import torch.optim.adam as adam_mod

    original = adam_mod._device_dtype_check_for_fused

    def check(p, cuda_unsupported=False):
        if p.device.type != "meta":
            original(p, cuda_unsupported)

    adam_mod._device_dtype_check_for_fused = check
    try:
        yield
    finally:
        adam_mod._device_dtype_check_for_fused = original


def make_torch(cfg: HostConfig, variant: str):
    model = make_model(cfg, "meta")
    params = model.matrices + model.vectors
    kw = {"fused": True} if variant == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, **kw)
    return opt, model


# ---------------------------------------------------------------------------------------------------
# Launch hook
# ---------------------------------------------------------------------------------------------------
class LaunchCounter:
    """The launch hook: while ``compiling``, the codegen compiler's hook (compiles and records each
    launch); afterwards ``JITFunction.warmup`` only (binding and cache lookup), counted."""

    def __init__(self, compiler):
        self.compiler = compiler
        self.compiling = True
        self.count = 0

    def hook(self, kernel, grid, args, kwargs):
        self.count += 1
        if self.compiling:
            return self.compiler.hook(kernel, grid, args, kwargs)
        return kernel.warmup(*args, grid=grid, **kwargs)


def _cache_sizes(compiler) -> Dict[str, int]:
    """Compiled variants in each kernel's cache (device 0, the stand-in's)."""
    out = {}
    for kernel, _ in compiler._saved_caches.values():
        caches = getattr(kernel, "device_caches", {})
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        out[name] = len(caches[0][0]) if 0 in caches else 0
    return out


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
def _quantiles(samples: Sequence[float]) -> Tuple[float, float, float]:
    t = torch.tensor(list(samples), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return q[0], q[1], q[2]


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int, steps: Dict[str, int],
                     log=None) -> Dict[str, List[float]]:
    """Per-call seconds of every callable: ``rounds`` rounds, each calling every callable ``steps[name]``
    times in a row (rotating which goes first), every call timed on its own. The cyclic garbage
    collector stays on, as in a training loop."""
    names = list(fns)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    perf = time.perf_counter
    gc.collect()
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, out = fns[name], samples[name]
            for _ in range(steps[name]):
                t0 = perf()
                fn()
                out.append(perf() - t0)
        if log:
            log(f"host_step: round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {sorted(samples[n][-steps[n]:])[steps[n] // 2] * 1e3:.2f} ms" for n in names))
    return samples


def profile_steps(fn: Callable[[], object], steps: int, divisor: int, top: int = 25) -> List[dict]:
    """cProfile of ``steps`` calls: the ``top`` functions by own time, in µs per ``divisor`` (matrix)
    per step, with their cumulative time and calls per step (first entry: the total own time and the
    ``top`` functions by cumulative time)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (path, line, name), (cc, nc, tt, ct, _callers) in st.stats.items():
        rel = path
        for prefix in (str(ROOT) + os.sep, sys.prefix + os.sep):
            if path.startswith(prefix):
                rel = path[len(prefix):]
        rows.append({
            "function": f"{rel}:{line}({name})" if line else name,
            "own_us_per_matrix": tt / steps / divisor * 1e6,
            "cum_us_per_matrix": ct / steps / divisor * 1e6,
            "calls_per_step": nc / steps,
        })
    total = sum(r["own_us_per_matrix"] for r in rows)
    by_cum = sorted(rows, key=lambda r: -r["cum_us_per_matrix"])[:top]
    rows.sort(key=lambda r: -r["own_us_per_matrix"])
    return [{"total_own_us_per_matrix": total, "steps": steps, "by_cumulative": by_cum}] + rows[:top]


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------
def _uptime() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        try:
            return "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
        except OSError:
            return "n/a"


def code_hash() -> str:
    """sha256 (12 hex) of the code the step runs (optimizers, ops, kernels): the git sha does not
    identify it while the tree has uncommitted changes."""
    h = hashlib.sha256()
    files = sorted([*(ROOT / "subspace_ops" / "optim").glob("*.py"), ROOT / "subspace_ops" / "ops.py",
                    ROOT / "subspace_ops" / "projectors.py", *(ROOT / "kernels").glob("*.py")])
    for f in files:
        try:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
        except OSError:
            pass
    return h.hexdigest()[:12]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def run(cfg: HostConfig, providers: Sequence[str] = PROVIDERS, profile: int = 0, log=None) -> dict:
    """Build, compile, time; the result document (``rows`` plus run metadata)."""
    from . import codegen
    from .cli import collect_meta

    log = log or (lambda msg: None)
    meta = collect_meta("cpu")
    meta["uptime_start"] = _uptime()
    meta["code_sha256"] = code_hash()
    n_mat, n_vec = len(matrix_shapes(cfg)), norm_count(cfg)
    arch = codegen.ARCHS[ARCH]
    opts, firsts, launches, census = {}, {}, {}, {}
    with codegen.compiling_for(arch) as compiler:
        from subspace_ops.kernels import _common

        counter = LaunchCounter(compiler)
        with _common.override(launch_hook=counter.hook):
            for name in providers:
                t0 = time.perf_counter()
                if name in OURS:
                    opt, model = make_ours(cfg, "galore" if name == "galore_triton" else "snsm")
                else:
                    opt, model = make_torch(cfg, name.rsplit("_", 1)[1])
                built = time.perf_counter() - t0
                # Warm-up steps: the first compiles (codegen hook) and creates the plain state.
                counter.compiling = True
                with _fused_meta_allowed() if name == "torch_adamw_fused" else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    before = len(compiler.launches)
                    opt.step()
                    firsts[name] = time.perf_counter() - t0
                    if name in OURS:
                        census[name] = collections.Counter(
                            f"{launch.kernel} {'x'.join(map(str, launch.grid))}"
                            for launch in compiler.launches[before:])
                    for _ in range(cfg.warm_steps - 1):
                        opt.step()
                opts[name] = (opt, model)
                log(f"host_step: {name}: built in {built:.1f} s, first step {firsts[name]:.1f} s "
                    f"(peak RSS {_peak_rss_gib():.2f} GiB)")
            counter.compiling = False
            cache_before = _cache_sizes(compiler)
            fns = {name: opts[name][0].step for name in providers}
            # launches per step of our optimizers: counted over one steady step each
            for name in providers:
                c0 = counter.count
                fns[name]()
                launches[name] = counter.count - c0 if name in OURS else None
            count_before = counter.count
            t_timed = time.perf_counter()
            steps = {name: steps_for(name, cfg.steps_per_round) for name in providers}
            samples = time_interleaved(fns, cfg.rounds, steps, log)
            t_timed = time.perf_counter() - t_timed
            timed_launches = counter.count - count_before
            cache_after = _cache_sizes(compiler)
            compiles_in_timed = sum(cache_after.values()) - sum(cache_before.values())
            profiles = {}
            if profile:
                for name in providers:
                    profiles[name] = profile_steps(fns[name], steps_for(name, profile), n_mat)
                    log(f"host_step: profiled {name} ({steps_for(name, profile)} steps)")
    meta["uptime_end"] = _uptime()
    meta["load_end"] = f"{os.getloadavg()[0]:.2f}"
    meta["peak_rss_gib"] = round(_peak_rss_gib(), 3)
    meta["timed_s"] = round(t_timed, 1)
    expected = sum(launches[n] for n in OURS if n in launches) * cfg.rounds * cfg.steps_per_round
    rows = []
    med = {}
    for name in providers:
        s_med, s_p20, s_p80 = _quantiles(samples[name])
        med[name] = s_med
        rows.append(_row(name, cfg, meta, samples[name], (s_med, s_p20, s_p80), n_mat, n_vec, launches[name],
                         census.get(name), firsts[name], compiles_in_timed, profiles.get(name)))
    for row in rows:
        for t in TORCH:
            if t in med:
                row[f"{t}_us_per_param"] = med[t] / (n_mat + n_vec) * 1e6
                row[f"x_{t}"] = med[row["provider"]] / med[t]
    return {
        "rows": rows, "meta": meta, "config": dataclasses.asdict(cfg), "shapes": shapes_text(cfg),
        "matrices": n_mat, "vectors": n_vec, "timed_launches": timed_launches,
        "timed_launches_expected": expected, "compiles_in_timed_steps": compiles_in_timed,
        "kernel_variants": cache_after,
    }


def _row(name, cfg, meta, samples, q, n_mat, n_vec, launches, census, first_s, compiles, profile) -> dict:
    s_med, s_p20, s_p80 = q
    n_par = n_mat + n_vec
    ours = name in OURS
    if ours:
        tensors = (f"cpu: W, G aliasing views of one buffer, fp32 moments real; kernels compiled for {ARCH}, "
                   "launches go to JITFunction.warmup")
    else:
        tensors = "meta (no kernel runs)"
    notes = []
    if name == "torch_adamw_fused":
        notes.append("fused=True on meta: torch's device check at state creation bypassed for meta in the first "
                     "step; steady steps run the unmodified fused path with the _fused_adamw_ meta kernel. Two "
                     "errors in opposite directions: the step counters of fused=True live on the parameters' "
                     "device, so _foreach_add_ on them runs a Python meta kernel per tensor here (on CUDA one C++ "
                     "multi-tensor launch); and the CUDA kernel's own C++ host work (multi_tensor_apply chunking, "
                     "its launches) is not in this number")
    if name == "torch_adamw_foreach":
        notes.append("foreach=True on meta: every foreach op runs through Python reference decompositions per "
                     "tensor (torch._refs / _prims meta), orders of magnitude slower than CUDA's C++ foreach path: "
                     "not a proxy for its host cost, shown for completeness")
    if ours:
        notes.append("launches: the lean hook's JITFunction.warmup (binding, specialization, cache lookup); a real "
                     "launch also runs Triton's launcher and cuLaunchKernel, not measured")
    if cfg.layers != 32:
        notes.append(f"{cfg.layers} layer(s), not the 32 of LLaMA-7B: per-matrix figures only")
    return {
        "op": "host_step", "provider": name, "m": 0, "n": 0, "rank": cfg.rank, "dtype": cfg.dtype,
        "median_ms": s_med * 1e3, "p20_ms": s_p20 * 1e3, "p80_ms": s_p80 * 1e3, "min_ms": min(samples) * 1e3,
        "n_samples": len(samples), "us_per_matrix_min": min(samples) / n_mat * 1e6,
        "us_per_matrix": s_med / n_mat * 1e6, "us_per_matrix_p20": s_p20 / n_mat * 1e6,
        "us_per_matrix_p80": s_p80 / n_mat * 1e6,
        "us_per_param": s_med / n_par * 1e6, "us_per_param_p20": s_p20 / n_par * 1e6,
        "us_per_param_p80": s_p80 / n_par * 1e6,
        "launches_per_step": launches, "launches_by_kernel_grid": dict(census) if census else None,
        "matrices": n_mat, "vectors": n_vec, "params": n_par, "layers": cfg.layers, "shapes": shapes_text(cfg),
        "tensors": tensors, "arch": ARCH if ours else None, "first_step_s": round(first_s, 2),
        "compiles_in_timed_steps": compiles if ours else None,
        "device": meta["device"], "torch": meta["torch"], "triton": meta["triton"], "git_sha": meta["git_sha"],
        "git_dirty": meta.get("git_dirty"), "code_sha256": meta["code_sha256"], "threads": meta["threads"],
        "date": meta["date"], "load_start": meta["load_start"], "load_end": meta["load_end"],
        "uptime_start": meta["uptime_start"], "uptime_end": meta["uptime_end"], "peak_rss_gib": meta["peak_rss_gib"],
        "timer": "time.perf_counter per step, interleaved rounds (rotating provider order)",
        "notes": "; ".join(notes), "profile": profile,
    }


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def markdown(doc: dict, mode: str, command: str) -> str:
    meta, rows, cfg = doc["meta"], doc["rows"], doc["config"]
    lines = [
        f"# subspace-ops benchmark: host_step ({mode}, {meta['device']})",
        "",
        f"- what: CPU time of `opt.step()` on the fused Triton path, kernels compiled for {ARCH} on this machine "
        "and never launched (the launch hook calls `JITFunction.warmup`: argument binding, specialization, "
        "cache lookup); torch.optim.AdamW on meta tensors beside it, in the same interleaved rounds",
        f"- set: {doc['shapes']} ({doc['matrices']} low-rank matrices, {doc['vectors']} plain vectors); no refresh "
        "(update_proj_gap 10^9, state loaded with load_state_dict)",
        f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, git {meta['git_sha']}"
        f"{' (uncommitted changes to tracked files)' if meta.get('git_dirty') else ''}, code sha256 "
        f"{meta['code_sha256']} (optim, ops, projectors, kernels), threads {meta['threads']}, date {meta['date']}",
        f"- load: `{meta['uptime_start']}` at start, `{meta['uptime_end']}` at end (a shared 2-core machine: "
        "other processes inflate host times)",
        f"- timed: {cfg['rounds']} rounds x {cfg['steps_per_round']} steps per provider after {cfg['warm_steps']} "
        f"warm-up steps ({meta['timed_s']} s); peak RSS {meta['peak_rss_gib']:.2f} GiB; compiles during timed "
        f"steps: {doc['compiles_in_timed_steps']}; launches counted in timed steps {doc['timed_launches']} "
        f"(expected {doc['timed_launches_expected']})",
        f"- command: `{command}`",
        "",
    ]
    head = ["provider", "steps", "step ms", "p20 ms", "p80 ms", "us/matrix", "p20", "p80", "min", "us/param",
            "launches/step", "x torch fused", "x torch foreach"]
    body = []
    for r in rows:
        body.append([
            r["provider"], str(r["n_samples"]), f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}", f"{r['p80_ms']:.3f}",
            f"{r['us_per_matrix']:.2f}", f"{r['us_per_matrix_p20']:.2f}", f"{r['us_per_matrix_p80']:.2f}",
            f"{r['us_per_matrix_min']:.2f}",
            f"{r['us_per_param']:.2f}", "-" if r["launches_per_step"] is None else str(r["launches_per_step"]),
            f"{r['x_torch_adamw_fused']:.2f}" if "x_torch_adamw_fused" in r else "-",
            f"{r['x_torch_adamw_foreach']:.2f}" if "x_torch_adamw_foreach" in r else "-",
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    lines.append(fmt(head))
    lines.append("|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":")
                                for i, w in enumerate(widths)) + "|")
    lines += [fmt(b) for b in body]
    lines += ["", "steps: timed steps; step ms: median (p20, p80) of the per-step times; us/matrix = step time / "
              "low-rank matrices (median, p20, p80, min; the plain vectors' work included in the step); us/param = "
              "step time / all parameters; x torch = median step time / torch's median step time over the same "
              "parameters.", ""]
    lines.append("## Launches per step")
    lines.append("")
    for r in rows:
        if r["launches_by_kernel_grid"]:
            parts = ", ".join(f"{k} x{v}" for k, v in sorted(r["launches_by_kernel_grid"].items()))
            lines.append(f"- {r['provider']}: {r['launches_per_step']} ({parts})")
    lines.append(f"- compiled variants per kernel ({ARCH}): "
                 + ", ".join(f"{k} {v}" for k, v in sorted(doc["kernel_variants"].items())))
    lines.append("")
    lines.append("## Notes")
    lines.append("")
    for r in rows:
        lines.append(f"- {r['provider']}: tensors {r['tensors']}; first step {r['first_step_s']} s"
                     + (f"; {r['notes']}" if r["notes"] else ""))
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "## cProfile of steady steps (top functions by own time, us per matrix per step)", ""]
        for r in profiled:
            total = r["profile"][0]["total_own_us_per_matrix"]
            lines.append(f"### {r['provider']} ({r['profile'][0]['steps']} steps; profiled total {total:.2f} "
                         "us/matrix, cProfile adds overhead)")
            for title, entries in (("by own time", r["profile"][1:]),
                                   ("by cumulative time", r["profile"][0]["by_cumulative"])):
                lines += ["", f"{title}:", "", "| own us/matrix | cum us/matrix | calls/step | function |",
                          "|---:|---:|---:|---|"]
                for p in entries:
                    lines.append(f"| {p['own_us_per_matrix']:.3f} | {p['cum_us_per_matrix']:.3f} | "
                                 f"{p['calls_per_step']:.0f} | `{p['function']}` |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# CLI entry (python -m bench --op host_step)
# ---------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace, argv: Optional[Sequence[str]], parser: argparse.ArgumentParser) -> int:
    from .codegen import interpret_env_set

    if interpret_env_set():
        # The compile path needs real JIT functions; TRITON_INTERPRET makes them interpreter functions.
        if argv is not None or os.environ.get("_BENCH_HOST_REEXEC"):
            raise SystemExit("python -m bench --op host_step: TRITON_INTERPRET is set; unset it "
                             "(env -u TRITON_INTERPRET python -m bench --op host_step ...)")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["_BENCH_HOST_REEXEC"] = "1"
        print("bench --op host_step: restarting without TRITON_INTERPRET", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as bench --compile-only (silences a 3.9 notice)
    if args.device == "cuda":
        parser.error("--op host_step measures the host path on the CPU; it takes no --device cuda")
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    cfg = MODES[mode]
    if args.layers is not None:
        if args.layers <= 0:
            parser.error("--layers must be a positive int")
        cfg = dataclasses.replace(cfg, layers=args.layers)
    if args.ranks:
        cfg = dataclasses.replace(cfg, rank=args.ranks[0])
    if args.dtypes:
        if args.dtypes[0] not in DTYPES:
            parser.error(f"unknown dtype {args.dtypes[0]!r}; choose from {', '.join(DTYPES)}")
        cfg = dataclasses.replace(cfg, dtype=args.dtypes[0])
    if args.rounds:
        cfg = dataclasses.replace(cfg, rounds=args.rounds)
    providers = [p for p in PROVIDERS if args.providers is None or p in args.providers]
    unknown = [p for p in (args.providers or []) if p not in PROVIDERS]
    if unknown or not providers:
        parser.error(f"--providers for host_step: choose from {', '.join(PROVIDERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    log(f"bench: host_step {mode}: {shapes_text(cfg)}; {', '.join(providers)}")
    doc = run(cfg, providers, profile=args.profile or 0, log=log)
    command = report.command_line(argv)
    doc["command"] = command
    doc["mode"] = mode
    text = markdown(doc, mode, command) + f"\n(total {time.perf_counter() - t0:.0f} s)\n"
    report.publish(text, doc, args)
    return 0
