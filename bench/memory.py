"""``python -m bench --op memory``: the memory of a training step, measured and estimated.

Two sections, one row per optimizer configuration (``ROWS``):

**Measured**: one training step (forward, backward, ``opt.step()``, ``opt.zero_grad()``) of the demo
model (``subspace_ops.demo``: its GPT, its flags' defaults, its optimizer factories, so GaLoreAdamW
takes the demo's ``lowrank_param_groups``), on random token batches of the demo's shape. Two steps
are measured, each with its own tracker: the first (it creates the optimizer state and, for GaLore,
computes the first basis) and the second (a steady step). Per step: the peak and the phase it was
reached in (forward, backward, step), what was held at the peak by category, and the sizes the
categories reach: parameters, gradients (after backward), optimizer state (after the step: the
persistent state) and activations (after the forward: what autograd keeps for backward, plus the
loss).

* CPU: ``torch.distributed._tools.mem_tracker.MemTracker``, a ``TorchDispatchMode`` that sees every
  allocation and free and files each storage under parameter, gradient, activation, temporary
  (created in backward), optimizer state (anything created inside ``opt.step()``, temporaries
  included) or other (the input batch). It tracks one iteration, so each measured step gets a new one.
* CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` around each phase (the peak
  counters reset at the step's start); activations = allocated after the forward minus before it;
  parameters, gradients and state are the bytes of their storages. No per-category split at the peak.

**Estimated**: LLaMA 60M, 130M, 350M, 1B and 7B in the GaLore paper's configurations (``LLAMA``),
built on the ``meta`` device (no memory is allocated, 7B included), bf16 weights. The same code a
real step runs: the row's factory builds the optimizer on the meta parameters, every parameter gets
a meta ``.grad`` and ``opt.step()`` runs (reference backend: meta tensors are not CUDA), then

* weights, gradients: the bytes of the parameters and of their ``.grad``;
* optimizer states: the bytes of every tensor in ``opt.state``, deduplicated by storage (the step
  counters of our optimizers are views of one buffer);
* activations, for a stated token batch (default 1 x 256): the forward pass on meta tensors under
  ``torch.autograd.graph.saved_tensors_hooks``, summing the bytes of the tensors autograd saves for
  backward, deduplicated by storage, parameters excluded. Attention is computed as a fused (flash)
  kernel computes it, as torch's ``scaled_dot_product_attention`` picks on CPU and CUDA: it saves q,
  k, v, the output and the log-sum-exp, not the T x T weights (on meta tensors torch would take the
  math path: ``fused_attention_on_meta``);
* total: their sum, the way papers break training memory down; for a row that steps inside
  backward (``step_in_backward``: ``call_step=False``) gradients are the most gradient bytes alive at
  once and the total is the simulated peak below, since the step then runs next to live activations
  and no sum of the columns describes that moment;
* simulated peak: a real training step (forward, backward, step, zero_grad) on the meta model under
  ``MemTracker`` (which counts meta storages like real ones): the first step and a steady step, the
  larger peak. Unlike the sum, it includes temporaries (the step's, the backward's) and the order in
  which activations are freed while gradients appear. On meta tensors the step takes the paths a CPU
  step takes: ``torch.optim.AdamW``'s single-tensor loop (CUDA's default foreach path also holds a
  temporary the size of the parameters) and our reference backend (its fp32 copies of a 16-bit matrix
  are temporaries the fused Triton step does not make).

The measured section also prints this estimate for the demo model and batch next to the measurement;
``tests/test_memory.py`` requires, on a small demo configuration, the state bytes to be equal, the
sum within 5% of the measured peak and the simulated peak within 1%.

To add an optimizer configuration: one ``Row(label, factory, ...)`` line in ``ROWS``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import report

MIB = 2**20
GIB = 2**30
GB = 10**9  # the estimates print decimal GB, as the GaLore paper does
CARD_BYTES = 24 * GIB  # a "24 GB" card (RTX 3090 / 4090) holds 24 GiB
PHASES = ("forward", "backward", "step")


# ---------------------------------------------------------------------------------------------------
# Rows: optimizer configurations
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One optimizer configuration, a row of both tables.

    ``factory(model, args)`` builds the optimizer as the demo's ``train.OPTIMIZERS`` factories do
    (``args``: the demo's flags; the LLaMA estimates set ``rank`` and ``update_proj_gap`` to the
    paper's) and may set up whatever else the configuration needs. A training step runs
    ``accumulation`` forward and backward passes (each on a batch of the step's shape, the loss divided
    by ``accumulation``), then ``opt.step()`` when ``call_step``, then ``opt.zero_grad()``.
    ``estimate=False`` keeps the row out of the LLaMA estimates (whose breakdown gives every parameter
    a gradient and calls ``opt.step()``).
    """

    label: str
    factory: Callable
    accumulation: int = 1
    call_step: bool = True
    estimate: bool = True


