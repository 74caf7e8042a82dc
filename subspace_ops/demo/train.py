"""The demo's optimizers (name -> factory), learning-rate schedule, evaluation and training loop.

To add an optimizer, write a ``factory(model, args) -> torch.optim.Optimizer`` and add it to
``OPTIMIZERS``; the first line of its docstring is its ``--help`` entry.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

import subspace_ops

from .data import get_batch
from .fsdp import local_state_bytes
from .report import ProgressBar, subspace_summary

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


def describe(factory: Callable) -> str:
    """The ``--help`` entry of an optimizer factory: the first line of its docstring."""
    doc = (factory.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


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


def train_one(name: str, model: nn.Module, train: Tensor, val_xy, args, device: torch.device, ctx=None) -> dict:
    """Train ``model`` in place with optimizer ``name``; return its result row.

    ``ctx`` (``demo.fsdp.Context``): ``model`` is sharded with FSDP2 and this process is one rank of
    the run: it steps on its slice of each batch, the training loss is the mean over the ranks, and
    the row adds ``state_bytes_per_rank`` (the largest rank's local state)."""
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
    bar = ProgressBar(args.steps, name, enabled=not args.no_progress and (ctx is None or ctx.main))
    part = None if ctx is None else ctx.local_slice(args.batch_size)
    model.train()
    for step in range(1, args.steps + 1):
        x, y = get_batch(train, args.batch_size, model.context, generator, device)
        if part is not None:  # every rank draws the whole batch (same generator) and takes its slice
            x, y = x[part], y[part]
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

        loss_value = loss.item() if ctx is None else ctx.mean(loss.item())  # the whole batch's mean
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
    per_rank = {} if ctx is None else {"state_bytes_per_rank": ctx.max(local_state_bytes(optimizer))}
    return {
        "optimizer": name,
        "val_loss": final_val,
        "initial_val_loss": initial_val,
        "final_train_loss": train_losses[-1],
        "state_bytes": optimizer_state_bytes(optimizer),
        **per_rank,
        "step_ms": 1e3 * statistics.median(step_s[skip:]),
        "opt_step_ms": 1e3 * statistics.median(opt_s[skip:]),
        **subspace_summary(optimizer),
        "train_losses": train_losses,
        "val_curve": val_curve,
    }
