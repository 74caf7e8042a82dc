"""Rows -> aligned (markdown) table, ratios section, JSON and an optional plot."""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# Keys every row has (the JSON contract; tests/test_bench_cli.py checks them).
ROW_KEYS = (
    "op", "provider", "m", "n", "rank", "dtype", "median_ms", "p20_ms", "p80_ms", "bytes", "flops",
    "gbps", "tflops", "floor_ms", "x_floor", "device", "copy_gbps", "torch", "triton", "git_sha",
)
EXTRA_KEYS = ("gemm_tflops", "side", "min_ms", "n_samples", "timer", "peak_mem_bytes", "step_extra_mem_bytes", "notes")

TABLE_COLUMNS = (
    ("op", "op", "s"), ("provider", "provider", "s"), ("m", "m", "d"), ("n", "n", "d"), ("rank", "rank", "d"),
    ("dtype", "dtype", "s"), ("median_ms", "median_ms", ".4g"), ("p20_ms", "p20_ms", ".4g"),
    ("p80_ms", "p80_ms", ".4g"), ("MB", "bytes", "mb"), ("GFLOP", "flops", "gflop"), ("GB/s", "gbps", ".4g"),
    ("TFLOP/s", "tflops", ".3g"), ("floor_ms", "floor_ms", ".3g"), ("x_floor", "x_floor", ".3g"),
)


def make_row(
    *, op: str, provider: str, spec, stats, nbytes: int, flops: int, rates: dict, meta: dict,
    gemm_dtype: str, notes: str = "", peak: Optional[Tuple[int, int]] = None,
) -> dict:
    median_s = stats.median_ms * 1e-3
    gemm = rates["gemm_tflops"][gemm_dtype]
    floor_ms = max(nbytes / (rates["copy_gbps"] * 1e9), flops / (gemm * 1e12)) * 1e3
    return {
        "op": op, "provider": provider, "m": spec.m, "n": spec.n, "rank": spec.rank, "dtype": spec.dtype,
        "median_ms": stats.median_ms, "p20_ms": stats.p20_ms, "p80_ms": stats.p80_ms,
        "bytes": int(nbytes), "flops": int(flops),
        "gbps": nbytes / median_s / 1e9, "tflops": flops / median_s / 1e12,
        "floor_ms": floor_ms, "x_floor": stats.median_ms / floor_ms,
        "device": meta["device"], "copy_gbps": rates["copy_gbps"], "torch": meta["torch"],
        "triton": meta["triton"], "git_sha": meta["git_sha"], "git_dirty": meta.get("git_dirty"),
        "gemm_tflops": gemm, "side": spec.side, "min_ms": stats.min_ms, "n_samples": stats.n_samples,
        "timer": stats.timer, "peak_mem_bytes": peak[0] if peak else None,
        "step_extra_mem_bytes": peak[1] if peak else None, "notes": notes,
    }


# -- amortized step -------------------------------------------------------------------------------
# step provider -> [(refresh provider it pays for, label suffix, every step?)]. svd and randomized
# refresh once per `gap` steps; online_pca moves its basis every step; gaussian/srht bases are
# regenerated from their seed every step.
_SUBSPACE = [
    ("svd", "", False), ("randomized_warm", "+randomized", False), ("online_pca_step", "+online_pca", True),
    ("gaussian", "+gaussian", True), ("srht", "+srht", True),
]
AMORTIZE = {
    "reference": _SUBSPACE,
    "triton": _SUBSPACE,
    "galore_torch": [("svd", "", False)],
    "torch_adamw_fused": [(None, "", False)],
    "torch_adamw_foreach": [(None, "", False)],
}