def _adamw(model: nn.Module, args) -> torch.optim.Optimizer:
    from subspace_ops.demo import train

    return train.make_adamw(model, args)


def _galore(model: nn.Module, args) -> torch.optim.Optimizer:
    from subspace_ops.demo import train

    return train.make_galore(model, args)


def _galore_in_backward(k: int) -> Callable:
    """GaLoreAdamW stepping inside backward (``opt.step_in_backward(k)``): no ``opt.step()``."""
    def factory(model: nn.Module, args) -> torch.optim.Optimizer:
        opt = _galore(model, args)
        opt.step_in_backward(accumulation_steps=k)
        return opt

    return factory


ROWS: Tuple[Row, ...] = (
    Row("torch.optim.AdamW", _adamw),
    Row("GaLoreAdamW", _galore),
    Row("GaLoreAdamW, step in backward, accumulation 1", _galore_in_backward(1), call_step=False),
    Row("GaLoreAdamW, step in backward, accumulation 4", _galore_in_backward(4), accumulation=4, call_step=False),
)


def demo_args(argv: Sequence[str] = ()) -> argparse.Namespace:
    """The demo's flags (``python -m subspace_ops.demo``) with their defaults, ``argv`` applied."""
    from subspace_ops.demo.cli import build_parser

    return build_parser().parse_args(list(argv))


# Smoke mode (CI): a tiny demo model.
SMOKE_DEMO = ("--d-model", "32", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "2",
              "--rank", "8")


# ---------------------------------------------------------------------------------------------------
# Byte counting
# ---------------------------------------------------------------------------------------------------
def _storage_key(t: Tensor) -> tuple:
    # _cdata identifies the StorageImpl (views share it); data_ptr() is 0 for every meta storage.
    return (t.device.type, t.device.index, t.untyped_storage()._cdata)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts its whole storage once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def param_bytes(model: nn.Module) -> int:
    return storage_bytes(model.parameters())


def grad_bytes(model: nn.Module) -> int:
    return storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Every tensor in ``opt.state``, deduplicated by storage."""
    return storage_bytes(v for st in opt.state.values() for v in st.values())


@contextlib.contextmanager
def fused_attention_on_meta():
    """``F.scaled_dot_product_attention`` on meta tensors takes torch's math path, which saves the
    B x H x T x T attention weights for backward; on CPU and CUDA torch picks a fused (flash) kernel,
    which saves q, k, v, the output and the fp32 log-sum-exp (B x H x T). Inside this context, meta
    inputs (no mask, no dropout) go to the fused CPU kernel's meta function, so a meta forward saves
    what a real one saves."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type == "meta" and attn_mask is None and dropout_p == 0.0 and not kwargs.get("enable_gqa"):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, is_causal, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(model: nn.Module, batch: Tuple[Tensor, Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during one forward of ``model(*batch)``,
    deduplicated by storage, parameters (and views of them) excluded: the activation memory."""
    exclude = {_storage_key(p) for p in model.parameters()}
    seen: Dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in exclude:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention_on_meta():
        loss = model(*batch)
    del loss
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------
# One training step, measured
# ---------------------------------------------------------------------------------------------------
def train_step(model: nn.Module, opt, batch: Tuple[Tensor, Tensor], row: Row, mark=None) -> None:
    """forward, backward (``row.accumulation`` times), ``opt.step()``, ``opt.zero_grad()``;
    ``mark(phase)`` after each forward, backward and the step."""
    mark = mark or (lambda phase: None)
    for _ in range(row.accumulation):
        loss = model(*batch)
        if row.accumulation > 1:
            loss = loss / row.accumulation
        mark("forward")
        loss.backward()
        del loss
        mark("backward")
    if row.call_step:
        opt.step()
    mark("step")
    opt.zero_grad(set_to_none=True)


_CATEGORIES = {"Parameter": "params", "Gradient": "grads", "Optstate": "optimizer_state",
               "Activation": "activations", "Temp": "temp", "Buffer": "buffers", "Other": "other"}


def _flat(snapshot: dict) -> Dict[str, int]:
    """A MemTracker snapshot ({device: {category: bytes, "Total": bytes}}) summed over devices."""
    out = dict.fromkeys([*_CATEGORIES.values(), "total"], 0)
    for dev_snap in snapshot.values():
        for key, value in dev_snap.items():
            key = getattr(key, "value", key)
            out["total" if key == "Total" else _CATEGORIES[key]] += value
    return out


def _peak_phase(marks: List[Tuple[str, int]], peak: int) -> str:
    """The phase in which the running peak first reached its final value."""
    return next((phase for phase, p in marks if p >= peak), marks[-1][0] if marks else "-")


def tracked_step(model: nn.Module, opt, batch, row: Row) -> dict:
    """One training step under a new ``MemTracker`` (CPU or meta tensors)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt, *batch)
    sizes: Dict[str, int] = {}
    marks: List[Tuple[str, int]] = []
    # The most gradient bytes alive at once: sampled as each parameter's gradient arrives (a tensor
    # hook, before it is accumulated into .grad and before a step inside backward frees it): the
    # .grad tensors alive then plus the arriving one.
    max_grads = [0]

    def sample(grad: Tensor) -> None:
        max_grads[0] = max(max_grads[0], grad_bytes(model) + grad.untyped_storage().nbytes())

    hooks = [p.register_hook(sample) for p in model.parameters() if p.requires_grad]
    def mark(phase: str) -> None:
        now = _flat(mt.get_tracker_snapshot("current"))
        marks.append((phase, _flat(mt.get_tracker_snapshot("peak"))["total"]))
        if phase == "forward":
            sizes.setdefault("activations", now["activations"])
        elif phase == "backward":
            sizes["grads"] = now["grads"]
            mt.reset_mod_stats()  # MemTracker allows one forward per tracked iteration: the next micro-batch's
        else:
            sizes["optimizer_state"] = now["optimizer_state"]

    try:
        with mt:
            train_step(model, opt, batch, row, mark)
    finally:
        for h in hooks:
            h.remove()
    at_peak = _flat(mt.get_tracker_snapshot("peak"))
    # "grads": the most gradient bytes alive at once (a step inside backward frees each gradient in
    # its hook, before MemTracker's own hook would tag it)
    sizes["grads"] = max(max_grads[0], sizes.get("grads", 0))
    return {
        "params": param_bytes(model), **sizes, "max_grads": sizes["grads"],
        "peak": at_peak["total"],
        "peak_phase": _peak_phase(marks, at_peak["total"]),
        "at_peak": {k: v for k, v in at_peak.items() if k != "total"},
    }


