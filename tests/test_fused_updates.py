"""The fused (Triton) weight updates against the reference, compared as updates.

Every weight check here is ``ΔW = W_after − W_before`` against the reference's ``ΔW_ref`` from the
same ``W_before`` (``_numerics.delta_w_close``): relative to ``‖ΔW_ref‖``, plus one rounding of W.
The hyperparameters make each term of the update visible, so that a kernel that gets one term wrong
fails here, for 16-bit weights too:

* weight decay ``lr·wd = 0.05`` (6 to 12 bf16 ulps of W), and a step of several ulps;
* ``eps = 1e-3`` with gradients of about 1e-2, so that ``sqrt(V)`` is of the order of eps: dropping
  eps or scaling it changes the direction by tens of percent;
* ``β2 = 0.99`` against ``β1 = 0.9``, non-zero starting moments or two steps: swapping β2 for β1,
  ``1−β2`` for ``1−β1``, or moving β2 by 1e-3 changes the second moment far beyond 1e-5.

Three levels: each launcher of ``subspace_ops.kernels``; the ops (``ops.galore_matrix_step_``,
``snsm_matrix_step_``, ``adam_step_``) with ``backend="triton"`` against ``backend="reference"``;
and whole ``GaLoreAdamW`` / ``AdamSNSM`` runs, Triton against reference, weights re-synced before
every step so each step's ΔW is compared from one ``W_before``. The optimizer tests treat the
optimizer as a black box (whatever kernels it launches, per matrix or grouped over same-shape
matrices) and only forbid the reference step functions while the Triton optimizer steps; their
models hold several matrices of each shape, and the reference optimizer steps one parameter at a
time, so a wrong grouping (shared step counts or settings) fails too. ``tests/mutation_check.py``
proves that these tests fail on broken kernels.
"""
import pytest
import torch

from subspace_ops import AdamSNSM, GaLoreAdamW, kernels, ops, reference

pytest.importorskip("triton")

from subspace_ops.kernels import backproject as kb  # noqa: E402
from subspace_ops.kernels import lowrank_adam as ka  # noqa: E402
from subspace_ops.kernels import project as kp  # noqa: E402
from _numerics import assert_delta_w_close, forbid_reference_and_count_launches, rel_err, ulps  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIDES = ["left", "right"]
needs_interpreter = pytest.mark.skipif(
    not (kernels.HAS_TRITON and kernels.interpreting()), reason="Triton on CPU needs TRITON_INTERPRET=1"
)
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]

B1, B2, EPS = 0.9, 0.99, 1e-3
LR, WD = 0.05, 1.0  # lr·wd = 0.05
W_SCALE, G_SCALE = 0.1, 1e-2
MIN_ULPS = 4.0  # a term under test moves a 16-bit W by at least this many ulps (median)
STATE_RTOL = 1e-5  # fp32 moments of the same inputs: fp32 accuracy whatever W's dtype


def make(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)


def orthonormal(rows, r, dtype, device, seed):
    return torch.linalg.qr(make((rows, r), seed=seed))[0].to(dtype=dtype, device=device)


def lowrank_shape(side, m, n, r):
    return {"left": (r, n), "right": (m, r), "full": (r, r)}[side]


def moments(shape, device, seed):
    """Adam moments of a run that has seen gradients of ~G_SCALE: sqrt(V) of the order of EPS."""
    M = make(shape, device=device, seed=seed, scale=G_SCALE)
    V = make(shape, device=device, seed=seed + 1, scale=3 * EPS).square()
    return M, V


def assert_states_close(pairs, where):
    for name, (out, ref) in pairs.items():
        assert out.dtype == torch.float32, f"{where}: {name} is {out.dtype}"
        assert rel_err(out, ref) <= STATE_RTOL, f"{where}: {name} rel err {rel_err(out, ref):.3e}"


def assert_terms_visible(W_old, step_term, lr, weight_decay, dtype, where):
    """The test can see both terms of ``W ← (W − step_term)·(1 − lr·wd)``: each moves W by
    several ulps of ``dtype``."""
    if dtype == torch.float32:
        return
    W1 = W_old.double() - step_term.double()
    assert ulps(step_term, W_old, dtype) >= MIN_ULPS, f"{where}: the step is too small to test"
    assert ulps(lr * weight_decay * W1, W_old, dtype) >= MIN_ULPS, f"{where}: the decay is too small to test"


