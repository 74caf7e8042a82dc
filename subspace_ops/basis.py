"""``Basis``: the basis of one matrix for any side, and the only place that knows how the sides differ.

* side ``"left"``:  ``left`` is (m, r), ``project(G) = Pᵀ G`` (r, n), ``back(R) = P R`` (m, n)
* side ``"right"``: ``right`` is (n, r), ``project(G) = G P`` (m, r), ``back(R) = R Pᵀ`` (m, n)
* side ``"full"``:  both, ``project(G) = Plᵀ G Pr`` (r, r), ``back(N) = Pl N Prᵀ`` (m, n)

``parts`` is ``(left,)``, ``(right,)`` or ``(left, right)``: code that treats every part alike (casting,
orthonormalising, checking finiteness, storing in the optimizer state) loops over it, with
``part_sides`` naming the side each part projects on by itself. The public functions still take (and
the public basis functions still return) the old conventions, a Tensor for one side and a pair
``(left, right)`` for ``"full"``: ``Basis.of`` reads them, ``legacy`` writes them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

SIDES = ("left", "right", "full")
# The sides each part of a basis projects on, in ``parts`` order.
_PART_SIDES = {"left": ("left",), "right": ("right",), "full": ("left", "right")}


def _check_side(side: str) -> None:
    if side not in _PART_SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


class Basis:
    """The basis of one (m x n) matrix for ``side`` (see the module docstring); a small immutable
    holder of one or two tensors, created per matrix per step (kept cheap: ``__slots__``, no checks
    beyond the side in ``__init__``)."""

    __slots__ = ("side", "left", "right", "parts")

    def __init__(self, side: str, left: Optional[Tensor] = None, right: Optional[Tensor] = None):
        self.side = side
        self.left = left
        self.right = right
        if side == "left":
            self.parts = (left,)
        elif side == "right":
            self.parts = (right,)
        elif side == "full":
            self.parts = (left, right)
        else:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def of(cls, obj, side: str) -> "Basis":
        """``obj`` as a Basis for ``side``: a Basis (returned as is), a Tensor for ``"left"`` /
        ``"right"``, a pair ``(left, right)`` for ``"full"``; a ValueError for anything else."""
        if obj.__class__ is cls:
            if obj.side != side:
                raise ValueError(f"a basis for side {obj.side!r} given for side {side!r}")
            return obj
        _check_side(side)
        if side == "full":
            if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
                raise ValueError("side 'full' needs basis=(P_left, P_right), a pair of tensors")
            return cls("full", obj[0], obj[1])
        if not isinstance(obj, Tensor):
            raise ValueError(f"side {side!r} needs one basis tensor, got {type(obj).__name__}")
        return cls(side, obj, None) if side == "left" else cls(side, None, obj)

    @classmethod
    def from_parts(cls, side: str, parts: Sequence[Tensor]) -> "Basis":
        """The Basis whose ``parts`` are ``parts`` (in ``part_sides`` order; extra ones are ignored, so
        ``(state["basis"], state.get("basis_right"))`` reads any side)."""
        if side == "right":
            return cls(side, None, parts[0])
        return cls(side, parts[0], parts[1] if side == "full" else None)

    @classmethod
    def pick(cls, side: str, left: Tensor, right: Tensor) -> "Basis":
        """The parts ``side`` uses of a left (m, r) and a right (n, r) basis computed together."""
        _check_side(side)
        return cls(side, left if side != "right" else None, right if side != "left" else None)

    @staticmethod
    def part_sides(side: str) -> Tuple[str, ...]:
        """The side each part projects on by itself: ``("left",)``, ``("right",)``, ``("left", "right")``."""
        _check_side(side)
        return _PART_SIDES[side]

    @staticmethod
    def part_rows(side: str, m: int, n: int) -> Tuple[int, ...]:
        """The number of rows of each part for an (m x n) matrix."""
        _check_side(side)
        return tuple(m if s == "left" else n for s in _PART_SIDES[side])

    @staticmethod
    def lowrank_shape_of(side: str, m: int, n: int, r: int) -> Tuple[int, int]:
        """Shape of ``project(G)`` for an (m x n) ``G`` and rank ``r``."""
        _check_side(side)
        return (r if side != "right" else m, r if side != "left" else n)

    # -- the parts --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Basis":
        """A Basis of the same side with ``fn`` applied to each part (orthonormalise, cast, ...)."""
        return Basis.from_parts(self.side, [fn(p) for p in self.parts])

    def legacy(self):
        """The old convention: the tensor for ``"left"`` / ``"right"``, ``(left, right)`` for ``"full"``."""
        return self.parts if len(self.parts) == 2 else self.parts[0]

    def lowrank_shape(self, m: int, n: int) -> Tuple[int, int]:
        """Shape of ``project(G)`` for an (m x n) ``G``."""
        return (self.left.shape[1] if self.left is not None else m,
                self.right.shape[1] if self.right is not None else n)

    def is_finite(self) -> bool:
        """Every part finite (meta tensors, which have no values, count as finite: ``all_finite``)."""
        from .distributed import LOCAL, all_finite

        return all_finite(LOCAL, *self.parts)

    # -- the math (the reference's: fp32, float64 for float64) -----------------------------------
    def project(self, G: Tensor) -> Tensor:
        """``Plᵀ G``, ``G Pr`` or ``Plᵀ G Pr`` in fp32 (float64 for a float64 ``G``)."""
        G32 = G if G.dtype == torch.float64 else G.float()
        dtype = G32.dtype
        if self.left is not None:
            G32 = self.left.to(dtype).mT @ G32
        if self.right is not None:
            G32 = G32 @ self.right.to(dtype)
        return G32

    def back(self, N: Tensor) -> Tensor:
        """``Pl N``, ``N Prᵀ`` or ``Pl N Prᵀ`` in fp32 (float64 when the basis is float64)."""
        dtype = torch.float64 if self.parts[0].dtype == torch.float64 else torch.float32
        X = N.to(dtype)
        if self.left is not None:
            X = self.left.to(dtype) @ X
        if self.right is not None:
            X = X @ self.right.to(dtype).mT
        return X

    def transport_(self, M: Tensor, V: Optional[Tensor], new: "Basis", comm=None) -> None:
        """Carry low-rank moments from this basis into ``new``, in place (``reference.transport_moments_``):
        ``M ← Cl M Crᵀ`` with ``C = P_newᵀ P_old`` on each side the basis has, ``V`` likewise with
        ``C∘C``, clamped ≥ 0. ``comm``: the left parts' rows are sharded (``subspace_ops.distributed``):
        ``Cl`` is summed over ranks; the moments' own layout needs nothing more."""
        # C in the bases' width (float64 stays float64), then rounded once to the moments' dtype: a sum
        # over sharded rows then rounds like the whole one.
        wide = torch.float64 if self.dtype == torch.float64 else torch.float32
        Cl = Cr = None
        if self.left is not None:
            Cl = new.left.to(wide).mT @ self.left.to(wide)
            if comm is not None:
                Cl = comm.sum_(Cl)
            Cl = Cl.to(M.dtype)
        if self.right is not None:
            Cr = (new.right.to(wide).mT @ self.right.to(wide)).to(M.dtype)
        M.copy_(_sandwich(Cl, M, Cr))
        if V is not None:
            V.copy_(_sandwich(None if Cl is None else Cl * Cl, V, None if Cr is None else Cr * Cr).clamp_(min=0.0))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s}={tuple(p.shape)}" for s, p in zip(_PART_SIDES[self.side], self.parts))
        return f"Basis({self.side!r}, {shapes}, dtype={self.dtype})"


def _sandwich(Cl: Optional[Tensor], X: Tensor, Cr: Optional[Tensor]) -> Tensor:
    """``Cl X Crᵀ`` with a missing factor left out (the association of the old code: left first)."""
    if Cl is not None:
        X = Cl @ X
    if Cr is not None:
        X = X @ Cr.mT
    return X
