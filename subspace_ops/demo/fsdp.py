"""``--fsdp``: the demo under FSDP2 (``torch.distributed.fsdp.fully_shard``), one process per rank.

    torchrun --nproc-per-node 2 -m subspace_ops.demo --fsdp

Every rank builds the same initial model (same seed), shards each block and then the whole model with
``fully_shard`` (parameters, gradients and optimizer state split over the ranks by rows), and trains
on its slice of each batch: rank ``i`` of ``w`` takes sequences ``[i·b/w, (i+1)·b/w)`` of the batch of
``b``, which every rank draws from the same generator. FSDP2 averages the gradients over the ranks,
so with equal slices each step's gradient is the whole batch's, as in one process: the printed losses
equal the single-process demo's up to floating-point summation order. The training loss printed is
the mean over the ranks of their slices' losses (= the whole batch's mean); validation runs the whole
validation set on every rank. Rank 0 prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

TORCHRUN = "torchrun --nproc-per-node 2 -m subspace_ops.demo --fsdp"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Context:
    """This process's place in the run: ``rank`` of ``world``."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local_slice(self, n: int) -> slice:
        """This rank's rows of a batch of ``n`` (``n`` divisible by ``world``)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def mean(self, value: float) -> float:
        """The mean over the ranks of ``value`` (an all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def max(self, value: int) -> int:
        import torch.distributed as dist

        t = torch.tensor(value, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)


def init() -> Context:
    """Join the process group torchrun set up (gloo: the demo's FSDP2 runs on the CPU)."""
    import warnings

    import torch.distributed as dist

    # FSDP2 itself calls all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 marks as
    # deprecated: one FutureWarning per rank that no user of the demo can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Context(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 as a user applies it: each transformer block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def local_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds in ``optimizer``'s state: the local shard of each DTensor state tensor
    (a replicated one counts whole), plain tensors whole; each storage counted once, by its size."""
    seen = set()
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if not isinstance(v, torch.Tensor):
                continue
            t = getattr(v, "_local_tensor", v)
            storage = t.untyped_storage()
            key: Optional[tuple] = (storage.data_ptr(), storage.nbytes())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total
