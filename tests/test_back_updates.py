"""``ops.back_updates_``: the weight update from a known low-rank direction N (FSDP2's left side,
step_in_backward's accumulated projections), Triton (interpreter) against the reference, as ΔW."""
from __future__ import annotations

import pytest
import torch

from subspace_ops import ops
from subspace_ops.basis import Basis

pytest.importorskip("triton")

from _launches import count_kernel_launches
from _numerics import delta_w_close

HYPER = dict(step_size=0.05, scale=0.5, lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.2)


def _case(side, dtype, m=37, n=23, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g).to(dtype)
    Pl = torch.linalg.qr(torch.randn(m, r, generator=g))[0].to(dtype)
    Pr = torch.linalg.qr(torch.randn(n, r, generator=g))[0].to(dtype)
    basis = Basis.pick(side, Pl, Pr)
    N = torch.randn(basis.lowrank_shape(m, n), generator=g)  # fp32, as low-rank Adam returns it
    return W, N, basis


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_triton_matches_the_reference(side, dtype):
    W, N, basis = _case(side, dtype)
    W_ref, W_tri = W.clone(), W.clone()
    ops.back_updates_([W_ref], [N], [basis], backend="reference", side=side, **HYPER)
    with count_kernel_launches() as launches:
        ops.back_updates_([W_tri], [N], [basis], backend="triton", side=side, **HYPER)
    assert sum(launches.values()) == (2 if side == "full" else 1)
    problem = delta_w_close(W_tri, W, W_ref)
    assert problem is None, problem


def test_reference_is_the_definition():
    W, N, basis = _case("left", torch.float64)
    got = W.clone()
    ops.back_updates_([got], [N], [basis], backend="reference", side="left", **HYPER)
    want = (W - HYPER["step_size"] * HYPER["scale"] * (basis.left @ N.double()))
    want = want - HYPER["lr"] * HYPER["weight_decay"] * want
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    assert not torch.allclose(got, W)
