"""subspace_ops.ops: backend choice, the project/back_project custom ops (values, autograd, fake
kernels, torch.compile), the optimizer steps on the Triton backend (they must really launch the
kernels) and whole GaLoreAdamW trajectories, Triton vs reference.

Without CUDA the Triton backend runs in the CPU interpreter (conftest.py sets TRITON_INTERPRET=1);
the custom ops pick it up from SUBSPACE_OPS_BACKEND, which the tests set with monkeypatch.
"""
import os
import subprocess
import sys

import pytest
import torch

import subspace_ops
from subspace_ops import GaLoreAdamW, kernels, ops, reference
from _numerics import TOL, assert_delta_w_close, forbid_reference_and_count_launches, rel_err

SIDES = ["left", "right"]
needs_interpreter = pytest.mark.skipif(
    not (kernels.HAS_TRITON and kernels.interpreting()), reason="Triton on CPU needs TRITON_INTERPRET=1"
)
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]


def make(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)


def operands(op, side, m=23, n=17, r=5, dtype=torch.float32, device="cpu"):
    """(x, P) for project (x = G) or back_project (x = R)."""
    rows = m if side == "left" else n
    P = make((rows, r), dtype, device, 1, rows ** -0.5)
    if op == "project":
        return make((m, n), dtype, device, 2), P
    return make((r, n) if side == "left" else (m, r), dtype, device, 3), P


OPS = {"project": subspace_ops.project, "back_project": subspace_ops.back_project}
REF = {"project": reference.project, "back_project": reference.back_project}


# ---------------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------------
def test_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    x = torch.zeros(2)
    assert ops.resolve_backend(None, x) == "reference"
    assert ops.resolve_backend("auto", x) == "reference"
    assert ops.resolve_backend("reference", x) == "reference"
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "")  # empty = unset
    assert ops.resolve_backend(None, x) == "reference"


@needs_interpreter
def test_env_var_is_read_at_call_time(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "triton")
    assert ops.resolve_backend(None, x) == "triton"
    assert ops.resolve_backend("reference", x) == "reference"  # an explicit backend wins
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "reference")
    assert ops.resolve_backend(None, x) == "reference"
    assert ops.resolve_backend("triton", x) == "triton"


@pytest.mark.gpu
def test_auto_is_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    assert ops.resolve_backend(None, torch.zeros(2, device="cuda")) == "triton"
    assert ops.resolve_backend(None, torch.zeros(2, device="cuda", dtype=torch.float64)) == "reference"
    assert ops.resolve_backend(None, torch.zeros(2)) == "reference"


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        ops.resolve_backend("cuda", torch.zeros(2))
    with pytest.raises(ValueError, match="backend must be None or one of"):
        ops.validate_backend("fast")


def test_bad_env_var_names_the_variable(monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SUBSPACE_OPS_BACKEND"):
        ops.resolve_backend(None, torch.zeros(2))
    with pytest.raises(ValueError, match="SUBSPACE_OPS_BACKEND"):
        subspace_ops.project(*operands("project", "left"), "left")


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.zeros(2))
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        subspace_ops.back_project(*operands("back_project", "right"), "right")


