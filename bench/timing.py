"""Timers and the two machine rates a floor is computed from.

* CUDA: ``triton.testing.do_bench`` (median and the 0.2/0.8 quantiles, L2 flushed between calls).
  Ops slower than ``SLOW_MS`` (a full SVD takes seconds) are timed with a few CUDA-event-timed calls
  instead, because do_bench would spend ~5 estimate calls + warm-up on them.
* CPU: ``time.perf_counter`` around batches of calls; the providers of one group are timed in
  interleaved rounds (rotating order), so load from other processes on a shared 2-core machine hits
  all of them alike and their ratios stay meaningful.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

SLOW_MS = 100.0
SLOW_REPS = 3


@dataclass
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: Optional[float]
    n_samples: Optional[int]
    timer: str

    @classmethod
    def from_samples(cls, samples_ms: List[float], timer: str) -> "Stats":
        t = torch.tensor(samples_ms, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
        return cls(q[0], q[1], q[2], float(t.min()), len(samples_ms), timer)


@dataclass
class CpuTimerConfig:
    """Rounds are adapted so one group takes about ``group_s`` seconds, within [min_rounds, max_rounds]."""

    min_rounds: int = 10
    max_rounds: int = 60
    min_round_s: float = 0.05  # calls per round: enough to last this long
    warmup_s: float = 0.3
    group_s: float = 20.0


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_cpu_group(fns: Dict[str, Callable[[], object]], cfg: CpuTimerConfig) -> Dict[str, Stats]:
    """Time several callables in interleaved rounds; per-call ms statistics for each.

    Run each callable once before (first-call costs are not timed here).
    """
    names = list(fns)
    if not names:
        return {}
    gc.collect()
    est = {}
    for name in names:  # the callers ran each callable once already (lazy state, allocator)
        end = time.perf_counter() + cfg.warmup_s
        est[name] = max(_once(fns[name]), 1e-7)
        while time.perf_counter() < end:
            est[name] = min(est[name], max(_once(fns[name]), 1e-7))
    calls = {name: max(1, math.ceil(cfg.min_round_s / est[name])) for name in names}
    round_s = sum(calls[name] * est[name] for name in names)
    rounds = int(min(cfg.max_rounds, max(cfg.min_rounds, cfg.group_s / round_s)))
    # Hard stop at 1.5x the planned time (after 3 rounds at least): on a loaded machine the
    # estimates above can be far too optimistic.
    deadline = time.perf_counter() + 1.5 * max(cfg.group_s, rounds * round_s)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    perf = time.perf_counter
    for r in range(rounds):
        k0 = r % len(names)
        for name in names[k0:] + names[:k0]:
            fn, k = fns[name], calls[name]
            t0 = perf()
            for _ in range(k):
                fn()
            samples[name].append((perf() - t0) * 1e3 / k)
            # re-fit the batch size to the per-call time seen so far
            typical_s = sorted(samples[name])[len(samples[name]) // 2] * 1e-3
            calls[name] = max(1, math.ceil(cfg.min_round_s / max(typical_s, 1e-7)))
        if r >= 2 and perf() > deadline:
            break
    return {name: Stats.from_samples(samples[name], "perf_counter") for name in names}


def time_cuda(fn: Callable[[], object], warmed: bool = False) -> Stats:
    """do_bench for normal ops; ``SLOW_REPS`` CUDA-event-timed calls for ops slower than SLOW_MS.

    ``warmed``: the caller already ran ``fn`` once (compilation, autotuning, lazy state).
    """
    if not warmed:
        fn()
    torch.cuda.synchronize()
    samples = [_event_ms(fn)]
    if samples[0] > SLOW_MS:
        samples += [_event_ms(fn) for _ in range(SLOW_REPS - 1)]
        return Stats.from_samples(samples, f"cuda_events_x{SLOW_REPS}")
    from triton.testing import do_bench

    med, p20, p80, lo = do_bench(fn, quantiles=[0.5, 0.2, 0.8, 0.0])
    return Stats(float(med), float(p20), float(p80), float(lo), None, "do_bench")


def _event_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def peak_memory_cuda(fn: Callable[[], object]) -> tuple:
    """(peak bytes allocated during one call, peak minus bytes allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return int(peak), int(peak - before)


# -- machine rates --------------------------------------------------------------------------------
@dataclass
class RateSizes:
    copy_bytes: int = 256 << 20
    gemm_n: int = 2048


def measure_copy_gbps(device: str, nbytes: int, cfg: CpuTimerConfig) -> float:
    """Large same-device copy; counts read + write (2 x nbytes) per copy."""
    numel = nbytes // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    stats = time_cuda(fn) if device == "cuda" else time_cpu_group({"copy": fn}, cfg)["copy"]
    return 2 * numel * 4 / (stats.median_ms * 1e-3) / 1e9


def measure_gemm_tflops(device: str, dtype: torch.dtype, n: int, cfg: CpuTimerConfig) -> float:
    """Square n x n x n matmul in ``dtype`` (TF32 as the process has it set)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    fn = lambda: torch.matmul(a, b, out=out)  # noqa: E731
    fn()
    stats = time_cuda(fn) if device == "cuda" else time_cpu_group({"gemm": fn}, cfg)["gemm"]
    return 2 * n**3 / (stats.median_ms * 1e-3) / 1e12