def assert_sensitive(run, hyper, where, threshold=1e-2):
    """``run(**hyper)`` (a reference computation returning a tensor) changes by more than
    ``threshold`` relative when eps or β2 is wrong the ways a kernel could get it wrong."""
    base = run(**hyper)
    b1, b2, eps = hyper["beta1"], hyper["beta2"], hyper["eps"]
    for what, change in {
        "eps dropped": dict(eps=0.0), "eps x10": dict(eps=10 * eps),
        "beta2 -> beta1": dict(beta2=b1), "beta2 - 1e-3": dict(beta2=b2 - 1e-3),
    }.items():
        assert rel_err(run(**{**hyper, **change}), base) > threshold, f"{where}: blind to {what}"


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
def test_back_project_update_delta_w(side, dtype, device):
    m, n, r = 37, 53, 5
    W = make((m, n), dtype, device, 1, W_SCALE)
    N = make(lowrank_shape(side, m, n, r), device=device, seed=2, scale=0.5)  # an Adam direction
    P = orthonormal(m if side == "left" else n, r, dtype, device, 3)
    hyper = dict(step_size=LR, scale=0.5, lr=LR, weight_decay=WD)
    W_old, W_ref, W_rounded = W.clone(), W.clone(), W.clone()
    kb.back_project_update_(W, N, P, side, dot_dtype=P.dtype, **hyper)
    back = reference.back_project_any(N, P, side)
    reference.apply_update_(W_ref, back, **hyper)
    where = f"back_project_update_ {side} {dtype}"
    assert_terms_visible(W_old, LR * 0.5 * back, LR, WD, dtype, where)
    assert_delta_w_close(W, W_old, W_ref, where=where)
    # The documented math exactly: N rounded once to the basis dtype for the product.
    reference.apply_update_(W_rounded, reference.back_project_any(N.to(dtype), P, side), **hyper)
    assert_delta_w_close(W, W_old, W_rounded, rtol=1e-5, where=where + " (N rounded to the basis dtype)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
def test_project_adam_epilogue_eps_and_beta2(side, dtype, device):
    m, n, r = 37, 53, 5
    G = make((m, n), dtype, device, 1, G_SCALE)
    P = orthonormal(m if side == "left" else n, r, dtype, device, 2)
    M, V = moments(lowrank_shape(side, m, n, r), device, 3)
    M0, V0 = M.clone(), V.clone()
    hyper = dict(beta1=B1, beta2=B2, eps=EPS)
    N = kp.project_adam_(G, P, side, M, V, **hyper)
    R = reference.project_any(G, P, side)
    M_ref, V_ref = M0.clone(), V0.clone()
    N_ref = reference.lowrank_adam_(R, M_ref, V_ref, **hyper)
    where = f"project_adam_ {side} {dtype}"
    assert_sensitive(lambda **h: reference.lowrank_adam_(R, M0.clone(), V0.clone(), **h), hyper, where)
    assert_states_close({"M": (M, M_ref), "V": (V, V_ref), "N": (N, N_ref)}, where)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_adam_eps_and_beta2(dtype, device):
    R = make((37, 53), dtype, device, 1, G_SCALE)
    M, V = moments((37, 53), device, 3)
    M0, V0 = M.clone(), V.clone()
    hyper = dict(beta1=B1, beta2=B2, eps=EPS)
    N = ka.lowrank_adam_(R, M, V, **hyper)
    M_ref, V_ref = M0.clone(), V0.clone()
    N_ref = reference.lowrank_adam_(R, M_ref, V_ref, **hyper)
    where = f"lowrank_adam_ {dtype}"
    assert_sensitive(lambda **h: reference.lowrank_adam_(R, M0.clone(), V0.clone(), **h), hyper, where)
    assert_states_close({"M": (M, M_ref), "V": (V, V_ref), "N": (N, N_ref)}, where)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 53), (1100,)], ids=["matrix", "vector"])