def test_triton_on_cpu_without_interpreter_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SUBSPACE_OPS_BACKEND")}
    code = (
        "import torch, subspace_ops\n"
        "try:\n"
        "    subspace_ops.ops.resolve_backend('triton', torch.zeros(2))\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if kernels.HAS_TRITON:
        assert "ValueError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
    else:
        assert "needs the triton package" in out.stdout


def test_triton_needs_triton_installed(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="needs the triton package"):
        ops.resolve_backend("triton", torch.zeros(2))
    assert ops.resolve_backend("auto", torch.zeros(2)) == "reference"


def test_triton_rejects_other_devices_and_dtypes(monkeypatch):
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    with pytest.raises(ValueError, match="supports CUDA tensors"):
        ops.resolve_backend("triton", torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="supports dtypes"):
        ops.resolve_backend("triton", torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# custom ops: values, bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_ops_on_triton_match_reference(op, side, dtype, device, monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "triton")
    x, P = operands(op, side, 37, 29, 6, dtype, device)
    out = OPS[op](x, P, side)
    ref = REF[op](x.float(), P.float(), side)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_ops_on_reference_are_the_reference(op, side, monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "reference")
    x, P = operands(op, side)
    assert torch.equal(OPS[op](x, P, side), REF[op](x, P, side))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: subspace_ops.project(torch.zeros(4, 3), torch.zeros(4, 2), "full"), "side must be 'left' or 'right'"),
        (lambda: subspace_ops.project(torch.zeros(2, 4, 3), torch.zeros(4, 2), "left"), "must be 2-D"),
        (lambda: subspace_ops.project(torch.zeros(4, 3), torch.zeros(4, 2).double(), "left"), "one dtype"),
        (lambda: subspace_ops.project(torch.zeros(4, 3), torch.zeros(4, 2, device="meta"), "left"), "one device"),
        (lambda: subspace_ops.project(torch.zeros(4, 3), torch.zeros(4, 2), "right"), r"needs P of shape \(3, r\)"),
        (lambda: subspace_ops.back_project(torch.zeros(2, 3), torch.zeros(4, 2), "up"), "side must be 'left' or 'right'"),
        (lambda: subspace_ops.back_project(torch.zeros(2), torch.zeros(4, 2), "left"), "must be 2-D"),
        (lambda: subspace_ops.back_project(torch.zeros(2, 3).half(), torch.zeros(4, 2), "left"), "one dtype"),
        (lambda: subspace_ops.back_project(torch.zeros(3, 3), torch.zeros(4, 2), "left"), "needs P with 3 columns"),
    ],
)
def test_ops_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# custom ops: autograd, fake kernels, torch.compile
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck_float64_reference(op, side, monkeypatch):
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    x, P = operands(op, side, 7, 5, 3, torch.float64)
    x.requires_grad_()
    P.requires_grad_()
    fn = lambda a, b: OPS[op](a, b, side)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, P))
    assert torch.autograd.gradgradcheck(fn, (x, P))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_triton_grads_match_analytic(op, side, device, monkeypatch):
    """Backward through the Triton kernels vs the closed forms: project left R = PᵀG gives
    dG = P dR, dP = G dRᵀ; right R = GP gives dG = dR Pᵀ, dP = Gᵀ dR; back_project left B = PR gives
    dR = Pᵀ dB, dP = dB Rᵀ; right B = RPᵀ gives dR = dB P, dP = dBᵀ R."""
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "triton")
    x, P = operands(op, side, 29, 19, 6, torch.float32, device)
    x.requires_grad_()
    P.requires_grad_()
    out = OPS[op](x, P, side)
    dout = make(out.shape, device=device, seed=9)
    out.backward(dout)
    xd, Pd, dd = x.detach().double(), P.detach().double(), dout.double()
    if op == "project":
        dx = Pd @ dd if side == "left" else dd @ Pd.mT
        dP = xd @ dd.mT if side == "left" else xd.mT @ dd
    else:
        dx = Pd.mT @ dd if side == "left" else dd @ Pd
        dP = dd @ xd.mT if side == "left" else dd.mT @ xd
    assert rel_err(x.grad, dx) <= 1e-5
    assert rel_err(P.grad, dP) <= 1e-5


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("op", ["project", "back_project"])
def test_opcheck(op, side, monkeypatch):
    """Schema, fake kernel, autograd registration and dispatch of the custom ops (reference path)."""
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    x, P = operands(op, side)
    overload = getattr(torch.ops.subspace_ops, op).default
    torch.library.opcheck(overload, (x.requires_grad_(), P.requires_grad_(), side))


def _pipeline(G, Pl, Pr):
    R = subspace_ops.project(G, Pl, "left")
    B = subspace_ops.back_project(R, Pl, "left")
    S = subspace_ops.project(B, Pr, "right")
    return (subspace_ops.back_project(S, Pr, "right") * G).sum() + S.square().sum()


def _check_compiled(backend, device):
    torch._dynamo.reset()
    G = make((23, 17), device=device, seed=1).requires_grad_()
    Pl = make((23, 4), device=device, seed=2, scale=0.3).requires_grad_()
    Pr = make((17, 5), device=device, seed=3, scale=0.3).requires_grad_()
    eager = _pipeline(G, Pl, Pr)
    eager_grads = torch.autograd.grad(eager, (G, Pl, Pr))
    compiled = torch.compile(_pipeline, fullgraph=True, backend=backend)
    out = compiled(G, Pl, Pr)
    grads = torch.autograd.grad(out, (G, Pl, Pr))
    assert rel_err(out, eager) <= 1e-5
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) <= 1e-5


