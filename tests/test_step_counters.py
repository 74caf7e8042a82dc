"""Step counters: ``state["step"]`` is a 0-d fp32 tensor per parameter that counts that parameter's
steps, whatever the optimizer does to advance them cheaply (one op for all parameters)."""
import torch

from subspace_ops import GaLoreAdamW
from _numerics import roundtrip


def _params(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5, generator=g)) for _ in range(count)] + [
        torch.nn.Parameter(torch.randn(5, generator=g))]


def _step(opt, params, with_grad):
    for i, p in enumerate(params):
        p.grad = torch.ones_like(p) if i in with_grad else None
    opt.step()


def test_counts_follow_each_parameter_across_growth_and_partial_steps():
    params = _params(40)  # more parameters than the counters' first buffer holds
    opt = GaLoreAdamW([{"params": params[:40], "rank": 2}, {"params": params[40:]}], lr=1e-3)
    everyone = set(range(len(params)))
    _step(opt, params[:3], {0, 1, 2})  # only the first three exist in the state yet
    _step(opt, params, everyone)
    _step(opt, params, {0, 5, 40})
    _step(opt, params, everyone - {7})
    expected = {i: (i < 3) + 1 + (i in {0, 5, 40}) + (i != 7) for i in everyone}
    for i, p in enumerate(params):
        step = opt.state[p]["step"]
        assert step.dim() == 0 and step.dtype == torch.float32
        assert int(step.item()) == expected[i], i


def test_loaded_and_hand_set_counters_are_adopted():
    params = _params(3)
    opt = GaLoreAdamW([{"params": params[:3], "rank": 2}, {"params": params[3:]}], lr=1e-3)
    for _ in range(3):
        _step(opt, params, {0, 1, 2, 3})
    saved = roundtrip(opt)
    twin = _params(3)
    opt2 = GaLoreAdamW([{"params": twin[:3], "rank": 2}, {"params": twin[3:]}], lr=1e-3)
    opt2.load_state_dict(saved)
    opt2.state[twin[1]]["step"] = torch.tensor(10.0)  # set by hand
    _step(opt2, twin, {0, 1, 2, 3})
    assert [int(opt2.state[p]["step"]) for p in twin] == [4, 11, 4, 4]
    # The original optimizer is untouched by the copy's steps.
    assert [int(opt.state[p]["step"]) for p in params] == [3, 3, 3, 3]