def cuda_step(model: nn.Module, opt, batch, row: Row) -> dict:
    """One training step on CUDA: the caching allocator's counters around each phase."""
    sizes: Dict[str, int] = {}
    marks: List[Tuple[str, int]] = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()

    def mark(phase: str) -> None:
        torch.cuda.synchronize()
        marks.append((phase, torch.cuda.max_memory_allocated()))
        if phase == "forward":
            sizes.setdefault("activations", torch.cuda.memory_allocated() - before)
        elif phase == "backward":
            sizes["grads"] = grad_bytes(model)
        else:
            sizes["optimizer_state"] = state_bytes(opt)

    train_step(model, opt, batch, row, mark)
    peak = torch.cuda.max_memory_allocated()
    return {"params": param_bytes(model), **sizes, "peak": peak, "peak_phase": _peak_phase(marks, peak),
            "at_peak": None}


def measure_steps(model: nn.Module, opt, batch, row: Row, device: str) -> Tuple[dict, dict]:
    """(first step, steady step): each measured on its own."""
    step = cuda_step if device == "cuda" else tracked_step
    first = step(model, opt, batch, row)
    return first, step(model, opt, batch, row)


def random_batch(vocab: int, batch: int, seq: int, device, seed: int = 0) -> Tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (batch, seq), generator=gen)
    y = torch.randint(vocab, (batch, seq), generator=gen)
    return x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------------
