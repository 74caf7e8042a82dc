"""Train a small character-level GPT with AdamW and with GaLoreAdamW, and compare them.

    python -m subspace_ops.demo                      # adamw, galore, galore_rand; < 3 min on 2 CPU cores
    python -m subspace_ops.demo --steps 1000 --device cuda --plot losses.png

The corpus is the text of Python's own documentation topics (``pydoc_data.topics``, shipped with
CPython, about 465k characters of English prose and code), so nothing is downloaded. A
character-level tokenizer is built from it; the first 90% is the training split, the last 10% the
validation split. Every optimizer starts from the same initial weights and sees the same batches.

``--fsdp`` runs the same training under FSDP2 (``fully_shard``, gloo on the CPU), one process per rank,
started by torchrun: ``torchrun --nproc-per-node 2 -m subspace_ops.demo --fsdp`` (``fsdp``). Each rank
trains on its slice of every batch; rank 0 prints the same table with a per-rank state-memory column.

At the end a table lists, per optimizer: the validation loss, the bytes held in optimizer state (MiB),
their ratio to AdamW's, and the median time of a whole training step and of ``optimizer.step()``
alone. ``main(argv)`` returns the same rows as dicts.

Modules: ``data`` (corpus, tokenizer, batches), ``model`` (the GPT), ``train`` (the optimizers by
name, the schedule, the training loop), ``report`` (progress bar, table, plot), ``fsdp`` (the
``--fsdp`` run's process group, sharding and per-rank state bytes), ``cli`` (flags and the run of
every chosen optimizer; ``__main__`` calls its ``main``). To add an optimizer, write a
``factory(model, args) -> torch.optim.Optimizer`` and add it to ``train.OPTIMIZERS``; the first line
of its docstring is its ``--help`` entry.
"""
from .cli import build_parser, main, parse_args
from .train import DEFAULT_OPTIMIZERS, OPTIMIZERS

__all__ = ["main", "parse_args", "build_parser", "OPTIMIZERS", "DEFAULT_OPTIMIZERS"]
