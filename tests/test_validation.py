"""Bad input gets a clear error naming the parameter and the fix."""
import pytest
import torch

from subspace_ops import GaLoreAdamW


def p():
    return torch.zeros(6, 4, requires_grad=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_constructor_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([p()], **kwargs)


@pytest.mark.parametrize(
    "group,match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=2, update_proj_gap=0), "update_proj_gap"),
        (dict(rank=2, proj_type="diagonal"), "proj_type"),
        (dict(rank=2, projector="qr"), "projector"),
        (dict(rank=2, oversample=-1), "oversample"),
        (dict(rank=2, power_iters=1.5), "power_iters"),
        (dict(rank=2, lr=-0.1), "lr"),
    ],
)
def test_constructor_rejects_bad_group_keys(group, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [p()], **group}])


def test_sparse_gradient_is_rejected_at_step():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW([{"params": emb.parameters(), "rank": 2}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()


def test_complex_param_in_lowrank_group_is_rejected_at_step():
    z = torch.zeros(4, 3, dtype=torch.complex64, requires_grad=True)
    opt = GaLoreAdamW([{"params": [z], "rank": 2}])
    z.grad = torch.ones(4, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="complex"):
        opt.step()


def test_complex_param_in_plain_group_works():
    z = torch.zeros(4, 3, dtype=torch.complex64, requires_grad=True)
    opt = GaLoreAdamW([z], lr=0.1)
    z.grad = torch.full((4, 3), 1 + 1j, dtype=torch.complex64)
    opt.step()
    assert torch.allclose(z.detach().real, torch.full((4, 3), -0.1), atol=1e-4)
    assert torch.allclose(z.detach().imag, torch.full((4, 3), -0.1), atol=1e-4)


def test_bad_backend_env_var(monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "fastest")
    x = p()
    opt = GaLoreAdamW([{"params": [x], "rank": 2}])
    x.grad = torch.randn(6, 4)
    with pytest.raises(ValueError, match="SUBSPACE_OPS_BACKEND"):
        opt.step()
