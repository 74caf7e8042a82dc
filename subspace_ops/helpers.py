"""Helpers around the optimizers: parameter grouping and memory accounting."""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

# Module names whose weights stay full-rank by default: the output head and anything embedding-like.
DEFAULT_FULL_RANK_PATTERNS = (r"(^|\.)(lm_head|head|output|classifier)$", r"embed")


def lowrank_param_groups(
    model: nn.Module,
    rank: int,
    *,
    full_rank_patterns: Optional[Sequence[str]] = None,
    lowrank_patterns: Optional[Sequence[str]] = None,
    **group_options,
) -> List[dict]:
    """Split ``model``'s trainable parameters into a low-rank group and a full-rank group.

    Low-rank: the weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules, except modules whose
    qualified name matches one of ``full_rank_patterns`` (regular expressions searched in the name;
    default: the output head — ``lm_head``, ``head``, ``output``, ``classifier`` — and anything with
    ``embed`` in its name) and weights shared with an ``nn.Embedding`` (tied heads). When
    ``lowrank_patterns`` is given, a weight must also match one of them. Everything else (biases,
    norms, embeddings, the head) goes to the full-rank group. ``group_options`` (``update_proj_gap``,
    ``scale``, ``proj_type``, ``projector``, ...) are added to the low-rank group.

    Returns a list of param-group dicts for any optimizer of this package, empty groups left out.
    """
    full_pats = [re.compile(p) for p in (DEFAULT_FULL_RANK_PATTERNS if full_rank_patterns is None else full_rank_patterns)]
    low_pats = [re.compile(p) for p in lowrank_patterns] if lowrank_patterns is not None else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrix_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    lowrank_ids = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, matrix_types) or weight is None or not weight.requires_grad:
            continue
        if id(weight) in embedding_weights or any(p.search(name) for p in full_pats):
            continue
        if low_pats is not None and not any(p.search(name) for p in low_pats):
            continue
        lowrank_ids.add(id(weight))

    lowrank, full = [], []
    for p in model.parameters():  # deduplicated by nn.Module, in registration order
        if p.requires_grad:
            (lowrank if id(p) in lowrank_ids else full).append(p)
    groups = []
    if lowrank:
        groups.append({"params": lowrank, "rank": rank, **group_options})
    if full:
        groups.append({"params": full})
    return groups


def _state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def memory_report(optimizer: torch.optim.Optimizer) -> dict:
    """Bytes held in ``optimizer``'s state now, next to what ``torch.optim.AdamW`` would hold.

    ``state_bytes`` counts every state tensor (moments, bases, step counters) and is measured, so
    call it after at least one step. ``adamw_bytes`` is what torch.optim.AdamW holds for the same
    parameters: two moments in each parameter's dtype plus a 4-byte step counter per parameter.
    """
    params: Iterable[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
    state_bytes = sum(_state_bytes(optimizer.state[p]) for p in params if p in optimizer.state)
    adamw_bytes = sum(2 * p.numel() * p.element_size() + 4 for p in params)
    return {
        "state_bytes": state_bytes,
        "adamw_bytes": adamw_bytes,
        "ratio": state_bytes / adamw_bytes if adamw_bytes else 0.0,
        "params": len(params),
        "params_with_state": sum(1 for p in params if optimizer.state.get(p)),
    }
