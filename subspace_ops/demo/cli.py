"""The demo's command line: flags, their checks, and one run of every chosen optimizer."""
from __future__ import annotations

import argparse
import copy
import json
import os
from typing import List

import torch

from . import fsdp
from .data import CharTokenizer, eval_windows, load_corpus, split_corpus
from .model import GPT
from .report import format_table, import_pyplot, plot_losses
from .train import DEFAULT_OPTIMIZERS, OPTIMIZERS, describe, train_one


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores // 2))


def build_parser() -> argparse.ArgumentParser:
    optim_help = "; ".join(f"{name}: {describe(f)}" for name, f in OPTIMIZERS.items())
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
    p.add_argument(
        "--fsdp", action="store_true",
        help=f"shard the model with FSDP2 (fully_shard, gloo on the CPU) over the processes torchrun starts; "
        f"each rank trains on its slice of every batch, rank 0 prints the table with each rank's state memory: "
        f"{fsdp.TORCHRUN}",
    )
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
    if args.fsdp:
        if not fsdp.launched_by_torchrun():
            parser.error(f"--fsdp runs one process per rank, started by torchrun: {fsdp.TORCHRUN} "
                         "[other flags] (RANK and WORLD_SIZE are not set, so this process was not)")
        if torch.device(args.device).type != "cpu":
            parser.error(f"--fsdp: this demo shards over gloo on the CPU; add --device cpu "
                         f"(got --device {args.device})")
        if args.grokfast != "none":
            parser.error("--fsdp with --grokfast is not supported: subspace_ops.GradFilter does not take the "
                         "DTensor gradients of an FSDP2 model yet")
        world = int(os.environ["WORLD_SIZE"])
        if args.batch_size % world:
            parser.error(f"--fsdp: --batch-size ({args.batch_size}) must be divisible by the number of processes "
                         f"({world}), so that every rank takes an equal slice of each batch")
    return args


def main(argv=None) -> List[dict]:
    """Run the demo with command-line arguments ``argv``; return one result row (a dict) per optimizer."""
    args = parse_args(argv)
    plt = import_pyplot() if args.plot else None  # fail before training, not after
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    ctx = fsdp.init() if args.fsdp else None
    try:
        return run(args, plt, ctx)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a longer-lived process (tests)
        if ctx is not None:
            fsdp.shutdown()


def run(args: argparse.Namespace, plt, ctx=None) -> List[dict]:
    """Load the corpus, build one initial model, train a copy of it with every chosen optimizer, report.
    ``ctx`` (``fsdp.Context``): this process is one rank of an FSDP2 run; only rank 0 prints and writes."""
    device = torch.device(args.device)
    main_rank = ctx is None or ctx.main
    say = print if main_rank else (lambda *a, **k: None)

    text = load_corpus()
    tokenizer = CharTokenizer(text)
    train, val = split_corpus(tokenizer.encode(text))
    val_xy = eval_windows(val, args.context, args.eval_windows)

    torch.manual_seed(args.seed)
    initial = GPT(tokenizer.vocab_size, args.context, args.d_model, args.layers, args.heads)
    n_params = sum(p.numel() for p in initial.parameters())
    say(
        f"corpus: pydoc_data.topics, {len(text):,} chars, vocab {tokenizer.vocab_size}, "
        f"train {len(train):,} / val {len(val):,} | model: {args.layers} layers, d_model {args.d_model}, "
        f"{args.heads} heads, context {args.context}, {n_params / 1e6:.2f}M params | "
        f"{args.steps} steps x batch {args.batch_size} | rank {args.rank}, gap {args.update_proj_gap} | "
        f"device {device}, {torch.get_num_threads()} threads"
        + ("" if ctx is None else f" per rank | FSDP2 over {ctx.world} processes (gloo), "
           f"{args.batch_size // ctx.world} sequences of each batch per rank"),
        flush=True,
    )

    rows = []
    for name in args.optim_names:
        torch.manual_seed(args.seed)  # the optimizers' own randomness, if any, starts the same too
        model = copy.deepcopy(initial).to(device)
        if ctx is not None:
            fsdp.shard(model)
        rows.append(train_one(name, model, train, val_xy, args, device, ctx))

    adamw = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        # Measured AdamW state when AdamW ran, else what torch AdamW would hold for these parameters.
        reference = adamw["state_bytes"] if adamw else sum(2 * p.numel() * p.element_size() + 4 for p in initial.parameters())
        r["state_ratio"] = r["state_bytes"] / reference

    say()
    say(format_table(rows, 1 if ctx is None else ctx.world))
    if not main_rank:
        return rows
    if args.json:
        config = {k: v for k, v in vars(args).items()}
        config["world"] = 1 if ctx is None else ctx.world  # processes (FSDP2 ranks)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": config, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_losses(rows, args.plot, plt)
        print(f"wrote {args.plot}")
    return rows
