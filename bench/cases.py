"""What is benchmarked: a factory per (op, provider) and the analytic bytes/FLOPs of each.

``bytes`` and ``flops`` are what the op must move/compute at minimum (docs/design.md, "Kernels",
"What to fuse and why"), counted for each provider's own storage (galore-torch and torch AdamW keep their
moments in the parameter's dtype; ours are fp32). ``flops`` counts matmul/factorisation FLOPs only
(2 per multiply-add); elementwise work is bandwidth-bound and is covered by ``bytes``.

Shared by the CLI (``python -m bench``) and the pytest-benchmark files.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Tuple

import torch

from subspace_ops import ops, projectors, reference
from subspace_ops._galore_torch import import_galore_torch
from subspace_ops.optim import GaLoreAdamW

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("step", "refresh", "project", "project_adam", "back_project_update", "lowrank_adam", "snsm_step")
STEP_PROVIDERS = ("triton", "reference", "galore_torch", "torch_adamw_fused", "torch_adamw_foreach")
OP_PROVIDERS = ("reference", "triton")
SUBSPACE_STEP = ("triton", "reference", "galore_torch")
TORCH_ADAMW = ("torch_adamw_fused", "torch_adamw_foreach")

# Hyperparameters of every timed step (galore-torch's defaults; no weight decay).
LR, BETAS, EPS, SCALE = 1e-3, (0.9, 0.999), 1e-6, 0.25
NEVER = 10**9  # update_proj_gap that keeps a timed step free of refreshes


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def refresh_providers() -> Tuple[str, ...]:
    """svd, randomized (cold and warm-started), then any other projector the package has.

    ``online_pca`` starts from the SVD basis and then moves the basis every step: its provider here
    (``online_pca_step``) times that per-step update. ``gaussian``/``srht`` are regenerated from their
    seed at every step, so their time is a per-step cost too (see report.AMORTIZE).
    """
    extra = tuple(
        "online_pca_step" if p == "online_pca" else p
        for p in projectors.PROJECTORS if p not in ("svd", "randomized")
    )
    return ("svd", "randomized", "randomized_warm") + extra


def providers_for(op: str) -> Tuple[str, ...]:
    if op == "step":
        return STEP_PROVIDERS
    if op == "refresh":
        return refresh_providers()
    return OP_PROVIDERS


@dataclass(frozen=True)
class Spec:
    m: int
    n: int
    rank: int
    dtype: str
    device: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def esize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def side(self) -> str:
        return projectors.basis_side("std", self.m, self.n)

    @property
    def r(self) -> int:
        return projectors.effective_rank(self.rank, self.m, self.n)

    @property
    def lowrank_numel(self) -> int:
        a, b = projectors.lowrank_shape(self.side, self.m, self.n, self.rank)
        return a * b

    @property
    def basis_rows(self) -> int:
        return self.m if self.side == "left" else self.n

    @property
    def basis_numel(self) -> int:
        return self.basis_rows * self.r

    @property
    def label(self) -> str:
        return f"{self.m}x{self.n} r{self.rank} {self.dtype}"


@dataclass
class Bench:
    """A ready-to-time callable; ``keep`` holds whatever must stay alive while it is timed."""

    fn: Callable[[], object]
    note: str = ""
    keep: list = field(default_factory=list)


# -- analytic cost --------------------------------------------------------------------------------
def _svd_flops(rows: int, cols: int) -> int:
    """Thin SVD with U1, S, V (Golub & Van Loan, Fig. 5.4.1): the cheaper of R-SVD and Golub-Reinsch."""
    big, small = max(rows, cols), min(rows, cols)
    return min(6 * big * small**2 + 20 * small**3, 14 * big * small**2 + 8 * small**3)


def _randomized_flops(spec: Spec, warm: bool, oversample: int = 8, power_iters: int = 1) -> int:
    # randomized_svd runs on A = G (left) or Gᵀ (right): a x c, sketch width k.
    a, c = (spec.m, spec.n) if spec.side == "left" else (spec.n, spec.m)
    k = min(spec.r + oversample, a, c)
    gemms = (4 * power_iters + 4) * a * c * k  # G Ω, (G (Gᵀ Q)) per iteration, Qᵀ G
    qr = (power_iters + 1) * (2 * a * k * k - 2 * k**3 // 3)
    small = _svd_flops(k, c) + 2 * a * k * k  # svd(Qᵀ G) and Q Ub
    warm_gemm = 2 * a * c * min(spec.r, k) if warm else 0  # Aᵀ · previous basis
    return gemms + qr + small + warm_gemm


def analytic(op: str, provider: str, spec: Spec) -> Tuple[int, int, str]:
    """(bytes, flops, note) that ``op`` must move/compute at minimum for ``provider``."""
    m, n, r, e = spec.m, spec.n, spec.r, spec.esize
    mn, low, basis = m * n, spec.lowrank_numel, spec.basis_numel
    if op == "step":
        if provider in TORCH_ADAMW:
            # read G, W, M, V; write W, M, V; moments in the param dtype (torch.optim's zeros_like)
            return 3 * mn * e + 4 * mn * e, 0, ""
        state_e = e if provider == "galore_torch" else 4  # galore-torch: moments in grad dtype
        # read G, read W, write W; the basis read by both GEMMs; M, V read and written
        return 3 * mn * e + 2 * basis * e + 4 * low * state_e, 4 * mn * r, ""
    if op == "refresh":
        nbytes = mn * e + basis * e  # read G once, write the basis
        if provider == "svd":
            return nbytes, _svd_flops(m, n), "flops: thin SVD (Golub-Van Loan count)"
        if provider in ("randomized", "randomized_warm"):
            return nbytes, _randomized_flops(spec, provider == "randomized_warm"), ""
        if provider == "online_pca_step":
            # docs/algorithms.md §3: the online-PCA gradient ≈ 4·m·n·r, then a QR of the basis
            rows = spec.basis_rows
            return mn * e + 2 * basis * e + 4 * basis * 4, 4 * mn * r + 4 * rows * r * r, "per-step basis update"
        return nbytes, 0, "flops not modelled for this projector"
    if op == "project":
        return mn * e + basis * e + low * 4, 2 * mn * r, "fp32 output R"
    if op == "project_adam":
        return mn * e + basis * e + 5 * low * 4, 2 * mn * r, "R stays on chip; M, V read+written, N out"
    if op == "back_project_update":
        return 2 * mn * e + basis * e + low * 4, 2 * mn * r, "W -= step*scale*(P N), in place"
    if op == "lowrank_adam":
        return 6 * low * 4, 0, "R in; M, V read+written; N out (all fp32)"
    if op == "snsm_step":
        # G read twice (the complement term needs G again after the whole projection), W read and
        # written, the basis read by both GEMMs, M read+written, D = M - R written and read back,
        # the subset-norm accumulator (max(m, n) fp32) read+written and read again.
        return (4 * mn * e + 2 * basis * e + 4 * low * 4 + 3 * max(m, n) * 4, 4 * mn * r,
                "AdamSNSM matrix update; std side: V summed inside the projection")
    raise ValueError(f"unknown op {op!r}")


# -- inputs ---------------------------------------------------------------------------------------
def make_inputs(spec: Spec, seed: int = 0) -> dict:
    """Gradient, initial weight, an orthonormal basis and low-rank tensors, seeded, made on the device."""
    dev, dt = spec.device, spec.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=dev)  # noqa: E731
    G = randn(spec.m, spec.n).to(dt)
    W0 = (0.02 * randn(spec.m, spec.n)).to(dt)
    P = torch.linalg.qr(randn(spec.basis_rows, spec.r))[0].to(dt)
    lr_shape = projectors.lowrank_shape(spec.side, spec.m, spec.n, spec.rank)
    R = randn(*lr_shape)
    M = 0.1 * randn(*lr_shape)
    V = 0.01 * torch.rand(*lr_shape, generator=gen, device=dev)
    return dict(G=G, W0=W0, P=P, R=R, M=M, V=V)


def _param(inputs: dict) -> torch.nn.Parameter:
    p = torch.nn.Parameter(inputs["W0"].clone())
    p.grad = inputs["G"]  # no optimizer here modifies the gradient
    return p


def _lowrank_group(p, rank: int, **extra) -> list:
    group = {"params": [p], "rank": rank, "update_proj_gap": NEVER, "scale": SCALE, "proj_type": "std"}
    group.update(extra)
    return [group]


# -- Triton launchers ----------------------------------------------------------------------------
def _kernel_module(name: str):
    try:
        return importlib.import_module(f"subspace_ops.kernels.{name}")
    except ImportError as exc:  # kernels not written yet, or no Triton
        raise Skip(f"subspace_ops.kernels.{name} not importable ({exc})") from None


# -- factories ------------------------------------------------------------------------------------
def make_bench(op: str, provider: str, spec: Spec, inputs: dict) -> Bench:
    """A callable that runs ``op`` once with ``provider``; raises Skip where it cannot run."""
    if op == "step":
        return _make_step(provider, spec, inputs)
    if op == "refresh":
        return _make_refresh(provider, spec, inputs)
    if op == "snsm_step":
        return _make_snsm_step(provider, spec, inputs)
    if provider == "reference":
        return _make_reference_op(op, spec, inputs)
    if provider == "triton":
        return _make_triton_op(op, spec, inputs)
    raise Skip(f"unknown provider {provider!r} for {op}")


def _make_step(provider: str, spec: Spec, inputs: dict) -> Bench:
    p = _param(inputs)
    note = ""
    if provider in ("reference", "triton"):
        if provider == "triton" and spec.device != "cuda":
            raise Skip("GaLoreAdamW(backend='triton') is benchmarked on CUDA only")
        try:
            opt = GaLoreAdamW(_lowrank_group(p, spec.rank), lr=LR, betas=BETAS, eps=EPS, backend=provider)
            opt.step()  # computes the basis: the timed steps never refresh
        except (NotImplementedError, ImportError, RuntimeError, ValueError) as exc:
            raise Skip(f"GaLoreAdamW(backend={provider!r}) failed: {type(exc).__name__}: {exc}") from None
    elif provider == "galore_torch":
        try:
            gt = import_galore_torch()
        except ImportError as exc:
            raise Skip(str(exc)) from None
        opt = gt.GaLoreAdamW(_lowrank_group(p, spec.rank), lr=LR, betas=BETAS, eps=EPS, no_deprecation_warning=True)
        opt.step()
    elif provider in TORCH_ADAMW:
        flag = "fused" if provider == "torch_adamw_fused" else "foreach"
        try:
            opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, **{flag: True})
            opt.step()
        except RuntimeError as exc:
            raise Skip(f"torch.optim.AdamW({flag}=True) unsupported here: {exc}") from None
        note = "full-rank AdamW, moments in param dtype"
    else:
        raise Skip(f"unknown step provider {provider!r}")
    return Bench(opt.step, note, [p, opt])


def _make_refresh(provider: str, spec: Spec, inputs: dict) -> Bench:
    G, rank, side = inputs["G"], spec.r, spec.side
    if provider == "svd":
        return Bench(lambda: projectors.svd_basis(G, rank, side), "torch.linalg.svd(G.float()) as galore-torch")
    if provider == "randomized":
        return Bench(lambda: projectors.randomized_basis(G, rank, side), "oversample 8, 1 power iteration")
    previous = projectors.randomized_basis(G, rank, side, seed=1)
    if provider == "randomized_warm":
        fn = lambda: projectors.randomized_basis(G, rank, side, previous=previous)  # noqa: E731
        return Bench(fn, "warm-started from a previous basis", [previous])
    if provider == "online_pca_step":
        update = getattr(projectors, "online_pca_update", None)
        if update is None:
            raise Skip("projectors.online_pca_update not found")
        P = inputs["P"]
        M = torch.zeros(P.shape, dtype=torch.float32, device=P.device)
        V = torch.zeros_like(M)
        fn = lambda: update(P, G, M, V, 1, LR / 200, side)  # noqa: E731
        return Bench(fn, "projectors.online_pca_update: one basis step (taken every optimizer step)", [M, V])
    if provider in projectors.PROJECTORS:
        fn = lambda: projectors.compute_basis(G, rank, side, provider, previous=previous)  # noqa: E731
        note = "projectors.compute_basis"
        if provider in getattr(projectors, "SEEDED_PROJECTORS", ()):
            note += " (regenerated from its seed at every optimizer step)"
        return Bench(fn, note, [previous])
    raise Skip(f"unknown refresh provider {provider!r}")


def _make_snsm_step(provider: str, spec: Spec, inputs: dict) -> Bench:
    """One AdamSNSM matrix update (subspace_ops.ops.snsm_matrix_step_) on the given backend."""
    if provider == "triton" and spec.device != "cuda":
        raise Skip("Triton kernels are benchmarked on CUDA only")
    W, M = inputs["W0"].clone(), inputs["M"].clone()
    V = 0.01 * torch.rand(reference.subset_norm_shape(spec.m, spec.n), device=spec.device)
    G, P = inputs["G"], inputs["P"]
    h = dict(step_size=reference.adam_step_size(LR, BETAS[0], BETAS[1], 10), lr=LR, beta1=BETAS[0],
             beta2=BETAS[1], eps=EPS, weight_decay=0.0)

    def fn():
        ops.snsm_matrix_step_(W, G, P, M, V, backend=provider, side=spec.side, **h)

    return Bench(fn, f"ops.snsm_matrix_step_(backend={provider!r})", [W, M, V])


def _hyper() -> dict:
    return dict(
        step_size=reference.adam_step_size(LR, BETAS[0], BETAS[1], 10), scale=SCALE, lr=LR, weight_decay=0.0
    )


def _make_reference_op(op: str, spec: Spec, inputs: dict) -> Bench:
    G, P, side = inputs["G"], inputs["P"], spec.side
    if op == "project":
        # what the reference step runs: fp32 math, fp32 R
        return Bench(lambda: reference.project_any(G, P, side), "reference.project_any")
    if op == "project_adam":
        M, V = inputs["M"].clone(), inputs["V"].clone()

        def fn():
            return reference.lowrank_adam_(reference.project_any(G, P, side), M, V, BETAS[0], BETAS[1], EPS)

        return Bench(fn, "lowrank_adam_(project_any(G))", [M, V])
    if op == "back_project_update":
        W, N, h = inputs["W0"].clone(), inputs["R"], _hyper()

        def fn():
            reference.apply_update_(W, reference.back_project_any(N, P, side), **h)

        return Bench(fn, "apply_update_(back_project_any(N))", [W])
    if op == "lowrank_adam":
        R, M, V = inputs["R"], inputs["M"].clone(), inputs["V"].clone()
        return Bench(lambda: reference.lowrank_adam_(R, M, V, BETAS[0], BETAS[1], EPS), "", [M, V])
    raise Skip(f"unknown op {op!r}")


def _make_triton_op(op: str, spec: Spec, inputs: dict) -> Bench:
    """The launchers GaLoreAdamW(backend='triton') composes (subspace_ops.ops.galore_matrix_step_)."""
    if spec.device != "cuda":
        raise Skip("Triton kernels are benchmarked on CUDA only")
    G, P, R, side, h = inputs["G"], inputs["P"], inputs["R"], spec.side, _hyper()
    W, M, V = inputs["W0"].clone(), inputs["M"].clone(), inputs["V"].clone()
    b1, b2 = BETAS
    if op == "project":
        k = _kernel_module("project")
        fn = lambda: k.project(G, P, side, out_dtype=torch.float32)  # noqa: E731
        return Bench(fn, "kernels.project.project(out_dtype=fp32)")
    if op == "project_adam":
        k = _kernel_module("project")
        fn = lambda: k.project_adam_(G, P, side, M, V, beta1=b1, beta2=b2, eps=EPS)  # noqa: E731
        return Bench(fn, "kernels.project.project_adam_", [M, V])
    if op == "back_project_update":
        k = _kernel_module("backproject")
        fn = lambda: k.back_project_update_(W, R, P, side, dot_dtype=P.dtype, **h)  # noqa: E731
        return Bench(fn, "kernels.backproject.back_project_update_(dot_dtype=basis dtype)", [W])
    if op == "lowrank_adam":
        k = _kernel_module("lowrank_adam")
        fn = lambda: k.lowrank_adam_(R, M, V, beta1=b1, beta2=b2, eps=EPS)  # noqa: E731
        return Bench(fn, "kernels.lowrank_adam.lowrank_adam_", [M, V])
    raise Skip(f"unknown op {op!r}")
