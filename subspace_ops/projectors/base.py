"""The projector base class, the registry, and what every projector shares.

A projector owns how one matrix's basis is made and kept (docs/design.md, "How to add a projector"):

* its group keys, their defaults and their validation (``keys``, ``validate``);
* when a refresh is due (``refresh_due``);
* computing a basis (``compute``), or regenerating it (``current``);
* its own tensor state in the optimizer's per-parameter state (``store``, ``state_shapes``) and which
  of it stays fp32 through ``load_state_dict`` (``fp32_state``);
* a step of its own after the weight update, if it has one (``after_update``: Online Subspace Descent).

Projectors are stateless objects; a matrix's basis lives in the optimizer's state (tensors only).
They report what changed as ``(old, new)`` bases and never call back into the optimizer: the
optimizer decides what happens to its moments (kept, reset, transported).

Bases: a ``subspace_ops.basis.Basis`` (``(m, r)`` ``left`` for side ``"left"``, ``(n, r)`` ``right``
for ``"right"``, both for ``"full"``), in the gradient's dtype; orthonormal columns unless
``orthonormal`` is False. ``current`` and ``after_update`` return one, ``store`` takes one and keeps
its parts as tensors under ``STATE_KEYS``. ``compute`` returns what the public basis functions return
(``svd_basis``, ``compute_basis``): a Tensor for one side, a pair ``(left, right)`` for ``"full"``
(tests and plug-ins wrap it as such); the optimizer reads it with ``Basis.of``, which also takes a
``Basis``.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch
from torch import Tensor

from ..basis import Basis

# The state keys of a stored basis's parts, in ``Basis.parts`` order ("basis_right": "full" only).
STATE_KEYS = ("basis", "basis_right")

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def basis_side(proj_type: str, m: int, n: int) -> str:
    """Which side a (m x n) matrix projects on, by galore-torch's ``proj_type`` rules."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {PROJ_TYPES}")


def lowrank_shape(side: str, m: int, n: int, rank: int) -> tuple:
    """Shape of the projected gradient (and of the low-rank moments)."""
    return Basis.lowrank_shape_of(side, m, n, effective_rank(rank, m, n))


def effective_rank(rank: int, m: int, n: int) -> int:
    """A rank at or above min(m, n) runs as full rank."""
    return min(rank, m, n)


def orthonormalize(P: Tensor) -> Tensor:
    """Q of a Householder QR of ``P`` (fp32), columns signed so that ``diag(R) >= 0``.

    The sign choice makes ``Q ≈ P`` when ``P`` is already nearly orthonormal. Householder QR returns
    orthonormal columns whose span contains ``span(P)`` even when ``P`` is rank-deficient.
    """
    Q, R = torch.linalg.qr(P if P.dtype == torch.float64 else P.float())  # float64 stays float64
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign


def parameter_seed(group_seed: int, index: int, step: int) -> int:
    """Seed of parameter ``index``'s basis drawn at completed-step ``step``: reproducible and
    resumable from a checkpoint without storing a generator."""
    return (int(group_seed) * 1_000_003 + index) * 1_000_003 + step


def _positive_int(group: dict, key: str, example: str = "") -> None:
    v = group[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"invalid {key}: {v!r}; must be a positive int{example}")


def _nonnegative_int(group: dict, key: str) -> None:
    v = group[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"invalid {key}: {v!r}; must be an int >= 0")


