"""What the subspace optimizers share: validation, checkpoints, the per-parameter loop, bases.

``SubspaceOptimizer`` gathers tensors and keeps the basis of every low-rank matrix (refreshes with
failure handling, seeded projections, Online Subspace Descent, moment transport, diagnostics); a
subclass only says which moments a low-rank matrix has and which update it takes
(``_init_lowrank_state``, ``_matrix_updates``, ``_on_basis_change``). The math is in
``subspace_ops.reference`` and ``subspace_ops.projectors``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops, reference
from .. import projectors
from ..basis import Basis
from ..distributed import (COLS, LOCAL, REPLICATE, ROWS, Rows, ShardedState, broadcast_basis, is_dtensor, local,
                           orthonormalize_basis, part_comm, placement_error)
from ..projectors import PROJ_TYPES, basis_side, effective_rank

# The optimizers' own state that is fp32 (float64 for float64 parameters; see load_state_dict): the
# low-rank moments. Each projector adds its own (``Projector.fp32_state``).
FP32_STATE = ("exp_avg", "exp_avg_sq", "grad_acc")

# Key of the diagnostics in state_dict() (tensors only, so weights_only=True loads it).
STATS_KEY = "subspace_stats"
# State key of a low-rank matrix's projected gradient accumulated by step_in_backward (laid out as
# exp_avg), and the state_dict key of the micro-batches its accumulation window has seen.
ACC_KEY = "grad_acc"
MICRO_KEY = "step_in_backward_micro"


def _check_number(name: str, value, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}: {value!r}; {want}")


def validate_hyperparameters(group: dict) -> None:
    """Raise a ValueError naming the bad value and the valid range."""
    lr, betas, eps = group.get("lr"), group.get("betas"), group.get("eps")
    if lr is not None:
        lr_value = lr.item() if isinstance(lr, Tensor) else lr
        _check_number("lr", lr, lr_value >= 0.0, "lr must be >= 0")
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"invalid betas: {betas!r}; must be a pair (beta1, beta2), e.g. (0.9, 0.999)")
        for i, b in enumerate(betas):
            _check_number(f"betas[{i}]", b, 0.0 <= b < 1.0, "each beta must be in [0, 1)")
    if eps is not None:
        _check_number("eps", eps, eps >= 0.0, "eps must be >= 0")
    capturable = group.get("capturable", False)
    if not isinstance(capturable, bool):
        raise ValueError(f"invalid capturable: {capturable!r}; must be True or False")
    wd = group.get("weight_decay")
    if wd is not None:
        _check_number("weight_decay", wd, wd >= 0.0, "weight_decay must be >= 0")
    if "rank" not in group:
        return
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"invalid rank: {rank!r}; rank must be a positive int (e.g. rank=128)")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"invalid proj_type: {group['proj_type']!r}; expected one of {PROJ_TYPES}")
    projectors.get(group["projector"]).validate(group)
    if "scale" in group:
        scale = group["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"invalid scale: {scale!r}; must be a number > 0 (galore-torch's default 0.25)")
    transport = group.get("transport_moments", False)
    if not isinstance(transport, bool):
        raise ValueError(f"invalid transport_moments: {transport!r}; must be True or False")



class _StepCounters:
    """The CPU step counters of the parameters as 0-d views of one buffer, so that a step advances
    all of them with one tensor op: one ``add_`` per parameter (or a CPU ``_foreach_add_``, which
    loops the same way) costs ~3 µs of host time each. ``state["step"]`` stays an ordinary 0-d fp32
    tensor to read, save and load; one that is not this buffer's view (just loaded, or set by hand)
    is adopted: its value copied into the buffer and the state pointed at the view."""

    def __init__(self):
        self.buf = torch.zeros(16, dtype=torch.float32)
        self.slots: dict = {}  # id(param) -> [param, slot, view]
        self._index = (None, None)  # (slots tuple, index tensor) of the last advance

    def _grow(self, states) -> None:
        grown = torch.zeros(2 * self.buf.numel(), dtype=torch.float32)
        grown[: self.buf.numel()] = self.buf
        self.buf = grown
        for e in self.slots.values():
            old, e[2] = e[2], grown[e[1]]
            st = states.get(e[0])
            if st is not None and st.get("step") is old:
                st["step"] = e[2]

    def slot(self, p: Tensor, state: dict, states) -> int:
        """p's counter slot, ``state["step"]`` made its view; ``states``: the optimizer's state."""
        entry = self.slots.get(id(p))
        if entry is None or entry[0] is not p:
            slot = len(self.slots)
            if slot >= self.buf.numel():
                self._grow(states)
            entry = self.slots[id(p)] = [p, slot, self.buf[slot]]
        current = state["step"]
        if current is not entry[2]:
            entry[2].copy_(current)
            state["step"] = entry[2]
        return entry[1]

    def advance(self, slots: list) -> None:
        if not slots:
            return
        n = len(slots)
        if slots[0] == 0 and slots[-1] == n - 1 and n == len(self.slots):
            self.buf[:n].add_(1.0)  # every parameter stepped (the usual case): one op
            return
        key = tuple(slots)
        if self._index[0] != key:
            self._index = (key, torch.tensor(slots, dtype=torch.int64))
        self.buf.index_add_(0, self._index[1], torch.ones(n, dtype=torch.float32))


class _Collected:
    """What one ``step()`` gathers before it updates: low-rank batches keyed by (group, side, layout,
    step count), plain batches keyed by their hyperparameters, step counters to advance, actions to
    run after the updates, and the hyperparameters already computed per (group, step count)."""

    __slots__ = ("batches", "plain", "steps", "slots", "after", "hyper", "sharded", "gathered")

    def __init__(self):
        self.batches, self.plain, self.hyper, self.gathered = {}, {}, {}, {}
        self.steps, self.slots, self.after, self.sharded = [], [], [], []


# ``_refresh``'s "no basis gathered for this matrix" (None means: gathered, and none could be computed).
_NOT_GATHERED = object()


def _float(x) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


class SubspaceOptimizer(Optimizer):
    """Base of the optimizers whose matrices in groups with a ``rank`` key live in a subspace.

    Subclasses set ``lowrank_defaults`` (filled into low-rank groups) and implement
    ``_init_lowrank_state``, ``_matrix_updates`` and optionally ``_on_basis_change``. Everything
    outside low-rank groups, and 1-D parameters inside them, takes the plain AdamW step of
    ``reference.adam_step_``.
    """

    lowrank_defaults: dict = {}
    # True when the update needs an orthogonal projector (e.g. SNSM's complement G − back(project(G))):
    # the Gaussian projection is then orthonormalised (QR) after it is regenerated.
    orthonormal_bases: bool = False

    def __init__(self, params: Iterable, defaults: dict, *, backend: Optional[str] = None):
        ops.validate_backend(backend)
        self.backend = backend
        self._warned_refresh = False
        # Host copies of capturable groups' step counters: id(param) -> (param, completed steps).
        self._host_steps: dict = {}
        self._counters = _StepCounters()
        # The row sharding of each DTensor (FSDP2) low-rank matrix: id(param) -> (param, Rows); and
        # whether any low-rank matrix is one (set by _check_sharded).
        self._comms: dict = {}
        self._sharded = False
        # The active step_in_backward() handle, and the micro-batches its accumulation window has seen.
        self._backward = None
        self._micro = 0
        # Diagnostics per parameter index (tensors only); see subspace_stats().
        self._stats: dict = {}
        validate_hyperparameters(defaults)
        super().__init__(params, defaults)
        if not any("rank" in g for g in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: no param group has a 'rank' key, so nothing is low-rank and every "
                "parameter takes plain AdamW steps (galore-torch's AdamW: eps and bias correction placed as "
                "in Hugging Face's AdamW, not torch.optim.AdamW's). Build the groups with "
                "subspace_ops.lowrank_param_groups(model, rank=...) or give the matrices' group a 'rank'",
                UserWarning,
                stacklevel=3,
            )

    # -- param groups -----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in self.lowrank_defaults.items():
                param_group.setdefault(key, value)
            # The projector's own keys (its refresh schedule, seed, settings): it owns their defaults.
            for key, value in projectors.get(param_group["projector"]).defaults().items():
                param_group.setdefault(key, value)
        if "betas" in param_group:
            param_group["betas"] = tuple(param_group["betas"])
        validate_hyperparameters(param_group)
        super().add_param_group(param_group)
        self._check_sharded(self.param_groups[-1])

    def _check_sharded(self, group: dict) -> None:
        """DTensor parameters: a low-rank matrix must be row-sharded on a 1-D mesh (FSDP2's
        ``fully_shard``); anything else (Shard(1), tensor parallelism, 2-D meshes) gets a ValueError
        here that names the parameter and its placement, instead of a failure inside torch at the
        first step. Plain parameters take elementwise AdamW on their local shards, any placement."""
        if "rank" not in group:
            return
        start = sum(len(g["params"]) for g in self.param_groups[:-1])
        for i, p in enumerate(group["params"]):
            if p.dim() >= 2 and is_dtensor(p):
                error = placement_error(p, f"{type(self).__name__}: parameter {start + i}")
                if error is not None:
                    raise ValueError(error)
                self._sharded = True

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state dict, plus the diagnostics under ``"subspace_stats"`` (tensors)."""
        sd = super().state_dict()
        if self._micro:
            sd[MICRO_KEY] = torch.tensor(self._micro, dtype=torch.int64)
        if self._stats:
            sd[STATS_KEY] = {i: {k: v.clone() for k, v in st.items()} for i, st in self._stats.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim's, but the fp32 moments stay fp32 (float64 for float64 parameters) and integer
        state stays integer.

        torch.optim casts every state tensor but ``step`` to a floating parameter's dtype on load,
        which would round the low-rank moments of a bf16 model to bf16, and counters such as
        ``refresh_offset`` or ``basis_step`` to bf16 (exact only up to 256), changing the trajectory
        after a resume.
        """
        self._host_steps.clear()
        saved = state_dict["state"]
        stats = state_dict.get(STATS_KEY, {})
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        self._check_loaded_state(state_dict)
        if self._backward is not None and int(state_dict.get(MICRO_KEY, 0)) >= self._backward.accumulation_steps:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the checkpoint was saved after "
                f"{int(state_dict[MICRO_KEY])} micro-batches of an accumulation window, but the active "
                f"step_in_backward() accumulates {self._backward.accumulation_steps}; resume with the same "
                "accumulation_steps"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in (STATS_KEY, MICRO_KEY)})
        self._micro = int(state_dict.get(MICRO_KEY, 0))
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        for pid, (group, p) in zip(ids, params):
            if pid not in saved or p not in self.state:
                continue
            fp32 = FP32_STATE + (projectors.get(group["projector"]).fp32_state if "rank" in group else ())
            for key, value in saved[pid].items():
                if key in fp32:
                    self.state[p][key] = value.to(device=p.device, dtype=reference.state_dtype(p.dtype), copy=True)
                elif key != "step" and isinstance(value, Tensor) and not value.is_floating_point():
                    self.state[p][key] = value.to(device=self.state[p][key].device, copy=True)
        self._stats = {int(i): {k: v.clone() for k, v in st.items()} for i, st in stats.items()}

    def _state_shapes(self, side: str, m: int, n: int, rank: int) -> dict:
        """The optimizer's own state keys of a low-rank matrix and their shapes (checked at load)."""
        raise NotImplementedError

    def _check_loaded_state(self, state_dict: dict) -> None:
        """Before anything is loaded: every low-rank parameter's saved state must be what this
        optimizer and the group's projector keep for it, or a ValueError names the parameter and the
        problem (instead of a shape error deep in the math at the next step)."""
        name = type(self).__name__
        saved = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            return  # torch.optim's own check says so
        index = 0
        for group, saved_group in zip(self.param_groups, saved_groups):
            for p, pid in zip(group["params"], saved_group["params"]):
                st = saved.get(pid)
                where = f"{name}.load_state_dict: parameter {index} (shape {tuple(p.shape)})"
                index += 1
                if not st:
                    continue
                for key, value in st.items():
                    if not isinstance(value, (Tensor, int, float)):
                        raise ValueError(
                            f"{where}: state {key!r} is a {type(value).__name__}, not a tensor. This looks "
                            "like a galore-torch checkpoint (it pickles projector objects); its moments are "
                            "in another layout, so start this optimizer's state fresh instead of loading it"
                        )
                if "rank" not in saved_group or "rank" not in group or p.dim() < 2 or p.numel() == 0:
                    continue
                m = p.shape[0]
                n = p.numel() // m
                side = basis_side(group["proj_type"], m, n)
                rank = effective_rank(group["rank"], m, n)
                want = {"step": (), "refresh_offset": (), **self._state_shapes(side, m, n, rank)}
                if any(k in st for k in ("basis", "basis_step")):  # a basis exists once the first step ran
                    want.update(projectors.get(group["projector"]).state_shapes(side, m, n, rank))
                if ACC_KEY in st:  # saved inside a step_in_backward accumulation window
                    want[ACC_KEY] = want["exp_avg"]
                for key, shape in want.items():
                    if key not in st:
                        raise ValueError(
                            f"{where}: the saved state has no {key!r} (it has {sorted(st)}); it was not "
                            f"saved by {name} with projector={group['projector']!r}, proj_type="
                            f"{group['proj_type']!r}, rank={group['rank']}"
                        )
                    got = tuple(st[key].shape) if isinstance(st[key], Tensor) else ()
                    if got != tuple(shape):
                        raise ValueError(
                            f"{where}: saved {key!r} has shape {got}, but {name} with rank={group['rank']} on "
                            f"side {side!r} keeps {tuple(shape)}; the checkpoint comes from another "
                            "optimizer, rank or proj_type"
                        )

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One step of every parameter with a gradient.

        Three phases: per parameter, on the host, validate, create state, refresh the basis when
        due and collect the tensors; then one grouped update per (group, side, layout, step count),
        which on the Triton backend launches each kernel once for all same-shape matrices; then what
        must follow the weight update (Online Subspace Descent's basis step, copying back a weight
        that was not contiguous).
        """
        if self._backward is not None:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called while step_in_backward() hooks are active: the "
                "parameters already step inside backward(). Call only loss.backward() (and scheduler.step() "
                "once per accumulation window), or call handle.remove() to go back to ordinary opt.step()"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    entries.append((group, index, p, False))
                index += 1
        self._step_entries(entries)
        return loss

    def _step_entries(self, entries) -> None:
        """Step the parameters of ``entries``: ``(group, index, param, projected)`` in parameter
        order. ``projected``: the low-rank matrix steps from its projected gradient accumulated in
        state ``"grad_acc"`` (``step_in_backward``) instead of ``param.grad``."""
        self._sync_host_steps()
        c = _Collected()
        if self._sharded:
            self._gather_refreshes(c, entries)
        for group, index, p, projected in entries:
            if not projected:
                self._check_grad(p, group, index)
            if p.numel() > 0:
                if "rank" in group and p.dim() >= 2:
                    self._collect_lowrank(p, group, index, c, projected)
                else:
                    self._collect_plain(p, group, c)
        self._counters.advance(c.slots)
        if c.steps:
            torch._foreach_add_(c.steps, 1.0)  # capturable counters, on the device: one launch
        for key, (Ws, Gs, bases, states, hyper, group) in c.batches.items():
            if key[-1]:  # projected gradients
                self._projected_updates(Ws, Gs, bases, states, group, key[1], hyper)
            else:
                self._matrix_updates(Ws, Gs, bases, states, group, key[1], hyper)
        for args in c.sharded:  # in parameter order: the same collectives in the same order on every rank
            self._sharded_update(*args)
        for _key, (Ws, Gs, Ms, Vs, hyper) in c.plain.items():
            ops.adam_steps_(Ws, Gs, Ms, Vs, backend=self.backend, **hyper)
        for fn in c.after:
            fn()

    @staticmethod
    def _new_step(p: Tensor, group: dict) -> Tensor:
        """The step counter: on the CPU, or on the parameter's device for a capturable group (read by
        the kernels; torch.optim's load_state_dict keeps it there for groups with 'capturable')."""
        device = p.device if group.get("capturable", False) else "cpu"
        return torch.zeros((), dtype=torch.float32, device=device)

    def _check_grad(self, p: Tensor, group: dict, index: int) -> None:
        name = type(self).__name__
        if p.grad.is_sparse:
            raise ValueError(
                f"{name}: parameter {index} (shape {tuple(p.shape)}) has a sparse gradient, which "
                "is not supported; use dense gradients (e.g. nn.Embedding(sparse=False))"
            )
        if "rank" in group and p.dim() >= 2 and torch.is_complex(p):
            raise ValueError(
                f"{name}: parameter {index} (shape {tuple(p.shape)}) is complex, which a low-rank "
                "group does not support; put it in a group without 'rank'"
            )

    def _hyper(self, group: dict, state: dict, c: "_Collected", p: Tensor, s: Optional[int] = None) -> tuple:
        """(step count after this step, the hyperparameters of the update). The step count itself is
        advanced once for all parameters at the end of the collection (``step``).

        The step size is a host float unless the learning rate is a tensor on an accelerator or the
        group is ``capturable``: the kernels then read the learning rate (and, capturable, the step
        count) from device memory, so the step neither syncs the host nor bakes values into a CUDA
        graph."""
        capturable = group.get("capturable", False)
        if capturable:
            step_t = state["step"]
            if s is None:
                s = self._host_step(p, step_t)
            self._host_steps[id(p)] = (p, s + 1)
            c.steps.append(step_t)
        else:
            c.slots.append(self._counters.slot(p, state, self.state))
            step_t = state["step"]
            if s is None:
                s = int(step_t.item())
        t = s + 1
        key = (id(group), t)
        hyper = c.hyper.get(key)
        if hyper is None:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            correct_bias = group["correct_bias"]
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                         correct_bias=correct_bias)
            device_lr = isinstance(lr, Tensor) and lr.device.type not in ("cpu", "meta")
            if capturable:
                hyper.update(step_size=None, lr=lr, step=step_t)
            elif device_lr:
                c_t = reference.adam_step_size(1.0, beta1, beta2, t, correct_bias)
                hyper.update(step_size=None, lr=lr, bias_correction=c_t)
            else:
                lr = float(lr) if not isinstance(lr, Tensor) else lr.item()
                hyper.update(step_size=reference.adam_step_size(lr, beta1, beta2, t, correct_bias), lr=lr)
            c.hyper[key] = hyper
        return t, hyper

    def _sync_host_steps(self) -> None:
        """Capturable groups: outside a CUDA graph capture, read every device step counter (one copy)
        into the host counts, so graph replays, which the host does not see, are counted too."""
        if not any(g.get("capturable", False) for g in self.param_groups):
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        params = [p for g in self.param_groups if g.get("capturable", False) for p in g["params"]
                  if "step" in self.state.get(p, {})]
        if not params:
            return
        by_device: dict = {}
        for p in params:
            by_device.setdefault(self.state[p]["step"].device, []).append(p)
        for ps in by_device.values():
            values = torch.stack([self.state[p]["step"] for p in ps]).cpu().tolist()  # one copy per device
            for p, t in zip(ps, values):
                self._host_steps[id(p)] = (p, int(round(t)))

    def _host_step(self, p: Tensor, step_t: Tensor) -> int:
        """Completed steps of ``p`` as the host counts them (capturable groups): the device counter is
        read once (a sync), then counted on the host, so refreshes are scheduled without syncing."""
        known = self._host_steps.get(id(p))
        if known is None or known[0] is not p:
            return int(step_t.item())
        return known[1]

    def _collect_plain(self, p: Tensor, group: dict, c: "_Collected") -> None:
        W, G = local(p), local(p.grad)  # a DTensor's local shard: AdamW is elementwise
        if torch.is_complex(p):
            W, G = torch.view_as_real(W), torch.view_as_real(G)
        state = self.state[p]
        if not state:
            state["step"] = self._new_step(p, group)
            if is_dtensor(p) and not torch.is_complex(p):  # moments sharded as the parameter is
                state["exp_avg"] = torch.zeros_like(p, dtype=reference.state_dtype(p.dtype))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=reference.state_dtype(p.dtype))
            else:
                state["exp_avg"] = torch.zeros(W.shape, dtype=reference.state_dtype(W.dtype), device=W.device)
                state["exp_avg_sq"] = torch.zeros(W.shape, dtype=reference.state_dtype(W.dtype), device=W.device)
        _, hyper = self._hyper(group, state, c, p)
        key = tuple(map(id, hyper.values())) if group.get("capturable", False) else tuple(hyper.values())
        # plain tensors of every group with equal settings: one launch
        batch = c.plain.get(key)
        if batch is None:
            batch = c.plain[key] = ([], [], [], [], hyper)
        batch[0].append(W)
        batch[1].append(G)
        batch[2].append(local(state["exp_avg"]))
        batch[3].append(local(state["exp_avg_sq"]))

    # -- subclass hooks ---------------------------------------------------------------------------
    def _init_lowrank_state(self, state, p: Tensor, side: str, m: int, n: int, rank: int, comm=LOCAL) -> None:
        """The optimizer's own state of a low-rank matrix: zeros of ``_state_shapes`` (fp32; float64
        for a float64 parameter: ``reference.state_dtype``); for a
        row-sharded matrix (``comm``) this rank's part of each, laid out by ``_state_placement``."""
        for key, shape in self._state_shapes(side, m, n, rank).items():
            place = self._state_placement(key, side, m, n) if comm.sharded else REPLICATE
            if place == ROWS:
                shape = (comm.rows,) + tuple(shape[1:])
            elif place == COLS:
                shape = (shape[0], comm.col_range(shape[1])[1]) + tuple(shape[2:])
            state[key] = torch.zeros(shape, dtype=reference.state_dtype(p.dtype), device=local(p).device)

    def _state_placement(self, key: str, side: str, m: int, n: int) -> str:
        """How the state tensor ``key`` of a row-sharded (m x n) matrix is laid out (FSDP2;
        ``subspace_ops.distributed``). Default, the low-rank moments: ``G P`` (m x r, side "right")
        has the weight's rows; ``Pᵀ G`` (r x n, "left") is split over its columns, so each rank
        keeps 1/world of it; "full"'s r x r is whole on every rank."""
        return {"right": ROWS, "left": COLS, "full": REPLICATE}[side]

    def _rows_local(self, side: str, m: int, n: int) -> bool:
        """True when a row-sharded (m x n) matrix's update on ``side`` needs only this rank's rows
        (then it takes the grouped fused path on the local shards); else ``_sharded_update``. Default:
        side "right", whose ``G P`` keeps G's rows."""
        return side == "right"

    def _sharded_update(self, W, G, basis, state, group: dict, side: str, hyper: dict, comm, R=None) -> None:
        """The update of one row-sharded matrix that ``_rows_local`` says needs sums over ranks
        (``W``, ``G``: this rank's rows; ``state``: its local view). ``R``: instead of
        ``G``, the projected gradient already summed over ranks, laid out as the moments are
        (``step_in_backward``'s accumulation)."""
        raise NotImplementedError

    # True when the optimizer can step a low-rank matrix from its projected gradient alone
    # (``_projected_updates``): step_in_backward then accumulates ``project(G)`` instead of ``G``.
    projects_accumulation: bool = False

    def _projected_updates(self, Ws, Rs, bases, states, group: dict, side: str, hyper: dict) -> None:
        """Update the matrices ``Ws`` from projected gradients ``Rs`` (one group, side, step count)."""
        raise NotImplementedError

    def _matrix_updates(self, Ws, Gs, bases, states, group: dict, side: str, hyper: dict) -> None:
        """Update the matrices ``Ws`` (in place) of one group and side at one step count."""
        raise NotImplementedError

    def _on_basis_change(self, state, group: dict, side: str, old, new, refresh: bool, comm=LOCAL) -> None:
        """Called after the basis changed: at a refresh (``refresh=True``) or after an Online
        Subspace Descent step. Default: transport ``exp_avg``/``exp_avg_sq`` when the group asks."""
        if group.get("transport_moments", False):
            reference.transport_moments_(state["exp_avg"], state["exp_avg_sq"], old, new, side, comm)

    # -- low-rank matrices ------------------------------------------------------------------------
    def _collect_lowrank(self, p: Tensor, group: dict, index: int, c: "_Collected", projected: bool = False) -> None:
        m = p.shape[0]
        n = p.numel() // m
        side = basis_side(group["proj_type"], m, n)
        rank = effective_rank(group["rank"], m, n)
        proj = projectors.get(group["projector"])
        state, comm = self._matrix_state(p, proj, side, m, n)
        if not state:
            if group["rank"] >= min(m, n):
                warnings.warn(
                    f"{type(self).__name__}: parameter {index} (shape {tuple(p.shape)}) has rank="
                    f"{group['rank']} >= min(m, n) = {min(m, n)}: it runs at full rank and keeps more state "
                    "than AdamW would; give it a smaller rank or put it in a group without 'rank' "
                    "(lowrank_param_groups does)",
                    UserWarning,
                    stacklevel=4,
                )
            state["step"] = self._new_step(p, group)
            self._init_lowrank_state(state, p, side, m, n, rank, comm)
            offset = index % group["update_proj_gap"] if group["stagger"] else 0
            state["refresh_offset"] = torch.tensor(offset, dtype=torch.int64)

        W = local(p) if comm.sharded else p
        if projected:  # the projected gradient step_in_backward accumulated; W stands in for G's layout
            G = R = state["grad_acc"]
            (state.state if comm.sharded else state).pop("grad_acc")
            like = W if W.dim() == 2 else W.reshape(W.shape[0], n)
        else:
            G = local(p.grad) if comm.sharded else p.grad
            if G.dim() != 2:
                G = G.reshape(G.shape[0], n)  # reshape costs ~1 µs of host time
            like = G
        s = self._host_step(p, state["step"]) if group.get("capturable", False) else int(state["step"].item())
        refreshed = False
        if not projected and proj.refresh_due(state, group, s):
            refreshed = self._refresh(proj, state, G, group, side, rank, index, s, comm,
                                      c.gathered.pop(id(p), _NOT_GATHERED))

        basis = self._basis(proj, state, group, side, like, index, comm)
        t, hyper = self._hyper(group, state, c, p, s)
        # The weight itself or an in-place view; a non-contiguous weight is updated through a copy.
        if W.is_contiguous():
            W = W if W.dim() == 2 else W.view(like.shape)
        else:
            W, target = W.reshape(like.shape).clone(), W
            c.after.append(lambda target=target, W=W: target.copy_(W.view_as(target)))
        if not refreshed and not projected and type(proj).after_update is not projectors.Projector.after_update:
            c.after.append(lambda: self._projector_step(proj, state, G, basis, group, side, index, s, comm))
        if comm.sharded and not self._rows_local(side, m, n):  # sums over ranks: one matrix at a time
            c.sharded.append((W, None if projected else G, basis, state, group, side, hyper, comm,
                              R if projected else None))
            return
        if W.numel() == 0:  # a rank holding none of the rows
            return
        key = (id(group), side, W.shape, W.dtype, G.dtype, t, projected)
        batch = c.batches.get(key)
        if batch is None:
            batch = c.batches[key] = ([], [], [], [], hyper, group)
        batch[0].append(W)
        batch[1].append(G)
        batch[2].append(basis)
        batch[3].append(state)

    # -- step in backward ---------------------------------------------------------------------------
    def step_in_backward(self, accumulation_steps: int = 1, max_grad_norm: Optional[float] = None):
        """Step every parameter inside ``backward()``, as soon as its gradient is ready, and free
        the gradient (layer-wise updates); returns a handle whose ``remove()`` restores ``step()``.

        The loop is then only ``(loss(micro_batch) / k).backward()``, plus ``scheduler.step()`` once
        per ``k = accumulation_steps`` micro-batches, and it equals the ordinary loop (backward k
        times, ``clip_grad_norm_(params, max_grad_norm)`` when given, ``opt.step()``,
        ``opt.zero_grad()``) to float rounding. See ``subspace_ops.optim.backward`` for what is kept
        when (low-rank accumulation, exact clipping, refresh windows) and docs/design.md."""
        from .backward import StepInBackward

        return StepInBackward(self, accumulation_steps, max_grad_norm)

    def _can_project(self, p: Tensor, group: dict, index: int) -> bool:
        """True when ``p``'s gradient can be kept as ``project(G)`` until its step: a low-rank matrix
        of an optimizer that steps from the projection alone, whose basis is fixed until then (no
        refresh due at this step, no projector step of its own that needs G)."""
        if not self.projects_accumulation or "rank" not in group or p.dim() < 2 or p.numel() == 0:
            return False
        if torch.is_complex(p):
            return False
        proj = projectors.get(group["projector"])
        if type(proj).after_update is not projectors.Projector.after_update:
            return False
        state = self.state.get(p)
        if not state or not proj.has_basis(state):
            return False
        s = self._host_step(p, state["step"]) if group.get("capturable", False) else int(state["step"].item())
        return not proj.refresh_due(state, group, s)

    def _accumulate_projected(self, p: Tensor, group: dict, index: int) -> None:
        """Add ``project(p.grad)`` (summed over ranks and laid out as ``exp_avg`` for a row-sharded
        matrix) into state ``"grad_acc"`` and free ``p.grad``. Requires ``_can_project``."""
        m = p.shape[0]
        n = p.numel() // m
        side = basis_side(group["proj_type"], m, n)
        proj = projectors.get(group["projector"])
        state, comm = self._matrix_state(p, proj, side, m, n)
        G = local(p.grad)
        G = G.reshape(G.shape[0], n)
        basis = self._basis(proj, state, group, side, G, index, comm)
        R = basis.project(G)
        if comm.sharded and side != "right":
            R = comm.scatter_cols(R) if side == "left" else comm.sum_(R)
        acc = state.get(ACC_KEY)
        if acc is None:
            state[ACC_KEY] = R.to(reference.state_dtype(p.dtype))
        else:
            acc.add_(R)
        p.grad = None

    # -- row-sharded matrices (FSDP2) -----------------------------------------------------------
    def _matrix_state(self, p: Tensor, proj, side: str, m: int, n: int) -> tuple:
        """``(state, comm)`` of a low-rank matrix: its state dict and ``LOCAL``; for a DTensor (FSDP2)
        its state seen through this rank's shards (``ShardedState``) and its row sharding."""
        if not is_dtensor(p):
            return self.state[p], LOCAL
        comm = self._comm(p)
        return ShardedState(self.state[p], comm, lambda key: self._placement(proj, key, side, m, n), n), comm

    def _comm(self, p) -> Rows:
        entry = self._comms.get(id(p))
        if entry is None or entry[0] is not p:
            entry = self._comms[id(p)] = (p, Rows.of(p))
        return entry[1]

    def _placement(self, proj, key: str, side: str, m: int, n: int) -> str:
        """The layout of state ``key`` of a row-sharded matrix: the optimizer's own keys
        (``_state_placement``; the accumulated projected gradient as the first moment) or the
        projector's (``Projector.state_placement``)."""
        if key == ACC_KEY:
            key = "exp_avg"
        if key in self._state_shapes(side, m, n, 1):
            return self._state_placement(key, side, m, n)
        return proj.state_placement(key, side)

    def _gather_refreshes(self, c: "_Collected", entries) -> None:
        """Bases of row-sharded matrices whose projector works only on whole gradients (the exact
        SVD, plug-ins) and whose refresh is due this step: each gradient is gathered on an owner
        rank, round-robin over the matrices, every owner computes its bases, then each basis is
        broadcast, so different matrices' SVDs run on different ranks at the same time. Results go
        to ``c.gathered`` for ``_refresh``; the one refresh that moves whole gradients."""
        due = []
        for group, index, p, projected in entries:
            if projected or "rank" not in group or p.dim() < 2 or not is_dtensor(p):
                continue
            proj = projectors.get(group["projector"])
            if proj.shards_rows:
                continue
            state = self.state[p]
            if state and not proj.refresh_due(state, group, int(state["step"].item())):
                continue
            due.append((p, group, proj, index, int(state["step"].item()) if state else 0))
        gathered = []
        for k, (p, group, proj, i, s) in enumerate(due):
            comm = self._comm(p)
            G = local(p.grad)
            G = G.reshape(G.shape[0], p.numel() // p.shape[0])
            owner = k % comm.world
            gathered.append((owner, G, comm.gather_to(G, owner)))
        for (p, group, proj, i, s), (owner, G, whole) in zip(due, gathered):
            m, n = whole.shape if whole is not None else (p.shape[0], G.shape[1])
            side = basis_side(group["proj_type"], m, n)
            rank = effective_rank(group["rank"], m, n)
            basis = None
            if whole is not None:  # this rank owns the matrix
                basis = proj.compute(whole, rank, side, group, index=i, step=s, previous=None)
                basis = None if basis is None else Basis.of(basis, side)
            c.gathered[id(p)] = (owner, basis, side, m, n, rank, G)
        for p, *_ in due:
            owner, basis, side, m, n, rank, G = c.gathered[id(p)]
            c.gathered[id(p)] = broadcast_basis(self._comm(p), basis, owner, side, m, n, rank, G.dtype, G.device)

    # -- bases --------------------------------------------------------------------------------------
    def _basis(self, proj, state, group: dict, side: str, G: Tensor, index: int, comm=LOCAL):
        """The basis the update uses (a ``Basis``, or None before the first refresh): the projector's,
        orthonormalised when this optimizer needs orthonormal columns and the projector's are not.
        ``comm``: the matrix's row sharding (``subspace_ops.distributed``), G this rank's rows."""
        if comm.sharded and proj.shards_rows:
            basis = proj.current(state, group, side, G, index, comm=comm)
        else:
            basis = proj.current(state, group, side, G, index)
        if basis is None:
            return None
        if basis.__class__ is not Basis:  # a plug-in's current() may still return a Tensor or a pair
            basis = Basis.of(basis, side)
        if self.orthonormal_bases and not proj.orthonormal:
            basis = orthonormalize_basis(basis, comm).map(lambda b: b.to(G.dtype))
        return basis

    def _refresh(self, proj, state, G: Tensor, group: dict, side: str, rank: int, index: int, s: int,
                 comm=LOCAL, gathered=_NOT_GATHERED) -> bool:
        """Ask the projector for a new basis for ``G``; True when the basis was (re)set. A basis that
        cannot be computed (non-finite gradient, SVD not converging) keeps the previous one, or a
        fixed orthonormal one at the first step, and warns once. ``gathered``: the basis already
        computed from the whole gradient (``_gather_refreshes``), or None when it could not be."""
        previous = self._basis(proj, state, group, side, G, index, comm)
        if gathered is not _NOT_GATHERED:
            basis = gathered
        elif comm.sharded:
            basis = proj.compute(G, rank, side, group, index=index, step=s, previous=previous, comm=comm)
        else:
            basis = proj.compute(G, rank, side, group, index=index, step=s, previous=previous)
        if basis is not None:
            basis = Basis.of(basis, side)  # a plug-in's compute() may still return a Tensor or a pair
        else:
            if not self._warned_refresh:
                warnings.warn(
                    f"{type(self).__name__}: could not compute a basis for parameter {index} at step {s} "
                    "(non-finite gradient or SVD did not converge); keeping the previous basis. "
                    "This warning is shown once.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._warned_refresh = True
            if previous is not None:
                return False
            m, n = comm.global_rows(G.shape[0]), G.shape[1]
            basis = Basis.from_parts(side, [
                part_comm(comm, ps).local_rows(reference.orthonormal_fallback(rows, rank, G))
                for ps, rows in zip(Basis.part_sides(side), Basis.part_rows(side, m, n))])
        proj.store(state, basis, side, s)
        new = self._basis(proj, state, group, side, G, index, comm)
        if new is None:  # a projector that regenerates its basis: the one just computed
            new = basis
        self._record_stats(proj, index, G, previous, new, side, s, group, comm)
        if previous is not None:
            self._on_basis_change(state, group, side, previous, new, True, comm)
        return True

    def _projector_step(self, proj, state, G: Tensor, basis, group: dict, side: str, index: int, s: int,
                        comm=LOCAL) -> None:
        """The projector's own step after the weight update (Online Subspace Descent)."""
        if comm.sharded:
            change = proj.after_update(state, G, basis, group, side, index=index, step=s, comm=comm)
        else:
            change = proj.after_update(state, G, basis, group, side, index=index, step=s)
        if change is None:
            return
        old, new, on_schedule = change
        old, new = Basis.of(old, side), Basis.of(new, side)
        if on_schedule:
            self._record_stats(proj, index, G, old, new, side, s, group, comm)
        self._on_basis_change(state, group, side, old, new, False, comm)

    # -- diagnostics ------------------------------------------------------------------------------
    def _orthonormal(self, proj, basis, comm=LOCAL):
        """Bases for the diagnostics: a basis without orthonormal columns (gaussian) is orthonormalised."""
        if proj.orthonormal or self.orthonormal_bases:
            return basis
        return orthonormalize_basis(basis, comm)

    def _record_stats(self, proj, index: int, G: Tensor, old, new, side: str, s: int, group: dict,
                      comm=LOCAL) -> None:
        if G.device.type == "meta":  # memory estimates (bench/memory.py): no values, no diagnostics
            return
        new = self._orthonormal(proj, new, comm)
        stats = {
            "step": torch.tensor(s, dtype=torch.int64),
            "energy": torch.tensor(reference.captured_energy(G, new, side, comm), dtype=torch.float32),
        }
        if old is not None:
            old = self._orthonormal(proj, old, comm)
            stats["energy_old_basis"] = torch.tensor(reference.captured_energy(G, old, side, comm),
                                                     dtype=torch.float32)
            # One entry per part: "cosines" for the one basis of a side (the left one of "full"),
            # "cosines_right" for the right one of "full".
            for key, ps, P_old, P_new in zip(("cosines", "cosines_right"), Basis.part_sides(side), old.parts,
                                             new.parts):
                stats[key] = reference.principal_angle_cosines(P_old, P_new, part_comm(comm, ps)).cpu()
        self._stats[index] = stats

    @torch.no_grad()
    def subspace_stats(self) -> dict:
        """Diagnostics of every low-rank matrix that has a basis, keyed by parameter index.

        Each entry: ``refresh_step`` (completed steps at the last refresh), ``energy_at_refresh``
        (‖project(G)‖²/‖G‖² of that step's gradient in the new basis), ``energy_old_basis`` (the same
        in the basis it replaced, None at the first refresh), ``cosines`` (principal-angle cosines
        between the old and new basis, descending; ``cosines_right`` too for ``proj_type="full"``;
        None at the first refresh), ``energy_now`` (captured energy of the current ``.grad`` in the
        current basis, when a gradient is present) and ``name`` when the group has ``names``.
        With FSDP2 (DTensor parameters) ``energy_now`` is computed with collectives: call this on
        every rank.
        For ``online_pca`` the basis moves every step: the refresh entries come from the basis step
        taken on the ``update_proj_gap`` schedule (old = before that step). For ``gaussian`` the
        bases are orthonormalised before measuring. Recorded values survive ``state_dict()``.
        """
        out = {}
        index = 0
        for group in self.param_groups:
            names = group.get("names")
            for i, p in enumerate(group["params"]):
                if "rank" in group and p.dim() >= 2 and index in self._stats:
                    st = self._stats[index]
                    entry = {
                        "refresh_step": int(st["step"]),
                        "energy_at_refresh": float(st["energy"]),
                        "energy_old_basis": float(st["energy_old_basis"]) if "energy_old_basis" in st else None,
                        "cosines": st["cosines"].clone() if "cosines" in st else None,
                    }
                    if "cosines_right" in st:
                        entry["cosines_right"] = st["cosines_right"].clone()
                    if names is not None and i < len(names):
                        entry["name"] = names[i]
                    if p.grad is not None and p.numel() > 0:
                        m = p.shape[0]
                        n = p.numel() // m
                        side = basis_side(group["proj_type"], m, n)
                        proj = projectors.get(group["projector"])
                        # FSDP2: collective, like the step (call it on every rank)
                        state, comm = self._matrix_state(p, proj, side, m, n)
                        G = local(p.grad)
                        G = G.reshape(G.shape[0], n)
                        basis = self._basis(proj, state, group, side, G, index, comm)
                        if basis is not None:
                            basis = self._orthonormal(proj, basis, comm)
                            entry["energy_now"] = reference.captured_energy(G, basis, side, comm)
                    out[index] = entry
                index += 1
        return out
