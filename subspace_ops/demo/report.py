"""What the demo shows: the progress bar, the subspace statistics, the result table and the plot."""
from __future__ import annotations

import statistics
import sys
import time
from typing import List

import torch

# ------------------------------------------------------------------------------------------------
# Progress bar (stderr, no dependency)
# ------------------------------------------------------------------------------------------------


class ProgressBar:
    """``label  step/total [#####-----] loss 2.345  12.3 it/s``.

    On a terminal it redraws one line in place (at most 10 times a second); in a log (stderr not a
    terminal) it prints a line every 10% instead, so logs stay short.
    """

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None, width: int = 24):
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.drawn = 0
        self.every = max(1, total // 10)

    def _line(self, step: int, loss: float) -> str:
        filled = int(self.width * step / max(1, self.total))
        bar = "#" * filled + "-" * (self.width - filled)
        rate = step / max(1e-9, time.perf_counter() - self.start)
        return f"{self.label:<12} {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.3f}  {rate:5.1f} it/s"

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.tty:
            now = time.perf_counter()
            if now - self.last_draw >= 0.1 or step == self.total:
                self.last_draw = now
                line = self._line(step, loss)
                # Pad over a longer previous line (the it/s field can shrink).
                self.stream.write("\r" + line.ljust(self.drawn))
                self.drawn = len(line)
                self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self._line(step, loss) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------------------------
# Result rows and table
# ------------------------------------------------------------------------------------------------


def subspace_summary(optimizer: torch.optim.Optimizer) -> dict:
    """Means over the low-rank matrices of ``subspace_stats()`` at their last refresh (None for
    optimizers without subspaces): captured gradient energy and the smallest principal-angle cosine
    between the replaced and the new basis (1: the subspace did not move)."""
    if not hasattr(optimizer, "subspace_stats"):
        return {"energy": None, "min_cosine": None}
    stats = list(optimizer.subspace_stats().values())
    energies = [s["energy_at_refresh"] for s in stats if s.get("energy_at_refresh") is not None]
    cosines = [float(s["cosines"].min()) for s in stats if s.get("cosines") is not None and s["cosines"].numel()]
    return {
        "energy": statistics.fmean(energies) if energies else None,
        "min_cosine": statistics.fmean(cosines) if cosines else None,
    }


def format_table(rows: List[dict], world: int = 1) -> str:
    """The result table; with FSDP (``world`` ranks, rows with ``state_bytes_per_rank``) a column of
    the optimizer state one rank holds."""
    per_rank = bool(rows) and all("state_bytes_per_rank" in r for r in rows)
    header = ("optimizer", "val loss", "state MiB") + (("state MiB/rank",) if per_rank else ()) + (
        "vs AdamW", "step ms", "opt.step ms", "energy", "min cos")

    def opt(value):
        return "-" if value is None else f"{value:.3f}"

    body = [
        (
            r["optimizer"],
            f"{r['val_loss']:.4f}",
            f"{r['state_bytes'] / 2**20:.3f}",
            *((f"{r['state_bytes_per_rank'] / 2**20:.3f}",) if per_rank else ()),
            f"{r['state_ratio']:.3f}",
            f"{r['step_ms']:.1f}",
            f"{r['opt_step_ms']:.2f}",
            opt(r["energy"]),
            opt(r["min_cosine"]),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in body]
    lines.append(
        "state MiB: every tensor in optimizer.state; step ms: median forward + backward + clip + "
        "optimizer.step(); opt.step ms: median optimizer.step() alone; energy: captured gradient "
        "energy |project(G)|^2/|G|^2 at the last refresh, min cos: smallest principal-angle cosine "
        "between the old and new basis there (means over the low-rank matrices)"
    )
    if per_rank:
        lines.append(
            f"FSDP2 over {world} processes: state MiB/rank: the optimizer state one rank holds (its local "
            f"shards; state replicated on every rank, such as a right-side basis, counted whole), the largest "
            f"over the {world} ranks; state MiB and vs AdamW: the whole state, summed over the shards; step "
            "times: rank 0's"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plot (optional: needs matplotlib)
# ------------------------------------------------------------------------------------------------


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'subspace-ops[plot]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(rows: List[dict], path: str, plt) -> None:
    """Training loss (moving average) and validation loss per optimizer, one PNG."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        color = f"C{i}"
        losses = r["train_losses"]
        window = max(1, len(losses) // 50)
        smooth = [
            sum(losses[max(0, j - window + 1) : j + 1]) / (j + 1 - max(0, j - window + 1)) for j in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), smooth, color=color, alpha=0.6, label=f"{r['optimizer']} train")
        steps, vals = zip(*r["val_curve"])
        ax.plot(steps, vals, color=color, marker="o", linestyle="--", label=f"{r['optimizer']} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / char)")
    ax.set_title("char-level GPT on pydoc topics")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