class Projector:
    """Base class: a projector whose basis is computed at a refresh and stored in the state.

    Subclasses set ``name`` (what a param group's ``"projector"`` says), ``keys`` (their own group keys
    and defaults) and implement ``compute``; the rest has defaults that fit a stored basis refreshed
    every ``update_proj_gap`` steps.
    """

    name: str = ""
    # Group keys every projector reads: the refresh schedule and the seed of anything random.
    schedule_keys = {"update_proj_gap": 200, "stagger": False, "seed": 0}
    keys: Dict[str, object] = {}
    # State keys (beyond the basis) that stay fp32 whatever the parameter dtype (float64 for float64).
    fp32_state: tuple = ()
    # False when the basis does not have orthonormal columns (an optimizer that needs them
    # orthonormalises it; diagnostics measure the orthonormalised basis).
    orthonormal: bool = True
    # True when ``compute``, ``current`` and ``after_update`` take ``comm=`` (subspace_ops.distributed)
    # and work on this rank's rows of a row-sharded gradient (FSDP2). Otherwise the optimizer gathers a
    # sharded gradient on one rank, calls ``compute`` there and broadcasts the basis.
    shards_rows: bool = False

    # -- group keys ---------------------------------------------------------------------------------
    @classmethod
    def defaults(cls) -> dict:
        return {**cls.schedule_keys, **cls.keys}

    def validate(self, group: dict) -> None:
        """Raise a ValueError naming a bad group key of this projector."""
        _positive_int(group, "update_proj_gap", " (e.g. 200)")
        if not isinstance(group["stagger"], bool):
            raise ValueError(f"invalid stagger: {group['stagger']!r}; must be True or False")
        if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
            raise ValueError(f"invalid seed: {group['seed']!r}; must be an int")

    # -- the basis ----------------------------------------------------------------------------------
    def has_basis(self, state: dict) -> bool:
        return "basis" in state

    def refresh_due(self, state: dict, group: dict, s: int) -> bool:
        """``s``: completed steps. A basis is due at the first step, then every ``update_proj_gap``
        steps (shifted by the parameter's ``refresh_offset`` when the group staggers)."""
        if not self.has_basis(state):
            return True
        return (s + state["refresh_offset"].item()) % group["update_proj_gap"] == 0

    def current(self, state: dict, group: dict, side: str, G: Tensor, index: int, comm=None):
        """The basis in use (a ``Basis``), or None before the first refresh. A stored basis needs no
        ``comm``: ``state`` holds this rank's part of it."""
        if "basis" not in state:
            return None
        return Basis.from_parts(side, (state["basis"], state.get("basis_right")))

    def compute(self, G: Tensor, rank: int, side: str, group: dict, *, index: int, step: int,
                previous=None):
        """A new basis for ``G`` (m x n), or None when no finite one can be computed from it: a Tensor
        for side "left" / "right", ``(left, right)`` for "full" (a ``Basis`` is accepted too: the
        optimizer reads either with ``Basis.of``). ``previous``: the ``Basis`` in use, or None."""
        raise NotImplementedError

    def store(self, state: dict, basis, side: str, step: int) -> None:
        """Keep ``basis`` (a ``Basis``: what ``current`` returns from now on) in the optimizer's state."""
        state.update(zip(STATE_KEYS, basis.parts))

    def state_shapes(self, side: str, m: int, n: int, rank: int) -> dict:
        """The projector's state keys and their shapes once a basis exists (checked at load)."""
        return {k: (rows, rank) for k, rows in zip(STATE_KEYS, Basis.part_rows(side, m, n))}

    def state_placement(self, key: str, side: str) -> str:
        """How a state tensor of a row-sharded matrix is laid out (``subspace_ops.distributed``): a
        left part of the basis has the weight's rows (``"rows"``), a right part is whole on every
        rank (``"replicate"``)."""
        parts = dict(zip(STATE_KEYS, Basis.part_sides(side)))
        return "rows" if parts.get(key) == "left" else "replicate"

    def after_update(self, state: dict, G: Tensor, basis, group: dict, side: str, *, index: int, step: int):
        """A step of the projector's own after the weight update: ``(old, new, on_schedule)`` when
        it moved the basis (``on_schedule``: a step the diagnostics record), else None."""
        return None


_REGISTRY: Dict[str, Projector] = {}


def register(cls: Type[Projector]) -> Type[Projector]:
    """Make ``cls`` available as ``projector=cls.name`` in param groups (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Projector)) or not cls.name:
        raise ValueError(f"register() takes a Projector subclass with a name, got {cls!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Projector:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"invalid projector: {name!r}; expected one of {tuple(_REGISTRY)}") from None


def names() -> tuple:
    return tuple(_REGISTRY)


def finite_or_none(basis: Optional[Basis]) -> Optional[Basis]:
    """``basis`` (a ``Basis``) when every part is finite, else None."""
    return basis if basis is not None and basis.is_finite() else None
