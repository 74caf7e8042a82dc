"""Each Triton kernel against subspace_ops.reference (the specification).

Without CUDA the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1); the
same tests run on a GPU under the ``gpu`` marker. Shapes are small and odd (masked edges); 40x33 at
rank 40 is larger than one rank tile (32 under the interpreter), so the rank loop runs.
Tolerances (DESIGN.md) are ‖out − ref‖ / ‖ref‖.
"""
import pytest
import torch

from subspace_ops import kernels, reference

pytest.importorskip("triton")

from subspace_ops.kernels import backproject as kb  # noqa: E402
from subspace_ops.kernels import lowrank_adam as ka  # noqa: E402
from subspace_ops.kernels import project as kp  # noqa: E402
from _numerics import TOL, assert_delta_w_close, rel_err, within_one_rounding  # noqa: E402

DTYPES = list(TOL)
SHAPES = [(37, 53, 5), (129, 77, 16), (40, 33, 40)]
SIDES = ["left", "right"]
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
HYPER = dict(beta1=0.9, beta2=0.99, eps=1e-6)


def make(shape, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)


def basis(rows, r, dtype, device, seed=1):
    # Kernels need no orthonormality; a scaled Gaussian keeps the outputs O(1) for any rank.
    return make((rows, r), torch.float32, "cpu", seed, rows ** -0.5).to(dtype=dtype, device=device)


def basis_rows(side, m, n):
    return m if side == "left" else n


def lowrank_shape(side, m, n, r):
    return (r, n) if side == "left" else (m, r)


def moments(shape, device, seed=2):
    M = make(shape, torch.float32, device, seed)
    V = make(shape, torch.float32, device, seed + 1).abs()
    return M, V


