"""The fused Triton path of AdamSNSM's matrix update (ALGORITHMS.md §4) against
``reference.snsm_matrix_step_``: each launcher, ``ops.snsm_matrix_step_``, that the Triton backend
really launches the kernels, and whole AdamSNSM trajectories, Triton vs reference.

Without CUDA the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1); the
``gpu`` tests repeat the checks at LLaMA-7B MLP size. Shapes are odd, tall (V of shape (m, 1)) and
wide (V of shape (1, n)), so with both sides they cover the Subset-Norm sum fused into the projection
("std": right on tall, left on wide) and the standalone pass (the other two). Tolerances (DESIGN.md)
are ‖out − ref‖ / ‖ref‖.
"""
import pytest
import torch

from subspace_ops import AdamSNSM, kernels, ops, reference

pytest.importorskip("triton")

from subspace_ops.kernels import backproject as kb  # noqa: E402
from subspace_ops.kernels import lowrank_adam as ka  # noqa: E402
from subspace_ops.kernels import project as kp  # noqa: E402
from subspace_ops.kernels import subset_norm as ks  # noqa: E402
from _numerics import (  # noqa: E402
    TOL,
    assert_delta_w_close,
    forbid_reference_and_count_launches,
    rel_err,
    roundtrip,
    within_one_rounding,
)

DTYPES = list(TOL)
SIDES = ["left", "right"]
# wide (V (1, n)) and tall (V (m, 1)); 40x33 at rank 40 runs the back-projection's rank loop twice.
SHAPES = [(37, 53, 5), (129, 77, 16), (40, 33, 40)]
needs_interpreter = pytest.mark.skipif(
    not (kernels.HAS_TRITON and kernels.interpreting()), reason="Triton on CPU needs TRITON_INTERPRET=1"
)
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]
B1, B2, EPS = 0.9, 0.99, 1e-6
UPDATE = dict(step_size=0.05, lr=0.1, weight_decay=0.1, eps=EPS)


def make(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)


def basis(rows, r, dtype, device, seed=1):
    # Kernels need no orthonormality; a scaled Gaussian keeps the outputs O(1) for any rank.
    return make((rows, r), torch.float32, "cpu", seed, rows ** -0.5).to(dtype=dtype, device=device)


def lowrank_shape(side, m, n, r):
    return {"left": (r, n), "right": (m, r), "full": (r, r)}[side]


def sumsq(G, V_shape):
    """Σ G² (fp32) over each row (V (m, 1)) or each column (V (1, n))."""
    G32 = G.float()
    return (G32 * G32).sum(dim=1 if V_shape[1] == 1 and V_shape[0] == G.shape[0] else 0, keepdim=True)


def accumulator(V_shape, device, seed=4):
    return make(V_shape, device=device, seed=seed).abs() + 0.1


# ---------------------------------------------------------------------------------------------------
# kernels.subset_norm
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("m,n", [(37, 53), (129, 77), (300, 7)])
def test_subset_norm_matches_reference(m, n, layout, axis, dtype, device):
    G = make((m, n), dtype, device, 1)
    if layout == "transposed":
        G = G.mT.contiguous().mT
    V_shape = (m, 1) if axis == "rows" else (1, n)
    V = accumulator(V_shape, device)
    V_ref = V.clone().mul_(B2).add_(sumsq(G, V_shape), alpha=1 - B2)
    assert ks.subset_norm_(G, V, beta2=B2) is V
    assert rel_err(V, V_ref) <= 1e-5  # squares of the loaded values, summed in fp32, for every dtype


@pytest.mark.parametrize("device", DEVICES)
def test_subset_norm_strided_accumulator_and_empty_sums(device):
    m, n = 45, 19
    G = make((m, n), torch.bfloat16, device, 1)
    for V_shape, store in (((m, 1), torch.zeros(m, 3, device=device)), ((1, n), torch.zeros(3, n, device=device))):
        V = store[:, 1:2] if V_shape[1] == 1 else store[1:2]  # a strided view, written in place
        V.copy_(accumulator(V_shape, device))
        V_ref = V.clone().mul_(B2).add_(sumsq(G, V_shape), alpha=1 - B2)
        ks.subset_norm_(G, V, beta2=B2)
        assert rel_err(V, V_ref) <= 1e-5
        assert (store.sum() - V.sum()).abs() < 1e-3  # nothing else written
    # An empty sum decays the accumulator only; an empty accumulator is left alone.
    V = accumulator((m, 1), device)
    V_ref = V * B2
    ks.subset_norm_(torch.zeros(m, 0, device=device), V, beta2=B2)
    assert torch.equal(V, V_ref)
    ks.subset_norm_(torch.zeros(0, 4, device=device), torch.zeros(1, 4, device=device), beta2=B2)