# Estimates on the meta device
# ---------------------------------------------------------------------------------------------------
def estimate(build: Callable[[], nn.Module], row: Row, args, batch: Tuple[Tensor, Tensor],
             simulate: bool = True) -> dict:
    """The breakdown of ``row`` for the model ``build()`` makes on the meta device (see the module doc).
    ``batch``: meta token batch of the stated shape. ``simulate``: also the simulated peak."""
    model = build()
    opt = row.factory(model, args)
    if row.call_step:
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        out = {"params": param_bytes(model), "grads": grad_bytes(model)}
        opt.step()
        out["optimizer_state"] = state_bytes(opt)
        opt.zero_grad(set_to_none=True)
    else:
        # The step runs inside backward (step_in_backward): the gradients alive at once are what the
        # step itself keeps, so they come from running it, tracked (first step, then a steady one).
        with fused_attention_on_meta():
            first, steady = measure_steps(model, opt, batch, row, "meta")
        out = {"params": param_bytes(model), "grads": max(first["max_grads"], steady["max_grads"]),
               "optimizer_state": state_bytes(opt)}
        out["simulated_first"], out["simulated_steady"] = first, steady  # that run is the simulation
        out["simulated_peak"] = max(first["peak"], steady["peak"])
    out["activations"] = saved_activation_bytes(model, batch)
    out["total"] = out["params"] + out["grads"] + out["optimizer_state"] + out["activations"]
    if not row.call_step:
        # The step runs during backward, next to live activations and its own temporaries: no sum of
        # the columns describes that moment; the total is the tracked run's peak.
        out["total"] = out["simulated_peak"]
    out["n_params"] = sum(p.numel() for p in model.parameters())
    handle = getattr(opt, "_backward", None)
    if handle is not None:
        handle.remove()  # a later optimizer on this model must not find these hooks
    del opt
    if simulate and row.call_step:
        # a fresh optimizer: its first step (state created, first basis) and a steady step, both tracked
        opt = row.factory(model, args)
        with fused_attention_on_meta():
            first, steady = measure_steps(model, opt, batch, row, "meta")
        out["simulated_first"], out["simulated_steady"] = first, steady
        out["simulated_peak"] = max(first["peak"], steady["peak"])
    return out


# -- LLaMA (the GaLore paper's architecture: RMSNorm, rotary attention, SwiGLU; untied head) ---------
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    name: str
    hidden: int
    intermediate: int
    heads: int
    layers: int
    rank: int  # the paper's GaLore rank for this size
    vocab: int = 32000

    def describe(self) -> str:
        return f"{self.hidden}/{self.intermediate}/{self.heads}/{self.layers}"


# hidden / intermediate / heads / layers as in the GaLore repository's configs/llama_*.json (the 1B
# there has 32 heads and 24 layers; the paper's Table 5 lists 24 and 32, but 24 heads do not divide
# 2048); GaLore ranks of the paper (Table 2; r = 1024 for 7B, §5.3). vocab 32000.
LLAMA = (
    LlamaConfig("60M", 512, 1376, 8, 8, 128),
    LlamaConfig("130M", 768, 2048, 12, 12, 256),
    LlamaConfig("350M", 1024, 2736, 16, 24, 256),
    LlamaConfig("1B", 2048, 5461, 32, 24, 512),
    LlamaConfig("7B", 4096, 11008, 32, 32, 1024),
)
LLAMA_GAP = 200
LLAMA_DTYPE = torch.bfloat16