def amortized_rows(rows: List[dict], gap: int) -> List[dict]:
    """``step_amortized`` = step + refresh / gap (one refresh every ``gap`` steps), per provider."""
    out = []
    key = lambda r: (r["m"], r["n"], r["rank"], r["dtype"])  # noqa: E731
    refresh = {(key(r), r["provider"]): r for r in rows if r["op"] == "refresh"}
    for step in (r for r in rows if r["op"] == "step"):
        for ref_provider, suffix, every_step in AMORTIZE.get(step["provider"], []):
            ref = refresh.get((key(step), ref_provider)) if ref_provider else None
            if ref_provider and ref is None:
                continue
            row = dict(step)
            row["op"], row["provider"] = "step_amortized", step["provider"] + suffix
            per = 1 if every_step else gap
            frac = lambda k: (ref[k] / per if ref else 0.0)  # noqa: E731
            for k in ("median_ms", "p20_ms", "p80_ms"):
                row[k] = step[k] + frac(k)
            row["min_ms"] = None if step["min_ms"] is None else step["min_ms"] + (ref["min_ms"] / per if ref else 0.0)
            row["bytes"] = int(step["bytes"] + frac("bytes"))
            row["flops"] = int(step["flops"] + frac("flops"))
            s = row["median_ms"] * 1e-3
            row["gbps"], row["tflops"] = row["bytes"] / s / 1e9, row["flops"] / s / 1e12
            row["floor_ms"] = max(
                row["bytes"] / (row["copy_gbps"] * 1e9), row["flops"] / (step["gemm_tflops"] * 1e12)
            ) * 1e3
            row["x_floor"] = row["median_ms"] / row["floor_ms"]
            row["notes"] = (f"step + {ref_provider}" + ("" if every_step else f"/{gap}")) if ref else "no refresh"
            row["peak_mem_bytes"] = row["step_extra_mem_bytes"] = None
            out.append(row)
    return out


# -- ratios ---------------------------------------------------------------------------------------
# (op, numerator, denominator, wording); "slower/faster" phrasing comes from the value.
RATIOS = (
    ("step", "reference", "galore_torch"),
    ("step", "reference", "torch_adamw_fused"),
    ("step", "reference", "torch_adamw_foreach"),
    ("step", "triton", "torch_adamw_fused"),
    ("step", "triton", "reference"),
    ("step", "triton", "galore_torch"),
    ("step_amortized", "reference", "galore_torch"),
    ("step_amortized", "reference+randomized", "galore_torch"),
    ("step_amortized", "reference+randomized", "torch_adamw_fused"),
    ("step_amortized", "triton+randomized", "torch_adamw_fused"),
    ("project", "triton", "reference"),
    ("project_adam", "triton", "reference"),
    ("back_project_update", "triton", "reference"),
    ("lowrank_adam", "triton", "reference"),
    ("snsm_step", "triton", "reference"),
)
SPEEDUPS = (("refresh", "svd", "randomized"), ("refresh", "svd", "randomized_warm"))


def _index(rows: Iterable[dict]) -> Dict[tuple, dict]:
    return {(r["op"], r["provider"], r["m"], r["n"], r["rank"], r["dtype"]): r for r in rows}


# Printed under the ratio lines: what their [lo-hi] brackets are (see ratio_lines).
RATIO_LEGEND = (
    "[lo-hi] after a ratio a / b: lo = p20(a) / p80(b), hi = p80(a) / p20(b), where p20 and p80 are the "
    "20th and 80th percentiles of each provider's time per call (CPU: over the interleaved timing rounds; "
    "CUDA: over do_bench's repetitions, or 3 timed calls for ops over 100 ms; step_amortized adds "
    "refresh/gap to each). It is not a confidence "
    "interval: it excludes 1 exactly when the middle 60% of a's times and of b's times do not overlap."
)


