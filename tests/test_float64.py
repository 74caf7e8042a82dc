"""A float64 model stays float64 end to end: every projector trains, and lr=0 leaves the weights
bit-identical (an update computed in fp32 would round them)."""
import pytest
import torch

from subspace_ops import AdamSNSM, GaLoreAdamW
from subspace_ops.projectors import PROJECTORS


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(9, 14, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(14, 9, generator=g, dtype=torch.float64) * 1e-3 + 1.0),
            torch.nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))]


@pytest.mark.parametrize("cls", [GaLoreAdamW, AdamSNSM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_float64_weights_stay_float64(cls, projector, proj_type):
    params = _params()
    before = [p.detach().clone() for p in params]
    def groups():
        return [{"params": params[:2], "rank": 3, "projector": projector, "proj_type": proj_type,
                 "update_proj_gap": 2}, {"params": params[2:]}]

    frozen = cls(groups(), lr=0.0, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        frozen.step()
    for p, b in zip(params, before):
        assert p.dtype == torch.float64 and torch.equal(p, b)  # lr=0: not even a rounding
    trained = cls(groups(), lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        trained.step()
    for p, b in zip(params, before):
        assert p.dtype == torch.float64 and bool(torch.isfinite(p).all()) and not torch.equal(p, b)
    # Ones near 1.0 (param 1) moved by less than fp32's resolution there would have been rounded away.
    assert not torch.equal(params[1].float().double(), params[1].detach())
