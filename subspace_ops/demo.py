"""Train a small character-level GPT with AdamW and with GaLoreAdamW, and compare them.

    python -m subspace_ops.demo                      # adamw, galore, galore_rand; < 3 min on 2 CPU cores
    python -m subspace_ops.demo --steps 1000 --device cuda --plot losses.png

The corpus is the text of Python's own documentation topics (``pydoc_data.topics``, shipped with
CPython, about 465k characters of English prose and code), so nothing is downloaded. A
character-level tokenizer is built from it; the first 90% is the training split, the last 10% the
validation split. Every optimizer starts from the same initial weights and sees the same batches.

At the end a table lists, per optimizer: the validation loss, the bytes held in optimizer state (MiB),
their ratio to AdamW's, and the median time of a whole training step and of ``optimizer.step()``
alone. ``main(argv)`` returns the same rows as dicts.

To add an optimizer, write a ``factory(model, args) -> torch.optim.Optimizer`` and add it to
``OPTIMIZERS``; the first line of its docstring is its ``--help`` entry.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import subspace_ops

# ------------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ------------------------------------------------------------------------------------------------


def load_corpus() -> str:
    """Python's documentation topics, as shipped with CPython (no download)."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


class CharTokenizer:
    """One token per distinct character of the corpus, in code-point order."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split_corpus(tokens: Tensor, train_fraction: float = 0.9):
    """Deterministic split: the first ``train_fraction`` of the tokens trains, the rest validates."""
    cut = int(len(tokens) * train_fraction)
    return tokens[:cut], tokens[cut:]


def get_batch(data: Tensor, batch_size: int, context: int, generator: torch.Generator, device):
    """Random windows of ``context + 1`` tokens: inputs and next-token targets."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts.tolist()])
    return x.to(device), y.to(device)


def eval_windows(data: Tensor, context: int, count: int):
    """``count`` evenly spaced validation windows (the same ones at every evaluation)."""
    last = len(data) - context - 1
    count = max(1, min(count, last + 1))
    starts = torch.linspace(0, last, count).long().tolist()
    x = torch.stack([data[s : s + context] for s in starts])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
    return x, y


# ------------------------------------------------------------------------------------------------
# Model: a small decoder-only transformer (GPT-2 layout, pre-norm, no dropout)
# ------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, ``n_layers`` pre-norm blocks, final LayerNorm, head.

    The head is not tied to the token embedding, so ``lowrank_param_groups`` keeps both full rank
    (by name) and makes every attention and MLP matrix low rank.
    """

    def __init__(self, vocab_size: int, context: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.context = context
        self.tok_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2·layers).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.tok_embed(idx) + self.pos_embed(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------------------------------------
# Optimizers: name -> factory(model, args). Add new ones here.
# ------------------------------------------------------------------------------------------------


def make_adamw(model: nn.Module, args) -> torch.optim.Optimizer:
    """torch.optim.AdamW on every parameter (lr = --lr)."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def _galore_groups(model: nn.Module, args, projector: str, lowrank_lr=None, **options) -> List[dict]:
    if "scale" not in options:
        options["scale"] = args.galore_scale
    groups = subspace_ops.lowrank_param_groups(
        model, rank=args.rank, update_proj_gap=args.update_proj_gap, projector=projector, **options
    )
    # The low-rank matrices take --galore-lr (their update is multiplied by --galore-scale);
    # embeddings, head, norms and biases take plain AdamW steps at --lr.
    for group in groups:
        if "rank" in group:
            group["lr"] = args.galore_lr if lowrank_lr is None else lowrank_lr
    return groups


def make_galore(model: nn.Module, args) -> torch.optim.Optimizer:
    """GaLoreAdamW, exact SVD refresh (matrices: --galore-lr, the rest: --lr)."""
    return subspace_ops.GaLoreAdamW(
        _galore_groups(model, args, "svd"), lr=args.lr, weight_decay=args.weight_decay
    )


def make_galore_rand(model: nn.Module, args) -> torch.optim.Optimizer:
    """GaLoreAdamW, randomized (warm-started range finder) refresh; same learning rates."""
    return subspace_ops.GaLoreAdamW(
        _galore_groups(model, args, "randomized"), lr=args.lr, weight_decay=args.weight_decay
    )


def make_osd(model: nn.Module, args) -> torch.optim.Optimizer:
    """GaLoreAdamW with Online Subspace Descent: the basis follows the gradients every step."""
    return subspace_ops.GaLoreAdamW(
        _galore_groups(model, args, "online_pca"), lr=args.lr, weight_decay=args.weight_decay
    )


def make_galore_srht(model: nn.Module, args) -> torch.optim.Optimizer:
    """GaLoreAdamW with a seeded subsampled randomized Hadamard basis (no SVD), moments transported."""
    return subspace_ops.GaLoreAdamW(
        _galore_groups(model, args, "srht", transport_moments=True), lr=args.lr, weight_decay=args.weight_decay
    )


