"""Projectors are plug-ins: a projector defined here, outside the package, registers and trains."""
import pytest
import torch

from subspace_ops import AdamSNSM, GaLoreAdamW, projectors
from _numerics import roundtrip


@projectors.register
class FirstColumnsProjector(projectors.Projector):
    """A fixed basis: the first r columns of a random orthogonal matrix drawn from the group's seed,
    computed once and never changed (``shift`` rotates which columns; a key this projector owns)."""

    name = "test_first_columns"
    keys = {"shift": 0}

    def validate(self, group):
        super().validate(group)
        if not isinstance(group["shift"], int) or group["shift"] < 0:
            raise ValueError(f"invalid shift: {group['shift']!r}; must be an int >= 0")

    def compute(self, G, rank, side, group, *, index, step, previous=None):
        if previous is not None:
            return previous
        rows = {"left": G.shape[0], "right": G.shape[1]}
        gen = torch.Generator().manual_seed(group["seed"] * 1000 + index)

        def make(n):
            Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
            return Q.roll(-group["shift"], dims=1)[:, :rank].to(G.dtype).contiguous()

        if side == "full":
            return make(rows["left"]), make(rows["right"])
        return make(rows[side])


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(12, 9, generator=g)), torch.nn.Parameter(torch.randn(9, generator=g))]


def _run(cls, params, steps, **group):
    opt = cls([{"params": params[:1], "rank": 3, "projector": "test_first_columns", "update_proj_gap": 2, **group},
               {"params": params[1:]}], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


@pytest.mark.parametrize("cls", [GaLoreAdamW, AdamSNSM], ids=lambda c: c.__name__)
def test_a_projector_defined_outside_the_package_trains(cls):
    params = _model()
    before = params[0].detach().clone()
    opt = _run(cls, params, 5, shift=1)
    group = opt.param_groups[0]
    assert group["shift"] == 1 and group["seed"] == 0  # its own key, and the shared schedule keys
    basis = opt.state[params[0]]["basis"]
    assert basis.shape == (9, 3)  # std side of a 12 x 9 matrix: right
    want = FirstColumnsProjector().compute(params[0].grad, 3, "right", group, index=0, step=0)
    assert torch.equal(basis, want)  # refreshed at steps 0, 2, 4: the projector kept it
    assert not torch.equal(params[0].detach(), before)
    # Checkpoints stay tensors only and resume.
    saved = roundtrip(opt)
    opt2 = cls([{"params": _model()[:1], "rank": 3, "projector": "test_first_columns", "shift": 1},
                {"params": _model()[1:]}])
    opt2.load_state_dict(saved)


def test_the_projector_validates_its_own_keys_and_the_registry_lists_it():
    with pytest.raises(ValueError, match="invalid shift"):
        GaLoreAdamW([{"params": _model()[:1], "rank": 3, "projector": "test_first_columns", "shift": -1}])
    with pytest.raises(ValueError, match="test_first_columns"):  # the error lists registered names
        GaLoreAdamW([{"params": _model()[:1], "rank": 3, "projector": "no_such_projector"}])
    assert "test_first_columns" in projectors.names()
    with pytest.raises(ValueError, match="Projector subclass"):
        projectors.register(object)