def test_adamw_delta_w(shape, dtype, device):
    W = make(shape, dtype, device, 1, W_SCALE)
    G = make(shape, dtype, device, 2, G_SCALE)
    M, V = moments(shape, device, 3)
    M0, V0, W_old = M.clone(), V.clone(), W.clone()
    hyper = dict(step_size=0.02, lr=LR, beta1=B1, beta2=B2, eps=EPS, weight_decay=WD)
    ka.adamw_(W, G, M, V, **hyper)
    W_ref, M_ref, V_ref = W_old.clone(), M0.clone(), V0.clone()
    reference.adam_step_(W_ref, G, M_ref, V_ref, **hyper)
    where = f"adamw_ {shape} {dtype}"
    N_ref = M_ref / (V_ref.sqrt() + EPS)
    assert_terms_visible(W_old, 0.02 * N_ref, LR, WD, dtype, where)

    def ref_delta(**h):
        W2 = W_old.clone()
        reference.adam_step_(W2, G, M0.clone(), V0.clone(), **{**hyper, **h})
        return W2.double() - W_old.double()

    assert_sensitive(ref_delta, dict(beta1=B1, beta2=B2, eps=EPS), where)
    assert_states_close({"M": (M, M_ref), "V": (V, V_ref)}, where)
    assert_delta_w_close(W, W_old, W_ref, where=where)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_back_project_snsm_update_delta_w(axis, side, dtype, device):
    m, n, r = 37, 53, 5
    W = make((m, n), dtype, device, 1, W_SCALE)
    G = make((m, n), dtype, device, 2, G_SCALE)
    D = make(lowrank_shape(side, m, n, r), device=device, seed=3, scale=G_SCALE)
    P = orthonormal(m if side == "left" else n, r, dtype, device, 4)
    V_shape = (m, 1) if axis == "rows" else (1, n)
    V = make(V_shape, device=device, seed=5, scale=3 * EPS).square()  # sqrt(V) of the order of eps
    step = 2e-3
    hyper = dict(step_size=step, lr=LR, weight_decay=WD)
    W_old = W.clone()
    kb.back_project_snsm_update_(W, G, V, D, P, side, dot_dtype=P.dtype, eps=EPS, **hyper)

    def direction(D, eps=EPS):
        return (reference.back_project_any(D, P, side) + G.float()) / (V.sqrt() + eps)

    def ref_after(D, eps=EPS):
        W2 = W_old.clone()
        reference.apply_update_(W2, direction(D, eps), step, 1.0, LR, WD)
        return W2

    where = f"back_project_snsm_update_ {side} V {axis} {dtype}"
    assert_terms_visible(W_old, step * direction(D), LR, WD, dtype, where)
    for eps in (0.0, 10 * EPS):
        assert rel_err(direction(D, eps), direction(D)) > 1e-2, f"{where}: blind to eps={eps}"
    assert_delta_w_close(W, W_old, ref_after(D), where=where)
    assert_delta_w_close(W, W_old, ref_after(D.to(dtype)), rtol=1e-5, where=where + " (D rounded to the basis dtype)")


# ---------------------------------------------------------------------------------------------------
# ops: backend="triton" against backend="reference", two steps from the same weights and states
# ---------------------------------------------------------------------------------------------------
def _bases(m, n, r, side, dtype, device):
    Pl, Pr = orthonormal(m, r, dtype, device, 11), orthonormal(n, r, dtype, device, 12)
    return {"left": Pl, "right": Pr, "full": (Pl, Pr)}[side]


def _two_steps(step_fn, W, G_of, states, hyper_of, dtype, where):
    """Two steps of ``step_fn(W, G, *states, backend=..., **hyper)`` on both backends; W re-synced,
    ΔW and every state compared after each."""
    states_ref = [s.clone() for s in states]
    for t in (1, 2):
        G, hyper = G_of(t), hyper_of(t)
        W_before = W.clone()
        W_ref = W.clone()
        step_fn(W, G, *states, backend="triton", **hyper)
        step_fn(W_ref, G, *states_ref, backend="reference", **hyper)
        at = f"{where}, step {t}"
        assert_states_close({f"state {i}": pair for i, pair in enumerate(zip(states, states_ref))}, at)
        assert_delta_w_close(W, W_before, W_ref, dtype, where=at)
        W.copy_(W_ref)