class RMSNorm(nn.Module):
    """Hugging Face LLaMA's: normalised in fp32, scaled in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads = cfg.heads
        h = cfg.hidden
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks (rotary attention q/k/v/o, SwiGLU gate/up/down),
    final RMSNorm, untied ``lm_head``; ``forward(idx, targets)`` returns the mean cross-entropy (logits
    upcast to fp32). ``lowrank_param_groups`` makes every attention and MLP matrix low-rank and keeps
    the embedding and the head full-rank."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        T = idx.shape[1]
        head_dim = self.cfg.hidden // self.cfg.heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=idx.device).float() / head_dim))
        angles = torch.arange(T, device=idx.device).float()[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        dtype = self.embed_tokens.weight.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_llama(cfg: LlamaConfig, dtype: torch.dtype = LLAMA_DTYPE, device="meta") -> Llama:
    with torch.device(device):
        return Llama(cfg).to(dtype)


def llama_args(cfg: LlamaConfig) -> argparse.Namespace:
    args = demo_args()
    args.rank, args.update_proj_gap = cfg.rank, LLAMA_GAP
    return args


# ---------------------------------------------------------------------------------------------------
# Published figures (GaLore, Zhao et al., ICML 2024, arXiv:2403.03507v2), "G" as printed there
# ---------------------------------------------------------------------------------------------------
PAPER = "Zhao et al., GaLore (ICML 2024), arXiv:2403.03507v2"
# Table 6 (= the memory in Table 2): BF16 estimates of weights and optimizer states, Adam ("Full-Rank")
# and GaLore at ranks 128 / 256 / 256 / 512.
PAPER_TABLE6 = {
    "60M": {"weights": 0.12, "adam_states": 0.23, "galore_states": 0.13},
    "130M": {"weights": 0.25, "adam_states": 0.51, "galore_states": 0.28},
    "350M": {"weights": 0.68, "adam_states": 1.37, "galore_states": 0.54},
    "1B": {"weights": 2.60, "adam_states": 5.20, "galore_states": 1.78},
}
# 7B: §1, "58 GB memory (14GB for trainable parameters, 42GB for Adam optimizer states and weight
# gradients, and 2GB for activations)", footnote: BF16, maximum sequence length 2048, batch size 1.
PAPER_7B = {"weights": 14.0, "adam_states_and_grads": 42.0, "activations_seq2048": 2.0, "total": 58.0}
PAPER_7B_NOTES = (
    "Table 3 (7B, memory estimates): 8-bit GaLore 18G, 8-bit Adam 26G.",
    "§5.5 (measured, token batch 256): 8-bit GaLore with per-layer weight updates needs 22.0G; against "
    "8-bit Adam, the low-rank projection saves 9.6G (65.5%) of optimizer states and the per-layer updates "
    "13.5G of weight gradients.",
    "The paper gives no 7B optimizer-state figure for (16-bit) GaLoreAdamW; none is quoted here.",
)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def run_measured(device: str, argv: Sequence[str], rows: Sequence[Row], log, seed: int = 0) -> dict:
    from subspace_ops.demo.data import CharTokenizer, load_corpus
    from subspace_ops.demo.model import GPT

    args = demo_args(argv)
    vocab = CharTokenizer(load_corpus()).vocab_size

    def build(dev):
        torch.manual_seed(seed)
        with torch.device(dev):
            return GPT(vocab, args.context, args.d_model, args.layers, args.heads)

    out_rows = []
    for row in rows:
        t0 = time.perf_counter()
        model = build(device)
        opt = row.factory(model, args)
        batch = random_batch(vocab, args.batch_size, args.context, device, seed)
        first, steady = measure_steps(model, opt, batch, row, device)
        n_params = sum(p.numel() for p in model.parameters())
        del model, opt, batch
        gc.collect()
        est = estimate(lambda: build("meta"), row, args, random_batch(vocab, args.batch_size, args.context, "meta", seed))
        out_rows.append({"optimizer": row.label, "first": first, "steady": steady,
                         "peak": max(first["peak"], steady["peak"]), "estimate": _no_nested(est)})
        log(f"memory: measured {row.label}: peak {out_rows[-1]['peak'] / MIB:.2f} MiB ({time.perf_counter() - t0:.1f} s)")
    return {
        "model": f"demo GPT: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context "
                 f"{args.context}, vocab {vocab}; {n_params / 1e6:.2f}M parameters, fp32",
        "batch": [args.batch_size, args.context], "rank": args.rank, "update_proj_gap": args.update_proj_gap,
        "demo_flags": list(argv), "rows": out_rows,
    }


def _no_nested(est: dict) -> dict:
    out = {k: v for k, v in est.items() if k not in ("simulated_first", "simulated_steady")}
    if "simulated_steady" in est:
        out["simulated_peak_phase"] = max((est["simulated_first"], est["simulated_steady"]),
                                          key=lambda s: s["peak"])["peak_phase"]
    return out


def run_estimated(configs: Sequence[LlamaConfig], rows: Sequence[Row], tokens: Tuple[int, int], log,
                  simulate: bool = True) -> List[dict]:
    out = []
    for cfg in configs:
        args = llama_args(cfg)
        batch = random_batch(cfg.vocab, tokens[0], tokens[1], "meta")
        for row in rows:
            if not row.estimate:
                continue
            t0 = time.perf_counter()
            est = estimate(lambda: build_llama(cfg), row, args, batch, simulate=simulate)
            entry = {"model": cfg.name, "config": cfg.describe(), "optimizer": row.label,
                     "rank": cfg.rank if "galore" in row.label.lower() else None, **_no_nested(est)}
            if cfg.name == "7B":  # the paper's activation figure is for a 2048-token sequence
                entry["activations_seq2048"] = saved_activation_bytes(
                    build_llama(cfg), random_batch(cfg.vocab, 1, 2048, "meta"))
            out.append(entry)
            gc.collect()
            log(f"memory: estimated LLaMA {cfg.name} {row.label}: total {est['total'] / GB:.2f} GB, simulated "
                f"peak {_gb(est.get('simulated_peak'))} GB ({time.perf_counter() - t0:.1f} s)")
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def _table(head: Sequence[str], body: Sequence[Sequence[str]], text_columns: int = 1) -> List[str]:
    """A markdown table with padded columns: the first ``text_columns`` left-aligned, numbers right."""
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(("-" * (w + 2)) if i < text_columns else ("-" * (w + 1) + ":")
                          for i, w in enumerate(widths)) + "|"
    return [fmt(head), rule, *(fmt(b) for b in body)]


def _mib(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / MIB:.2f}"


def _gb(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def markdown(doc: dict) -> str:
    meta, m = doc["meta"], doc["measured"]
    lines = [
        "# Training memory: measured and estimated (python -m bench --op memory)",
        "",
        f"- device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, "
        f"git {meta['git_sha']}{' (uncommitted changes to tracked files)' if meta.get('git_dirty') else ''}, "
        f"date {meta['date']}",
        f"- command: `{doc['command']}`",
        "",
        "## Measured: one training step of the demo model",
        "",
        f"{m['model']}; batch {m['batch'][0]} x {m['batch'][1]} tokens (random tokens); GaLore rank {m['rank']}, "
        f"update_proj_gap {m['update_proj_gap']} (the demo's groups and defaults). A step: forward, backward, "
        "`opt.step()`, `opt.zero_grad()`. "
        + ("Measured with `MemTracker` (every storage allocated or freed, by category)."
           if meta["device_type"] != "cuda" else
           "Measured with `torch.cuda.memory_allocated` / `max_memory_allocated` around each phase.")
        + " MiB = 2^20 bytes.",
        "",
    ]
    head = ["optimizer", "params", "grads", "optimizer state", "activations", "peak, 1st step", "in",
            "peak, steady step", "in"]
    body = []
    for r in m["rows"]:
        f, s = r["first"], r["steady"]
        body.append([r["optimizer"], _mib(s["params"]), _mib(s.get("grads")), _mib(s.get("optimizer_state")),
                     _mib(s.get("activations")), _mib(f["peak"]), f["peak_phase"], _mib(s["peak"]), s["peak_phase"]])
    lines += _table(head, body)
    lines += ["", "params, grads (after backward), optimizer state (after the step: what persists), activations "
              "(after the forward: what autograd keeps for backward, and the loss), in MiB, from the steady step. "
              "Peaks: the most held at once during the step, and the phase it was reached in. The first step "
              "creates the optimizer state (and GaLore's first basis); later steps hold it throughout.", ""]
    if any(r["steady"]["at_peak"] for r in m["rows"]):
        lines += ["What the steady step held at its peak (MiB; `MemTracker`'s categories: optimizer state "
                  "includes temporaries created inside `opt.step()`, temp = created during backward, other = the "
                  "input batch):", ""]
        cats = ("params", "grads", "optimizer_state", "activations", "temp", "other")
        body = [[r["optimizer"], *(_mib(r["steady"]["at_peak"][c]) for c in cats), _mib(r["steady"]["peak"])]
                for r in m["rows"]]
        lines += _table(["optimizer", "params", "grads", "optimizer state", "activations", "temp", "other", "peak"], body)
        lines.append("")
    lines += ["The meta estimate of the same model and batch (the method of the estimates below) against the "
              "measured peak (the larger of the two steps):", ""]
    body = []
    for r in m["rows"]:
        e = r["estimate"]
        body.append([r["optimizer"], _mib(e["params"]), _mib(e["grads"]), _mib(e["optimizer_state"]),
                     _mib(e["activations"]), _mib(e["total"]), f"{e['total'] / r['peak']:.3f}",
                     _mib(e["simulated_peak"]), f"{e['simulated_peak'] / r['peak']:.3f}", _mib(r["peak"])])
    lines += _table(["optimizer", "weights", "gradients", "optimizer states", "activations", "total (sum)",
                     "sum / measured", "simulated peak", "sim / measured", "measured peak"], body)
    est = doc["estimated"]
    if est:
        b, t = doc["tokens"]
        lines += ["", f"## Estimated: LLaMA, bf16 weights, token batch {b} x {t} (batch x sequence), on the meta device",
                  "",
                  "GB = 10^9 bytes (as in the GaLore paper). The GaLore paper's configurations (hidden / intermediate / "
                  f"heads / layers, vocab 32000; GaLore rank as in the paper, update_proj_gap {LLAMA_GAP}, scale 0.25, "
                  "proj_type std, projector svd); no activation checkpointing, gradients kept until the step. "
                  "`torch.optim.AdamW` keeps its moments in the parameters' dtype (bf16); `GaLoreAdamW` keeps every "
                  "moment in fp32 (the low-rank ones and the AdamW moments of the embedding, head and norms) and "
                  "each basis in bf16.", ""]
        head = ["model", "optimizer", "weights", "gradients", "optimizer states", "activations", "total",
                "simulated peak", "fits in 24 GiB"]
        body = []
        for e in est:
            opt = e["optimizer"] + (f" (r={e['rank']})" if e.get("rank") else "")
            fits = "yes" if max(e["total"], e.get("simulated_peak") or 0) <= CARD_BYTES else "no"
            body.append([f"{e['model']} ({e['config']})", opt, _gb(e["params"]), _gb(e["grads"]),
                         _gb(e["optimizer_state"]), _gb(e["activations"]), _gb(e["total"]),
                         _gb(e.get("simulated_peak")), fits])
        lines += _table(head, body, text_columns=2)
        lines += ["", "weights, gradients: the bytes of the parameters and of one gradient each; optimizer states: "
                  "every tensor in `opt.state` after `opt.step()` on meta tensors (the optimizer's own code path); "
                  "activations: the tensors autograd saves in the forward (fused attention); total: their sum "
                  "(step in backward: gradients are the most gradient bytes alive at once, sampled as each gradient "
                  "arrives while the step frees them, and the total is the simulated peak); "
                  "simulated peak: the most held at once in a whole step on meta tensors under `MemTracker` "
                  "(temporaries included, activations freed as gradients appear; on meta tensors the step takes "
                  "`torch.optim.AdamW`'s single-tensor path, where CUDA's default foreach path also holds a temporary "
                  "the size of the parameters, and our reference backend, whose fp32 copies of a 16-bit matrix the "
                  "fused Triton step does not make). fits in 24 GiB: the larger of total and simulated peak <= 24 GiB "
                  f"({CARD_BYTES / GB:.2f} GB); a real card also needs room for the CUDA context and allocator "
                  "fragmentation (about 1 GB).", ""]
        lines += _published(est)
    lines += ["", "## Method", "", *_method_lines()]
    return "\n".join(lines).rstrip() + "\n"


def _published(est: List[dict]) -> List[str]:
    by = {(e["model"], e["optimizer"]): e for e in est}
    lines = [f"## Published figures ({PAPER})", ""]
    body = []
    for name, pub in PAPER_TABLE6.items():
        adam, gal = by.get((name, "torch.optim.AdamW")), by.get((name, "GaLoreAdamW"))
        if adam is None and gal is None:
            continue
        ours = adam or gal
        body.append([name, f"{pub['weights']:.2f}", _gb(ours["params"]), f"{pub['adam_states']:.2f}",
                     _gb(adam["optimizer_state"]) if adam else "-", f"{pub['galore_states']:.2f}",
                     _gb(gal["optimizer_state"]) if gal else "-"])
    if body:
        lines += ["Table 6 of the paper (BF16 estimates of weights and optimizer states, \"G\") next to ours (GB):", ""]
        lines += _table(["model", "weights: paper", "ours", "Adam states: paper", "ours (AdamW)",
                         "GaLore states: paper", "ours (GaLoreAdamW)"], body)
        diffs = [abs(ours / (paper * GB) - 1)
                 for name, pub in PAPER_TABLE6.items() if (name, "torch.optim.AdamW") in by
                 for ours, paper in ((by[(name, "torch.optim.AdamW")]["params"], pub["weights"]),
                                     (by[(name, "torch.optim.AdamW")]["optimizer_state"], pub["adam_states"]))]
        close = f"within {max(diffs):.0%} of" if diffs else "compared with"
        bigger = [name for name in PAPER_TABLE6 if (name, "torch.optim.AdamW") in by and (name, "GaLoreAdamW") in by
                  and by[(name, "GaLoreAdamW")]["optimizer_state"] > by[(name, "torch.optim.AdamW")]["optimizer_state"]]
        lines += ["", f"Weights and AdamW states: ours are {close} the paper's (the paper states neither its parameter "
                  "counts nor whether its G is 10^9 or 2^30 bytes). Our GaLoreAdamW states are larger than the paper's "
                  "GaLore states: all our moments are fp32 (the paper counts BF16), including the full-size AdamW "
                  "moments of the embedding and the head"
                  + (f", which at {' and '.join(bigger)} make them larger than AdamW's bf16 states." if bigger else "."),
                  ""]
    a7 = by.get(("7B", "torch.optim.AdamW"))
    g7 = by.get(("7B", "GaLoreAdamW"))
    if a7 or g7:
        lines += ["LLaMA 7B, the paper's §1 (BF16, batch size 1, sequence length 2048): \"at least 58 GB memory (14GB "
                  "for trainable parameters, 42GB for Adam optimizer states and weight gradients, and 2GB for "
                  "activations)\". Ours (GB):", ""]
        body = [["7B, paper §1", f"{PAPER_7B['weights']:.1f}", f"{PAPER_7B['adam_states_and_grads']:.1f}",
                 f"{PAPER_7B['activations_seq2048']:.1f}", f"{PAPER_7B['total']:.1f}"]]
        for e in (a7, g7):
            if e is not None:
                states = e["grads"] + e["optimizer_state"]
                act = e.get("activations_seq2048")
                body.append([f"7B, ours, {e['optimizer']}", _gb(e["params"]), _gb(states), _gb(act),
                             _gb(e["params"] + states + (act or 0))])
        lines += _table(["", "weights", "optimizer states + gradients", "activations (seq 2048)", "total"], body)
        lines += ["", "Our activations at 2048 tokens are the saved tensors of a forward without checkpointing "
                  "(fused attention, fp32 RMSNorm intermediates as in Hugging Face's LLaMA); the paper does not say "
                  "how its 2GB were counted.", ""]
        lines += [f"- {note}" for note in PAPER_7B_NOTES]
        if g7:
            need = max(g7["total"], g7.get("simulated_peak") or 0)
            fits = "fits" if need <= CARD_BYTES else "does not fit"
            lines += [f"- Ours, GaLoreAdamW r=1024 (fp32 moments, gradients kept until the step): optimizer states "
                      f"{_gb(g7['optimizer_state'])} GB, total {_gb(g7['total'])} GB at the token batch above, so it "
                      f"{fits} in 24 GiB. The paper's 22.0G is 8-bit GaLore with per-layer weight updates (no "
                      "gradients kept), not this configuration."]
    return lines


def _method_lines() -> List[str]:
    return [
        "- Measured (CPU): `torch.distributed._tools.mem_tracker.MemTracker`, a new tracker per step (it tracks one "
        "iteration); the model, optimizer and batch are registered with `track_external` before the step.",
        "- Measured (CUDA): `torch.cuda.reset_peak_memory_stats` at the step's start, `memory_allocated` / "
        "`max_memory_allocated` after each phase (allocations are rounded to 512-byte blocks).",
        "- Estimated: the model built on the `meta` device; the row's optimizer factory; a meta `.grad` for every "
        "parameter; `opt.step()` (our optimizers skip their finiteness checks and diagnostics on meta tensors); the "
        "bytes of the parameters, gradients and `opt.state` (deduplicated by storage); activations from "
        "`torch.autograd.graph.saved_tensors_hooks` over a meta forward (deduplicated by storage, parameters "
        "excluded), with `scaled_dot_product_attention` computed by the fused CPU kernel's meta function "
        "(`fused_attention_on_meta`: torch's meta path would save the T x T attention weights).",
        "- Simulated peak: the same training step as measured, on the meta model under `MemTracker` (first step and a "
        "steady step). It counts what PyTorch allocates; library workspaces (LAPACK, cuSOLVER, cuBLAS) are not seen.",
        "- Not counted anywhere: the CUDA context, allocator caching and fragmentation, data loading.",
    ]


# ---------------------------------------------------------------------------------------------------
# CLI entry (python -m bench --op memory)
# ---------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace, argv: Optional[Sequence[str]], parser: argparse.ArgumentParser) -> int:
    from .cli import collect_meta, default_threads

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    names = [c.name for c in LLAMA]
    if args.models is not None:
        unknown = [n for n in args.models if n not in names]
        if unknown:
            parser.error(f"--models: unknown {unknown}; choose from {', '.join(names)}")
        configs = [c for c in LLAMA if c.name in args.models]
    else:
        configs = [LLAMA[0]] if mode == "smoke" else list(LLAMA)
    tokens = args.tokens or (1, 256)
    if min(tokens) <= 0:
        parser.error("--tokens: batch and sequence length must be positive, e.g. 1x256")
    threads = default_threads(args.threads, mode)
    if threads:
        torch.set_num_threads(threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    meta = collect_meta(device)
    meta["device_type"] = device
    demo_flags = SMOKE_DEMO if mode == "smoke" else ()
    log(f"bench: memory {mode} on {meta['device']}: demo model measured, LLaMA {', '.join(c.name for c in configs)} "
        f"estimated at {tokens[0]}x{tokens[1]} tokens")
    measured = run_measured(device, demo_flags, ROWS, log)
    # smoke (CI, seconds): no simulated peak for LLaMA; the measured section's estimate still simulates
    estimated = run_estimated(configs, ROWS, tokens, log, simulate=mode != "smoke")
    command = report.command_line(argv)
    doc = {"command": command, "mode": mode, "meta": meta, "measured": measured, "tokens": list(tokens),
           "estimated": estimated, "units": {"measured": "bytes", "estimated": "bytes"},
           "published": {"source": PAPER, "table6_G": PAPER_TABLE6, "7B_G": PAPER_7B, "7B_notes": list(PAPER_7B_NOTES)}}
    text = markdown(doc) + f"\n(total {time.perf_counter() - t0:.0f} s)\n"
    report.publish(text, doc, args)
    return 0
