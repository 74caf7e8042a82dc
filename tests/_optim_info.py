"""One declarative table of optimizer configurations for the behaviour tests (the ``OptimizerInfo``
pattern of ``torch/testing/_internal/common_optimizers.py``).

Each ``OptimInfo`` names an optimizer class, the options of its low-rank groups, its constructor
keyword arguments and flags that say what a test may expect of it (``has_scale``, ``stores_basis``,
...). ``info.make(dtype)`` builds the tiny model below and the optimizer over it;
``tests/test_optimizer_behaviour.py`` runs every check on every entry. A new optimizer, projector or
option gets an entry here and is then held to torch.optim's behaviour (checkpoints, ``zero_grad``,
schedulers, ``add_param_group``, closures, dtypes) without a new test.

The tiny model: matrices of odd shapes on every basis side of ``proj_type="std"``, a conv weight, a
bias inside a low-rank group, and a plain group; every rank is below ``min(m, n)`` (a larger one warns,
and ``UserWarning``s from ``subspace_ops`` are errors in the tests).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from subspace_ops import AdamSNSM, GaLoreAdamW, projectors
from subspace_ops.optim.base import FP32_STATE

# name -> shape, in parameter order; LOWRANK, PLAIN and ADDED say which group holds which.
SHAPES = {
    "tall": (18, 11),      # std: right basis (11, r)
    "wide": (7, 13),       # std: left basis (7, r)
    "bias": (11,),         # 1-D inside a low-rank group: plain AdamW
    "plain_matrix": (5, 4),
    "plain_bias": (13,),
    "conv": (6, 3, 2, 2),  # viewed as 6 x 12
}
LOWRANK = ("tall", "wide", "bias")
PLAIN = ("plain_matrix", "plain_bias")
ADDED = ("conv",)  # the third group, a low-rank one: what the add_param_group test adds later
NAMES = tuple(SHAPES)
RANK, ADDED_RANK, GAP = 3, 2, 2  # a refresh every 2 steps: a few steps span one


def tiny_params(dtype=torch.float32, seed=0) -> List[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in SHAPES.values()]


def tiny_groups(params, lowrank: dict) -> List[dict]:
    """Param groups over ``tiny_params``: the low-rank group (``lowrank`` options), the plain group,
    and a second low-rank group (the conv weight, rank 2, same options)."""
    by_name = dict(zip(NAMES, params))
    return [
        {"params": [by_name[k] for k in LOWRANK], "rank": RANK, "update_proj_gap": GAP, **lowrank},
        {"params": [by_name[k] for k in PLAIN]},
        {"params": [by_name[k] for k in ADDED], "rank": ADDED_RANK, "update_proj_gap": GAP, **lowrank},
    ]


@dataclass(frozen=True)
class OptimInfo:
    id: str
    cls: type
    lowrank: dict = field(default_factory=dict)  # low-rank group options (projector, proj_type, ...)
    kwargs: dict = field(default_factory=dict)   # constructor keyword arguments (deep-copied per use)
    groups: Callable = tiny_groups               # (params, lowrank) -> param groups
    # -- flags --------------------------------------------------------------------------------------
    capturable: bool = False
    tensor_lr: bool = False  # the learning rate is a tensor (schedulers fill_ it in place)

    @property
    def projector(self) -> str:
        return self.lowrank.get("projector", "svd")

    @property
    def proj_type(self) -> str:
        return self.lowrank.get("proj_type", "std")

    @property
    def has_scale(self) -> bool:
        """Low-rank groups carry a ``scale`` (GaLore's α); AdamSNSM has none."""
        return "scale" in self.cls.lowrank_defaults

    @property
    def stores_basis(self) -> bool:
        """The basis is a state tensor (``"basis"``); seeded projectors keep only ``basis_step``."""
        return self.projector not in projectors.SEEDED_PROJECTORS

    @property
    def fp32_state(self) -> Tuple[str, ...]:
        """State keys that are fp32 whatever the parameter dtype: the moments and the projector's."""
        return FP32_STATE + projectors.get(self.projector).fp32_state

    def constructor_kwargs(self) -> dict:
        return copy.deepcopy(self.kwargs)  # a tensor lr: one per optimizer

    def param_groups(self, params) -> List[dict]:
        return self.groups(params, dict(self.lowrank))

    def make(self, dtype=torch.float32, seed=0, params: Optional[list] = None, groups: Optional[list] = None):
        """``(params, optimizer)`` over the tiny model (or over ``groups`` of ``params``)."""
        params = tiny_params(dtype, seed) if params is None else params
        groups = self.param_groups(params) if groups is None else groups
        return params, self.cls(groups, **self.constructor_kwargs())


def _galore(id, *, capturable=False, tensor_lr=False, **lowrank) -> OptimInfo:
    kwargs = dict(lr=torch.tensor(1e-2) if tensor_lr else 1e-2, weight_decay=0.05, backend="reference")
    if capturable:
        kwargs["capturable"] = True
    return OptimInfo(f"galore-{id}", GaLoreAdamW, {"scale": 0.5, **lowrank}, kwargs,
                     capturable=capturable, tensor_lr=tensor_lr)


def _snsm(id, *, capturable=False, **lowrank) -> OptimInfo:
    kwargs = dict(lr=2e-2, weight_decay=0.05, backend="reference")
    if capturable:
        kwargs["capturable"] = True
    return OptimInfo(f"snsm-{id}", AdamSNSM, lowrank, kwargs, capturable=capturable)


OPTIM_INFOS: List[OptimInfo] = [
    # GaLoreAdamW: every projector with each proj_type
    *[_galore(f"{projector}-{proj_type}", projector=projector, proj_type=proj_type)
      for projector in projectors.PROJECTORS for proj_type in ("std", "full", "reverse_std")],
    # options
    _galore("svd-transport", projector="svd", transport_moments=True),
    _galore("online_pca-transport", projector="online_pca", transport_moments=True),
    _galore("randomized-stagger", projector="randomized", stagger=True),
    _galore("srht-full-stagger-transport", projector="srht", proj_type="full", stagger=True,
            transport_moments=True),
    _galore("capturable", capturable=True),
    _galore("tensor_lr", tensor_lr=True),
    _galore("capturable-tensor_lr", capturable=True, tensor_lr=True),
    # AdamSNSM
    _snsm("svd", projector="svd"),
    _snsm("online_pca", projector="online_pca"),
    _snsm("gaussian", projector="gaussian"),
    _snsm("randomized-full-transport", projector="randomized", proj_type="full", transport_moments=True),
    _snsm("capturable", capturable=True),
]

assert len({info.id for info in OPTIM_INFOS}) == len(OPTIM_INFOS), "duplicate OptimInfo ids"