# ---------------------------------------------------------------------------------------------------
# kernels.project.project_momentum_
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("fuse_v", [True, False], ids=["with_v", "no_v"])
def test_project_momentum_matches_reference(fuse_v, m, n, r, side, dtype, device):
    G = make((m, n), dtype, device)
    P = basis(m if side == "left" else n, r, dtype, device)
    M = make(lowrank_shape(side, m, n, r), device=device, seed=2)
    V_shape = (m, 1) if side == "right" else (1, n)  # the orientation fused into the projection
    V = accumulator(V_shape, device) if fuse_v else None
    R = reference.project_any(G, P, side)
    M_ref = M.clone().mul_(B1).add_(R, alpha=1 - B1)
    D = kp.project_momentum_(G, P, side, M, V, beta1=B1, beta2=B2)
    # 16-bit inputs: exact products summed in fp32 on both paths, so fp32 accuracy for every dtype.
    assert D.dtype == torch.float32 and D.shape == R.shape
    assert rel_err(M, M_ref) <= 1e-5
    assert rel_err(D, M_ref - R) <= 1e-5
    if fuse_v:
        V_ref = accumulator(V_shape, device).mul_(B2).add_(sumsq(G, V_shape), alpha=1 - B2)
        assert rel_err(V, V_ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_project_momentum_many_rank_tiles_and_strided_operands(device):
    """Rank 70 spans several output tiles along the rank: the first rank tile alone writes V.
    Transposed G, strided basis and state, an ``out`` given."""
    m, n, r = 33, 45, 70
    for side in SIDES:
        r_eff = min(r, m if side == "left" else n)
        G = make((n, m), torch.bfloat16, device).mT
        P = make((m if side == "left" else n, 2 * r_eff), torch.bfloat16, device, 1, 0.2)[:, ::2]
        shape = lowrank_shape(side, m, n, r_eff)
        M = make(shape[::-1], device=device, seed=3).mT
        V_shape = (m, 1) if side == "right" else (1, n)
        V = accumulator(V_shape, device)
        out = torch.full(shape, float("nan"), device=device)
        R = reference.project_any(G, P, side)
        M_ref = M.clone().mul_(B1).add_(R, alpha=1 - B1)
        V_ref = V.clone().mul_(B2).add_(sumsq(G, V_shape), alpha=1 - B2)
        assert kp.project_momentum_(G, P, side, M, V, beta1=B1, beta2=B2, out=out) is out
        assert rel_err(M, M_ref) <= 1e-5 and rel_err(out, M_ref - R) <= 1e-5 and rel_err(V, V_ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_project_momentum_rank_zero_still_updates_v(device):
    m, n = 9, 7
    G = make((m, n), device=device)
    M = torch.zeros(m, 0, device=device)
    V = accumulator((m, 1), device)
    V_ref = V.clone().mul_(B2).add_(sumsq(G, (m, 1)), alpha=1 - B2)
    D = kp.project_momentum_(G, torch.zeros(n, 0, device=device), "right", M, V, beta1=B1, beta2=B2)
    assert D.shape == (m, 0) and rel_err(V, V_ref) <= 1e-5
    # An empty reduction (G with no columns): R = 0.
    M = make((m, 3), device=device, seed=2)
    V = accumulator((m, 1), device)
    M_ref, V_ref = M * B1, V * B2
    D = kp.project_momentum_(torch.zeros(m, 0, device=device), torch.zeros(0, 3, device=device), "right", M, V,
                             beta1=B1, beta2=B2)
    assert torch.equal(M, M_ref) and torch.equal(D, M_ref) and torch.equal(V, V_ref)


# ---------------------------------------------------------------------------------------------------
# kernels.backproject.back_project_snsm_update_
# ---------------------------------------------------------------------------------------------------
def snsm_update_reference(W, G, V, D, P, side, dtype_of_d=None):
    """``reference.snsm_matrix_step_``'s weight update given D = M − R (optionally rounded to a dtype)."""
    if dtype_of_d is not None:
        D = D.to(dtype_of_d)
    direction = (reference.back_project_any(D, P, side) + G.float()) / (V.sqrt() + EPS)
    reference.apply_update_(W, direction, UPDATE["step_size"], 1.0, UPDATE["lr"], UPDATE["weight_decay"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_back_project_snsm_update_matches_reference(axis, m, n, r, side, dtype, device):
    W = make((m, n), dtype, device, 5)
    G = make((m, n), dtype, device, 6)
    D = make(lowrank_shape(side, m, n, r), device=device, seed=7)
    P = basis(m if side == "left" else n, r, dtype, device)
    V = accumulator((m, 1) if axis == "rows" else (1, n), device) * 10.0
    W_old, W_ref = W.clone(), W.clone()
    # As ops.snsm_matrix_step_ calls it: the fp32 D times the basis on its dtype's tensor cores.
    kb.back_project_snsm_update_(W, G, V, D, P, side, dot_dtype=P.dtype, **UPDATE)
    snsm_update_reference(W_ref, G, V, D, P, side)
    assert W.dtype == dtype
    assert_delta_w_close(W, W_old, W_ref)  # the update itself (fp32: to fp32 accuracy)
    if dtype != torch.float32:
        # Exactly the documented math: the reference fed D rounded once to the basis dtype lands
        # within one rounding of W.
        W_rounded = W_old.clone()
        snsm_update_reference(W_rounded, G, V, D, P, side, dtype_of_d=dtype)
        assert within_one_rounding(W, W_rounded, W_old, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_back_project_snsm_update_strided_operands_and_rank_zero(dtype, device):
    m, n, r = 31, 26, 5
    for side, axis in (("left", "rows"), ("right", "cols")):
        base = make((n, 2 * m), dtype, device, 9)
        W = base.mT[::2]  # (m, n), transposed and strided, updated in place
        G = make((n, m), dtype, device, 6).mT
        D = make(lowrank_shape(side, m, n, r)[::-1], device=device, seed=7).mT
        P = make((r, m if side == "left" else n), dtype, device, 1, 0.3).mT
        store = accumulator((m, 3) if axis == "rows" else (3, n), device)
        V = store[:, 2:] if axis == "rows" else store[2:]
        W_old, W_ref = W.clone(), W.clone()
        kb.back_project_snsm_update_(W, G, V, D, P, side, dot_dtype=P.dtype, **UPDATE)
        snsm_update_reference(W_ref, G, V, D, P, side, dtype_of_d=dtype)
        assert_delta_w_close(W, W_old, W_ref, where=f"{side} V {axis} {dtype}")
        assert torch.equal(base.mT[::2], W)
        assert torch.equal(base.mT[1::2], make((n, 2 * m), dtype, device, 9).mT[1::2])  # untouched
    # Rank 0: back(D) = 0, G alone moves W.
    W = make((m, n), dtype, device, 5)
    G = make((m, n), dtype, device, 6)
    V = accumulator((1, n), device)
    W_old, W_ref = W.clone(), W.clone()
    kb.back_project_snsm_update_(W, G, V, torch.zeros(m, 0, device=device), torch.zeros(n, 0, device=device),
                                 "right", **UPDATE)
    snsm_update_reference(W_ref, G, V, torch.zeros(m, 0, device=device), torch.zeros(n, 0, device=device), "right")
    assert_delta_w_close(W, W_old, W_ref, where=f"rank 0 {dtype}")


# ---------------------------------------------------------------------------------------------------
# bad input: every ValueError the new launchers raise
# ---------------------------------------------------------------------------------------------------
def _cases():
    G, W = torch.zeros(6, 4), torch.zeros(6, 4)
    Pl, Pr = torch.zeros(6, 2), torch.zeros(4, 2)
    M = torch.zeros(2, 4)
    Vr, Vc = torch.zeros(6, 1), torch.zeros(1, 4)
    meta = dict(device="meta")
    h = dict(beta1=0.9, beta2=0.99)
    return [
        (lambda: ks.subset_norm_(G[None], Vr, beta2=0.99), "G must be 2-D"),
        (lambda: ks.subset_norm_(G.double(), Vr, beta2=0.99), "G must be one of"),
        (lambda: ks.subset_norm_(G, torch.zeros(4, 1), beta2=0.99), "V must have shape"),
        (lambda: ks.subset_norm_(G, Vr.half(), beta2=0.99), r"V \(optimizer state\) must be float32"),
        (lambda: ks.subset_norm_(G, torch.zeros(6, 1, **meta), beta2=0.99), "one device"),
        (lambda: kp.project_momentum_(G, Pl, "left", M.half(), **h), r"M \(optimizer state\) must be float32"),
        (lambda: kp.project_momentum_(G, Pl, "left", M.mT, **h), "M must have shape"),
        (lambda: kp.project_momentum_(G, Pl, "left", torch.zeros(2, 4, **meta), **h), "one device"),
        (lambda: kp.project_momentum_(G, Pl, "left", M, out=torch.zeros(4, 2), **h), "D must have shape"),
        (lambda: kp.project_momentum_(G, Pl, "left", M, out=torch.zeros(2, 4, **meta), **h), "one device"),
        (lambda: kp.project_momentum_(G, Pl, "left", M, Vr, **h), "side 'left' needs V of shape \\(1, 4\\)"),
        (lambda: kp.project_momentum_(G, Pr, "right", torch.zeros(6, 2), Vc, **h), "side 'right' needs V of shape"),
        (lambda: kp.project_momentum_(G, Pl, "left", M, Vc.half(), **h), r"V \(optimizer state\) must be float32"),
        (lambda: kp.project_momentum_(G, Pl, "left", M, torch.zeros(1, 4, **meta), **h), "one device"),
        (lambda: kb.back_project_snsm_update_(W, G.double(), Vr, M, Pl, "left", **UPDATE), "G must be one of"),
        (lambda: kb.back_project_snsm_update_(W, G.mT, Vr, M, Pl, "left", **UPDATE), "G must have W's shape"),
        (lambda: kb.back_project_snsm_update_(W, G, torch.zeros(6, 4), M, Pl, "left", **UPDATE), "V must have shape"),
        (lambda: kb.back_project_snsm_update_(W, G, Vc.half(), M, Pl, "left", **UPDATE), r"V \(optimizer state\)"),
        (lambda: kb.back_project_snsm_update_(W, G, torch.zeros(6, 1, **meta), M, Pl, "left", **UPDATE), "one device"),
        (lambda: kb.back_project_snsm_update_(W.mT, G, Vr, M, Pl, "left", **UPDATE), "W must have shape"),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_launchers_reject_bad_input(case):
    fn, match = _cases()[case]
    with pytest.raises(ValueError, match=match):
        fn()


# ---------------------------------------------------------------------------------------------------
# ops.snsm_matrix_step_
# ---------------------------------------------------------------------------------------------------
def _step_args(m, n, r, side, dtype=torch.float32, device="cpu"):
    W, G = make((m, n), dtype, device, 1), make((m, n), dtype, device, 2)
    Pl = torch.linalg.qr(make((m, r), seed=3))[0].to(dtype=dtype, device=device)
    Pr = torch.linalg.qr(make((n, r), seed=4))[0].to(dtype=dtype, device=device)
    basis = {"left": Pl, "right": Pr, "full": (Pl, Pr)}[side]
    M = make(lowrank_shape(side, m, n, r), device=device, seed=5, scale=0.3)
    V = accumulator(reference.subset_norm_shape(m, n), device)
    hyper = dict(side=side, step_size=0.05, lr=0.1, beta1=B1, beta2=B2, eps=EPS, weight_decay=0.1)
    return W, G, basis, M, V, hyper


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("m,n,r", [(37, 53, 5), (129, 77, 16)], ids=["wide", "tall"])
def test_snsm_matrix_step_triton_matches_reference(m, n, r, side, dtype, device):
    W, G, basis, M, V, hyper = _step_args(m, n, r, side, dtype, device)
    W_old, W2, M2, V2 = W.clone(), W.clone(), M.clone(), V.clone()
    ops.snsm_matrix_step_(W, G, basis, M, V, backend="triton", **hyper)
    reference.snsm_matrix_step_(W2, G, basis, M2, V2, **hyper)
    assert rel_err(M, M2) <= 1e-5 and rel_err(V, V2) <= 1e-5
    assert_delta_w_close(W, W_old, W2)


@pytest.mark.parametrize(
    "side,basis_kind,match",
    [("diagonal", "one", "side must be one of"), ("full", "one", "needs basis=\\(P_left, P_right\\)"),
     ("left", "pair", "needs one basis tensor")],
)
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_snsm_matrix_step_rejects_bad_side_or_basis(side, basis_kind, match, backend):
    W, G, (Pl, Pr), M, V, hyper = _step_args(13, 9, 3, "full")
    hyper["side"] = side
    with pytest.raises(ValueError, match=match):
        ops.snsm_matrix_step_(W, G, Pl if basis_kind == "one" else (Pl, Pr), M, V, backend=backend, **hyper)


# ---------------------------------------------------------------------------------------------------
# AdamSNSM on the Triton backend
# ---------------------------------------------------------------------------------------------------
SHAPES_OPT = {"tall": (24, 17), "wide": (13, 29), "conv": (6, 3, 5), "reverse": (20, 16), "full": (16, 21),
              "bias": (17,)}


def _groups(params):
    tall, wide, conv, rev, full, bias = params
    return [
        # std: tall -> right, wide and conv (6 x 15) -> left, V summed in the projection; the 1-D bias
        # takes plain AdamW steps. reverse_std and full take the standalone Subset-Norm pass.
        {"params": [tall, wide, conv, bias], "rank": 4, "update_proj_gap": 4},
        {"params": [rev], "rank": 3, "update_proj_gap": 4, "proj_type": "reverse_std"},
        {"params": [full], "rank": 3, "update_proj_gap": 4, "proj_type": "full"},
    ]


def _optimizer(params, backend):
    return AdamSNSM(_groups(params), lr=0.02, eps=EPS, betas=(B1, B2), weight_decay=0.1, backend=backend)


def _opt_setup(dtype, device, backend):
    params = [make(s, dtype, device, i, 0.5).requires_grad_() for i, s in enumerate(SHAPES_OPT.values())]
    return params, _optimizer(params, backend)


def _set_grads(params, step):
    for i, p in enumerate(params):
        p.grad = make(p.shape, p.dtype, p.device, 1000 * step + i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_snsm_trajectory_triton_vs_reference(dtype, device):
    params_t, opt_t = _opt_setup(dtype, device, "triton")
    params_r, opt_r = _opt_setup(dtype, device, "reference")
    for step in range(10):  # refreshes at steps 0, 4, 8 (momentum reset)
        if step == 6:  # a save/load mid-run of the Triton optimizer
            saved = roundtrip(opt_t)
            opt_t = _optimizer(params_t, "triton")
            opt_t.load_state_dict(saved)
        _set_grads(params_t, step)
        _set_grads(params_r, step)
        before = [p.detach().clone() for p in params_r]  # the same on both sides (re-synced below)
        opt_t.step()
        opt_r.step()
        for i, (pt, pr) in enumerate(zip(params_t, params_r)):
            where = f"step {step}, param {list(SHAPES_OPT)[i]}"
            assert_delta_w_close(pt, before[i], pr, where=where)  # this step's update
            st, sr = opt_t.state[pt], opt_r.state[pr]
            assert st.keys() == sr.keys(), where
            for key in sr:
                if key in ("exp_avg", "exp_avg_sq"):
                    # fp32 states of the same (16-bit) gradients: fp32 accuracy whatever the dtype.
                    assert st[key].dtype == torch.float32
                    assert rel_err(st[key], sr[key]) <= 1e-5, f"{where}, state {key}"
                else:
                    # Steps, offsets and bases (the same gradient through the same SVD): identical.
                    assert torch.equal(st[key], sr[key]), f"{where}, state {key}"
            with torch.no_grad():  # re-sync: every step's ΔW is compared from the same W_before
                pt.copy_(pr)


@needs_interpreter
def test_triton_backend_really_launches_the_snsm_kernels(monkeypatch):
    """With backend="triton" nothing may fall back to the reference: the reference steps raise, and
    every kernel launch is counted."""
    from _launches import count_kernel_launches

    # The step's reference functions (the refresh diagnostics may still use project_any).
    forbid_reference_and_count_launches(
        monkeypatch, reference, ("snsm_matrix_step_", "adam_step_", "apply_update_", "back_project_any"), (),
    )
    params, opt = _opt_setup(torch.float32, "cpu", "triton")
    before = [p.detach().clone() for p in params]
    with count_kernel_launches() as calls:
        for step in range(2):
            _set_grads(params, step)
            opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    # Per step, 5 matrices of 5 layouts: one fused projection and one fused back-projection each,
    # plus full's two intermediate GEMMs; the standalone Subset-Norm pass for every fp32 matrix (the
    # fused sum is for 16-bit gradients, see ops.snsm_matrices_step_); one AdamW launch for the bias.
    assert calls["_project_kernel"] == 2 * 6 and calls["_back_project_kernel"] == 2 * 6
    assert calls["_subset_norm_kernel"] == 2 * 5
    assert calls["_adamw_kernel"] == 2


# ---------------------------------------------------------------------------------------------------
# GPU only: LLaMA-7B MLP sizes, bf16
# ---------------------------------------------------------------------------------------------------
LLAMA = [(4096, 11008), (11008, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("m,n", LLAMA, ids=["wide", "tall"])
def test_llama_size_bf16_snsm_step_vs_reference(m, n, side):
    r, dev = 256, "cuda"
    W, G, basis, M, V, hyper = _step_args(m, n, r, side, torch.bfloat16, dev)
    G.mul_(1e-2)
    hyper.update(step_size=1e-3, lr=1e-3, beta2=0.999)
    W_old, W2, M2, V2 = W.clone(), W.clone(), M.clone(), V.clone()
    ops.snsm_matrix_step_(W, G, basis, M, V, backend="triton", **hyper)
    reference.snsm_matrix_step_(W2, G, basis, M2, V2, **hyper)
    assert rel_err(M, M2) <= 1e-5 and rel_err(V, V2) <= 1e-5
    assert_delta_w_close(W, W_old, W2)


@pytest.mark.gpu
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n", LLAMA, ids=["wide", "tall"])
def test_llama_size_bf16_snsm_kernels_vs_reference(m, n, side):
    """Each launcher at size: D, M, V to fp32 accuracy; W within one rounding of the reference fed
    bf16(D) (the back-projection multiplies D on bf16 tensor cores)."""
    r, dev = 256, "cuda"
    G = make((m, n), torch.bfloat16, dev, 1, 1e-2)
    P = torch.linalg.qr(make((m if side == "left" else n, r), device=dev, seed=2))[0].to(torch.bfloat16)
    M = make(lowrank_shape(side, m, n, r), device=dev, seed=3, scale=1e-3)
    V_shape = reference.subset_norm_shape(m, n)
    V = accumulator(V_shape, dev) * 1e-2
    R = reference.project_any(G, P, side)
    M_ref = M.clone().mul_(B1).add_(R, alpha=1 - B1)
    V_ref = V.clone().mul_(B2).add_(sumsq(G, V_shape), alpha=1 - B2)
    if V_shape == ((m, 1) if side == "right" else (1, n)):
        D = kp.project_momentum_(G, P, side, M, V, beta1=B1, beta2=B2)
    else:
        ks.subset_norm_(G, V, beta2=B2)
        D = kp.project_momentum_(G, P, side, M, beta1=B1)
    assert rel_err(M, M_ref) <= 1e-5 and rel_err(D, M_ref - R) <= 1e-5 and rel_err(V, V_ref) <= 1e-5
    W = make((m, n), torch.bfloat16, dev, 4)
    W_old, W_ref, W_rounded = W.clone(), W.clone(), W.clone()
    kb.back_project_snsm_update_(W, G, V, D, P, side, dot_dtype=P.dtype, **UPDATE)
    snsm_update_reference(W_ref, G, V, M_ref - R, P, side)
    assert_delta_w_close(W, W_old, W_ref)
    snsm_update_reference(W_rounded, G, V, D, P, side, dtype_of_d=torch.bfloat16)
    assert within_one_rounding(W, W_rounded, W_old, torch.bfloat16)
