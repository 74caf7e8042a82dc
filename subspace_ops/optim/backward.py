"""``opt.step_in_backward()``: every parameter steps inside ``backward()`` and its gradient is freed,
with gradient accumulation and exact global-norm clipping (docs/design.md, "Step in backward").

What each parameter keeps between its gradient hook and its step (k = ``accumulation_steps``):

* k = 1, no clipping: nothing. It steps in its hook, from its gradient, which is then freed.
* k = 1, with ``max_grad_norm``: the hook adds ‖G‖² to the global norm; a low-rank matrix keeps only
  ``R = project(G)`` (r-sized) and frees G; plain parameters (and matrices that cannot be projected,
  below) keep G. After backward (a callback queued on the autograd engine) the norm is known: R and
  the kept gradients are scaled by the clip coefficient and everything steps at once.
* k > 1, no clipping: a low-rank matrix adds ``project(G)`` of each micro-batch to an r-sized
  accumulator (state ``"grad_acc"``) and frees G (projection is linear while the basis is fixed);
  everything else accumulates G as usual. Each parameter steps in its hook of the k-th micro-batch.
* k > 1, with ``max_grad_norm``: ‖Σᵢ Gᵢ‖ has cross terms no projection keeps, so full gradients
  accumulate until the k-th micro-batch, which then proceeds as k = 1 with clipping.

A matrix cannot be projected early, and keeps its full gradient for the window, when its basis
refreshes at this optimizer step (the refresh needs Σᵢ Gᵢ; with ``stagger=True`` only ~1/gap of the
matrices refresh at once), when its projector steps on G itself (``online_pca``), and always for
``AdamSNSM`` (its update uses G beyond the subspace).

A parameter whose hook did not fire in the k-th micro-batch (unused there) but has a gradient or an
accumulator steps after that backward, as ``opt.step()`` would step it.

Distributed: with FSDP2 the hooks fire on the sharded gradient after FSDP's reduce-scatter, so the
mode works as on one process (the global norm sums the shards' squares over the mesh). DDP's
all-reduce happens after the hooks, so DDP is refused with a ValueError.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..distributed import is_dtensor, local
from ..reference import wide
from .base import ACC_KEY


class StepInBackward:
    """The handle ``opt.step_in_backward()`` returns; ``remove()`` restores ordinary ``opt.step()``."""

    def __init__(self, opt, accumulation_steps: int = 1, max_grad_norm: Optional[float] = None):
        name = type(opt).__name__
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"{name}.step_in_backward: invalid accumulation_steps {accumulation_steps!r}; "
                             "must be an int >= 1")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and not isinstance(max_grad_norm, bool)
                                              and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"{name}.step_in_backward: invalid max_grad_norm {max_grad_norm!r}; must be a "
                             "finite number > 0, or None for no clipping")
        if opt._backward is not None:
            raise RuntimeError(f"{name}.step_in_backward: already active; call remove() on the handle first")
        params = [p for g in opt.param_groups for p in g["params"]]
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1 and not all(is_dtensor(p) for p in params):
            raise ValueError(
                f"{name}.step_in_backward: parameters that are not DTensors in a process group of "
                f"{torch.distributed.get_world_size()} ranks look like DistributedDataParallel, whose gradient "
                "all-reduce runs after the gradient hooks this mode steps in: each rank would step on its own "
                "gradient. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), whose hooks see the "
                "reduced gradient, or use ordinary opt.step() with DDP"
            )
        self.opt = opt
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._where = {}  # id(param) -> index; its group is looked up when it steps (load_state_dict
        self._handles = []  # replaces the group dicts)
        index = 0
        for group in opt.param_groups:
            for p in group["params"]:
                self._where[id(p)] = index
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
                index += 1
        self._params = params
        self._queued = False
        self._stepped = set()  # ids of the parameters that stepped in this window
        self._pending = {}  # clipping: id -> (group, index, p, projected), stepping after backward
        self._norm2 = {}  # clipping: "sharded" / "local" -> this rank's sum of squares
        opt._backward = self

    # -- the hooks --------------------------------------------------------------------------------
    def _locate(self, p) -> tuple:
        """(group, index) of parameter ``p`` in the optimizer's current param groups."""
        index = self._where[id(p)]
        start = 0
        for group in self.opt.param_groups:
            if index < start + len(group["params"]):
                return group, index
            start += len(group["params"])
        raise RuntimeError("step_in_backward: the optimizer's parameters changed; create a new handle")

    def _last(self) -> bool:
        return self.opt._micro == self.accumulation_steps - 1

    def _hook(self, p) -> None:
        with torch.no_grad():
            self._on_grad(p)

    def _on_grad(self, p) -> None:
        if not self._queued:  # the first gradient of this backward: run _after_backward at its end
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
            self._queued = True
        opt = self.opt
        group, index = self._locate(p)
        last = self._last()
        if self.max_grad_norm is not None:
            if not last:
                return  # exact clipping needs the norm of the whole sum: G accumulates as usual
            self._add_norm(p.grad)
            projected = opt._can_project(p, group, index)
            if projected:
                opt._accumulate_projected(p, group, index)
            self._pending[id(p)] = (group, index, p, projected)
            return
        projected = opt._can_project(p, group, index) and (not last or ACC_KEY in opt.state[p])
        if projected:  # (k = 1, or no accumulator yet: it steps from G directly, through the fused path)
            opt._accumulate_projected(p, group, index)
        if last:
            opt._step_entries([(group, index, p, projected)])
            opt._opt_called = True  # what torch's LR schedulers' step() wrapper records (no order warning)
            p.grad = None
            self._stepped.add(id(p))

    def _add_norm(self, G) -> None:
        key = "sharded" if is_dtensor(G) else "local"
        g = wide(local(G))
        sq = g.pow(2).sum()
        self._norm2[key] = sq if key not in self._norm2 else self._norm2[key] + sq

    def _after_backward(self) -> None:
        self._queued = False
        opt = self.opt
        if self._last():
            with torch.no_grad():
                self._finish_window()
        opt._micro = (opt._micro + 1) % self.accumulation_steps

    def _finish_window(self) -> None:
        """After the k-th backward: step what has not stepped (clipping: everything), then free."""
        opt = self.opt
        entries = dict(self._pending)
        for p in self._params:
            if id(p) in self._stepped or id(p) in entries:
                continue
            has_acc = ACC_KEY in opt.state.get(p, {})
            if p.grad is None and not has_acc:
                continue
            group, index = self._locate(p)
            if self.max_grad_norm is not None and p.grad is not None:
                if has_acc:  # cannot happen with clipping (no projection before the last micro-batch)
                    raise RuntimeError("internal error: an accumulator and a gradient under clipping")
                self._add_norm(p.grad)
            entries[id(p)] = (group, index, p, has_acc)
        if self.max_grad_norm is not None and entries:
            coef = self._clip_coef()
            for group, index, p, projected in entries.values():
                if projected:
                    local(opt.state[p][ACC_KEY]).mul_(coef)
                else:
                    local(p.grad).mul_(coef)
        ordered = sorted(entries.values(), key=lambda e: e[1])  # parameter order: collectives agree
        if ordered:
            opt._step_entries(ordered)
            opt._opt_called = True
        for _group, _index, p, _projected in ordered:
            p.grad = None
        self._pending.clear()
        self._stepped.clear()
        self._norm2.clear()

    def _clip_coef(self):
        """``clip_grad_norm_``'s coefficient ``min(1, max_norm / (‖G‖ + 1e-6))`` as a 0-d tensor (no
        host sync): the shards' squares are summed over the mesh, whole gradients counted once."""
        total = None
        sharded = self._norm2.get("sharded")
        if sharded is not None:
            mesh_param = next(p for p in self._params if is_dtensor(p))
            torch.distributed.all_reduce(sharded, group=mesh_param.device_mesh.get_group())
            total = sharded
        whole = self._norm2.get("local")
        if whole is not None:
            total = whole if total is None else total + whole.to(total.dtype)
        norm = total.sqrt()
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)

    # -- the handle -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks: ``opt.step()`` works again. Refused in the middle of an accumulation
        window (its projected gradients could not be stepped by ``opt.step()``)."""
        if self.opt._micro != 0:
            raise RuntimeError(
                f"step_in_backward: remove() after {self.opt._micro} of {self.accumulation_steps} micro-batches "
                "of an accumulation window; finish the window (its last backward steps the parameters) first"
            )
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.opt._backward is self:
            self.opt._backward = None

    def __enter__(self) -> "StepInBackward":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