def make_galore_gauss(model: nn.Module, args) -> torch.optim.Optimizer:
    """GaLoreAdamW with a seeded Gaussian projection (Flora), moments transported."""
    return subspace_ops.GaLoreAdamW(
        _galore_groups(model, args, "gaussian", transport_moments=True), lr=args.lr, weight_decay=args.weight_decay
    )


def make_snsm(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamSNSM: subset-norm step sizes, subspace momentum (matrices: --snsm-lr, the rest: --lr)."""
    groups = _galore_groups(model, args, "svd", lowrank_lr=args.snsm_lr)
    for group in groups:
        group.pop("scale", None)  # SNSM has no scale
    return subspace_ops.AdamSNSM(groups, lr=args.lr, weight_decay=args.weight_decay)


OPTIMIZERS: Dict[str, Callable[[nn.Module, argparse.Namespace], torch.optim.Optimizer]] = {
    "adamw": make_adamw,
    "galore": make_galore,
    "galore_rand": make_galore_rand,
    "osd": make_osd,
    "galore_srht": make_galore_srht,
    "galore_gauss": make_galore_gauss,
    "snsm": make_snsm,
}


# What runs by default: within 3 minutes on 2 CPU cores. `--optim all` runs every entry above.
DEFAULT_OPTIMIZERS = ("adamw", "galore", "galore_rand")


def _describe(factory: Callable) -> str:
    doc = (factory.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


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
# Training
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over the fixed validation windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        total += float(model(xb, yb)) * len(xb)
        count += len(xb)
    model.train(was_training)
    return total / count


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (the same schedule for every optimizer)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (works for any torch optimizer)."""
    return subspace_ops.memory_report(optimizer)["state_bytes"]


def train_one(name: str, model: nn.Module, train: Tensor, val_xy, args, device: torch.device) -> dict:
    """Train ``model`` in place with optimizer ``name``; return its result row."""
    optimizer = OPTIMIZERS[name](model, args)
    grad_filter = None if args.grokfast == "none" else subspace_ops.GradFilter(model, mode=args.grokfast)
    warmup = max(1, int(args.steps * args.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps, warmup))
    # The same batches, in the same order, for every optimizer.
    generator = torch.Generator().manual_seed(args.seed + 1)
    val_x, val_y = val_xy

    initial_val = evaluate(model, val_x, val_y, args.batch_size, device)
    val_curve = [(0, initial_val)]
    train_losses: List[float] = []
    step_s: List[float] = []
    opt_s: List[float] = []
    bar = ProgressBar(args.steps, name, enabled=not args.no_progress)
    model.train()
    for step in range(1, args.steps + 1):
        x, y = get_batch(train, args.batch_size, model.context, generator, device)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_filter is not None:
            grad_filter.apply()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        _sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t2 = time.perf_counter()
        scheduler.step()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)

        loss_value = loss.item()
        if not math.isfinite(loss_value):
            bar.close()
            raise RuntimeError(f"{name}: training loss became {loss_value} at step {step}; try a lower learning rate")
        train_losses.append(loss_value)
        if step % args.eval_every == 0 and step != args.steps:
            val_curve.append((step, evaluate(model, val_x, val_y, args.batch_size, device)))
        bar.update(step, loss_value)
    bar.close()
    final_val = evaluate(model, val_x, val_y, args.batch_size, device)
    val_curve.append((args.steps, final_val))

    # Medians after a short warm-up (first-call allocations, lazy init); the median also keeps the
    # occasional basis-refresh step of GaLore out of the typical step time.
    skip = min(args.steps - 1, max(1, args.steps // 10))
    return {
        "optimizer": name,
        "val_loss": final_val,
        "initial_val_loss": initial_val,
        "final_train_loss": train_losses[-1],
        "state_bytes": optimizer_state_bytes(optimizer),
        "step_ms": 1e3 * statistics.median(step_s[skip:]),
        "opt_step_ms": 1e3 * statistics.median(opt_s[skip:]),
        **subspace_summary(optimizer),
        "train_losses": train_losses,
        "val_curve": val_curve,
    }


# ------------------------------------------------------------------------------------------------
# Report
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


def format_table(rows: List[dict]) -> str:
    header = ("optimizer", "val loss", "state MiB", "vs AdamW", "step ms", "opt.step ms", "energy", "min cos")

    def opt(value):
        return "-" if value is None else f"{value:.3f}"

    body = [
        (
            r["optimizer"],
            f"{r['val_loss']:.4f}",
            f"{r['state_bytes'] / 2**20:.3f}",
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
    return "\n".join(lines)


def _import_pyplot():
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


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores // 2))


def build_parser() -> argparse.ArgumentParser:
    optim_help = "; ".join(f"{name}: {_describe(f)}" for name, f in OPTIMIZERS.items())
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(
        prog="python -m subspace_ops.demo",
        description=(
            "Train a small character-level GPT on Python's documentation text (shipped with CPython) "
            "with AdamW and with GaLoreAdamW, then print validation loss, optimizer-state memory and "
            "step times. The defaults finish in under 3 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--optim", default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated optimizers to run, or 'all' ({optim_help})",
    )
    p.add_argument("--steps", type=int, default=300, help="training steps per optimizer")
    p.add_argument("--rank", type=int, default=32, help="GaLore rank")
    p.add_argument("--update-proj-gap", type=int, default=50, help="GaLore: steps between basis refreshes")
    p.add_argument("--galore-scale", type=float, default=0.25, help="GaLore scale (alpha) of the low-rank update")
    p.add_argument(
        "--lr", type=float, default=3e-3,
        help="peak learning rate of AdamW and of GaLore's full-rank parameters (embeddings, head, norms, "
        "biases); AdamW's best of 1e-3, 3e-3, 6e-3, 1e-2 at 400 steps",
    )
    p.add_argument(
        "--galore-lr", type=float, default=4e-2,
        help="peak learning rate of GaLore's low-rank matrices, whose update is also multiplied by "
        "--galore-scale (4e-2 x 0.25 = 1e-2 per step); GaLore's best of 3e-3, 1e-2, 2e-2, 4e-2, 8e-2",
    )
    p.add_argument(
        "--snsm-lr", type=float, default=1e-2,
        help="peak learning rate of AdamSNSM's low-rank matrices (SNSM wants a larger LR than Adam)",
    )
    p.add_argument(
        "--grokfast", choices=("none", "ema", "ma"), default="none",
        help="apply a Grokfast gradient filter (subspace_ops.GradFilter) between backward and step, for every optimizer",
    )
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay (all optimizers)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="fraction of steps of linear LR warm-up, then cosine decay to 10%%")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--context", type=int, default=64, help="sequence length (characters)")
    p.add_argument("--d-model", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation evaluations")
    p.add_argument("--eval-windows", type=int, default=256, help="validation windows per evaluation (evenly spaced, fixed)")
    p.add_argument("--device", default=default_device, help="torch device; cuda when available, else cpu")
    p.add_argument(
        "--threads", type=int, default=default_threads(),
        help="torch CPU threads; the default is half the CPU cores (at least 1): this small model gains "
        "little from more, and with every core taken, one busy process beside it made each step ~25x "
        "slower (measured on 2 cores)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of the loss curves (needs matplotlib)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the configuration and result rows as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = list(OPTIMIZERS) if args.optim.strip() == "all" else args.optim.split(",")
    args.optim_names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in args.optim_names if n not in OPTIMIZERS]
    if unknown or not args.optim_names:
        parser.error(f"--optim: unknown {unknown or 'empty list'}; choose from {', '.join(OPTIMIZERS)}")
    for flag in ("steps", "rank", "threads", "update_proj_gap", "batch_size", "context", "d_model", "layers", "heads",
                 "eval_every", "eval_windows"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if not 0.0 <= args.warmup_fraction < 1.0:
        parser.error("--warmup-fraction must be in [0, 1)")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    plt = _import_pyplot() if args.plot else None  # fail before training, not after
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, plt)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a longer-lived process (tests)


def _run(args: argparse.Namespace, plt) -> List[dict]:
    device = torch.device(args.device)

    text = load_corpus()
    tokenizer = CharTokenizer(text)
    train, val = split_corpus(tokenizer.encode(text))
    val_xy = eval_windows(val, args.context, args.eval_windows)

    torch.manual_seed(args.seed)
    initial = GPT(tokenizer.vocab_size, args.context, args.d_model, args.layers, args.heads)
    n_params = sum(p.numel() for p in initial.parameters())
    print(
        f"corpus: pydoc_data.topics, {len(text):,} chars, vocab {tokenizer.vocab_size}, "
        f"train {len(train):,} / val {len(val):,} | model: {args.layers} layers, d_model {args.d_model}, "
        f"{args.heads} heads, context {args.context}, {n_params / 1e6:.2f}M params | "
        f"{args.steps} steps x batch {args.batch_size} | rank {args.rank}, gap {args.update_proj_gap} | "
        f"device {device}, {torch.get_num_threads()} threads",
        flush=True,
    )

    rows = []
    for name in args.optim_names:
        torch.manual_seed(args.seed)  # the optimizers' own randomness, if any, starts the same too
        model = copy.deepcopy(initial).to(device)
        rows.append(train_one(name, model, train, val_xy, args, device))

    adamw = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        # Measured AdamW state when AdamW ran, else what torch AdamW would hold for these parameters.
        reference = adamw["state_bytes"] if adamw else sum(2 * p.numel() * p.element_size() + 4 for p in initial.parameters())
        r["state_ratio"] = r["state_bytes"] / reference

    print()
    print(format_table(rows))
    if args.json:
        config = {k: v for k, v in vars(args).items()}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": config, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_losses(rows, args.plot, plt)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