def _adam_hyper(t, **extra):
    step_size = reference.adam_step_size(LR, B1, B2, t)
    return dict(step_size=step_size, lr=LR, beta1=B1, beta2=B2, eps=EPS, weight_decay=WD, **extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_galore_matrix_step_delta_w(side, dtype, device):
    m, n, r = 37, 53, 5
    W = make((m, n), dtype, device, 1, W_SCALE)
    basis = _bases(m, n, r, side, dtype, device)
    shape = lowrank_shape(side, m, n, r)
    M, V = torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def step(W, G, M, V, **kw):
        ops.galore_matrix_step_(W, G, basis, M, V, **kw)

    _two_steps(step, W, lambda t: make((m, n), dtype, device, 20 + t, G_SCALE), [M, V],
               lambda t: _adam_hyper(t, side=side, scale=0.5), dtype, f"galore_matrix_step_ {side} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,side", [(37, 53, "left"), (37, 53, "right"), (53, 37, "left"), (53, 37, "right"),
                                      (37, 53, "full")])
def test_snsm_matrix_step_delta_w(m, n, side, dtype, device):
    """Wide and tall with both sides: V's sum fused into the projection ("std": left on wide,
    right on tall) and the standalone Subset-Norm pass (the other side, and "full")."""
    r = 5
    W = make((m, n), dtype, device, 1, W_SCALE)
    basis = _bases(m, n, r, side, dtype, device)
    M = torch.zeros(lowrank_shape(side, m, n, r), device=device)
    V = torch.zeros(reference.subset_norm_shape(m, n), device=device)

    def step(W, G, M, V, **kw):
        ops.snsm_matrix_step_(W, G, basis, M, V, **kw)

    # SNSM's step lr·c_t·G/(sqrt(V) + eps) is about lr per element (V sums n squares, with 1−β2 = 0.01):
    # an LR of 0.01 keeps it about a tenth of W.
    _two_steps(step, W, lambda t: make((m, n), dtype, device, 20 + t, G_SCALE), [M, V],
               lambda t: dict(_adam_hyper(t, side=side), step_size=reference.adam_step_size(0.01, B1, B2, t)),
               dtype, f"snsm_matrix_step_ {m}x{n} {side} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_step_delta_w(dtype, device):
    shape = (37, 53)
    W = make(shape, dtype, device, 1, W_SCALE)
    M, V = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    _two_steps(ops.adam_step_, W, lambda t: make(shape, dtype, device, 20 + t, G_SCALE), [M, V],
               lambda t: dict(_adam_hyper(t), step_size=reference.adam_step_size(0.02, B1, B2, t)),
               dtype, f"adam_step_ {dtype}")


# ---------------------------------------------------------------------------------------------------
# whole optimizers: Triton against reference, per-step ΔW from re-synced weights
# ---------------------------------------------------------------------------------------------------
STEPS = 3  # refreshes at steps 0 and 2 (update_proj_gap 2): moments kept (GaLore) or reset (SNSM)
OPT_HYPER = dict(betas=(B1, B2), eps=EPS)
# The step functions of the reference: none may run while the Triton optimizer steps.
REFERENCE_STEPS = ("galore_matrix_step_", "snsm_matrix_step_", "adam_step_", "lowrank_adam_", "apply_update_",
                   "back_project_any")


def _params(shapes, dtype, device):
    return {k: [make(s, dtype, device, 100 * j + i, W_SCALE).requires_grad_() for i, s in enumerate(v)]
            for j, (k, v) in enumerate(shapes.items())}


def _galore_model(dtype, device):
    """Two matrices of each shape (so that grouped launches group them): wide (left basis), tall
    (right), "full"; 1-D biases take AdamW, two in the low-rank group and one of the same shape in a
    plain group with another weight decay (a grouped AdamW launch must keep the groups' settings)."""
    params = _params({"wide": [(37, 53)] * 2, "tall": [(53, 37)] * 2, "full": [(20, 16)] * 2,
                      "bias": [(37,)] * 3}, dtype, device)
    return [
        {"params": params["wide"] + params["tall"] + params["bias"][:2], "rank": 5, "update_proj_gap": 2,
         "scale": 0.5},
        # Scale 1: Pl N Prᵀ of a 20 x 16 matrix at rank 3 is smaller than a one-sided back-projection.
        {"params": params["full"], "rank": 3, "update_proj_gap": 2, "scale": 1.0, "proj_type": "full"},
        {"params": params["bias"][2:], "weight_decay": 2 * WD},
    ]


def _snsm_model(dtype, device):
    """wide (left, V (1, n) summed in the projection), tall (right, V (m, 1) in the projection),
    reverse_std (wide's shape, right side) and full (the standalone Subset-Norm pass); 1-D biases
    (AdamW), one in a plain group with another weight decay."""
    params = _params({"wide": [(37, 53)] * 2, "tall": [(53, 37)] * 2, "reverse": [(37, 53)] * 2,
                      "full": [(20, 16)] * 2, "bias": [(37,)] * 3}, dtype, device)
    return [
        {"params": params["wide"] + params["tall"] + params["bias"][:2], "rank": 5, "update_proj_gap": 2},
        {"params": params["reverse"], "rank": 5, "update_proj_gap": 2, "proj_type": "reverse_std"},
        {"params": params["full"], "rank": 3, "update_proj_gap": 2, "proj_type": "full"},
        {"params": params["bias"][2:], "weight_decay": 10.0},
    ]


SKIP = (1, 1)  # (step, parameter): no gradient then, so two same-shape matrices differ in step count


def _run_per_step(make_groups, make_opt, dtype, device, monkeypatch, name):
    """``STEPS`` steps of the Triton and the reference optimizer on the same gradients; after each,
    every parameter's ΔW (from the same weights: re-synced after every step) and every state.

    The reference optimizer steps one parameter at a time (only its gradient set), so nothing is
    batched there: the comparison also checks how the Triton optimizer batches parameters into
    launches (which tensors share one, at which step count and hyperparameters), where a reference
    optimizer batching the same way would make the same mistake."""
    opt_t = make_opt(make_groups(dtype, device), "triton")
    opt_r = make_opt(make_groups(dtype, device), "reference")
    params_t = [p for g in opt_t.param_groups for p in g["params"]]
    params_r = [(p, g) for g in opt_r.param_groups for p in g["params"]]
    seen = 0.0
    for step in range(STEPS):
        for i, pt in enumerate(params_t):
            pt.grad = None if (step, i) == SKIP else make(pt.shape, dtype, device, 1000 * step + i, G_SCALE)
        before = [p.detach().clone() for p, _ in params_r]
        with monkeypatch.context() as mp:
            forbid_reference_and_count_launches(mp, reference, REFERENCE_STEPS, ())
            opt_t.step()
        for pt, (pr, _) in zip(params_t, params_r):
            if pt.grad is not None:
                for q, _ in params_r:
                    q.grad = pt.grad.clone() if q is pr else None
                opt_r.step()
        for i, (pt, (pr, group), b) in enumerate(zip(params_t, params_r, before)):
            where = f"{name} {dtype}, step {step}, param {i} {tuple(pt.shape)}"
            assert_delta_w_close(pt, b, pr, where=where)
            st, sr = opt_t.state[pt], opt_r.state[pr]
            assert st.keys() == sr.keys(), where
            assert_states_close({k: (st[k], sr[k]) for k in ("exp_avg", "exp_avg_sq")}, where)
            for key in sr.keys() - {"exp_avg", "exp_avg_sq"}:
                assert torch.equal(st[key], sr[key]), f"{where}, state {key}"  # steps, offsets, bases
            if dtype != torch.float32 and (step, i) != SKIP:
                # The decay's share of this step, lr·wd·W_after / (1 − lr·wd), and the rest.
                lr_wd = group["lr"] * group["weight_decay"]
                decay = lr_wd * pr.detach().double() / (1.0 - lr_wd)
                seen = max(seen, ulps(decay, b, dtype))
                assert ulps(pr.detach().double() - b.double() + decay, b, dtype) >= MIN_ULPS, f"{where}: step too small"
        with torch.no_grad():  # the next step starts from the same weights on both sides
            for pt, (pr, _) in zip(params_t, params_r):
                pt.copy_(pr)
    assert dtype == torch.float32 or seen >= MIN_ULPS, "the decay is too small to test"


# capturable=True (a tensor lr, step counts on the device) takes the kernels' other way to the update
# scalars: alpha and decay formed in the kernel from the lr and step count in memory.
OPT_CASES = [pytest.param(torch.float32, False, id="fp32"), pytest.param(torch.bfloat16, False, id="bf16"),
             pytest.param(torch.bfloat16, True, id="bf16-capturable")]


def _optimizer(cls, lr, weight_decay, capturable):
    def make_opt(groups, backend):
        if capturable and backend == "triton":
            return cls(groups, lr=torch.tensor(lr), weight_decay=weight_decay, backend=backend, capturable=True,
                       **OPT_HYPER)
        return cls(groups, lr=lr, weight_decay=weight_decay, backend=backend, **OPT_HYPER)

    return make_opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,capturable", OPT_CASES)
def test_galore_adamw_per_step_delta_w(dtype, capturable, device, monkeypatch):
    _run_per_step(_galore_model, _optimizer(GaLoreAdamW, LR, WD, capturable), dtype, device, monkeypatch,
                  f"GaLoreAdamW{' capturable' if capturable else ''}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,capturable", OPT_CASES)
def test_adam_snsm_per_step_delta_w(dtype, capturable, device, monkeypatch):
    # SNSM's step is about lr per element (see test_snsm_matrix_step_delta_w): lr = 0.01, and
    # wd = 5 for the same lr·wd = 0.05.
    _run_per_step(_snsm_model, _optimizer(AdamSNSM, 0.01, 5.0, capturable), dtype, device, monkeypatch,
                  f"AdamSNSM{' capturable' if capturable else ''}")