def ratio_lines(rows: Sequence[dict]) -> List[str]:
    """Time ratios of medians within this run, each with a bracket ``[lo-hi]`` (``RATIO_LEGEND``):
    ``lo = a.p20 / b.p80`` and ``hi = a.p80 / b.p20``, the ratio's range when each provider's time
    moves within its own 20th-80th percentile band."""
    idx = _index(rows)
    shapes = sorted({(r["m"], r["n"], r["rank"], r["dtype"]) for r in rows}, key=lambda s: (s[3], s[0], s[1], s[2]))
    lines = []
    for op, a, b in RATIOS:
        for m, n, rank, dt in shapes:
            ra, rb = idx.get((op, a, m, n, rank, dt)), idx.get((op, b, m, n, rank, dt))
            if not (ra and rb):
                continue
            q = ra["median_ms"] / rb["median_ms"]
            lo, hi = ra["p20_ms"] / rb["p80_ms"], ra["p80_ms"] / rb["p20_ms"]
            lines.append(
                f"{op} {m}x{n} r{rank} {dt}: {a} / {b} = {q:.3f} [{lo:.3f}-{hi:.3f}]"
                f"  ({a} {ra['median_ms']:.4g} ms, {b} {rb['median_ms']:.4g} ms)"
            )
    for op, slow, fast in SPEEDUPS:
        for m, n, rank, dt in shapes:
            rs, rf = idx.get((op, slow, m, n, rank, dt)), idx.get((op, fast, m, n, rank, dt))
            if not (rs and rf):
                continue
            q = rs["median_ms"] / rf["median_ms"]
            lines.append(
                f"{op} {m}x{n} r{rank} {dt}: {fast} is {q:.1f}x faster than {slow}"
                f"  ({slow} {rs['median_ms']:.4g} ms, {fast} {rf['median_ms']:.4g} ms)"
            )
    return lines


# Targets: (op, numerator, denominator, bound, is_max): median(a)/median(b) <= bound, or >= bound.
# Our step is no slower than galore-torch's, and the randomized refresh is at least 5x faster than the SVD.
CHECKS = (
    ("step", "reference", "galore_torch", 1.0, True),
    ("refresh", "svd", "randomized", 5.0, False),
)


def check_lines(rows: Sequence[dict]) -> List[str]:
    idx = _index(rows)
    shapes = sorted({(r["m"], r["n"], r["rank"], r["dtype"]) for r in rows}, key=lambda s: (s[3], s[0], s[1], s[2]))
    out = []
    for op, a, b, bound, is_max in CHECKS:
        for m, n, rank, dt in shapes:
            ra, rb = idx.get((op, a, m, n, rank, dt)), idx.get((op, b, m, n, rank, dt))
            if not (ra and rb):
                continue
            q = ra["median_ms"] / rb["median_ms"]
            ok = q <= bound if is_max else q >= bound
            rel = "<=" if is_max else ">="
            out.append(f"{op} {m}x{n} r{rank} {dt}: {a} / {b} = {q:.3f} (target {rel} {bound:g}): "
                       f"{'met' if ok else 'NOT MET'}")
    return out


# -- table / markdown -----------------------------------------------------------------------------
def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "s":
        return str(value)
    if kind == "d":
        return str(int(value))
    if kind == "mb":
        return f"{value / 1e6:.4g}"
    if kind == "gflop":
        return f"{value / 1e9:.4g}"
    return format(value, kind)


def table(rows: Sequence[dict]) -> str:
    """A markdown table with padded columns: aligned on a terminal, valid in a .md file."""
    cols = list(TABLE_COLUMNS)
    if any(r.get("peak_mem_bytes") is not None for r in rows):
        cols.append(("peak_MiB", "peak_mem_bytes", "mib"))
    header = [c[0] for c in cols]
    body = []
    for r in rows:
        cells = []
        for _, key, kind in cols:
            v = r.get(key)
            if kind == "mib":
                cells.append("-" if v is None else f"{v / 2**20:.0f}")
            else:
                cells.append(_fmt(v, kind))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = [kind not in ("s",) for _, _, kind in cols]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), sep] + [line(b) for b in body])


