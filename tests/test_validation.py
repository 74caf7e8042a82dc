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
        (dict(rank=2, projector="randomized", oversample=-1), "oversample"),
        (dict(rank=2, projector="randomized", power_iters=1.5), "power_iters"),
        (dict(rank=2, stagger="yes"), "stagger"),
        (dict(rank=2, scale=-0.25), "scale"),
        (dict(rank=2, betas=(0.9, 0.99, 0.5)), "betas"),
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


# ---------------------------------------------------------------------------------------------------
# load_state_dict checks each low-rank parameter's state before accepting it
# ---------------------------------------------------------------------------------------------------
def _trained(cls, rank=2, steps=2):
    W, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))
    opt = cls([{"params": [W], "rank": rank}, {"params": [b]}], lr=1e-2)
    for _ in range(steps):
        W.grad, b.grad = torch.randn(8, 6), torch.randn(6)
        opt.step()
    return opt


def _fresh(cls, rank=2):
    W, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))
    return cls([{"params": [W], "rank": rank}, {"params": [b]}], lr=1e-2), W


def test_load_rejects_another_optimizers_state():
    from subspace_ops import AdamSNSM

    sd = _trained(GaLoreAdamW).state_dict()
    opt, W = _fresh(AdamSNSM)
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(8, 6\)\).*'exp_avg_sq' has shape \(8, 2\).*keeps \(8, 1\)"):
        opt.load_state_dict(sd)
    assert not opt.state  # nothing was loaded


def test_load_rejects_a_missing_moment_and_a_wrong_rank():
    sd = _trained(GaLoreAdamW).state_dict()
    del sd["state"][0]["exp_avg"]
    opt, _ = _fresh(GaLoreAdamW)
    with pytest.raises(ValueError, match=r"parameter 0 .* no 'exp_avg'"):
        opt.load_state_dict(sd)
    opt3, _ = _fresh(GaLoreAdamW, rank=3)
    with pytest.raises(ValueError, match=r"'exp_avg' has shape \(8, 2\).*keeps \(8, 3\)"):
        opt3.load_state_dict(_trained(GaLoreAdamW).state_dict())


def test_load_names_a_galore_torch_checkpoint():
    sd = _trained(GaLoreAdamW).state_dict()
    sd["state"][0]["projector"] = object()  # galore-torch pickles a GaLoreProjector here
    opt, _ = _fresh(GaLoreAdamW)
    with pytest.raises(ValueError, match="galore-torch checkpoint"):
        opt.load_state_dict(sd)


def test_warns_when_nothing_is_low_rank_and_when_rank_is_full():
    with pytest.warns(UserWarning, match="no param group has a 'rank'"):
        GaLoreAdamW([p()])
    W = torch.nn.Parameter(torch.randn(3, 5))
    opt = GaLoreAdamW([{"params": [W], "rank": 4}])
    W.grad = torch.randn(3, 5)
    with pytest.warns(UserWarning, match=r"parameter 0 \(shape \(3, 5\)\) has rank=4 >= min\(m, n\) = 3"):
        opt.step()
