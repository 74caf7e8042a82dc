"""Grouped launches: every same-layout matrix of a step shares one launch per stage.

* the toy 4-layer LLaMA step (28 matrices of 3 shapes, 11 plain tensors) launches at most 10 kernels;
* a grouped step is bit-identical to per-matrix steps (the same kernels, pointers offset by a table).
"""
import functools

import pytest
import torch

from subspace_ops import AdamSNSM, GaLoreAdamW, kernels, ops
from _numerics import seeded_grads

pytest.importorskip("triton")
needs_interpreter = pytest.mark.skipif(not kernels.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")


def toy_llama(d=32, f=88, layers=4, vocab=50, dtype=torch.bfloat16, seed=0):
    """LLaMA's parameter set: per layer q, k, v, o (d x d), gate, up (f x d), down (d x f) and two
    norms; the embedding, the final norm and the output head: 28 matrices of 3 shapes, 11 plain."""
    g = torch.Generator().manual_seed(seed)

    def p(*shape):
        return torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype))

    matrices, plain = [], [p(vocab, d)]
    for _ in range(layers):
        matrices += [p(d, d) for _ in range(4)] + [p(f, d), p(f, d), p(d, f)]
        plain += [p(d), p(d)]
    plain += [p(d), p(vocab, d)]
    return matrices, plain


_grads = functools.partial(seeded_grads, seed=100)


@pytest.mark.parametrize("cls", [GaLoreAdamW, AdamSNSM], ids=lambda c: c.__name__)
def test_toy_llama_step_launches_at_most_10_kernels(cls):
    from subspace_ops.kernels import _common

    matrices, plain = toy_llama()
    assert len(matrices) == 28 and len(plain) == 11
    opt = cls([{"params": matrices, "rank": 8}, {"params": plain}], lr=1e-3, weight_decay=0.1,
              backend="triton")
    _grads(matrices + plain, 0)
    launches = []

    def count(kernel, grid, args, kwargs):  # counted, never run: the first step's refresh is reference math
        launches.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)

    with _common.override(launch_hook=count):
        opt.step()
        first = list(launches)
        launches.clear()
        _grads(matrices + plain, 1)
        opt.step()
    # 3 shapes x (projection + back-projection) + 1 multi-tensor AdamW for all 11 plain tensors.
    assert len(launches) == 7, launches
    assert len(first) == 7, first
    assert launches.count("_adamw_kernel") == 1


def _clone_params(params):
    return [torch.nn.Parameter(q.detach().clone()) for q in params]


@needs_interpreter
@pytest.mark.parametrize("algo", ["galore", "snsm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_step_is_bit_identical_to_per_matrix_steps(algo, dtype):
    """Three same-shape matrices (one launch per stage) vs three single-matrix calls."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 24, 40, 5
    Ws = [(torch.randn(m, n, generator=g) * 0.5).to(dtype) for _ in range(3)]
    Gs = [torch.randn(m, n, generator=g).to(dtype) for _ in range(3)]
    Ps = [torch.linalg.qr(torch.randn(m, r, generator=g))[0].to(dtype) for _ in range(3)]  # left side
    Ms = [torch.randn(r, n, generator=g) for _ in range(3)]
    if algo == "galore":
        Vs = [torch.rand(r, n, generator=g) for _ in range(3)]
        step, hyper = ops.galore_matrix_step_, dict(scale=0.25)
        group = ops.galore_matrices_step_
    else:
        Vs = [torch.rand(1, n, generator=g) for _ in range(3)]
        step, hyper = ops.snsm_matrix_step_, {}
        group = ops.snsm_matrices_step_
    hyper.update(side="left", step_size=0.01, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
    one = [[t.clone() for t in ts] for ts in (Ws, Ms, Vs)]
    grouped = [[t.clone() for t in ts] for ts in (Ws, Ms, Vs)]
    for i in range(3):
        step(one[0][i], Gs[i], Ps[i], one[1][i], one[2][i], backend="triton", **hyper)
    group(grouped[0], Gs, Ps, grouped[1], grouped[2], backend="triton", **hyper)
    for a, b in zip(one, grouped):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@needs_interpreter
def test_a_batch_whose_tensors_resolve_to_different_backends_is_split(monkeypatch):
    """Plain parameters of equal settings share a batch whatever their dtype; under ``auto`` on a GPU
    a float64 one takes the reference while the others take the kernels (emulated here)."""
    real = ops.resolve_backend

    def auto_like(backend, like):
        return "reference" if like.dtype == torch.float64 else real("triton", like)

    monkeypatch.setattr(ops, "resolve_backend", auto_like)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(9, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g).double()),
              torch.nn.Parameter(torch.randn(7, generator=g))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = GaLoreAdamW(params, lr=0.1, weight_decay=0.1)
    ref = GaLoreAdamW(twins, lr=0.1, weight_decay=0.1, backend="reference")
    for p, q in zip(params, twins):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for p, q in zip(params, twins):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
