"""Grokfast gradient filters (Lee et al. 2024; docs/algorithms.md §7), usable with any optimizer."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from . import reference

MODES = ("ema", "ma")
# The paper's amplification per mode (λ = 2 with the EMA filter, 5 with the moving average).
DEFAULT_LAMB = {"ema": 2.0, "ma": 5.0}


class GradFilter:
    """Amplify the slow component of the gradients in place, between ``backward()`` and ``step()``.

    ``mode="ema"``: ``μ ← α·μ + (1−α)·g`` (``μ`` starts at the first gradient), ``g ← g + λ·μ``.
    ``mode="ma"``: ``g ← g + λ·mean(last `window` gradients)`` (the current one included), applied once
    the window is full (``warmup=True``, the paper's default) or from the first step
    (``warmup=False``, averaging what is there).

    ``params_or_model``: an ``nn.Module`` (its parameters that require grad) or an iterable of tensors.
    ``lamb=None`` takes the paper's value for the mode (2.0 for EMA, 5.0 for MA). State is fp32 per
    parameter whatever its dtype (EMA: one tensor; MA: a ``(window, *shape)`` ring buffer plus an int64
    count), created at the first ``apply()`` that sees the parameter's gradient; parameters without a
    gradient are skipped. ``state_dict()`` holds tensors and plain numbers only
    (``torch.load(weights_only=True)`` works).

    Usage::

        filt = GradFilter(model, mode="ema", alpha=0.98, lamb=2.0)
        loss.backward()
        filt.apply()          # or filt()
        optimizer.step()

    With a ``GradScaler``, call it after ``scaler.unscale_(optimizer)`` so the state sees true gradients.
    """

    def __init__(
        self,
        params_or_model: Union[nn.Module, Iterable[Tensor]],
        mode: str = "ema",
        alpha: float = 0.98,
        lamb: Optional[float] = None,
        window: int = 100,
        warmup: bool = True,
    ):
        if isinstance(params_or_model, nn.Module):
            params = [p for p in params_or_model.parameters() if p.requires_grad]
        else:
            params = list(params_or_model)
            for p in params:
                if not isinstance(p, Tensor):
                    raise TypeError(f"GradFilter: expected tensors or an nn.Module, got {type(p).__name__}")
        seen, unique = set(), []
        for p in params:  # a shared parameter is filtered once
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        if not unique:
            raise ValueError("GradFilter: got no parameters (none given, or none requires grad)")
        if mode not in MODES:
            raise ValueError(f"GradFilter: invalid mode {mode!r}; expected one of {MODES}")
        if lamb is None:
            lamb = DEFAULT_LAMB[mode]
        self._validate(alpha, lamb, window)
        self.params = unique
        self.mode = mode
        self.alpha = float(alpha)
        self.lamb = float(lamb)
        self.window = int(window)
        self.warmup = bool(warmup)
        self.state: dict = {}

    @staticmethod
    def _validate(alpha, lamb, window) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
            raise ValueError(f"GradFilter: invalid alpha {alpha!r}; must be in [0, 1)")
        if isinstance(lamb, bool) or not isinstance(lamb, (int, float)) or not math.isfinite(lamb):
            raise ValueError(f"GradFilter: invalid lamb {lamb!r}; must be a finite number")
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"GradFilter: invalid window {window!r}; must be a positive int")

    @torch.no_grad()
    def apply(self) -> None:
        """Filter every ``p.grad`` in place (parameters whose ``grad`` is None are skipped)."""
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise ValueError(f"GradFilter: parameter {i} (shape {tuple(p.shape)}) has a sparse gradient")
            g = torch.view_as_real(grad) if grad.is_complex() else grad
            state = self.state.get(i)
            first = state is None
            if first:
                state = self.state[i] = self._new_state(g)
            if self.mode == "ema":
                reference.grokfast_ema_(g, state["ema"], self.alpha, self.lamb, first)
            else:
                reference.grokfast_ma_(g, state["buffer"], state["count"], self.lamb, self.warmup)

    __call__ = apply

    def _new_state(self, g: Tensor) -> dict:
        if self.mode == "ema":
            return {"ema": torch.zeros(g.shape, dtype=torch.float32, device=g.device)}
        return {
            "buffer": torch.zeros((self.window, *g.shape), dtype=torch.float32, device=g.device),
            "count": torch.zeros((), dtype=torch.int64, device=g.device),
        }

    def reset(self) -> None:
        """Forget all filter state (the next ``apply`` starts over)."""
        self.state.clear()

    def state_dict(self) -> dict:
        return {
            "state": {i: {k: v.clone() for k, v in st.items()} for i, st in self.state.items()},
            "config": {"mode": self.mode, "alpha": self.alpha, "lamb": self.lamb,
                       "window": self.window, "warmup": self.warmup},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state and hyperparameters; mode and window must match (they fix the state's shape)."""
        config, saved = state_dict["config"], state_dict["state"]
        if config["mode"] != self.mode or int(config["window"]) != self.window:
            raise ValueError(
                f"GradFilter: state_dict is for mode={config['mode']!r}, window={config['window']}; this filter "
                f"has mode={self.mode!r}, window={self.window}"
            )
        self._validate(config["alpha"], config["lamb"], self.window)
        state = {}
        for i, st in saved.items():
            i = int(i)
            if not 0 <= i < len(self.params):
                raise ValueError(f"GradFilter: state_dict has state for parameter {i}; this filter has {len(self.params)}")
            p = self.params[i]
            shape = torch.view_as_real(p).shape if p.is_complex() else p.shape
            new = {}
            for k, v in st.items():
                want = shape if k == "ema" else (self.window, *shape) if k == "buffer" else ()
                if tuple(v.shape) != tuple(want):
                    raise ValueError(
                        f"GradFilter: state {k!r} of parameter {i} has shape {tuple(v.shape)}, expected {tuple(want)}"
                    )
                dtype = torch.int64 if k == "count" else torch.float32
                new[k] = v.to(device=p.device, dtype=dtype, copy=True)
            state[i] = new
        self.state = state
        self.alpha, self.lamb, self.warmup = float(config["alpha"]), float(config["lamb"]), bool(config["warmup"])