def header_lines(meta: dict, rates: dict, mode: str, gap: int) -> List[str]:
    gemm = ", ".join(f"{k} {v:.3g}" for k, v in rates["gemm_tflops"].items())
    lines = [
        f"# subspace-ops benchmark ({mode}, {meta['device']})",
        "",
        f"- device: {meta['device']}",
        f"- measured copy bandwidth: {rates['copy_gbps']:.1f} GB/s (read+write of a {rates['copy_mib']} MiB copy)",
        f"- measured GEMM rate (TFLOP/s, {rates['gemm_n']}^3 matmul): {gemm}",
        f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, git {meta['git_sha']}"
        f"{' (uncommitted changes to tracked files)' if meta.get('git_dirty') else ''}, "
        f"threads {meta['threads']}, date {meta['date']}",
        f"- 1-min load average: {meta.get('load_start', 'n/a')} at start, {meta.get('load_end', 'n/a')} at end "
        f"(CPU timings of small ops suffer when other processes compete for the cores)",
        f"- timer: {meta['timer']}; floor_ms = max(bytes / copy rate, flops / GEMM rate); x_floor = median / floor; "
        f"step_amortized = step + refresh/{gap} (svd, randomized), or + the per-step basis cost "
        "(online_pca, gaussian, srht)",
    ]
    if meta["device"].startswith("cpu"):
        lines.append("- CPU: timed operands stay cache-resident between calls, so small working sets can beat the "
                     "DRAM copy floor (x_floor < 1); ratios between providers are the robust numbers")
    try:
        busy = float(meta.get("load_start", "0")) >= 1.0
    except ValueError:
        busy = False
    if meta["device"].startswith("cpu") and busy and meta["threads"] > 1:
        lines.append("- WARNING: the machine was busy at start; with several threads, OpenMP barriers wait for "
                     "descheduled threads (scheduler-tick steps in small ops): compare with --threads 1")
    if "tf32" in meta:
        lines.append(f"- TF32 matmul allowed: {meta['tf32']}")
    return lines


def markdown(rows: Sequence[dict], meta: dict, rates: dict, mode: str, gap: int, skipped: Sequence[str],
             command: str = "") -> str:
    parts = header_lines(meta, rates, mode, gap)
    if command:
        parts.append(f"- command: `{command}`")
    if any(r.get("peak_mem_bytes") is not None for r in rows):
        parts.append("- peak_MiB: torch.cuda.max_memory_allocated over one step (reset just before), including the "
                     "benchmark's shared inputs; JSON step_extra_mem_bytes = peak minus what was allocated before")
    parts += ["", table(rows), "", "## Ratios", ""]
    ratios = ratio_lines(rows)
    parts += [f"- {line}" for line in ratios] or ["- (none: providers missing)"]
    if any("[" in line for line in ratios):
        parts += ["", RATIO_LEGEND]
    checks = check_lines(rows)
    if checks:
        parts += ["", "## Comparison with galore-torch and the exact SVD (targets, on medians)", ""]
        parts += [f"- {c}" for c in checks]
    if skipped:
        parts += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    return "\n".join(parts) + "\n"


def command_line(argv) -> str:
    """The command a report says it came from: ``python -m bench`` and its arguments."""
    import sys

    return ("python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


def publish(text: str, doc, args) -> None:
    """Print the markdown ``text`` and write ``--json`` (``doc``) and ``--md`` (``text``) when asked."""
    from pathlib import Path

    print(text, end="")
    if args.json:
        write_json(doc, args.json)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text, encoding="utf-8")


def write_json(doc, path: str) -> None:
    """``doc`` (a dict, or a sequence of rows) as indented JSON at ``path``, its folder created."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc if isinstance(doc, dict) else list(doc), f, indent=1)
        f.write("\n")


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from None


def plot(rows: Sequence[dict], path: str) -> None:
    """Step time and x_floor vs rank, one line per (op, provider, dtype); one column per shape."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["m"], r["n"]) for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 8), squeeze=False)
    for j, (m, n) in enumerate(shapes):
        lines: Dict[tuple, list] = {}
        for r in rows:
            if (r["m"], r["n"]) == (m, n) and r["op"] in ("step", "step_amortized"):
                lines.setdefault((r["op"], r["provider"], r["dtype"]), []).append(r)
        for (op, prov, dt), rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r["rank"])
            ranks = [r["rank"] for r in rs]
            style = "-o" if op == "step" else "--s"
            axes[0][j].plot(ranks, [r["median_ms"] for r in rs], style, label=f"{op}:{prov} {dt}")
            axes[1][j].plot(ranks, [r["x_floor"] for r in rs], style, label=f"{op}:{prov} {dt}")
        axes[0][j].set_title(f"{m}x{n}")
        axes[0][j].set_ylabel("median ms")
        axes[1][j].set_ylabel("x floor")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("rank")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0][j].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