# ---------------------------------------------------------------------------------------------------
# project
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_project_matches_reference(m, n, r, side, dtype, device):
    G = make((m, n), dtype, device)
    P = basis(basis_rows(side, m, n), r, dtype, device)
    out = kp.project(G, P, side)
    ref = reference.project(G.float(), P.float(), side)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_project_adam_epilogue_matches_reference(m, n, r, side, dtype, device):
    G = make((m, n), dtype, device)
    P = basis(basis_rows(side, m, n), r, dtype, device)
    M, V = moments(lowrank_shape(side, m, n, r), device)
    M_ref, V_ref = M.clone(), V.clone()
    N = kp.project_adam_(G, P, side, M, V, **HYPER)
    # The low-rank gradient of 16-bit inputs is exact products summed in fp32 on both paths, so the
    # fp32 states must match to fp32 accuracy whatever the input dtype.
    N_ref = reference.lowrank_adam_(reference.project_any(G, P, side), M_ref, V_ref, **HYPER)
    assert N.dtype == torch.float32
    assert rel_err(M, M_ref) <= 1e-5
    assert rel_err(V, V_ref) <= 1e-5
    assert rel_err(N, N_ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("r", [1, 1100])
def test_extreme_ranks_fused_step(r, side, dtype, device):
    """Rank 1 and a rank above 1024: many output tiles along the rank in the projection, a long
    loop over the rank in the back-projection."""
    m, n = 40, 33
    G = make((m, n), dtype, device)
    P = basis(basis_rows(side, m, n), r, dtype, device)
    M, V = moments(lowrank_shape(side, m, n, r), device)
    M_ref, V_ref = M.clone(), V.clone()
    N = kp.project_adam_(G, P, side, M, V, **HYPER)
    N_ref = reference.lowrank_adam_(reference.project_any(G, P, side), M_ref, V_ref, **HYPER)
    assert rel_err(M, M_ref) <= 1e-5 and rel_err(V, V_ref) <= 1e-5 and rel_err(N, N_ref) <= 1e-5
    W = make((m, n), dtype, device, seed=5)
    W_old, W_ref = W.clone(), W.clone()
    hyper = dict(step_size=0.01, scale=0.25, lr=0.2, weight_decay=0.1)
    kb.back_project_update_(W, N, P, side, dot_dtype=P.dtype, **hyper)
    reference.apply_update_(W_ref, reference.back_project_any(N.to(dtype), P, side), **hyper)
    # The reference fed N rounded to the basis dtype: the same fp32 math up to summation order.
    assert_delta_w_close(W, W_old, W_ref, rtol=1e-5, where=f"rank {r} {side} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", SIDES)
def test_project_adam_into_given_out_and_fp32_of_mixed_operands(side, device):
    # Mixed operands (an fp32 low-rank tensor times a bf16 basis, the "full" side's second product)
    # multiply in fp32.
    m, n, r = 29, 23, 7
    G = make((m, n), torch.float32, device)
    P = basis(basis_rows(side, m, n), r, torch.bfloat16, device)
    M, V = moments(lowrank_shape(side, m, n, r), device)
    M_ref, V_ref = M.clone(), V.clone()
    out = torch.full(lowrank_shape(side, m, n, r), float("nan"), device=device)
    N = kp.project_adam_(G, P, side, M, V, out=out, **HYPER)
    assert N is out
    N_ref = reference.lowrank_adam_(reference.project_any(G, P, side), M_ref, V_ref, **HYPER)
    assert rel_err(N, N_ref) <= 1e-5 and rel_err(M, M_ref) <= 1e-5 and rel_err(V, V_ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_project_non_contiguous_inputs(dtype, device):
    m, n, r = 33, 45, 6
    G = make((n, m), dtype, device).mT  # transposed view
    Pl = make((m, 2 * r), dtype, device)[:, ::2]  # strided columns
    Pr = make((r, n), dtype, device).mT
    for side, P in (("left", Pl), ("right", Pr)):
        assert not G.is_contiguous() and not P.is_contiguous()
        out = kp.project(G, P, side)
        assert rel_err(out, reference.project(G.float(), P.float(), side)) <= TOL[dtype]
        shape = lowrank_shape(side, m, n, r)
        M = make(shape[::-1], torch.float32, device, 3).mT  # non-contiguous state
        V = make(shape[::-1], torch.float32, device, 4).abs().mT
        M_ref, V_ref = M.clone(), V.clone()
        N = kp.project_adam_(G, P, side, M, V, **HYPER)
        N_ref = reference.lowrank_adam_(reference.project_any(G, P, side), M_ref, V_ref, **HYPER)
        assert rel_err(M, M_ref) <= 1e-5 and rel_err(V, V_ref) <= 1e-5 and rel_err(N, N_ref) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# back_project
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_back_project_matches_reference(m, n, r, side, dtype, device):
    R = make(lowrank_shape(side, m, n, r), dtype, device)
    P = basis(basis_rows(side, m, n), r, dtype, device)
    out = kb.back_project(R, P, side)
    ref = reference.back_project(R.float(), P.float(), side)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_back_project_update_matches_reference(m, n, r, side, dtype, device):
    W = make((m, n), dtype, device, seed=5)
    N = make(lowrank_shape(side, m, n, r), torch.float32, device, seed=6)
    P = basis(basis_rows(side, m, n), r, dtype, device)
    hyper = dict(step_size=0.3, scale=0.25, lr=0.2, weight_decay=0.1)
    W_old, W_ref = W.clone(), W.clone()
    # As ops.galore_matrix_step_ calls it: the fp32 direction times the basis on its dtype's tensor
    # cores (N rounded once to 16 bits for a 16-bit basis).
    kb.back_project_update_(W, N, P, side, dot_dtype=P.dtype, **hyper)
    reference.apply_update_(W_ref, reference.back_project_any(N, P, side), **hyper)
    assert W.dtype == dtype
    # The update itself, relative to its own size (fp32: to fp32 accuracy).
    assert_delta_w_close(W, W_old, W_ref)
    if dtype != torch.float32:
        # Exactly the documented math: the reference fed the direction rounded once to the basis
        # dtype gives the same fp32 value up to summation order, so at most one unit in the last
        # place apart after the one rounding into W.
        W_rounded = W_old.clone()
        reference.apply_update_(W_rounded, reference.back_project_any(N.to(dtype), P, side), **hyper)
        assert within_one_rounding(W, W_rounded, W_old, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", SIDES)
def test_back_project_update_fp32_direction_exact_without_decay(side, device):
    # Default dot dtype (fp32 for an fp32 N and a bf16 basis), and weight_decay = 0 (no decay term).
    m, n, r = 21, 34, 9
    W = make((m, n), torch.float32, device, seed=5)
    N = make(lowrank_shape(side, m, n, r), torch.float32, device, seed=6)
    P = basis(basis_rows(side, m, n), r, torch.bfloat16, device)
    hyper = dict(step_size=0.3, scale=0.25, lr=0.2, weight_decay=0.0)
    W_old, W_ref = W.clone(), W.clone()
    kb.back_project_update_(W, N, P, side, **hyper)
    reference.apply_update_(W_ref, reference.back_project_any(N, P, side), **hyper)
    assert_delta_w_close(W, W_old, W_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_back_project_non_contiguous_inputs(dtype, device):
    m, n, r = 31, 26, 5
    hyper = dict(step_size=0.3, scale=0.25, lr=0.2, weight_decay=0.1)
    for side in SIDES:
        lr_shape = lowrank_shape(side, m, n, r)
        R = make(lr_shape[::-1], dtype, device).mT
        P = make((r, basis_rows(side, m, n)), dtype, device).mT
        assert not R.is_contiguous() and not P.is_contiguous()
        out = kb.back_project(R, P, side)
        assert rel_err(out, reference.back_project(R.float(), P.float(), side)) <= TOL[dtype]
        base = make((n, 2 * m), dtype, device, seed=9)
        W = base.mT[::2]  # (m, n) view, transposed and strided, updated in place
        assert W.shape == (m, n) and not W.is_contiguous()
        W_old, W_ref = W.clone(), W.clone()
        N = make(lr_shape[::-1], torch.float32, device, seed=7).mT
        kb.back_project_update_(W, N, P, side, dot_dtype=P.dtype, **hyper)
        reference.apply_update_(W_ref, reference.back_project_any(N, P, side), **hyper)
        assert_delta_w_close(W, W_old, W_ref, where=f"{side} {dtype}")
        assert torch.equal(base.mT[::2], W)  # written through the view
        assert torch.equal(base.mT[1::2], make((n, 2 * m), dtype, device, seed=9).mT[1::2])  # untouched


# ---------------------------------------------------------------------------------------------------
# elementwise: unfused low-rank Adam, fused plain AdamW
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_lowrank_adam_matches_reference(layout, dtype, device):
    R = make((37, 53), dtype, device)
    M, V = moments((37, 53), device)
    if layout == "transposed":
        R, M, V = (t.mT.contiguous().mT for t in (R, M, V))
        assert not R.is_contiguous() and not M.is_contiguous()
    M_ref, V_ref = M.clone(), V.clone()
    N = ka.lowrank_adam_(R, M, V, **HYPER)
    N_ref = reference.lowrank_adam_(R, M_ref, V_ref, **HYPER)
    assert rel_err(M, M_ref) <= 1e-5 and rel_err(V, V_ref) <= 1e-5 and rel_err(N, N_ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [((37,), "contiguous"), ((1100,), "strided"), ((13, 29), "contiguous"), ((13, 29), "transposed"),
     ((3, 5, 7), "contiguous"), ((3, 5, 7), "permuted"), ((), "contiguous")],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_reference(shape, layout, dtype, weight_decay, device):
    def lay(t):
        if layout == "transposed":
            return t.mT.contiguous().mT
        if layout == "permuted":
            return t.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        if layout == "strided":
            return t.repeat_interleave(2)[::2]
        return t

    W = lay(make(shape, dtype, device, 1))
    G = lay(make(shape, dtype, device, 2))
    M = lay(make(shape, torch.float32, device, 3))
    V = lay(make(shape, torch.float32, device, 4).abs())
    if layout != "contiguous":
        assert not W.is_contiguous()
    W_old, W_ref, M_ref, V_ref = W.clone(), W.clone(), M.clone(), V.clone()
    hyper = dict(step_size=0.05, lr=0.1, weight_decay=weight_decay, **HYPER)
    ka.adamw_(W, G, M, V, **hyper)
    reference.adam_step_(W_ref, G, M_ref, V_ref, **hyper)
    assert rel_err(M, M_ref) <= 1e-5 and rel_err(V, V_ref) <= 1e-5
    assert_delta_w_close(W, W_old, W_ref)
    if dtype != torch.float32:
        assert within_one_rounding(W, W_ref, W_old, dtype)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def _cases():
    f32 = dict(dtype=torch.float32)
    G, P, R = torch.zeros(6, 4), torch.zeros(6, 2), torch.zeros(2, 4)
    M, V = torch.zeros(2, 4), torch.zeros(2, 4)
    W = torch.zeros(6, 4)
    h = dict(beta1=0.9, beta2=0.99, eps=1e-6)
    u = dict(step_size=0.1, scale=0.25, lr=0.1, weight_decay=0.0)
    a = dict(step_size=0.1, lr=0.1, weight_decay=0.0, **h)
    meta = torch.zeros(6, 2, device="meta")
    return [
        (lambda: kp.project(G, P, "up"), "side must be 'left' or 'right'"),
        (lambda: kp.project(G[None], P, "left"), "must be 2-D"),
        (lambda: kp.project(G.double(), P, "left"), "G must be one of"),
        (lambda: kp.project(G, P.int(), "left"), "P must be one of"),
        (lambda: kp.project(G, meta, "left"), "one device"),
        (lambda: kp.project(G, torch.zeros(5, 2), "left"), "side 'left' needs P of shape"),
        (lambda: kp.project(G, P, "right"), "side 'right' needs P of shape"),
        (lambda: kp.project(G, P, "left", out=torch.zeros(3, 4)), "out must have shape"),
        (lambda: kp.project(G, P, "left", out=torch.zeros(2, 4, dtype=torch.float64)), "out must be one of"),
        (lambda: kp.project(G, P, "left", dot_dtype=torch.float64), "dot_dtype must be one of"),
        (lambda: kp.project_adam_(G, P, "left", M.half(), V, **h), r"M \(optimizer state\) must be float32"),
        (lambda: kp.project_adam_(G, P, "left", M, V[:1], **h), "V must have shape"),
        (lambda: kp.project_adam_(G, P, "left", M, V, out=torch.zeros(4, 2), **h), "N must have shape"),
        (lambda: kp.project_adam_(G, P, "left", M, torch.zeros(2, 4, device="meta"), **h), "one device"),
        (lambda: kb.back_project(R, P, "up"), "side must be 'left' or 'right'"),
        (lambda: kb.back_project(R[None], P, "left"), "must be 2-D"),
        (lambda: kb.back_project(R.double(), P, "left"), "R must be one of"),
        (lambda: kb.back_project(R, meta, "left"), "one device"),
        (lambda: kb.back_project(R.mT, P, "left"), "side 'left' needs P"),
        (lambda: kb.back_project(R, P, "right"), "side 'right' needs R"),
        (lambda: kb.back_project(R, P, "left", out=torch.zeros(4, 6)), "out must have shape"),
        (lambda: kb.back_project(R, P, "left", out=torch.zeros(6, 4, dtype=torch.int32)), "out must be one of"),
        (lambda: kb.back_project_update_(W.mT, R, P, "left", **u), "W must have shape"),
        (lambda: kb.back_project_update_(W.double(), R, P, "left", **u), "W must be one of"),
        (lambda: kb.back_project_update_(torch.zeros(6, 4, device="meta"), R, P, "left", **u), "one device"),
        (lambda: ka.lowrank_adam_(R.double(), M, V, **h), "R must be one of"),
        (lambda: ka.lowrank_adam_(R, M.mT, V, **h), "M must have shape"),
        (lambda: ka.lowrank_adam_(R, M, V, out=torch.zeros(2, 4, **f32).half(), **h), r"out \(optimizer state\)"),
        (lambda: ka.lowrank_adam_(R, M, torch.zeros(2, 4, device="meta"), **h), "one device"),
        (lambda: ka.adamw_(W.double(), W, W.clone(), W.clone(), **a), "W must be one of"),
        (lambda: ka.adamw_(W, W.double(), W.clone(), W.clone(), **a), "G must be one of"),
        (lambda: ka.adamw_(W, G.mT, W.clone(), W.clone(), **a), "G must have W's shape"),
        (lambda: ka.adamw_(W, G, W.half(), W.clone(), **a), r"M \(optimizer state\) must be float32"),
        (lambda: ka.adamw_(W, G, W.clone(), torch.zeros(6, 4, device="meta"), **a), "one device"),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_launchers_reject_bad_input(case):
    fn, match = _cases()[case]
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_stores_round_to_nearest_even(device):
    """A kernel's bf16 store rounds like torch's fp32→bf16 cast (ties to even, overflow to inf, NaN
    kept). Under the interpreter this checks the rne_bf16 work-around (its own cast truncates)."""
    x = torch.cat([
        make((1000,), torch.float32, "cpu", 11) * 1e3,
        torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.3895e38, 3.4e38, float("inf"), float("-inf")]),
    ]).to(device)
    one = torch.ones(1, 1, device=device)
    out = kb.back_project(x[:, None], one, "right", out_dtype=torch.bfloat16)
    assert torch.equal(out[:, 0], x.bfloat16())
    nan = kb.back_project(torch.full((1, 1), float("nan"), device=device), one, "right", out_dtype=torch.bfloat16)
    assert torch.isnan(nan).all()


# ---------------------------------------------------------------------------------------------------
# GPU only: LLaMA-7B MLP sizes on bf16 tensor cores
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("side", SIDES)
def test_llama_size_bf16_fused_kernels_vs_reference(side):
    m, n, r = 4096, 11008, 256
    dev = "cuda"
    G = make((m, n), torch.bfloat16, dev, 1) * 1e-2
    P = torch.linalg.qr(make((basis_rows(side, m, n), r), torch.float32, dev, 2))[0].to(torch.bfloat16)
    M, V = moments(lowrank_shape(side, m, n, r), dev)
    M_ref, V_ref = M.clone(), V.clone()
    N = kp.project_adam_(G, P, side, M, V, **HYPER)
    N_ref = reference.lowrank_adam_(reference.project_any(G, P, side), M_ref, V_ref, **HYPER)
    assert rel_err(M, M_ref) <= 1e-5 and rel_err(V, V_ref) <= 1e-5 and rel_err(N, N_ref) <= 1e-5
    W = make((m, n), torch.bfloat16, dev, 3)
    W_old, W_ref, W_rounded = W.clone(), W.clone(), W.clone()
    hyper = dict(step_size=1e-3, scale=0.25, lr=1e-3, weight_decay=0.1)
    kb.back_project_update_(W, N, P, side, dot_dtype=P.dtype, **hyper)
    reference.apply_update_(W_ref, reference.back_project_any(N_ref, P, side), **hyper)
    assert_delta_w_close(W, W_old, W_ref)
    # N multiplies on bf16 tensor cores: the reference fed bf16(N) is within one rounding.
    reference.apply_update_(W_rounded, reference.back_project_any(N.bfloat16(), P, side), **hyper)
    assert within_one_rounding(W, W_rounded, W_old, torch.bfloat16)
    out = kp.project(G, P, side)
    assert rel_err(out, reference.project(G.float(), P.float(), side)) <= TOL[torch.bfloat16]
    back = kb.back_project(out, P, side)
    assert rel_err(back, reference.back_project(out.float(), P.float(), side)) <= TOL[torch.bfloat16]