@pytest.mark.parametrize(
    "mode", ["reference", pytest.param("triton", marks=needs_interpreter)]
)
def test_compile_fullgraph_aot_eager(mode, monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", mode)
    _check_compiled("aot_eager", "cpu")


@pytest.mark.slow  # inductor compiles C++ on CPU: ~35 s cold on 2 cores, a few s with a warm cache
def test_compile_fullgraph_inductor_cpu(monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "reference")
    _check_compiled("inductor", "cpu")


@pytest.mark.gpu
def test_compile_fullgraph_inductor_cuda(monkeypatch):
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    _check_compiled("inductor", "cuda")


# ---------------------------------------------------------------------------------------------------
# optimizer steps: dispatch, bad input
# ---------------------------------------------------------------------------------------------------
def _step_args(side, dtype=torch.float32, device="cpu"):
    m, n, r = 13, 9, 3
    W, G = make((m, n), dtype, device, 1), make((m, n), dtype, device, 2)
    Pl, Pr = make((m, r), dtype, device, 3, 0.3), make((n, r), dtype, device, 4, 0.3)
    basis = {"left": Pl, "right": Pr, "full": (Pl, Pr)}[side]
    shape = {"left": (r, n), "right": (m, r), "full": (r, r)}[side]
    M, V = make(shape, device=device, seed=5), make(shape, device=device, seed=6).abs()
    hyper = dict(side=side, step_size=0.05, scale=0.25, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
    return W, G, basis, M, V, hyper


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_galore_matrix_step_triton_matches_reference(side, dtype, device):
    W, G, basis, M, V, hyper = _step_args(side, dtype, device)
    W_old, W2, M2, V2 = W.clone(), W.clone(), M.clone(), V.clone()
    ops.galore_matrix_step_(W, G, basis, M, V, backend="triton", **hyper)
    ops.galore_matrix_step_(W2, G, basis, M2, V2, backend="reference", **hyper)
    assert rel_err(M, M2) <= 1e-5 and rel_err(V, V2) <= 1e-5
    assert_delta_w_close(W, W_old, W2)


@pytest.mark.parametrize(
    "side,basis_kind,match",
    [("diagonal", "one", "side must be one of"), ("full", "one", "needs basis=\\(P_left, P_right\\)"),
     ("left", "pair", "needs one basis tensor")],
)
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_galore_matrix_step_rejects_bad_side_or_basis(side, basis_kind, match, backend):
    W, G, (Pl, Pr), M, V, hyper = _step_args("full")
    hyper["side"] = side
    basis = Pl if basis_kind == "one" else (Pl, Pr)
    with pytest.raises(ValueError, match=match):
        ops.galore_matrix_step_(W, G, basis, M, V, backend=backend, **hyper)


@needs_interpreter
def test_triton_backend_really_launches_kernels(monkeypatch):
    """With backend="triton" nothing may fall back to the reference: every reference op raises, and
    every kernel launch is counted. Same-shape matrices share one launch per stage."""
    from _launches import count_kernel_launches

    # The step's reference functions (the refresh diagnostics may still use project_any).
    forbid_reference_and_count_launches(
        monkeypatch, reference,
        ("galore_matrix_step_", "adam_step_", "lowrank_adam_", "apply_update_", "back_project_any"), (),
    )

    params, opt = _trajectory_setup(torch.float32, "cpu", "triton")
    before = [p.detach().clone() for p in params]
    with count_kernel_launches() as calls:
        for step in range(2):
            _set_grads(params, step)
            opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    # Per step: 3 one-sided matrices of 3 layouts and 1 "full" (its fp32 halves: 2 more launches),
    # each a projection and a back-projection; 2 plain params in one multi-tensor launch.
    assert calls["_project_kernel"] == 2 * 5 and calls["_back_project_kernel"] == 2 * 5
    assert calls["_adamw_kernel"] == 2 * 1

    with count_kernel_launches() as calls:
        R, M, V = make((5, 7)), torch.zeros(5, 7), torch.zeros(5, 7)
        ops.lowrank_adam_(R, M, V, backend="triton", beta1=0.9, beta2=0.99, eps=1e-6)
    assert calls == {"_lowrank_adam_kernel": 1}

    forbid_reference_and_count_launches(monkeypatch, reference, ("project", "back_project"), ())
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "triton")
    x, P = operands("project", "left")
    x.requires_grad_()
    P.requires_grad_()
    with count_kernel_launches() as calls:
        subspace_ops.back_project(subspace_ops.project(x, P, "left"), P, "left").sum().backward()
    # forward: 1 project + 1 back_project; backward: dR and dP of each op through the same kernels
    assert calls == {"_project_kernel": 1 + 3, "_back_project_kernel": 1 + 1}


def test_lowrank_adam_reference_dispatch():
    R, M, V = make((5, 7)), torch.zeros(5, 7), torch.zeros(5, 7)
    M2, V2 = M.clone(), V.clone()
    N = ops.lowrank_adam_(R, M, V, backend="reference", beta1=0.9, beta2=0.99, eps=1e-6)
    assert torch.equal(N, reference.lowrank_adam_(R, M2, V2, 0.9, 0.99, 1e-6))


# ---------------------------------------------------------------------------------------------------
# whole-optimizer trajectories: Triton vs reference, params AND every state tensor, every step
# ---------------------------------------------------------------------------------------------------
SHAPES = {"tall": (24, 17), "wide": (13, 29), "conv": (6, 3, 5), "full": (20, 16), "bias": (17,), "plain": (9, 7)}


def _trajectory_setup(dtype, device, backend):
    params = [make(s, dtype, device, i, 0.5).requires_grad_() for i, s in enumerate(SHAPES.values())]
    tall, wide, conv, full, bias, plain = params
    groups = [
        # std: tall -> right basis, wide and conv (6 x 15) -> left; the 1-D bias takes plain AdamW steps.
        {"params": [tall, wide, conv, bias], "rank": 4, "update_proj_gap": 5, "scale": 0.25},
        {"params": [full], "rank": 3, "update_proj_gap": 5, "scale": 0.5, "proj_type": "full"},
        {"params": [plain]},
    ]
    return params, GaLoreAdamW(groups, lr=0.02, weight_decay=0.1, backend=backend)


def _set_grads(params, step):
    for i, p in enumerate(params):
        p.grad = make(p.shape, p.dtype, p.device, 1000 * step + i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_galore_adamw_trajectory_triton_vs_reference(dtype, device):
    params_t, opt_t = _trajectory_setup(dtype, device, "triton")
    params_r, opt_r = _trajectory_setup(dtype, device, "reference")
    for step in range(12):  # refreshes at steps 0, 5, 10
        _set_grads(params_t, step)
        _set_grads(params_r, step)
        before = [p.detach().clone() for p in params_r]  # the same on both sides (re-synced below)
        opt_t.step()
        opt_r.step()
        for i, (pt, pr) in enumerate(zip(params_t, params_r)):
            where = f"step {step}, param {list(SHAPES)[i]}"
            assert_delta_w_close(pt, before[i], pr, where=where)  # this step's update
            st, sr = opt_t.state[pt], opt_r.state[pr]
            assert st.keys() == sr.keys(), where
            for key in sr:
                if key in ("exp_avg", "exp_avg_sq"):
                    # fp32 moments of the same (16-bit) inputs: fp32 accuracy whatever the dtype.
                    assert st[key].dtype == torch.float32
                    assert rel_err(st[key], sr[key]) <= 1e-5, f"{where}, state {key}"
                else:
                    # Steps, offsets and bases (the same gradient through the same SVD): identical.
                    assert torch.equal(st[key], sr[key]), f"{where}, state {key}"
            with torch.no_grad():  # re-sync: every step's ΔW is compared from the same W_before
                pt.copy_(pr)


# ---------------------------------------------------------------------------------------------------
# GPU only: LLaMA-7B MLP sizes, bf16
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_llama_size_bf16_step_vs_reference(side):
    m, n, r = 4096, 11008, 256
    dev = "cuda"
    W = make((m, n), torch.bfloat16, dev, 1)
    G = make((m, n), torch.bfloat16, dev, 2, 1e-2)
    Pl = torch.linalg.qr(make((m, r), device=dev, seed=3))[0].to(torch.bfloat16)
    Pr = torch.linalg.qr(make((n, r), device=dev, seed=4))[0].to(torch.bfloat16)
    basis = {"left": Pl, "right": Pr, "full": (Pl, Pr)}[side]
    shape = {"left": (r, n), "right": (m, r), "full": (r, r)}[side]
    M, V = make(shape, device=dev, seed=5, scale=1e-3), make(shape, device=dev, seed=6, scale=1e-3).square()
    W_old, W2, M2, V2 = W.clone(), W.clone(), M.clone(), V.clone()
    hyper = dict(side=side, step_size=1e-3, scale=0.25, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1)
    ops.galore_matrix_step_(W, G, basis, M, V, backend="triton", **hyper)
    ops.galore_matrix_step_(W2, G, basis, M2, V2, backend="reference", **hyper)
    assert rel_err(M, M2) <= 1e-5 and rel_err(V, V2) <= 1e-5
    assert_delta_w_close(W, W_old, W2)


@pytest.mark.gpu
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_llama_size_bf16_ops_and_grads_vs_reference(op, side, monkeypatch):
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)  # auto: Triton on CUDA
    x, P = operands(op, side, 4096, 11008, 256, torch.bfloat16, "cuda")
    x.requires_grad_()
    P.requires_grad_()
    out = OPS[op](x, P, side)
    xr, Pr = x.detach().float().requires_grad_(), P.detach().float().requires_grad_()
    ref = REF[op](xr, Pr, side)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
    dout = make(out.shape, torch.bfloat16, "cuda", 9)
    out.backward(dout)
    ref.backward(dout.float())
    assert rel_err(x.grad, xr.grad) <= TOL[torch.bfloat16]
    assert rel_err(P.grad, Pr.grad) <= TOL[torch.bfloat16]
