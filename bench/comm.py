"""``python -m bench --op comm``: what FSDP2 (``fully_shard``) costs the subspace optimizers, measured
on CPU/gloo: bytes each rank hands to collectives per step, and the optimizer state each rank holds.

How it runs. ``--world N`` (default 2) gloo processes (``torch.multiprocessing.spawn``, ``file://``
rendezvous, one torch thread each) build the same LLaMA-like model (``LlamaLike``: token embedding,
blocks of RMSNorm, attention with q, k, v, o (d x d) and a SwiGLU MLP with gate, up (f x d) and down
(d x f), final RMSNorm, head; no RoPE, which moves no bytes), shard it as a user does
(``fully_shard`` on each block, then on the root; no mixed precision: fp32 parameters, gradients,
reduce-scatter) and build every optimizer of ``optimizer_specs`` over the same parameters. Each
step: one forward and backward on this rank's slice of the batch, then every optimizer steps in turn
on the same gradients (lr 1e-6, so the weights barely move; bytes do not depend on values), then
``zero_grad``. ``update_proj_gap`` is 2 and 4 steps run: step 0 computes the first basis, step 2 is a
scheduled refresh, steps 1 and 3 are plain steps.

What is counted (measured, never computed from formulas): a ``TorchDispatchMode``
(``CollectiveBytes``) active around ``opt.step()`` of one optimizer only, and another around the
forward + backward (FSDP2's own parameter all-gathers and gradient reduce-scatters), records every op
of the ``c10d`` namespace (``c10d.allreduce_``, ``c10d._allgather_base_``,
``c10d._reduce_scatter_base_``, ``c10d.broadcast_``, ``c10d.gather_``, ...) and of the functional
collectives DTensor would issue (``_c10d_functional.*``). Per op it keeps

* ``sent``: the bytes of the tensors this rank passes as the op's send buffer: the ``input*``
  arguments when the schema has them (all-gather, reduce-scatter, gather: this rank's shard, the
  whole input of a reduce-scatter), else its ``tensors`` (all-reduce, broadcast: the buffer, on
  every rank, root or not). This is the convention of ``subspace_ops.distributed.Rows.sent``, which
  is read around the same ``opt.step()`` as a cross-check (the report says whether the two agree: a
  collective outside ``Rows`` would show as a difference). It is not bytes on the wire: a ring
  all-reduce puts about 2(w-1)/w of its buffer on the wire, a reduce-scatter (w-1)/w of its input;
* ``args``: the bytes of every tensor argument (outputs included; an all-gather's output is w times
  its input), in the JSON only.

Memory: after the 4 steps, per rank, the bytes of the local shards of every state tensor of each
optimizer (DTensor state: its ``_local_tensor``), deduplicated by storage and counted as the bytes
of the storage (our step counters are views of one buffer); split into sharded (DTensor with a
``Shard`` placement) and replicated (``Replicate`` DTensors and plain tensors), and the replicated
part into bases (``basis``, ``basis_right``) and the rest. Next to it the same optimizer built in
this (parent) process on the unsharded model and stepped 4 times on the whole batch: the
single-process state. FSDP2's target: per-rank state = (single − replicated) / world + replicated,
i.e. 1/world of the single-process state except what must be whole on every rank (a right-side basis
n x r, scalars).

Modes: full (d 512, f 1376, 8 heads, 2 layers, vocab 1024, rank 128: LLaMA-60M's width, MLP width
and GaLore rank, two of its blocks) and ``--quick`` (d 128, f 344, 4 heads, 1 layer, vocab 256, rank
32; seconds). ``--world N``, ``--json PATH``, ``--md PATH``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from datetime import timedelta
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import report

GAP, STEPS = 2, 4  # update_proj_gap; steps 0 (first basis), 1, 2 (refresh), 3
FIRST, REFRESH, PLAIN = 0, 2, 3  # the steps the table shows (step 1 is in the JSON: it equals step 3)
LR = 1e-6
PROJECTORS = ("svd", "randomized", "online_pca", "gaussian", "srht")
SIDES = ("left", "right", "std")
BASIS_KEYS = ("basis", "basis_right")
PG_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class CommConfig:
    d: int
    ffn: int
    heads: int
    layers: int
    vocab: int
    seq: int
    batch: int  # global sequences per step, split evenly over the ranks
    rank: int
    dtype: str = "float32"


MODES = {
    "full": CommConfig(d=512, ffn=1376, heads=8, layers=2, vocab=1024, seq=128, batch=8, rank=128),
    "quick": CommConfig(d=128, ffn=344, heads=4, layers=1, vocab=256, seq=32, batch=4, rank=32),
}


# -- the model ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)  # weight ffn x d: rows >= cols
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)  # weight d x ffn: rows < cols

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, ffn: int, heads: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(d), Attention(d, heads)
        self.mlp_norm, self.mlp = RMSNorm(d), SwiGLU(d, ffn)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaLike(nn.Module):
    def __init__(self, cfg: CommConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.d)
        self.layers = nn.ModuleList(Block(cfg.d, cfg.ffn, cfg.heads) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.d)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab, bias=False)

    def forward(self, tokens, targets):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.lm_head(self.norm(x)).flatten(0, 1), targets.flatten())


def make_model(cfg: CommConfig) -> LlamaLike:
    torch.manual_seed(0)
    return LlamaLike(cfg).to(getattr(torch, cfg.dtype))


def batch(cfg: CommConfig, step: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def matrices(model: nn.Module) -> Dict[str, tuple]:
    """Name -> (m, n) of the low-rank matrices (what ``lowrank_param_groups`` makes low-rank)."""
    from subspace_ops import lowrank_param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    group = next(g for g in lowrank_param_groups(model, rank=1) if "rank" in g)
    return {names[id(p)]: tuple(p.shape) for p in group["params"]}


# -- the optimizers -----------------------------------------------------------------------------------
def optimizer_specs() -> List[dict]:
    """Every optimizer the run builds, in stepping order: GaLoreAdamW for each side (proj_type
    "left", "right" and "std": galore-torch's rule, right for rows >= cols) and each projector,
    AdamSNSM (svd) for each side, torch.optim.AdamW."""
    specs = [dict(name=f"galore/{side}/{proj}", optimizer="GaLoreAdamW", side=side, projector=proj)
             for side in SIDES for proj in PROJECTORS]
    specs += [dict(name=f"snsm/{side}/svd", optimizer="AdamSNSM", side=side, projector="svd") for side in SIDES]
    specs.append(dict(name="adamw", optimizer="torch.optim.AdamW", side=None, projector=None))
    return specs


def build_optimizer(spec: dict, model: nn.Module, cfg: CommConfig):
    import subspace_ops

    if spec["optimizer"] == "torch.optim.AdamW":
        return torch.optim.AdamW(model.parameters(), lr=LR)
    groups = subspace_ops.lowrank_param_groups(model, rank=cfg.rank, update_proj_gap=GAP, projector=spec["projector"],
                                               proj_type=spec["side"])
    if spec["optimizer"] == "AdamSNSM":
        for g in groups:
            g.pop("scale", None)
        return subspace_ops.AdamSNSM(groups, lr=LR, backend="reference")
    return subspace_ops.GaLoreAdamW(groups, lr=LR, backend="reference")


# -- counting collectives -----------------------------------------------------------------------------
_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
# What part of opt.step() a collective belongs to: the innermost of these optimizer methods running
# (``tag_phases``); "other" outside them.
PHASES = {
    "_gather_refreshes": "refresh",  # whole-gradient gathers and basis broadcasts (svd)
    "_refresh": "refresh",  # a projector's compute (range finder, first online_pca basis)
    "_record_stats": "diagnostics",  # subspace_stats() at a refresh: captured energy, principal angles
    "_projector_step": "basis step",  # online_pca's step after the weight update
    "_sharded_update": "update",  # the low-rank update of a row-sharded left / full matrix
}
_PHASE: List[str] = []
_BOOKKEEPING = ("wait_tensor", "_wrap_tensor_autograd")  # functional collectives' bookkeeping: no data


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


class CollectiveBytes(TorchDispatchMode):
    """Records every collective dispatched while active: ``ops`` is a list of dicts ``op`` (e.g.
    ``c10d.allreduce_``), ``sent`` (bytes of the send buffer: the ``input*`` arguments, else
    ``tensors``) and ``args`` (bytes of every tensor argument). DTensor operations are handed back
    (``NotImplemented``) so that DTensor runs them and any collective it issues comes back through
    this mode on plain tensors."""

    def __init__(self):
        super().__init__()
        self.ops: List[dict] = []
        self._dtensor = _dtensor_class()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if self._dtensor is not None and any(issubclass(t, self._dtensor) for t in types):
            return NotImplemented
        out = func(*args, **kwargs)
        if func.namespace in _NAMESPACES and func._opname not in _BOOKKEEPING:
            named = {a.name: v for a, v in zip(func._schema.arguments, args)}
            named.update(kwargs)
            inputs = [v for k, v in named.items() if k.startswith("input")]
            if not inputs:
                inputs = [v for k, v in named.items() if k in ("tensors", "tensor", "self")]
            sent = 0 if func._opname in ("recv_", "recv_any_source_", "barrier") else _nbytes(inputs)
            self.ops.append({"op": f"{func.namespace}.{func._opname}", "sent": sent,
                             "args": _nbytes(list(args) + list(kwargs.values())),
                             "phase": _PHASE[-1] if _PHASE else "other"})
        return out


def tag_phases(opt) -> None:
    """Wrap the optimizer's methods of ``PHASES`` (on the instance) so that ``CollectiveBytes`` files
    each collective under the phase it ran in. Optimizers without them (torch's) are left alone."""
    for method, phase in PHASES.items():
        fn = getattr(opt, method, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _phase=phase, **kwargs):
            _PHASE.append(_phase)
            try:
                return _fn(*args, **kwargs)
            finally:
                _PHASE.pop()

        setattr(opt, method, wrapped)


def summarize(ops: List[dict]) -> dict:
    """{"sent": total bytes, "args": ..., "by_op": {op: [count, bytes]}, "by_phase": {phase: [count, bytes]}}."""
    by_op: Dict[str, list] = {}
    by_phase: Dict[str, list] = {}
    for o in ops:
        for table, key in ((by_op, o["op"]), (by_phase, o.get("phase", "other"))):
            entry = table.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += o["sent"]
    return {"sent": sum(o["sent"] for o in ops), "args": sum(o["args"] for o in ops), "by_op": by_op,
            "by_phase": by_phase}


# -- state memory -------------------------------------------------------------------------------------
def state_memory(opt) -> dict:
    """This rank's optimizer state: bytes of the storages of the local shards of every state tensor,
    each storage once; ``sharded`` (DTensors with a Shard placement), ``replicated_bases``
    (replicated ``basis`` / ``basis_right``) and ``replicated_other`` (other replicated or plain
    tensors: scalars, SNSM's per-column norms, ...). ``tensor_bytes``: numel x size of the local
    tensors, not deduplicated."""
    from torch.distributed.tensor import Shard

    DTensor = _dtensor_class()
    seen = set()
    out = {"total": 0, "sharded": 0, "replicated_bases": 0, "replicated_other": 0, "tensor_bytes": 0}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                is_dt = DTensor is not None and isinstance(v, DTensor)
                t = v._local_tensor if is_dt else v
                out["tensor_bytes"] += t.numel() * t.element_size()
                storage = t.untyped_storage()
                ident = (storage.data_ptr(), storage.nbytes())
                if storage.nbytes() == 0 or ident in seen:
                    continue
                seen.add(ident)
                kind = ("sharded" if is_dt and any(isinstance(pl, Shard) for pl in v.placements)
                        else "replicated_bases" if key in BASIS_KEYS else "replicated_other")
                out[kind] += storage.nbytes()
                out["total"] += storage.nbytes()
    return out


# -- the worker processes -----------------------------------------------------------------------------
def shard(model: LlamaLike) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)


def run_rank(rank: int, world: int, cfg: CommConfig) -> dict:
    from subspace_ops.distributed import Rows

    model = make_model(cfg)
    shard(model)
    specs = optimizer_specs()
    opts = [build_optimizer(s, model, cfg) for s in specs]
    for opt in opts:
        tag_phases(opt)
    lo, hi = rank * cfg.batch // world, (rank + 1) * cfg.batch // world
    fsdp, steps = [], {s["name"]: [] for s in specs}
    for step in range(STEPS):
        x, y = batch(cfg, step)
        with CollectiveBytes() as fb:
            loss = model(x[lo:hi], y[lo:hi])
            loss.backward()
        fsdp.append(summarize(fb.ops))
        for spec, opt in zip(specs, opts):
            before = Counter(Rows.sent)
            with CollectiveBytes() as c:
                opt.step()
            rows_sent = sum(Rows.sent.values()) - sum(before.values())
            steps[spec["name"]].append({**summarize(c.ops), "rows_sent": rows_sent})
        model.zero_grad(set_to_none=True)
    memory = {s["name"]: state_memory(opt) for s, opt in zip(specs, opts)}
    return {"rank": rank, "fsdp": fsdp, "steps": steps, "memory": memory}


def worker(rank: int, world: int, init_file: str, out_dir: str, cfg: CommConfig) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        try:
            result = run_rank(rank, world, cfg)
        except Exception as e:  # noqa: BLE001 (reported by the parent)
            result = {"rank": rank, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def spawn(world: int, cfg: CommConfig, deadline_s: float) -> List[dict]:
    import multiprocessing

    import torch.multiprocessing as mp

    # Fork where there is one: the workers inherit this process's imports (torch, FSDP2, dynamo, the
    # package; seconds each on a busy 2-core machine). This process has run no torch op yet.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        import torch._dynamo  # noqa: F401 (FSDP2 imports it at the first fully_shard)
        import torch.distributed.fsdp  # noqa: F401

        import subspace_ops  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="bench-comm-") as tmp:
        context = mp.start_processes(worker, args=(world, os.path.join(tmp, "init"), tmp, cfg), nprocs=world,
                                     join=False, start_method=method)
        start = time.monotonic()
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() - start > deadline_s:
                    raise RuntimeError(f"bench --op comm: the {world} processes were still running after "
                                       f"{deadline_s:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5)
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            if not os.path.exists(path):
                raise RuntimeError(f"bench --op comm: rank {r} wrote no result")
            with open(path, encoding="utf-8") as f:
                results.append(json.load(f))
    errors = [f"rank {r['rank']}: {r['error']}\n{r['traceback']}" for r in results if "error" in r]
    if errors:
        raise RuntimeError("bench --op comm failed in the worker processes:\n" + "\n".join(errors))
    return results


def single_process_memory(cfg: CommConfig) -> dict:
    """The state of every optimizer on the unsharded model after the same steps on the whole batch."""
    model = make_model(cfg)
    specs = optimizer_specs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [build_optimizer(s, model, cfg) for s in specs]
        for step in range(STEPS):
            x, y = batch(cfg, step)
            model(x, y).backward()
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)
    return {s["name"]: state_memory(opt) for s, opt in zip(specs, opts)}


# -- the document -------------------------------------------------------------------------------------
def analyse(cfg: CommConfig, world: int, results: List[dict], single: dict) -> dict:
    """Per optimizer and step: the largest bytes over the ranks (and every rank's); the
    normalisers (sums over the low-rank matrices, for each side); FSDP2's collectives; memory."""
    model = make_model(cfg)
    shapes = matrices(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    from subspace_ops.projectors import basis_side

    def side_of(spec_side, m, n):
        return basis_side(spec_side, m, n)

    norms = {}
    for side in SIDES:
        rn = sum(min(cfg.rank, m, n) * (n if side_of(side, m, n) == "left" else m) for m, n in shapes.values())
        norms[side] = {
            # elements of the projected gradient: r x n (left), m x r (right), summed over the matrices
            "lowrank_elements": rn,
            "left_matrices": sum(side_of(side, m, n) == "left" for m, n in shapes.values()),
        }
    elem = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    gather_bytes = sum(-(-m // world) * n * elem for m, n in shapes.values())  # this rank's rows of every G
    fsdp_steps = []
    for step in range(STEPS):
        per_rank = [r["fsdp"][step] for r in results]
        fsdp_steps.append({
            "all_gather_sent": max(sum(v[1] for k, v in pr["by_op"].items() if "allgather" in k or "all_gather" in k)
                                   for pr in per_rank),
            "reduce_scatter_sent": max(sum(v[1] for k, v in pr["by_op"].items() if "reduce_scatter" in k)
                                       for pr in per_rank),
            "other_sent": max(sum(v[1] for k, v in pr["by_op"].items()
                                  if not any(s in k for s in ("allgather", "all_gather", "reduce_scatter")))
                              for pr in per_rank),
            "sent": max(pr["sent"] for pr in per_rank),
            "by_op_rank0": per_rank[0]["by_op"],
        })
    rows = []
    for spec in optimizer_specs():
        name = spec["name"]
        per_step = []
        for step in range(STEPS):
            ranks = [r["steps"][name][step] for r in results]
            per_step.append({
                "sent": max(x["sent"] for x in ranks),
                "sent_per_rank": [x["sent"] for x in ranks],
                "args_per_rank": [x["args"] for x in ranks],
                "rows_sent_per_rank": [x["rows_sent"] for x in ranks],
                "by_op_rank0": ranks[0]["by_op"],
                "by_op_per_rank": [x["by_op"] for x in ranks],
                "by_phase_rank0": ranks[0]["by_phase"],
                "diagnostics": max(x["by_phase"].get("diagnostics", [0, 0])[1] for x in ranks),
            })
        mem_ranks = [r["memory"][name] for r in results]
        sp = single[name]
        replicated = max(m["replicated_bases"] + m["replicated_other"] for m in mem_ranks)
        target = (sp["total"] - replicated) / world + replicated
        rows.append({
            **spec,
            "steps": per_step,
            "rows_sent_matches": all(s["rows_sent_per_rank"] == s["sent_per_rank"] for s in per_step),
            "memory": {
                "per_rank": mem_ranks,
                "per_rank_max": max(m["total"] for m in mem_ranks),
                "single": sp,
                "single_over_world": sp["total"] / world,
                "replicated_per_rank": replicated,
                "target": target,
                "ratio_to_target": max(m["total"] for m in mem_ranks) / target if target else None,
            },
        })
    return {
        "config": dataclasses.asdict(cfg),
        "world": world,
        "gap": GAP,
        "steps": STEPS,
        "table_steps": {"first": FIRST, "refresh": REFRESH, "plain": PLAIN},
        "matrices": {k: list(v) for k, v in shapes.items()},
        "elem_bytes": elem,
        "lowrank_bytes": {side: v["lowrank_elements"] * elem for side, v in norms.items()},
        "left_matrices": {side: v["left_matrices"] for side, v in norms.items()},
        "gather_bytes": gather_bytes,
        "fsdp_param_bytes": param_bytes,  # the whole model's parameters (= its gradients)
        "fsdp": fsdp_steps,
        "rows": rows,
    }


_SHORT = {"allreduce_": "ar", "_allgather_base_": "ag", "_reduce_scatter_base_": "rs", "broadcast_": "bc",
          "gather_": "ga", "allgather_": "ag", "reduce_scatter_": "rs", "scatter_": "sc"}


def _ops_text(by_op: dict) -> str:
    if not by_op:
        return "-"
    parts = []
    for op, (count, _) in sorted(by_op.items(), key=lambda kv: -kv[1][1]):
        short = _SHORT.get(op.split(".", 1)[1], op)
        parts.append(f"{short}x{count}")
    return " ".join(parts)


def _kib(b: float) -> str:
    return f"{b / 1024:,.1f}"


def _table(head: List[str], body: List[List[str]]) -> List[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return [fmt(head), sep] + [fmt(b) for b in body]


def markdown(doc: dict, mode: str, command: str) -> str:
    meta, cfg, world = doc["meta"], doc["config"], doc["world"]
    fs = doc["fsdp"][PLAIN]
    rs = fs["reduce_scatter_sent"]
    lines = [
        f"# subspace-ops benchmark: comm, FSDP2 on gloo ({mode}, {world} ranks, {meta['device']})",
        "",
        f"- model: LLaMA-like, d {cfg['d']}, MLP {cfg['ffn']} (SwiGLU), {cfg['heads']} heads, {cfg['layers']} "
        f"layer(s), vocab {cfg['vocab']}, {cfg['dtype']} (parameters, gradients, collectives; optimizer "
        f"moments fp32); batch {cfg['batch']} x {cfg['seq']} tokens split over the ranks; "
        f"`fully_shard` on each block, then the root",
        f"- low-rank matrices ({len(doc['matrices'])}): "
        + ", ".join(f"{k.split('.', 1)[-1] if k.startswith('layers.') else k} {m}x{n}"
                    for k, (m, n) in list(doc["matrices"].items())[:7])
        + (" (per layer)" if cfg["layers"] > 1 else "")
        + f"; rank {cfg['rank']}, update_proj_gap {doc['gap']}; optimizers built with "
        "`lowrank_param_groups(model, rank, proj_type=...)` (embedding, head, norms: plain AdamW), reference backend",
        f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, git {meta['git_sha']}"
        f"{' (uncommitted changes to tracked files)' if meta.get('git_dirty') else ''}, 1 torch thread per rank, "
        f"date {meta['date']}, load {meta['load_start']} at start",
        "- measured: a `TorchDispatchMode` around each `opt.step()` and around forward+backward records every "
        "`c10d` (and `_c10d_functional`) op; bytes = the send buffer each rank passes (all-gather / gather / "
        "reduce-scatter: its input; all-reduce / broadcast: the buffer), max over the ranks, per step. Not bytes "
        "on the wire (a ring all-reduce sends about 2(w-1)/w of its buffer).",
        f"- command: `{command}`",
        "",
        "## FSDP2's own collectives per training step (forward + backward, measured)",
        "",
    ]
    body = []
    for step, f in enumerate(doc["fsdp"]):
        body.append([str(step), _kib(f["all_gather_sent"]), _kib(f["reduce_scatter_sent"]), _kib(f["other_sent"]),
                     _ops_text(f["by_op_rank0"])])
    lines += _table(["step", "param all-gather KiB", "grad reduce-scatter KiB", "other KiB", "collectives"], body)
    lines += ["", "ag: all-gather, rs: reduce-scatter, ar: all-reduce, bc: broadcast, ga: gather, sc: scatter; xN: count.", ""]
    lines += [f"## `opt.step()` per rank per step (KiB; vs FSDP2's gradient reduce-scatter {_kib(rs)} KiB)", ""]
    head = ["optimizer", "side", "projector", f"step {FIRST} (first basis)", f"step {REFRESH} (refresh)",
            "of which diagnostics", "refresh / RS", f"step {PLAIN} (no refresh)", "no-refresh / RS",
            "no-refresh / Σ r·n",
            "collectives at refresh", "collectives between", "= Rows.sent"]
    body = []
    for r in doc["rows"]:
        st = r["steps"]
        lowrank = doc["lowrank_bytes"].get(r["side"]) if r["side"] else None
        body.append([
            r["optimizer"], r["side"] or "-", r["projector"] or "-",
            _kib(st[FIRST]["sent"]), _kib(st[REFRESH]["sent"]), _kib(st[REFRESH]["diagnostics"]),
            f"{st[REFRESH]['sent'] / rs:.3f}",
            _kib(st[PLAIN]["sent"]), f"{st[PLAIN]['sent'] / rs:.3f}",
            f"{st[PLAIN]['sent'] / lowrank:.2f}" if lowrank else "-",
            _ops_text(st[REFRESH]["by_op_rank0"]), _ops_text(st[PLAIN]["by_op_rank0"]),
            "yes" if r["rows_sent_matches"] else "NO",
        ])
    lines += _table(head, body)
    lines += [
        "",
        f"side: `proj_type` of every low-rank matrix (`std`: right for rows >= cols, so only `down_proj` "
        f"projects on the left). RS: FSDP2's gradient reduce-scatter per step, measured above. Σ r·n: the bytes "
        f"of the projected gradients of all low-rank matrices of that side (r x n for a left one, m x r for a "
        f"right one: {', '.join(f'{s} {_kib(b)} KiB' for s, b in doc['lowrank_bytes'].items())}). Whole-gradient "
        f"gather (this rank's rows of every low-rank gradient): {_kib(doc['gather_bytes'])} KiB. of which "
        "diagnostics: the collectives of the refresh step's `subspace_stats` bookkeeping (`_record_stats`: "
        "captured energy in the new and old basis, principal angles), included in the step's bytes. = Rows.sent: the "
        "bytes agree with `subspace_ops.distributed.Rows.sent` on every rank and step (a collective outside "
        "`Rows` would make them differ). online_pca has no scheduled refresh: its basis moves every step, and "
        f"its step {FIRST} gathers each gradient for the first (SVD) basis.",
        "",
        "## Optimizer state per rank (after 4 steps)",
        "",
    ]
    head = ["optimizer", "side", "projector", "per rank KiB", "single process KiB", "single / world KiB",
            "replicated bases KiB", "replicated other KiB", "target KiB", "per rank / target",
            "per rank / AdamW per rank"]
    adamw = next(r for r in doc["rows"] if r["optimizer"] == "torch.optim.AdamW")["memory"]["per_rank_max"]
    body = []
    for r in doc["rows"]:
        if r["projector"] not in (None, "svd"):
            continue
        m = r["memory"]
        rank_max = max(m["per_rank"], key=lambda x: x["total"])
        body.append([
            r["optimizer"], r["side"] or "-", r["projector"] or "-", _kib(m["per_rank_max"]),
            _kib(m["single"]["total"]),
            _kib(m["single_over_world"]), _kib(rank_max["replicated_bases"]), _kib(rank_max["replicated_other"]),
            _kib(m["target"]), f"{m['ratio_to_target']:.4f}", f"{m['per_rank_max'] / adamw:.3f}",
        ])
    lines += _table(head, body)
    lines += [
        "",
        "per rank: bytes of the storages of this rank's local state tensors (DTensor local shards), each storage "
        "once, max over the ranks. single process: the same optimizer on the unsharded model, same steps, whole "
        "batch. replicated: state whole on every rank (right-side bases n x r; other: step counters, scalars, "
        "AdamSNSM's per-column norms). target = (single − replicated) / world + replicated. Every projector's "
        "memory is in the JSON.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI entry (python -m bench --op comm)
# ---------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace, argv: Optional[Sequence[str]], parser: argparse.ArgumentParser) -> int:
    import torch.distributed as dist

    from .cli import collect_meta

    if not dist.is_available() or not dist.is_gloo_available():
        parser.error("--op comm needs torch.distributed with the gloo backend")
    if args.device == "cuda":
        parser.error("--op comm runs on the CPU with gloo; it takes no --device cuda")
    world = args.world if args.world is not None else 2
    if world < 2:
        parser.error("--world must be at least 2")
    mode = "quick" if args.quick or args.smoke else "full"
    cfg = MODES[mode]
    if cfg.batch % world:
        cfg = dataclasses.replace(cfg, batch=world * -(-cfg.batch // world))  # equal slices
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    meta = collect_meta("cpu")
    log(f"bench: comm {mode}: {world} gloo processes, d {cfg.d}, MLP {cfg.ffn}, {cfg.layers} layer(s), "
        f"rank {cfg.rank}, {len(optimizer_specs())} optimizers")
    results = spawn(world, cfg, deadline_s=1800 if mode == "full" else 300)
    log(f"bench: comm: {world} ranks done in {time.perf_counter() - t0:.0f} s; single-process state ...")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = single_process_memory(cfg)
    finally:
        torch.set_num_threads(threads)
    doc = analyse(cfg, world, results, single)
    command = report.command_line(argv)
    meta["load_end"] = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    doc = {"command": command, "mode": mode, "meta": meta, **doc, "units": "bytes"}
    text = markdown(doc, mode, command) + f"\n(total {time.perf_counter() - t0:.0f} s)\n"
    report.publish(text, doc, args)
    return 0
