"""``python -m bench``: time the optimizer step and its ops against measured machine floors.

Usage::

    python -m bench [--quick] [--device cpu|cuda] [--json PATH] [--md PATH] [--plot PATH]
                    [--shapes 4096x4096,4096x11008] [--ranks 128,256] [--dtypes bf16,fp32]
                    [--ops step,refresh] [--providers reference,galore_torch] [--gap 200] [--rounds N]
                    [--threads N] [--time-budget S] [--target-only | --no-target]
    python -m bench --compile-only sm_90[,sm_80] [--json PATH] [--ptx-dir DIR] [--cases ci|before|LABELS]
    python -m bench --op host_step [--quick | --smoke] [--layers N] [--profile STEPS] [--json PATH] [--md PATH]
    python -m bench --op memory [--smoke] [--device cpu|cuda] [--models 60M,7B] [--tokens 1x256] [--json PATH] [--md PATH]
    python -m bench --op comm [--quick] [--world N] [--json PATH] [--md PATH]

Modes (device defaults to cuda when available, else cpu):

* full, CUDA: LLaMA-7B matrices 4096x4096, 4096x11008, 11008x4096 at rank 128/256/512, bf16 and fp32.
* full, CPU (the comparison with galore-torch): 1024x1024 and 1024x2816 at rank 128, fp32; a few
  minutes.
* ``--quick``: 512x512 and 512x1376 at rank 64 fp32 on CPU (4096x4096 and 4096x11008 at rank 256
  bf16 on CUDA); well under 3 minutes. On CPU it runs on one thread unless ``--threads`` says otherwise.

``--compile-only`` needs no GPU: it compiles every kernel variant for the target on this machine and
reports its machine code (bench/codegen.py).

``--op host_step`` needs no GPU either: the CPU time of ``opt.step()`` on the fused Triton path for a
LLaMA-7B parameter set, kernels compiled for sm_90 and never launched, next to torch's AdamW on meta
tensors (bench/host.py).

``--op memory`` measures the memory of one training step of the demo model (parameters, gradients,
optimizer state, activations, peak; CPU: ``MemTracker``, CUDA: ``max_memory_allocated``) and estimates
it for LLaMA 60M to 7B in the GaLore paper's configurations on the meta device, without allocating
weights (bench/memory.py). It needs no GPU; on a 2-core CPU it takes about 4 minutes (``--smoke``: a
tiny demo model and LLaMA 60M without the simulated peak, seconds; ``--quick`` is the default run).

``--op comm`` starts ``--world`` (default 2) gloo processes on the CPU, shards a LLaMA-like model with
FSDP2 (``fully_shard``) and measures the bytes each rank passes to collectives inside ``opt.step()`` (every
projector, both sides, refresh and plain steps) next to FSDP2's own all-gathers and reduce-scatters, and
the optimizer state each rank holds against the single-process state (bench/comm.py).

The table goes to stdout as markdown with padded columns, followed by a ratios section computed from
the same run; progress goes to stderr. ``--json`` writes the rows, ``--md`` the same report as stdout.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import cases, report
from .timing import CpuTimerConfig, RateSizes, measure_copy_gbps, measure_gemm_tflops, peak_memory_cuda
from .timing import time_cpu_group, time_cuda

ROOT = Path(__file__).resolve().parent.parent

# The case a GPU run must measure first (the LLaMA-7B MLP matrix at rank 256): --target-only runs
# just it, --no-target the rest.
TARGET = (4096, 11008, 256)
TARGET_DTYPES = ("bf16", "fp32")
TARGET_LABEL = "4096x11008 rank 256"


@dataclass
class ModeConfig:
    shapes: List[Tuple[int, int]]
    ranks: List[int]
    dtypes: List[str]
    timer: CpuTimerConfig = field(default_factory=CpuTimerConfig)  # step: the providers compared
    refresh_timer: CpuTimerConfig = field(default_factory=CpuTimerConfig)  # SVDs take seconds on CPU
    light_timer: CpuTimerConfig = field(default_factory=CpuTimerConfig)  # single-provider CPU groups
    rates: RateSizes = field(default_factory=RateSizes)

    def with_rounds(self, rounds: int) -> "ModeConfig":
        fix = lambda t: replace(t, min_rounds=rounds, max_rounds=rounds)  # noqa: E731
        return replace(
            self, timer=fix(self.timer), refresh_timer=fix(self.refresh_timer), light_timer=fix(self.light_timer)
        )


def mode_config(mode: str, device: str) -> ModeConfig:
    if mode == "smoke":  # CI: tiny shapes, both sides, a few rounds
        t = CpuTimerConfig(min_rounds=3, max_rounds=5, min_round_s=0.002, warmup_s=0.0, group_s=0.05)
        return ModeConfig([(96, 64), (64, 96)], [8], ["fp32"], t, t, t, RateSizes(16 << 20, 256))
    if device == "cuda":
        if mode == "quick":
            return ModeConfig([(4096, 4096), (4096, 11008)], [256], ["bf16"], rates=RateSizes(1 << 30, 8192))
        return ModeConfig(
            # The target case (4096x11008, rank 256, bf16 and fp32) first, so a run cut
            # short by --time-budget still measures it.
            [(4096, 11008), (4096, 4096), (11008, 4096)], [256, 128, 512], ["bf16", "fp32"],
            rates=RateSizes(1 << 30, 8192),
        )
    if mode == "quick":
        t = CpuTimerConfig(min_rounds=8, max_rounds=40, min_round_s=0.02, warmup_s=0.1, group_s=4.0)
        refresh = replace(t, min_rounds=5, warmup_s=0.0, group_s=4.0)
        light = replace(t, min_rounds=5, group_s=1.0)
        return ModeConfig([(512, 512), (512, 1376)], [64], ["fp32"], t, refresh, light, RateSizes(128 << 20, 1024))
    t = CpuTimerConfig(min_rounds=15, max_rounds=80, min_round_s=0.05, warmup_s=0.5, group_s=30.0)
    refresh = replace(t, min_rounds=7, warmup_s=0.0, group_s=25.0)
    light = replace(t, min_rounds=10, group_s=5.0)
    return ModeConfig([(1024, 1024), (1024, 2816)], [128], ["fp32"], t, refresh, light, RateSizes(256 << 20, 2048))


# -- metadata -------------------------------------------------------------------------------------
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> Optional[bool]:
    """Whether tracked files differ from HEAD (the sha then does not fully identify the code)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True,
            timeout=10,
        )
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_meta(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        timer = "triton.testing.do_bench (median, q0.2, q0.8); ops over 100 ms: 3 CUDA-event-timed calls (n_samples)"
    else:
        name = f"cpu: {_cpu_name()}"
        timer = "time.perf_counter, warm-up then interleaved rounds (rotating provider order)"
    return {
        "device": name, "torch": torch.__version__, "triton": _version("triton"), "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "python": platform.python_version(), "threads": torch.get_num_threads(), "timer": timer,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_start": _loadavg(),
        **({"tf32": bool(torch.backends.cuda.matmul.allow_tf32)} if device == "cuda" else {}),
    }


def _loadavg() -> str:
    """1-minute load average: on a shared CPU machine, other processes skew small-op timings."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def measure_rates(device: str, dtypes: Sequence[str], cfg: ModeConfig) -> dict:
    t = replace(cfg.timer, group_s=min(cfg.timer.group_s, 3.0))
    copy = measure_copy_gbps(device, cfg.rates.copy_bytes, t)
    gemm = {}
    for dt in sorted(set(dtypes) | {"fp32"}):
        gemm[dt] = measure_gemm_tflops(device, cases.DTYPES[dt], cfg.rates.gemm_n, t)
    return {"copy_gbps": copy, "gemm_tflops": gemm, "copy_mib": cfg.rates.copy_bytes >> 20, "gemm_n": cfg.rates.gemm_n}


# -- running --------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_list(text: Optional[str], conv=str) -> Optional[list]:
    return None if text is None else [conv(x) for x in text.split(",") if x.strip()]


def _parse_shape(text: str) -> Tuple[int, int]:
    try:
        m, n = text.lower().split("x")
        return int(m), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x11008, got {text!r}") from None


def _parse_tokens(text: str) -> Tuple[int, int]:
    try:
        b, t = text.lower().split("x")
        return int(b), int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tokens must look like 1x256 (batch x sequence), got {text!r}") from None


class Runner:
    def __init__(self, device: str, cfg: ModeConfig, meta: dict, rates: dict, ops: Sequence[str],
                 providers: Optional[Sequence[str]], seed: int = 0):
        self.device, self.cfg, self.meta, self.rates = device, cfg, meta, rates
        self.ops, self.providers, self.seed = ops, providers, seed
        self.rows: List[dict] = []
        self.skipped: Dict[Tuple[str, str, str], List[str]] = {}
        self.svd_cache: Dict[tuple, tuple] = {}
        self.exclude = lambda spec: False  # --no-target

    def _skip(self, op: str, provider: str, spec: cases.Spec, reason: str) -> None:
        self.skipped.setdefault((op, provider, reason), []).append(spec.label)

    def skipped_lines(self) -> List[str]:
        return [
            f"{op} / {prov}: {reason} ({len(labels)} case{'s' * (len(labels) > 1)})"
            for (op, prov, reason), labels in self.skipped.items()
        ]

    def run(self, deadline: Optional[float] = None, on_spec_done=None) -> List[dict]:
        """Time every op at every spec; stop starting new specs after ``deadline`` (perf_counter)."""
        specs = [
            cases.Spec(m, n, rank, dt, self.device)
            for (m, n) in self.cfg.shapes for rank in self.cfg.ranks for dt in self.cfg.dtypes
        ]
        specs = [s for s in specs if not self.exclude(s)]
        for i, spec in enumerate(specs):
            if deadline is not None and time.perf_counter() > deadline:
                left = [s.label for s in specs[i:]]
                self.skipped[("all", "all", "--time-budget spent before this shape")] = left
                _log(f"time budget spent: {len(left)} shape(s) not run")
                break
            inputs = cases.make_inputs(spec, self.seed)
            for op in self.ops:
                t0 = time.perf_counter()
                self._run_op(op, spec, inputs)
                _log(f"[{i + 1}/{len(specs)}] {op:<20} {spec.label:<24} {time.perf_counter() - t0:6.1f} s")
            del inputs
            self._free()
            if on_spec_done is not None:
                on_spec_done(self.rows)
        return self.rows

    def _free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _providers(self, op: str) -> List[str]:
        names = cases.providers_for(op)
        return [p for p in names if self.providers is None or p in self.providers]

    def _add(self, op, provider, spec, stats, note, peak=None):
        nbytes, flops, anote = cases.analytic(op, provider, spec)
        gemm_dtype = "fp32" if op == "refresh" else spec.dtype  # refreshes compute in fp32
        notes = "; ".join(x for x in (note, anote) if x)
        self.rows.append(report.make_row(
            op=op, provider=provider, spec=spec, stats=stats, nbytes=nbytes, flops=flops, rates=self.rates,
            meta=self.meta, gemm_dtype=gemm_dtype, notes=notes, peak=peak,
        ))

    def _run_op(self, op: str, spec: cases.Spec, inputs: dict) -> None:
        providers = self._providers(op)
        cached = {}
        if op == "refresh" and "svd" in providers:
            key = (spec.m, spec.n)
            if key in self.svd_cache:
                # svd_basis decomposes G.float() in full whatever the rank kept and G's dtype
                stats, rank0, dtype0 = self.svd_cache[key]
                cached["svd"] = (stats, f"rank- and dtype-independent: timed once at rank {rank0} {dtype0}")
                providers = [p for p in providers if p != "svd"]
        if self.device == "cuda":
            timed = self._run_cuda(op, spec, inputs, providers)
        else:
            timed = self._run_cpu(op, spec, inputs, providers)
        timed.update(cached)
        for provider in cases.providers_for(op):
            if provider in timed:
                stats, note, *peak = timed[provider]
                self._add(op, provider, spec, stats, note, peak[0] if peak else None)
                if op == "refresh" and provider == "svd" and provider not in cached:
                    self.svd_cache[(spec.m, spec.n)] = (stats, spec.rank, spec.dtype)

    def _build(self, op, provider, spec, inputs) -> Optional[cases.Bench]:
        try:
            bench = cases.make_bench(op, provider, spec, inputs)
        except cases.Skip as exc:
            self._skip(op, provider, spec, str(exc))
            return None
        try:
            bench.fn()  # probe: a provider that fails is reported as skipped, not fatal
        except Exception as exc:
            self._skip(op, provider, spec, f"failed: {type(exc).__name__}: {exc}")
            return None
        return bench

    def _run_cpu(self, op, spec, inputs, providers) -> dict:
        benches = {p: b for p in providers if (b := self._build(op, p, spec, inputs)) is not None}
        if op == "refresh":
            timer = self.cfg.refresh_timer
        else:
            timer = self.cfg.timer if len(benches) > 1 else self.cfg.light_timer
        stats = time_cpu_group({p: b.fn for p, b in benches.items()}, timer)
        return {p: (stats[p], benches[p].note) for p in benches}

    def _run_cuda(self, op, spec, inputs, providers) -> dict:
        out = {}
        for p in providers:
            bench = self._build(op, p, spec, inputs)
            if bench is None:
                continue
            try:
                stats = time_cuda(bench.fn, warmed=True)
                peak = peak_memory_cuda(bench.fn) if op == "step" else None
            except Exception as exc:  # a provider failing on the GPU must not lose the whole report
                self._skip(op, p, spec, f"failed: {type(exc).__name__}: {exc}")
                continue
            finally:
                del bench
                self._free()
            out[p] = (stats, "", peak)
        return out


OP_ORDER = {op: i for i, op in enumerate(cases.OPS[:1] + ("step_amortized",) + cases.OPS[1:])}


def sort_rows(rows: List[dict]) -> List[dict]:
    prov_order = {}
    for op in cases.OPS:
        for i, p in enumerate(cases.providers_for(op)):
            prov_order.setdefault(p, i)
    return sorted(rows, key=lambda r: (
        r["dtype"], r["m"], r["n"], r["rank"], OP_ORDER.get(r["op"], 99),
        prov_order.get(r["provider"].split("+")[0], 99), r["provider"],
    ))


def default_threads(threads: Optional[int], mode: str) -> Optional[int]:
    """The torch thread count of a run: ``--threads`` when given, else 1 for ``--quick`` and ``--smoke``,
    else None (torch's default).

    One thread for the short runs: their ops are small, and on a shared machine a second busy process
    stalls OpenMP barriers for a scheduler tick, which shows up as noise in the ratios. The README's CPU
    measurements were taken with one thread too.
    """
    if threads:
        return threads
    return 1 if mode in ("quick", "smoke") else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, a short run (CPU: < 3 min, 1 thread)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CI: tiny shapes, seconds
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--md", metavar="PATH", help="write the report (as printed) as markdown")
    p.add_argument("--plot", metavar="PATH", help="PNG of time and x_floor vs rank (needs matplotlib)")
    p.add_argument("--shapes", type=lambda s: [_parse_shape(x) for x in s.split(",")], help="e.g. 4096x4096,4096x11008")
    p.add_argument("--ranks", type=lambda s: _parse_list(s, int), help="e.g. 128,256,512")
    p.add_argument("--dtypes", type=_parse_list, help="from fp32, bf16, fp16")
    p.add_argument("--ops", "--op", type=_parse_list,
                   help=f"subset of {', '.join(cases.OPS)}; or host_step alone (bench/host.py: the host cost of "
                        "opt.step() on the Triton path, kernels compiled for sm_90, not run; no GPU needed); or memory "
                        "alone (bench/memory.py: training memory, measured on the demo model and estimated for LLaMA); or "
                        "comm alone (bench/comm.py: FSDP2 collectives and per-rank state, gloo on CPU)")
    p.add_argument("--providers", type=_parse_list, help="only these providers (all ops)")
    p.add_argument("--gap", type=int, default=200, help="steps per refresh for step_amortized (default 200)")
    p.add_argument("--rounds", type=int, help="CPU: fixed number of timing rounds per group")
    p.add_argument("--threads", type=int,
                   help="CPU: torch.set_num_threads (default: 1 with --quick and --smoke, else torch's)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="start no new shape after S seconds (the report keeps what was measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-only", action="store_true",
                   help=f"only the target case {TARGET_LABEL} (bf16 and fp32 unless --dtypes)")
    p.add_argument("--no-target", action="store_true", help="every case except the target case (the rest of a run)")
    h = p.add_argument_group("--op host_step (bench/host.py)")
    h.add_argument("--layers", type=int, metavar="N",
                   help="LLaMA-7B layers in the parameter set (default: 32; --quick 4, --smoke 1)")
    h.add_argument("--profile", type=int, metavar="STEPS",
                   help="also cProfile STEPS steady steps per provider and report the top functions")
    mem = p.add_argument_group("--op memory (bench/memory.py)")
    mem.add_argument("--models", type=_parse_list, metavar="SIZES",
                     help="LLaMA sizes to estimate, from 60M, 130M, 350M, 1B, 7B (default: all; --smoke 60M)")
    mem.add_argument("--tokens", type=_parse_tokens, metavar="BxT",
                     help="token batch of the estimates' activations, batch x sequence (default 1x256)")
    comm = p.add_argument_group("--op comm (bench/comm.py)")
    comm.add_argument("--world", type=int, metavar="N", help="gloo processes to start (default 2)")
    g = p.add_argument_group("static GPU codegen report, no GPU needed (bench/codegen.py)")
    g.add_argument("--compile-only", metavar="ARCHS",
                   help="compile every kernel variant for sm_90 and/or sm_80 (comma-separated), report "
                        "registers, spills, shared memory, vector widths, cp.async, wgmma, waves; --json "
                        "writes the rows")
    g.add_argument("--jobs", type=int, metavar="N",
                   help="with --compile-only: compile in N processes (default: the CPUs, at most 16)")
    g.add_argument("--ptx-dir", metavar="DIR", help="with --compile-only: write one .ptx (and .ttgir) per variant")
    g.add_argument("--cases", metavar="SUBSET",
                   help="with --compile-only: comma-separated presets (ci, before, all), case labels or "
                        "label substrings, e.g. 'ci' or '4096x11008 r256 bf16'")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile_only:
        from . import codegen  # needs no GPU: compiles for the target on this machine

        return codegen.main(args, argv)
    if args.ptx_dir or args.cases or args.jobs:
        parser.error("--ptx-dir, --cases and --jobs go with --compile-only")
    if args.ops and "host_step" in args.ops:
        if args.ops != ["host_step"]:
            parser.error("--op host_step runs alone (python -m bench --op host_step)")
        from . import host  # needs no GPU: compiles for sm_90 on this machine, times the host path

        return host.main(args, argv, parser)
    if args.ops and "comm" in args.ops:
        if args.ops != ["comm"]:
            parser.error("--op comm runs alone (python -m bench --op comm)")
        from . import comm  # CPU only: gloo processes, FSDP2, collectives counted

        return comm.main(args, argv, parser)
    if args.world is not None:
        parser.error("--world goes with --op comm")
    if args.layers is not None or args.profile is not None:
        parser.error("--layers and --profile go with --op host_step")
    if args.ops and "memory" in args.ops:
        if args.ops != ["memory"]:
            parser.error("--op memory runs alone (python -m bench --op memory)")
        from . import memory  # needs no GPU: measures the demo model here, estimates LLaMA on the meta device

        return memory.main(args, argv, parser)
    if args.models is not None or args.tokens is not None:
        parser.error("--models and --tokens go with --op memory")
    if args.target_only and args.no_target:
        parser.error("--target-only and --no-target exclude each other")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.plot:
        report.check_matplotlib()
    for dt in args.dtypes or []:
        if dt not in cases.DTYPES:
            parser.error(f"unknown dtype {dt!r}; choose from {', '.join(cases.DTYPES)}")
    for op in args.ops or []:
        if op not in cases.OPS:
            parser.error(f"unknown op {op!r}; choose from {', '.join(cases.OPS)}")
    if args.gap <= 0:
        parser.error("--gap must be a positive int")
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    threads = default_threads(args.threads, mode)
    if threads:
        torch.set_num_threads(threads)
    cfg = mode_config(mode, device)
    cfg.shapes = args.shapes or cfg.shapes
    cfg.ranks = args.ranks or cfg.ranks
    cfg.dtypes = args.dtypes or cfg.dtypes
    if args.rounds:
        cfg = cfg.with_rounds(args.rounds)
    if args.target_only:
        cfg.shapes, cfg.ranks = [TARGET[:2]], [TARGET[2]]
        cfg.dtypes = args.dtypes or list(TARGET_DTYPES)
    ops = args.ops or list(cases.OPS)

    t_start = time.perf_counter()
    meta = collect_meta(device)
    _log(f"bench: {mode} on {meta['device']}; measuring copy bandwidth and GEMM rate ...")
    rates = measure_rates(device, cfg.dtypes, cfg)
    runner = Runner(device, cfg, meta, rates, ops, args.providers, args.seed)
    if args.no_target:
        runner.exclude = lambda spec: (spec.m, spec.n, spec.rank) == TARGET and spec.dtype in TARGET_DTYPES
    command = report.command_line(argv)

    def write(raw_rows: List[dict], final: bool) -> Tuple[List[dict], str]:
        # Written after every shape too, so a run cut short by a timeout still leaves its rows.
        rows = sort_rows(raw_rows + report.amortized_rows(raw_rows, args.gap))
        meta["load_end"] = _loadavg()
        text = report.markdown(rows, meta, rates, mode, args.gap, runner.skipped_lines(), command)
        done = "total" if final else "partial: interrupted after"
        text += f"\n({done} {time.perf_counter() - t_start:.0f} s)\n"
        if args.json:
            report.write_json(rows, args.json)
        if args.md:
            Path(args.md).write_text(text, encoding="utf-8")
        return rows, text

    deadline = t_start + args.time_budget if args.time_budget else None
    raw = runner.run(deadline, on_spec_done=lambda r: write(r, final=False))
    rows, text = write(raw, final=True)
    print(text, end="")
    if args.plot:
        report.plot(rows, args.plot)
    return 0
