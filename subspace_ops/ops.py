"""Dispatch between the Triton kernels and the reference path.

``backend``: ``None`` (take ``SUBSPACE_OPS_BACKEND``, default ``auto``), ``"auto"`` (Triton for CUDA
tensors, reference otherwise), ``"triton"`` or ``"reference"``.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor

from . import reference

BACKENDS = ("auto", "triton", "reference")


def validate_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: Optional[str], like: Tensor) -> str:
    """The concrete backend ("triton" or "reference") for tensors on ``like``'s device."""
    validate_backend(backend)
    if backend is None:
        backend = os.environ.get("SUBSPACE_OPS_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"SUBSPACE_OPS_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "reference"
    if backend == "triton":
        raise NotImplementedError("the Triton backend is not built yet")
    return backend


def galore_matrix_step_(W, G, basis, M, V, *, backend: Optional[str] = None, **hyper) -> None:
    """One GaLore AdamW update of a 2-D weight (see ``reference.galore_matrix_step_``)."""
    resolve_backend(backend, W)
    reference.galore_matrix_step_(W, G, basis, M, V, **hyper)


def adam_step_(W, G, M, V, *, backend: Optional[str] = None, **hyper) -> None:
    """One plain AdamW update (see ``reference.adam_step_``)."""
    resolve_backend(backend, W)
    reference.adam_step_(W, G, M, V, **hyper)


def project(G: Tensor, P: Tensor, side: str) -> Tensor:
    """``Pᵀ G`` (side="left") or ``G P`` (side="right")."""
    return reference.project(G, P, side)


def back_project(R: Tensor, P: Tensor, side: str) -> Tensor:
    """``P R`` (side="left") or ``R Pᵀ`` (side="right")."""
    return reference.back_project(R, P, side)
