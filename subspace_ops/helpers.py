"""Helpers around the optimizers: parameter grouping and memory accounting."""
from __future__ import annotations

import math
import re
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

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

    Low-rank: the weights of ``nn.Linear`` (subclasses included, such as the ``out_proj`` of
    ``nn.MultiheadAttention``) and ``nn.Conv1d/2d/3d`` modules, and the input projections of
    ``nn.MultiheadAttention`` (``in_proj_weight``, the stacked ``(3·E, E)`` query/key/value matrix,
    or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ from
    ``embed_dim``); except matrices whose module's qualified name matches one of
    ``full_rank_patterns`` (regular expressions searched in the name; default: the output head —
    ``lm_head``, ``head``, ``output``, ``classifier`` — and anything with ``embed`` in its name) and
    weights shared with an ``nn.Embedding`` (tied heads). When ``lowrank_patterns`` is given, the
    module's name must also match one of them. For the input projections of an
    ``nn.MultiheadAttention`` the name is the attention module's own (``layers.0.self_attn``).

    A matrix with ``rank >= min(m, n)`` (``m = shape[0]``, ``n = prod(shape[1:])``, how the
    optimizers view it) also stays full-rank: the optimizers would run it at rank ``min(m, n)``,
    which keeps the full gradient's information but holds more state than AdamW (full-size moments
    plus a square basis). One ``UserWarning`` lists such matrices; pass a smaller ``rank`` or
    exclude them with ``full_rank_patterns`` to silence it.

    Everything else (biases, norms, embeddings, the head) goes to the full-rank group.
    ``group_options`` (``update_proj_gap``, ``scale``, ``proj_type``, ``projector``, ...) are added
    to the low-rank group. Returns a list of param-group dicts for any optimizer of this package,
    empty groups left out.
    """
    full_pats = [re.compile(p) for p in (DEFAULT_FULL_RANK_PATTERNS if full_rank_patterns is None else full_rank_patterns)]
    low_pats = [re.compile(p) for p in lowrank_patterns] if lowrank_patterns is not None else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    param_names = {}
    for pname, p in model.named_parameters():  # deduplicated: a shared parameter keeps its first name
        param_names.setdefault(id(p), pname)

    lowrank_ids = set()
    too_small = {}  # id(param) -> "name (shape)": matrices the rank would not reduce
    # The rank check needs a number; a bad rank is left to the optimizer's validation (ValueError).
    check_rank = isinstance(rank, int) and not isinstance(rank, bool)
    for name, module in model.named_modules():
        for weight in _matrices(module):
            if weight is None or not weight.requires_grad:
                continue
            if id(weight) in embedding_weights or any(p.search(name) for p in full_pats):
                continue
            if low_pats is not None and not any(p.search(name) for p in low_pats):
                continue
            if check_rank and not isinstance(weight, UninitializedParameter):  # lazy: shape unknown yet
                m, n = weight.shape[0], math.prod(weight.shape[1:])
                if rank >= min(m, n):
                    too_small[id(weight)] = f"{param_names.get(id(weight), name)} {tuple(weight.shape)}"
                    continue
            lowrank_ids.add(id(weight))
    if too_small:
        one = len(too_small) == 1
        warnings.warn(
            f"lowrank_param_groups: rank={rank} is >= min(m, n) of {len(too_small)} "
            f"{'matrix, which stays' if one else 'matrices, which stay'} in the full-rank group (at "
            f"that rank GaLore would hold more state than AdamW): {', '.join(too_small.values())}",
            UserWarning,
            stacklevel=2,
        )

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


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# nn.MultiheadAttention keeps its input projections as its own parameters, not in nn.Linear modules
# (its out_proj is an nn.Linear subclass and is handled as one).
_MHA_MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _matrices(module: nn.Module) -> Tuple[Optional[torch.Tensor], ...]:
    """The parameters of ``module`` itself that are candidates for a low-rank group."""
    if isinstance(module, (nn.Linear,) + _CONV_TYPES):
        return (getattr(module, "weight", None),)
    if isinstance(module, nn.MultiheadAttention):
        return tuple(getattr(module, attr, None) for attr in _MHA_MATRICES)
    return ()


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
